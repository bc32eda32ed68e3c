"""A medication check's ``atLeast`` (on how many different days record entries must qualify), a condition check's
``verification: confirmed``, and the opioid rule's one-step escalation for an opioid overuse risk that uses
them (clinical.md §4.1: MOH diagnosis, or 3 opioid orders/doses in 30 days)."""
from __future__ import annotations

import pytest

from cds_hooks_service.engine import HookContext, draft_facts, evaluate_rule
from cds_hooks_service.facts import Normaliser
from cds_hooks_service.index import RecordIndex, RuleConcepts
from cds_hooks_service.rulebook import load_rulebook
from cds_hooks_service.scenarios import expand_draft, expand_record
from tests.helpers import NOW, edit, rule_errors

OPIOID = "opioid-in-migraine"
ORAL_OXYCODONE = {"drug": "7804", "text": "oxycodone 5 mg tablet", "route": "PO", "category": "discharge"}
IV_HYDROMORPHONE = {"drug": "897745", "text": "hydromorphone 2 MG/ML Injectable Solution", "route": "IV",
                    "category": "inpatient"}
IV_MORPHINE = {"drug": "892531", "text": "morphine 4 mg IV", "route": "IV", "category": "inpatient"}
MIGRAINE = {"condition": "G43.909"}
MOH = {"condition": "G44.41", "display": "Drug-induced headache, not elsewhere classified, intractable"}


def _dose(at: str, **extra) -> dict:
    return {"given": "7052", "text": "morphine 4 mg IV", "route": "IV", "at": at, **extra}


def _evaluate(rulebook, drafts, record, *, fields=None):
    """The opioid rule's finding for the first draft. ``fields``: {record index: fields set on the FHIR resource}."""
    keys = {"Condition": "conditions", "MedicationRequest": "medicationRequests",
            "MedicationAdministration": "medicationAdministrations"}
    resources: dict[str, list[dict]] = {}
    for i, item in enumerate(record):
        r = expand_record(dict(item), i, NOW)
        r.update((fields or {}).get(i, {}))
        resources.setdefault(keys[r["resourceType"]], []).append(r)
    normaliser = Normaliser(rulebook.terminology)
    bundle = {"resourceType": "Bundle", "entry": [{"resource": expand_draft(dict(d), i, NOW)}
                                                  for i, d in enumerate(drafts)]}
    facts, meds = draft_facts(bundle, normaliser)
    ctx = HookContext("order-sign", NOW, "p", None, None, facts, facts)
    index = RecordIndex(resources, normaliser, meds, facts, RuleConcepts.of(rulebook))
    return evaluate_rule(rulebook.get(OPIOID), facts[0], ctx, index, rulebook, trace=True)


def _caution(finding, name):
    return next((e for e in finding.cautions if e.check == name), None)


def _why(finding, name):
    return next(t["why"] for t in finding.trace if t["check"] == name)


# -- atLeast: different days ----------------------------------------------------------------------------------
def test_three_opioid_doses_in_the_window_raise_an_oral_opioid_to_warning(rulebook):
    finding = _evaluate(rulebook, [ORAL_OXYCODONE], [MIGRAINE, _dose("-2d"), _dose("-9d"), _dose("-20d")])
    assert finding.indicator == "warning"
    doses = _caution(finding, "recent-opioid-orders")
    assert doses is not None and doses.total == 3 and [i["how"] for i in doses.items] == ["given"] * 3
    assert "on 3 distinct days (UTC), at least 3 needed" in _why(finding, "recent-opioid-orders")


def test_two_doses_or_one_outside_the_window_are_not_enough(rulebook):
    two = _evaluate(rulebook, [ORAL_OXYCODONE], [MIGRAINE, _dose("-2d"), _dose("-9d")])
    assert two.indicator == "info" and _caution(two, "recent-opioid-orders") is None
    assert "on 2 distinct days (UTC), at least 3 needed" in _why(two, "recent-opioid-orders")
    old = _evaluate(rulebook, [ORAL_OXYCODONE], [MIGRAINE, _dose("-2d"), _dose("-9d"), _dose("-40d")])
    assert old.indicator == "info" and _caution(old, "recent-opioid-orders") is None


def test_the_count_is_of_days_one_visits_or_one_operations_doses_are_one_day(rulebook):
    # An order and two doses on one day (a visit, an operation) are one day, not three entries (clinical review:
    # peri-operative doses and one ED visit are no overuse); the same three on three days count 3.
    same_day = [MIGRAINE, {"ordered": "7052", "text": "morphine 4 mg IV", "route": "IV", "at": "-3d"},
                _dose("-3d"), _dose("-3d")]
    finding = _evaluate(rulebook, [ORAL_OXYCODONE], same_day)
    assert finding.indicator == "info" and _caution(finding, "recent-opioid-orders") is None
    assert "on 1 distinct days" in _why(finding, "recent-opioid-orders")
    three_days = [MIGRAINE, {"ordered": "7052", "text": "morphine 4 mg IV", "route": "IV", "at": "-3d"},
                  _dose("-2d"), _dose("-1d")]
    assert _evaluate(rulebook, [ORAL_OXYCODONE], three_days).indicator == "warning"


