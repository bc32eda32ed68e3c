"""One clear card per problem (issue 9 §4), through the HTTP API with the real SQLite store.

Each rule's finding keeps its own card (own uuid): the store records one issued card per rule, and feedback
on any card is attributed to its rule. The order's lead card holds the actions; no suggestion label and no
set of actions appears on two cards; at most two critical cards; a conflict between two drafted orders is
one card; card times are in CDS_DISPLAY_TIMEZONE with the zone named.
"""
from __future__ import annotations

import pytest
from sqlalchemy import select

from cds_hooks_service.config import Settings
from cds_hooks_service.store import FeedbackStore, feedback, issued_card
from tests.cds_checks import check_response
from tests.helpers import DHE, SELECT, SIGN, SUMATRIPTAN_GIVEN, post, request_body

THREE_PROBLEMS = [dict(SUMATRIPTAN_GIVEN, at="-3h"),
                  {"ordered": "21212", "text": "clarithromycin 500 mg PO BID"},
                  {"condition": "I25.10", "display": "Atherosclerotic heart disease"}]
DHE_RULES = {"dhe-contraindicated-condition", "dhe-cyp3a4-inhibitor", "dhe-triptan-ergot-24h"}


def _cards(response) -> list[dict]:
    assert response.status_code == 200, response.get_data(as_text=True)[:500]
    body = response.get_json()
    check_response(body)  # spec-exact (at-most-one: at most one recommended suggestion per card, ...)
    return body["cards"]


def _signature(suggestion: dict) -> tuple:
    return tuple(sorted((a["type"], a.get("resourceId") or str(a.get("resource", {}).get("medicationCodeableConcept")))
                        for a in suggestion["actions"]))


