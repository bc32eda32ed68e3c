"""Bounded work per request: the hostile bodies of issue 11 and each limit's answer (limits.py)."""
from __future__ import annotations

import json
import tracemalloc

import pytest

from cds_hooks_service.limits import Limits
from cds_hooks_service.terminology import RXNORM
from tests.helpers import DHE, MIGRAINE, SIGN, assert_error, large_body, post, request_body

MIB = 1024 * 1024


def _compact_drafts_body(n: int) -> dict:
    """``n`` small DHE drafts (about 200 bytes each) and an empty record."""
    drafts = [{"resource": {"resourceType": "MedicationRequest", "id": f"d{i}", "status": "draft", "intent": "order",
                            "subject": {"reference": "Patient/p"},
                            "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "3418"}]}}}
              for i in range(n)]
    return {"hook": "order-sign", "hookInstance": "hostile-drafts", "context": {
        "userId": "Practitioner/x", "patientId": "p", "draftOrders": {"resourceType": "Bundle", "entry": drafts}},
        "prefetch": {k: None for k in ("conditions", "medicationRequests", "medicationAdministrations",
                                       "medicationStatements", "observations", "procedures")}}


def _cards(response) -> list[dict]:
    assert response.status_code == 200, response.get_data(as_text=True)[:500]
    return response.get_json()["cards"]


# -- the three hostile bodies of the issue (slow: megabytes of JSON built and posted) ---------------------
@pytest.mark.slow
@pytest.mark.parametrize("drafts,triptans", [(1000, 1000), (2000, 4000)])
def test_thousands_of_dhe_drafts_against_thousands_of_triptans_are_refused_naming_the_limit(client, drafts, triptans):
    body = large_body(drafts, triptans, triptans=triptans)
    raw = json.dumps(body)
    assert len(raw) < 5 * MIB  # fits the body size limit: it is the drafts limit that answers
    issue = assert_error(post(client, SIGN, body), 400, "context.draftOrders")
    assert "at most 100" in issue["details"]["text"] and "CDS_MAX_DRAFTS" in issue["details"]["text"]
    assert str(drafts) in issue["details"]["text"]


@pytest.mark.slow
def test_twelve_thousand_drafts_with_an_empty_record_are_refused_naming_the_limit(client):
    body = _compact_drafts_body(12_000)
    assert len(json.dumps(body)) < 5 * MIB
    issue = assert_error(post(client, SIGN, body), 400, "context.draftOrders")
    assert "12000" in issue["details"]["text"] and "at most 100" in issue["details"]["text"]


@pytest.mark.slow
def test_the_largest_accepted_order_set_against_a_large_record_gets_bounded_cards(make_app):
    """100 DHE drafts (the limit) x 2,000 triptan doses: every draft conflicts, every card lists at most 10
    doses and counts the rest, the response holds at most 20 cards + one naming the others, and the call's
    allocations stay far below the worker's memory budget (the old engine built 200,000 evidence items).
    (The evaluation deadline is raised: tracemalloc slows the call several times; the deadline has its own test.)"""
    client = make_app(limits=Limits(eval_deadline=60)).test_client()
    body = large_body(100, 2000, triptans=2000)
    tracemalloc.start()
    try:
        response = post(client, SIGN, body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    cards = _cards(response)
    assert len(response.get_data()) <= Limits().max_response_bytes
    assert peak < 300 * MIB, f"peak {peak / MIB:.0f} MiB"
    dhe_cards = [c for c in cards if c["source"]["topic"]["code"] == "dhe-triptan-ergot-24h"]
    assert len(dhe_cards) == 20 and len(cards) == 21
    # at most two critical cards per response (issue 9 §4): the others say they are critical findings
    assert [c["indicator"] for c in dhe_cards] == ["critical"] * 2 + ["warning"] * 18
    for card in dhe_cards:
        assert "more matching record entries not listed" in card["detail"]
    for card in dhe_cards[2:]:
        assert "A critical finding, shown as a warning only" in card["detail"]
    labels = [s["label"] for c in dhe_cards for s in c.get("suggestions", [])]
    assert len(labels) == len(set(labels)) and len(labels) > 20  # each draft keeps its own, named, actions
    overflow = cards[-1]
    assert overflow["indicator"] == "info" and overflow["source"]["topic"]["code"] == "cards-not-shown"
    assert overflow["summary"].startswith("80 more cards not shown")


# -- each limit ------------------------------------------------------------------------------------------
def test_drafts_up_to_the_limit_are_accepted(make_app):
    client = make_app(limits=Limits(max_drafts=3)).test_client()
    assert _cards(post(client, SIGN, request_body(drafts=[DHE] * 3, record=[MIGRAINE]))) == []
    assert_error(post(client, SIGN, request_body(drafts=[DHE] * 4, record=[MIGRAINE])), 400, "context.draftOrders")


def test_evidence_beyond_the_items_per_card_is_counted_on_the_card(make_app):
    client = make_app(limits=Limits(max_evidence_items=2)).test_client()
    record = [{"given": "37418", "text": f"sumatriptan dose {h}", "route": "SC", "at": f"-{h}h"} for h in (1, 2, 3, 4, 5)]
    (card,) = _cards(post(client, SIGN, request_body(drafts=[DHE], record=record)))
    assert "dose 1" in card["detail"] and "dose 2" in card["detail"] and "dose 3" not in card["detail"]
    assert "And 3 more matching record entries not listed" in card["detail"]


def test_cards_beyond_the_limit_are_named_in_one_info_card(make_app):
    client = make_app(limits=Limits(max_cards=2)).test_client()
    drafts = [dict(DHE, id=f"d{i}") for i in range(5)]
    record = [{"given": "37418", "text": "sumatriptan", "route": "SC", "at": "-2h"}]
    cards = _cards(post(client, SIGN, request_body(drafts=drafts, record=record)))
    assert [c["indicator"] for c in cards] == ["critical", "critical", "info"]
    assert cards[2]["summary"] == "3 more cards not shown (limit per response)"
    assert "DHE and a triptan or another ergot within 24 hours of each other (3)" in cards[2]["detail"]


def test_cards_beyond_the_response_bytes_are_named_in_one_info_card(make_app):
    client = make_app(limits=Limits(max_response_bytes=16 * 1024)).test_client()
    drafts = [dict(DHE, id=f"d{i}") for i in range(8)]
    record = [{"given": "37418", "text": "sumatriptan", "route": "SC", "at": "-2h"}]
    response = post(client, SIGN, request_body(drafts=drafts, record=record))
    cards = _cards(response)
    assert len(response.get_data()) <= 16 * 1024
    assert 1 <= len(cards) < 9 and cards[-1]["source"]["topic"]["code"] == "cards-not-shown"
    shown = sum(1 for c in cards if c["indicator"] == "critical")
    assert cards[-1]["summary"].startswith(f"{8 - shown} more card")


def test_evaluation_past_the_deadline_says_which_check_was_not_completed(make_app):
    client = make_app(limits=Limits(eval_deadline=0)).test_client()
    record = [{"given": "37418", "text": "sumatriptan", "route": "SC", "at": "-2h"}]
    cards = _cards(post(client, SIGN, request_body(drafts=[DHE], record=record)))
    # never an empty answer: one card (issue 9 §4) names each rule that triggered (the four DHE rules)
    (card,) = cards
    assert card["indicator"] == "info"
    assert card["summary"] == "Check not completed: 4 safety checks could not be run in full"
    assert "- DHE and a triptan or another ergot within 24 hours of each other" in card["detail"]
    assert card["detail"].count("\n- ") == 4
    assert "could not be checked in time" in card["detail"] and "CDS\\_EVAL\\_DEADLINE" in card["detail"]


@pytest.mark.parametrize("name,value", [("CDS_MAX_DRAFTS", "many"), ("CDS_MAX_CARDS", "0"),
                                        ("CDS_EVAL_DEADLINE", "-1")])
def test_a_bad_limit_fails_at_start_naming_the_variable(name, value):
    with pytest.raises(ValueError, match=name):
        Limits.from_env({name: value})


def test_limits_from_the_environment():
    limits = Limits.from_env({"CDS_MAX_DRAFTS": "40", "CDS_MAX_EVIDENCE_ITEMS": "5", "CDS_MAX_CARDS": "8",
                              "CDS_MAX_RESPONSE_BYTES": "200000", "CDS_EVAL_DEADLINE": "0.25"})
    assert limits == Limits(max_drafts=40, max_evidence_items=5, max_cards=8, max_response_bytes=200000,
                            eval_deadline=0.25)
    assert Limits.from_env({}) == Limits()