def test_an_active_order_written_before_the_window_does_not_count(rulebook):
    # An order's own date decides, not the end of its course: an active order written 100 days ago whose validity
    # runs on is not an opioid order "in the past 30 days" (clinical review).
    old_order = {"ordered": "7804", "text": "oxycodone 5 mg tablet", "route": "PO", "at": "-100d"}
    finding = _evaluate(rulebook, [ORAL_OXYCODONE], [MIGRAINE, old_order, _dose("-2d"), _dose("-9d")],
                        fields={1: {"dispenseRequest": {"validityPeriod": {"start": "2025-11-21T12:00:00Z",
                                                                           "end": "2026-12-31T00:00:00Z"}}}})
    assert finding.indicator == "info" and "on 2 distinct days" in _why(finding, "recent-opioid-orders")


def test_drafts_of_this_session_and_entered_in_error_doses_do_not_count(rulebook):
    others = [dict(IV_MORPHINE, text=f"morphine {n} mg IV") for n in (2, 4, 6)]
    assert _evaluate(rulebook, [ORAL_OXYCODONE, *others], [MIGRAINE]).indicator == "info"
    finding = _evaluate(rulebook, [ORAL_OXYCODONE],
                        [MIGRAINE, _dose("-2d"), _dose("-9d"), _dose("-5d", status="entered-in-error")])
    assert finding.indicator == "info"


# -- the escalation (adjust order: the steps up before "oral -> info") ----------------------------------------
def test_iv_hydromorphone_for_migraine_with_overuse_risk_is_critical_other_parenteral_opioids_stay_warning(rulebook):
    assert _evaluate(rulebook, [IV_HYDROMORPHONE], [MIGRAINE, MOH]).indicator == "critical"
    assert _evaluate(rulebook, [IV_HYDROMORPHONE], [MIGRAINE]).indicator == "warning"
    # the count alone is never critical (peri-operative doses, opioid-agonist treatment): a warning
    counted = [MIGRAINE, _dose("-2d"), _dose("-9d"), _dose("-20d")]
    assert _evaluate(rulebook, [IV_HYDROMORPHONE], counted).indicator == "warning"
    # IM hydromorphone: AHS Level A names IV hydromorphone
    im = dict(IV_HYDROMORPHONE, route="IM")
    assert _evaluate(rulebook, [im], [MIGRAINE, MOH]).indicator == "warning"
    morphine = _evaluate(rulebook, [IV_MORPHINE], [MIGRAINE, MOH])
    assert morphine.indicator == "warning" and _caution(morphine, "moh-diagnosis") is not None
    # Not migraine (the MOH diagnosis is the only headache): no AHS Level A claim, so no critical.
    assert _evaluate(rulebook, [IV_HYDROMORPHONE], [MOH]).indicator == "warning"


def test_an_unconfirmed_moh_diagnosis_raises_nothing(rulebook):
    for verification in ("unconfirmed", "provisional", "differential"):
        moh = dict(MOH, verification=verification)
        oral = _evaluate(rulebook, [ORAL_OXYCODONE], [MIGRAINE, moh])
        assert oral.indicator == "info" and _caution(oral, "moh-diagnosis") is None, verification
        assert _evaluate(rulebook, [IV_HYDROMORPHONE], [MIGRAINE, moh]).indicator == "warning", verification
    assert _evaluate(rulebook, [ORAL_OXYCODONE], [MIGRAINE, MOH]).indicator == "warning"  # confirmed


# -- the rule language: atLeast is a whole number >= 1, written or from a policy ------------------------------
ORIGINAL = "      atLeast: {policy: opioid-overuse-count}"




@pytest.mark.parametrize("written, says", [
    ("atLeast: 0", "found 0 (a number); allowed: a whole number of at least 1"),
    ("atLeast: 2.5", "found 2.5 (a number); allowed: a whole number of at least 1"),
    ("atLeast: three", "allowed: a whole number of at least 1"),
    ("atLeast: {policy: opioid-overuse-window}", "policy 'opioid-overuse-window' is a time window (30 days); "
                                                "allowed here: a number"),
    ("atLeast: {policy: opioid-overuse-counts}", "found the policy name 'opioid-overuse-counts'"),
])
def test_at_least_must_be_a_whole_number_of_at_least_one(rules_copy, written, says):
    rule = rules_copy / f"{OPIOID}.yaml"
    line = rule.read_text().splitlines().index(ORIGINAL) + 1
    edit(rule, ORIGINAL, "      " + written)
    errors = rule_errors(rules_copy)
    assert any(says in e and f"{OPIOID}.yaml:{line}:" in e for e in errors), errors  # the line of atLeast