@pytest.mark.parametrize("url,hook", [(SIGN, "order-sign"), (SELECT, "order-select")])
def test_one_order_with_three_problems(make_app, tmp_path, url, hook):
    db = f"sqlite:///{tmp_path / 'cards.sqlite3'}"
    client = make_app(database_url=db).test_client()
    cards = _cards(post(client, url, request_body(hook=hook, drafts=[DHE], record=THREE_PROBLEMS)))
    assert {c["source"]["topic"]["code"] for c in cards} == DHE_RULES and len(cards) == 3
    assert [c["indicator"] for c in cards] == ["critical", "critical", "warning"]
    lead = cards[0]
    assert "Also for this order" in lead["detail"]
    assert any(s.get("isRecommended") for s in lead["suggestions"])
    labels = [s["label"] for c in cards for s in c.get("suggestions", [])]
    signatures = [_signature(s) for c in cards for s in c.get("suggestions", [])]
    assert len(labels) == len(set(labels)) and len(signatures) == len(set(signatures))
    assert not any(s["actions"] == [] for c in cards for s in c.get("suggestions", []))
    for card in cards[1:]:
        assert "The actions for this order are on the card" in card["detail"]
        assert card["overrideReasons"]  # each problem can still be overridden with its own reasons
    assert "A critical finding, shown as a warning only" in cards[2]["detail"]

    # every rule is still counted: one issued card per rule, and feedback on a companion card is its rule's
    overridden = cards[1]
    item = {"card": overridden["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-03-01T12:00:00Z",
            "overrideReason": {"reason": {"system": overridden["overrideReasons"][0]["system"],
                                          "code": overridden["overrideReasons"][0]["code"]}}}
    assert client.post(url + "/feedback", json={"feedback": [item]}).status_code == 200
    store = FeedbackStore(db)
    try:
        with store.engine.connect() as conn:
            issued = dict(conn.execute(select(issued_card.c.card_uuid, issued_card.c.rule_id)).all())
            attributed = conn.execute(select(feedback.c.rule_id)).scalars().all()
    finally:
        store.close()
    assert issued == {c["uuid"]: c["source"]["topic"]["code"] for c in cards}
    assert attributed == [overridden["source"]["topic"]["code"]]


def test_dhe_and_sumatriptan_drafted_together_is_one_card(make_app, tmp_path):
    db = f"sqlite:///{tmp_path / 'cards.sqlite3'}"
    client = make_app(database_url=db).test_client()
    sumatriptan = {"drug": "37418", "text": "sumatriptan 6 mg SC", "route": "SC"}
    (card,) = _cards(post(client, SIGN, request_body(drafts=[DHE, sumatriptan], record=[])))
    assert card["indicator"] == "critical"
    removes = {a["resourceId"] for s in card["suggestions"] for a in s["actions"] if a["type"] == "delete"
               and len(s["actions"]) == 1}
    assert removes == {"MedicationRequest/draft-1", "MedicationRequest/draft-2"}  # keep either one
    assert sum(bool(s.get("isRecommended")) for s in card["suggestions"]) == 1
    store = FeedbackStore(db)
    try:
        with store.engine.connect() as conn:
            assert conn.execute(select(issued_card.c.card_uuid)).scalars().all() == [card["uuid"]]
    finally:
        store.close()


def test_times_in_the_display_zone_with_the_zone_named(make_app, monkeypatch):
    client = make_app().test_client()
    record = [dict(SUMATRIPTAN_GIVEN, at="-3h")]
    (card,) = _cards(post(client, SIGN, request_body(drafts=[DHE], record=record)))
    assert "given 3 h ago (2026-03-01 09:00 UTC)" in card["detail"]
    assert "DHE allowed again in 21 h** (from 2026-03-02 09:00 UTC)" in card["detail"]
    monkeypatch.setenv("CDS_DISPLAY_TIMEZONE", "America/New_York")
    (card,) = _cards(post(client, SIGN, request_body(drafts=[DHE], record=record)))
    assert "given 3 h ago (2026-03-01 04:00 EST)" in card["detail"]
    assert "(from 2026-03-02 04:00 EST)" in card["detail"]
    assert len(card["detail"]) <= 1200


def test_an_unknown_display_zone_stops_the_service_at_start(monkeypatch):
    monkeypatch.setenv("CDS_DISPLAY_TIMEZONE", "Mars/Olympus_Mons")
    with pytest.raises(ValueError, match="CDS_DISPLAY_TIMEZONE"):
        Settings.from_env()


@pytest.mark.parametrize("url,hook", [(SIGN, "order-sign"), (SELECT, "order-select")])
def test_an_alternative_is_offered_to_create_on_one_card_of_a_response_only(make_app, url, hook):
    # DHE (contraindicated: eGFR 22) and IV hydromorphone drafted together for migraine: both rules would replace
    # their order with prochlorperazine; accepting both would order it twice. The later card offers to remove its
    # own order and names the card that offers the alternative.
    client = make_app().test_client()
    drafts = [DHE, {"drug": "892531", "text": "hydromorphone 1 mg IV", "route": "IV"}]
    record = [{"condition": "G43.909"}, {"observation": "62238-1", "value": 22, "unit": "mL/min/{1.73_m2}", "at": "-1d"}]
    body = request_body(hook=hook, drafts=drafts, record=record,
                        selections=["MedicationRequest/draft-1", "MedicationRequest/draft-2"])
    cards = _cards(post(client, url, body))
    created = [str(a["resource"]["medicationCodeableConcept"]) for c in cards for s in c.get("suggestions", [])
               for a in s["actions"] if a["type"] == "create"]
    assert created and len(created) == len(set(created))  # no medication is offered on two cards
    dhe_card = next(c for c in cards if c["source"]["topic"]["code"] == "dhe-contraindicated-condition")
    opioid = next(c for c in cards if c["source"]["topic"]["code"] == "opioid-in-migraine")
    assert any("prochlorperazine" in s["label"] for s in dhe_card["suggestions"])
    remove = [s for s in opioid["suggestions"] if s["label"].startswith("Remove hydromorphone 1 mg IV")]
    assert len(remove) == 1 and "the alternative is offered on the card" in remove[0]["label"]
    assert [a["type"] for a in remove[0]["actions"]] == ["delete"] and "isRecommended" not in remove[0]
