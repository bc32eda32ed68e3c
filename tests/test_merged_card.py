"""A card that stands for more than one finding (issue 9 §4): one conflict between two drafted orders.

DHE and sumatriptan drafted together: the rule dhe-triptan-ergot-24h finds the conflict for each order, and
the response holds one card (the first order's; the other finding is MERGED into it). Then:

* `explain` says so ("merged into the card of <rule> for <order>"), not FIRED;
* feedback on that card counts once for its rule (one card shown), and an override of the conflict, made at
  order-select on either order's card, holds at order-sign for the conflict, whichever order leads there;
* an override of the conflict seen from one side does not hide a card that shows more than the conflict
  (a sumatriptan dose in the record the clinician was never shown).

SQLite file and PostgreSQL, through the HTTP API.
"""
from __future__ import annotations

import json
import logging

import pytest

from cds_hooks_service.cli import main
from cds_hooks_service.store import FeedbackStore
from tests.helpers import DHE, SCENARIO_NOW, SELECT, SIGN, SUMATRIPTAN_GIVEN, post, request_body

RULE = "dhe-triptan-ergot-24h"
SUMATRIPTAN = {"drug": "37418", "text": "sumatriptan 6 mg SC", "route": "SC"}
DHE_REF, SUMATRIPTAN_REF = "MedicationRequest/draft-1", "MedicationRequest/draft-2"


def _cards(response) -> list[dict]:
    assert response.status_code == 200, response.get_data(as_text=True)[:500]
    return response.get_json()["cards"]


def _override(client, url: str, card: dict):
    item = {"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": SCENARIO_NOW,
            "overrideReason": {"reason": {"system": card["overrideReasons"][0]["system"],
                                          "code": card["overrideReasons"][0]["code"]}}}
    response = client.post(url + "/feedback", json={"feedback": [item]})
    assert response.status_code == 200, response.get_data(as_text=True)


def _stats(url: str) -> dict:
    store = FeedbackStore(url)
    try:
        return {r["rule_id"]: r for r in store.stats()}
    finally:
        store.close()


@pytest.mark.parametrize("selected", [SUMATRIPTAN_REF, DHE_REF])
def test_an_override_of_the_conflict_at_order_select_holds_at_order_sign(make_app, store_url, selected):
    """Overriding the conflict card at order-select (on the triptan's side or the DHE's) means the conflict is
    not raised again at order-sign, where the DHE order leads. Before, an override on the triptan's side was
    stored for that order only, and the order-sign card (the DHE's) came back."""
    client = make_app(database_url=store_url).test_client()
    drafts = [DHE, SUMATRIPTAN]
    (card,) = _cards(post(client, SELECT, request_body(hook="order-select", drafts=drafts, record=[],
                                                       selections=[selected])))
    assert card["source"]["topic"]["code"] == RULE
    _override(client, SELECT, card)

    cards = _cards(post(client, SIGN, request_body(drafts=drafts, record=[])))
    assert [c for c in cards if c["source"]["topic"]["code"] == RULE] == []
    stats = _stats(store_url)[RULE]
    assert (stats["issued"], stats["overridden"]) == (1, 1)  # the one card shown, its one override


def test_an_override_at_order_sign_of_the_merged_card_counts_once(make_app, store_url):
    client = make_app(database_url=store_url).test_client()
    (card,) = _cards(post(client, SIGN, request_body(drafts=[DHE, SUMATRIPTAN], record=[])))
    _override(client, SIGN, card)
    stats = _stats(store_url)[RULE]
    assert (stats["issued"], stats["overridden"], stats["accepted"]) == (1, 1, 0)


def test_a_card_showing_more_than_the_overridden_conflict_is_shown_again(make_app, store_url):
    """At order-select only the sumatriptan order was checked: its card named the drafted DHE. At order-sign the
    DHE order's card also shows a sumatriptan dose given 3 h ago, which no card has shown: it is raised."""
    client = make_app(database_url=store_url).test_client()
    drafts, record = [DHE, SUMATRIPTAN], [dict(SUMATRIPTAN_GIVEN, at="-3h")]
    (card,) = _cards(post(client, SELECT, request_body(hook="order-select", drafts=drafts, record=record,
                                                       selections=[SUMATRIPTAN_REF])))
    _override(client, SELECT, card)
    cards = [c for c in _cards(post(client, SIGN, request_body(drafts=drafts, record=record)))
             if c["source"]["topic"]["code"] == RULE]
    assert len(cards) == 1 and "given 3 h ago" in cards[0]["detail"]