def test_at_least_from_a_policy_that_is_not_a_whole_number_is_refused(rules_copy):
    edit(rules_copy / f"{OPIOID}.yaml", "    value: 3\n    unit: different days", "    value: 2.5\n    unit: different days")
    errors = rule_errors(rules_copy)
    assert any("policy 'opioid-overuse-count' is 2.5; allowed here: a whole number of at least 1" in e
               for e in errors), errors


def test_a_written_at_least_and_the_policy_number_both_decide(rules_copy):
    edit(rules_copy / f"{OPIOID}.yaml", ORIGINAL, "      atLeast: 2")
    written = load_rulebook(rules_copy, rules_copy.parent / "cards")
    assert written.get(OPIOID).checks["recent-opioid-orders"].spec["atLeast"] == 2
    assert _evaluate(written, [ORAL_OXYCODONE], [MIGRAINE, _dose("-2d"), _dose("-9d")]).indicator == "warning"
    edit(rules_copy / f"{OPIOID}.yaml", "      atLeast: 2", ORIGINAL)
    edit(rules_copy / f"{OPIOID}.yaml", "    value: 3\n    unit: different days", "    value: 4\n    unit: different days")
    four = load_rulebook(rules_copy, rules_copy.parent / "cards")
    assert four.get(OPIOID).checks["recent-opioid-orders"].spec["atLeast"] == 4
    three = [MIGRAINE, _dose("-2d"), _dose("-9d"), _dose("-20d")]
    assert _evaluate(four, [ORAL_OXYCODONE], three).indicator == "info"


def test_verification_accepts_only_any_or_confirmed(rules_copy):
    edit(rules_copy / f"{OPIOID}.yaml", "status: active, verification: confirmed}", "status: active, verification: yes}")
    errors = rule_errors(rules_copy)
    assert any("moh-diagnosis" in e and "verification" in e for e in errors), errors


# -- the overuse count's data only raises the card's level: unreadable, the card still fires and says so -----------
def _without_medication_orders(body: dict) -> dict:
    for key in ("medicationRequests", "medicationAdministrations"):
        body["prefetch"].pop(key, None)
    return body


def test_opioid_card_fires_at_its_own_level_when_the_opioid_orders_cannot_be_read(shared_app):
    """No prefetch of the orders and administrations and no fhirServer: the count cannot run, but whether the rule
    fires rests on the conditions alone. The card is answered (not a 412), at its own level, naming what was not
    checked."""
    from tests.helpers import SIGN, post, request_body

    body = _without_medication_orders(request_body(drafts=(ORAL_OXYCODONE,), record=(MIGRAINE, MOH)))
    r = post(shared_app().test_client(), SIGN, body)
    assert r.status_code == 200, r.get_data(as_text=True)
    [card] = [c for c in r.get_json()["cards"] if c["source"]["topic"]["code"] == OPIOID]
    assert card["indicator"] == "warning"  # the confirmed MOH diagnosis (a condition) still raises the oral card
    assert "Not checked, could not be read" in card["detail"] and "medication" in card["detail"].lower()
    assert "(so not checked: Opioid orders or doses on 3 or more days in the past 30 days)._" in card["detail"]


def test_no_check_not_completed_card_when_only_the_overuse_count_could_not_run(shared_app):
    """An opioid order without any headache context: the rule cannot fire whatever the orders say, so the orders
    being unreadable is no "check not completed"."""
    from tests.helpers import SIGN, post, request_body

    body = _without_medication_orders(request_body(drafts=(ORAL_OXYCODONE,), record=()))
    r = post(shared_app().test_client(), SIGN, body)
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.get_json()["cards"] == []


def test_data_an_adjust_lowering_the_level_reads_is_required(rules_copy):
    """An adjust that lowers the card's level acts on "nothing found" when its data cannot be read: its data is
    required (412 / "Check not completed"), not merely noted on the card; one that raises it stays optional."""
    rule = rules_copy / f"{OPIOID}.yaml"
    assert load_rulebook(rules_copy, rules_copy.parent / "cards").get(OPIOID).needs == {"conditions"}
    edit(rule, "  - when: [oral-route]\n    indicator: info",
         "  - when: [oral-route]\n    indicator: info\n  - when: [recent-opioid-orders]\n    indicator: info")
    lowered = load_rulebook(rules_copy, rules_copy.parent / "cards").get(OPIOID)
    assert {"medicationRequests", "medicationAdministrations"} <= lowered.needs
    assert not lowered.card_needs & {"medicationRequests", "medicationAdministrations"}
