"""The rule language for issue 9 §3 points 2-4: a `drafted: {category: [...]}` test (where the drafted order is
to be taken: inpatient, outpatient, community, discharge, or none stated), and override reasons shown only on
a card they fit (`only_if` / `unless` on each `overrideReasons` entry, like suggestions)."""
from __future__ import annotations

import pytest
import yaml

from cds_hooks_service.facts import category_matches, order_categories
from cds_hooks_service.engine import reason_offered
from cds_hooks_service.rulebook import load_rulebook
from tests.helpers import edit, rule_errors

R4 = "http://terminology.hl7.org/CodeSystem/medicationrequest-category"




# --- the category of a drafted order ------------------------------------------------------------------

@pytest.mark.parametrize("category, expected", [
    ([{"coding": [{"system": R4, "code": "discharge"}]}], {"discharge"}),
    ({"coding": [{"system": R4, "code": "inpatient"}]}, {"inpatient"}),  # the Sandbox sends one object
    ([{"coding": [{"code": "outpatient"}]}], {"outpatient"}),  # no system: the code still counts
    ([{"coding": [{"system": "http://hl7.org/fhir/medication-request-category", "code": "community"}]}], {"community"}),
    ([{"coding": [{"system": "http://example.org/local", "code": "discharge"}]}], set()),  # another code system
    ([{"coding": [{"system": R4, "code": "something-else"}]}], set()),
    ([{"text": "discharge"}], set()),  # text alone is not a category code
    (None, set()),
    ("discharge", set()),  # wrong type: absent, never an error
])
def test_order_categories_read_leniently(category, expected):
    resource = {"resourceType": "MedicationRequest"}
    if category is not None:
        resource["category"] = category
    assert order_categories(resource) == frozenset(expected)


def test_category_filter_and_unknown():
    assert category_matches(frozenset({"discharge"}), ["outpatient", "discharge"])
    assert not category_matches(frozenset({"inpatient"}), ["outpatient", "discharge"])
    assert category_matches(frozenset(), ["unknown"])  # no category stated
    assert not category_matches(frozenset({"inpatient"}), ["unknown"])
    assert not category_matches(frozenset(), ["inpatient"])


def test_category_values_are_checked_by_the_schema(rules_copy):
    edit(rules_copy / "opioid-in-migraine.yaml", "drafted: {category: [inpatient]}", "drafted: {category: [emergency]}")
    (error,) = rule_errors(rules_copy)
    assert "checks.hospital-order.drafted.category[0]: found 'emergency'; allowed: 'inpatient', 'outpatient', " \
           "'community', 'discharge', 'unknown'" in error


def _card(rulebook, settings, rule_id: str, drafts: list, record: list, hook: str = "order-sign") -> dict:
    from cds_hooks_service.hook_call import call_service
    from cds_hooks_service.scenarios import Scenario, expand_draft, expand_record
    from cds_hooks_service.services import SERVICE_FOR_HOOK

    now = settings.fixed_now
    sc = Scenario(rule_id, "x", "fire", None, None, now, [expand_draft(d, i, now) for i, d in enumerate(drafts)],
                  [expand_record(r, i, now) for i, r in enumerate(record)], None, None)
    result = call_service(SERVICE_FOR_HOOK[hook], sc.request(hook), rulebook=rulebook, store=None, settings=settings)
    return next(c for c in result.response["cards"] if c["source"]["topic"]["code"] == rule_id)


@pytest.mark.parametrize("category, iv_offered", [("inpatient", True), ("discharge", False), ("outpatient", False),
                                                  ("community", False), (None, False)])
def test_oral_opioid_gets_iv_replacements_only_in_hospital(rulebook, make_settings, category, iv_offered):
    draft = {"drug": "7804", "text": "oxycodone 5 mg tablet", "route": "PO", "reason": "G43.909"}
    if category:
        draft["category"] = category
    card = _card(rulebook, make_settings(), "opioid-in-migraine", [draft], [])
    labels = [s["label"] for s in card.get("suggestions", [])]
    assert any("IV" in label for label in labels) is iv_offered, labels
    assert ("lasmiditan" in card["detail"]) is not iv_offered  # the CDC 2022 migraine sentence for home use
    assert card["indicator"] == "info"  # oral: info whatever the setting (clinical.md §4.1)


def test_a_draft_with_a_category_shows_it_on_the_card(rulebook, make_settings):
    card = _card(rulebook, make_settings(), "opioid-in-migraine",
                 [{"drug": "7804", "text": "oxycodone 5 mg tablet", "route": "PO", "category": "discharge"}],
                 [{"condition": "G43.909"}])
    assert "(oral; discharge)" in card["detail"]


# --- override reasons that fit the finding ----------------------------------------------------------------