def test_explain_says_a_merged_finding_is_on_the_other_orders_card(tmp_path, capsys):
    """Before, explain printed the merged finding as "FIRED [critical]", as if it had its own card."""
    path = tmp_path / "request.json"
    path.write_text(json.dumps(request_body(drafts=[DHE, SUMATRIPTAN], record=[])))
    assert main(["explain", str(path), "--now", SCENARIO_NOW, "--json"]) == 0
    rows = {(r["rule"], r["draft"]): r["outcome"] for r in json.loads(capsys.readouterr().out)["rules"]}
    assert rows[(RULE, DHE_REF)] == "FIRED [critical]"
    assert rows[(RULE, SUMATRIPTAN_REF)] == (f"merged into the card of {RULE} for {DHE_REF} (one card for a "
                                            "conflict between two drafted orders) [critical]")
    assert main(["explain", str(path), "--now", SCENARIO_NOW]) == 0
    text = capsys.readouterr().out
    assert f"{RULE} on {SUMATRIPTAN_REF}: merged into the card of {RULE} for {DHE_REF}" in text
    assert text.count("FIRED") == 1


THREE_PROBLEMS = [dict(SUMATRIPTAN_GIVEN, at="-3h"),
                  {"ordered": "21212", "text": "clarithromycin 500 mg PO BID"},
                  {"condition": "I25.10", "display": "Atherosclerotic heart disease"}]


def test_the_lead_card_holding_the_orders_actions_is_attributed_to_its_own_rule(make_app, store_url):
    """The lead card of an order carries the actions of the order's other cards too, but it stands for its own
    rule's finding only: accepting its "cancel" is that rule's acceptance, and an override of it at
    order-select silences that rule at order-sign, not the order's other problems (each keeps its own card,
    uuid and override)."""
    client = make_app(database_url=store_url).test_client()
    cards = _cards(post(client, SELECT, request_body(hook="order-select", drafts=[DHE], record=THREE_PROBLEMS)))
    lead, others = cards[0], cards[1:]
    assert len(others) == 2 and all("suggestions" not in c for c in others)
    _override(client, SELECT, lead)
    after = _cards(post(client, SIGN, request_body(drafts=[DHE], record=THREE_PROBLEMS)))
    rules = {c["source"]["topic"]["code"] for c in after}
    assert lead["source"]["topic"]["code"] not in rules
    assert rules == {c["source"]["topic"]["code"] for c in others}

    new_lead = after[0]
    cancel = next(s for s in new_lead["suggestions"] if s.get("isRecommended"))
    item = {"card": new_lead["uuid"], "outcome": "accepted", "outcomeTimestamp": SCENARIO_NOW,
            "acceptedSuggestions": [{"id": cancel["uuid"]}]}
    assert client.post(SIGN + "/feedback", json={"feedback": [item]}).status_code == 200
    stats = _stats(store_url)
    assert stats[new_lead["source"]["topic"]["code"]]["accepted"] == 1
    assert sum(r["accepted"] for r in stats.values()) == 1
    assert stats[lead["source"]["topic"]["code"]]["overridden"] == 1


def test_explain_of_a_live_call_names_the_overridden_card_a_merged_finding_shared(make_app, tmp_path, caplog):
    """With CDS_DEBUG_TRACE: at order-sign after the DHE order's conflict card was overridden at order-select,
    both findings of the conflict are suppressed, the merged one naming the card that stood for it."""
    caplog.set_level(logging.INFO)
    client = make_app(database_url=f"sqlite:///{tmp_path / 'trace.sqlite3'}", debug_trace=True).test_client()
    drafts = [DHE, SUMATRIPTAN]
    (card,) = _cards(post(client, SELECT, request_body(hook="order-select", drafts=drafts, record=[],
                                                       selections=[DHE_REF])))
    _override(client, SELECT, card)
    caplog.clear()
    assert _cards(post(client, SIGN, request_body(drafts=drafts, record=[]))) == []
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("explain ")]
    rows = {(r["rule"], r["draft"]): r["outcome"] for r in json.loads(line[len("explain "):])["rules"]}
    assert rows[(RULE, DHE_REF)] == "suppressed: overridden for this draft order at order-select"
    assert rows[(RULE, SUMATRIPTAN_REF)] == (f"suppressed: the card of {RULE} for {DHE_REF}, which stands for this "
                                            "conflict, was overridden at order-select")