def test_reason_offered_combines_only_if_and_unless():
    reason = {"code": "x", "display": "X", "only_if": ("a",), "unless": ("u",)}
    assert reason_offered(reason, {"a"}.__contains__)
    assert not reason_offered(reason, set().__contains__)
    assert not reason_offered(reason, {"a", "u"}.__contains__)
    assert reason_offered({"code": "y", "display": "Y"}, set().__contains__)  # no conditions: always shown


def test_override_reason_naming_an_unknown_check(rules_copy):
    edit(rules_copy / "dhe-contraindicated-condition.yaml", "only_if: [bp-finding]", "only_if: [bp-findings]")
    (error,) = rule_errors(rules_copy)
    assert "overrideReasons[0].only_if[0]: unknown check 'bp-findings' (did you mean 'bp-finding'?)" in error


def test_override_reason_codes_are_unique_and_conditions_consistent(rules_copy):
    edit(rules_copy / "dhe-contraindicated-condition.yaml", "{code: pregnancy-excluded,", "{code: bp-rechecked-controlled,")
    edit(rules_copy / "dhe-cyp3a4-inhibitor.yaml", "only_if: [drafted-inhibitor]}",
         "only_if: [drafted-inhibitor], unless: [drafted-inhibitor]}")
    found = rule_errors(rules_copy)
    assert any("found 'bp-rechecked-controlled' a second time" in e for e in found), found
    assert any("check 'drafted-inhibitor' is in both only_if and unless: the reason could never be shown" in e
               for e in found), found


def test_override_reason_display_shows_the_policy_number(rules_copy):
    edit(rules_copy / "dhe-cyp3a4-inhibitor.yaml", "value: 14", "value: 21")
    rulebook = load_rulebook(rules_copy, rules_copy.parent / "cards")
    displays = [r["display"] for r in rulebook.get("dhe-cyp3a4-inhibitor").override_reasons]
    assert "CYP3A4 inhibitor discontinued more than 21 days ago" in displays


@pytest.mark.parametrize("record, shown, not_shown", [
    ([{"condition": "Z34.90"}], "Pregnancy excluded or ended", "BP re-checked and controlled"),
    ([{"bp": [186, 104], "at": "-1h"}], "BP re-checked and controlled", "Pregnancy excluded or ended"),
])
def test_contraindication_card_shows_only_the_reasons_that_fit(rulebook, make_settings, record, shown, not_shown):
    card = _card(rulebook, make_settings(), "dhe-contraindicated-condition",
                 [{"drug": "3418", "text": "dihydroergotamine 1 mg IV", "route": "IV"}], record)
    displays = [r["display"] for r in card["overrideReasons"]]
    assert shown in displays and not_shown not in displays


def test_feedback_with_a_reason_of_the_rule_is_still_accepted(rulebook):
    """Feedback accepts any override reason code of the card's rule (the card shows a subset of them)."""
    from cds_hooks_service.api import checked_feedback
    from cds_hooks_service.cards import OVERRIDE_REASON_SYSTEM

    item = {"card": "c1", "outcome": "overridden", "outcomeTimestamp": "2026-03-01T12:00:00Z",
            "overrideReason": {"reason": {"system": OVERRIDE_REASON_SYSTEM, "code": "pregnancy-excluded"}}}
    stored, problems = checked_feedback([item], {"c1": "dhe-contraindicated-condition"}, rulebook)
    assert not problems and stored[0]["overrideReason"]["reason"]["display"] == "Pregnancy excluded or ended"


def test_the_scenario_assertions_read_override_reasons(tmp_path):
    from cds_hooks_service.scenarios import card_problems, load_scenarios

    card = {"summary": "s", "detail": "d", "indicator": "info",
            "overrideReasons": [{"system": "x", "code": "a", "display": "BP re-checked and controlled"}]}
    assert card_problems(card, {"override_reasons": ["BP re-checked"]}) == []
    assert card_problems(card, {"not_override_reasons": ["bp re-checked"]}) == [
        "offers the override reason 'BP re-checked and controlled'"]
    assert card_problems(card, {"override_reasons": ["Pregnancy"]}) == [
        "does not offer the override reason 'Pregnancy' (reasons: BP re-checked and controlled)"]
    scen = tmp_path / "s.tests.yaml"
    scen.write_text(yaml.safe_dump({"scenarios": [{"name": "x", "expect": "fire", "drafts": [
        {"drug": "7804", "route": "PO", "category": "discharge"}], "card": {"override_reasons": ["a"]}}]}))
    (sc,) = load_scenarios(scen, "opioid-in-migraine")
    assert sc.drafts[0]["category"] == [{"coding": [{"system": R4, "code": "discharge"}]}]
