"""The rule language and its validation: shared definitions, policies, only_if, cross-checks between rules,
cards, value sets, alternatives and scenario files, and the FHIR check of every resource a card can create."""
from __future__ import annotations

import shutil

import pytest
import yaml

from cds_hooks_service.rulebook import Located, RulebookError, Suggestion, load_rulebook
from tests.helpers import REPO
from tests.helpers import edit


def problems(rules_dir, **kw) -> list[str]:
    with pytest.raises(RulebookError) as exc:
        load_rulebook(rules_dir, rules_dir.parent / "cards", scenarios=True, **kw)
    return [str(p) for p in exc.value.problems if p.severity == "error"]


def only(rules_dir, **kw) -> str:
    errors = problems(rules_dir, **kw)
    assert len(errors) == 1, errors
    return errors[0]


# --- where a field is ---------------------------------------------------------------------------------

def test_located_gives_line_and_column_of_nested_values_and_keys():
    text = "a:\n  b:\n    - {c: 1, d: [x, y]}\n    - e: 14days\n"
    loc = Located.parse("f.yaml", text)
    assert loc.at(("a", "b", 0, "d", 1)) == (3, 21)
    assert loc.at(("a", "b", 1, "e")) == (4, 10)
    assert loc.at(("a", "b", 1, "e"), key=True) == (4, 7)
    assert loc.at(("a", "b", 1, "missing")) == (4, 7)  # nearest parent that exists
    assert loc.text(("a", "b", 0, "c")) == "1"


# --- cross-checks ---------------------------------------------------------------------------------------

def test_card_referring_to_a_check_the_rule_lacks(rules_copy):
    edit(rules_copy.parent / "cards/dhe-vasopressor.yaml", "{% if checks['drafted-pressor'] %}",
         "{% if checks['drafted-presser'] %}")
    error = only(rules_copy)
    assert "cards/dhe-vasopressor.yaml:" in error
    assert "refers to checks['drafted-presser'], but rule 'dhe-vasopressor' has no check 'drafted-presser' " \
           "(did you mean 'drafted-pressor'?)" in error


def test_card_reference_line_is_the_template_line(rules_copy):
    card = rules_copy.parent / "cards/dhe-cyp3a4-inhibitor.yaml"
    edit(card, "{% set strong = checks['strong-inhibitor-on-board']", "{% set strong = checks['strong-inhibitor']")
    line = next(i for i, text in enumerate(card.read_text().splitlines(), 1) if "checks['strong-inhibitor']" in text)
    assert f"dhe-cyp3a4-inhibitor.yaml:{line}: detail: refers to checks['strong-inhibitor']" in only(rules_copy)


def test_card_referring_to_a_check_never_passed_to_it(rules_copy):
    # `pregnancy` is a check of the rule, but only used by suggestions: the card never sees it.
    edit(rules_copy.parent / "cards/opioid-in-migraine.yaml", "  - Order: {{ draft.display }}",
         "  {% for name in ['headache-diagnosis', 'pregnancy'] if checks[name] %}x{% endfor %}\n"
         "  - Order: {{ draft.display }}")
    error = only(rules_copy)
    assert "refers to checks['pregnancy'], which rule 'opioid-in-migraine' never passes to the card" in error


def test_suggestion_label_must_name_the_drug_it_orders(rules_copy):
    edit(rules_copy / "opioid-in-migraine.yaml", "actions: [{delete: draft}, {create: metoclopramide-iv}]",
         "actions: [{delete: draft}, {create: ketorolac-iv}]")
    error = only(rules_copy)
    assert "opioid-in-migraine.yaml:" in error and "suggestions[1].label" in error
    assert "does not name 'ketorolac', the drug its create action 'ketorolac-iv' orders" in error


def test_unknown_alternative_and_unused_alternative(rules_copy):
    edit(rules_copy / "opioid-in-migraine.yaml", "{create: dexamethasone-iv}", "{create: dexamethasone}")
    assert "unknown alternative 'dexamethasone' (did you mean 'dexamethasone-iv'?)" in only(rules_copy)


def test_unused_value_set_policy_and_check_are_warnings(rules_copy):
    shutil.copy(rules_copy / "valuesets/cond-raynaud.json", rules_copy / "valuesets/cond-unused.json")
    text = (rules_copy / "valuesets/cond-unused.json").read_text().replace('"id": "cond-raynaud"', '"id": "cond-unused"')
    (rules_copy / "valuesets/cond-unused.json").write_text(text)
    edit(rules_copy / "shared.yaml", "\nchecks:\n", "  unused-number:\n    value: 5\n    unit: mg\n    meaning: nothing at all\n"
         "    basis: a test\n    signOff: {status: pending}\n\nchecks:\n")
    edit(rules_copy / "opioid-in-migraine.yaml", "  oral-route:\n",
         "  left-over:\n    label: Left over\n    condition: {valueSets: [cond-raynaud], status: any}\n  oral-route:\n")
    rb = load_rulebook(rules_copy, rules_copy.parent / "cards")  # warnings do not stop loading
    warnings = [str(w) for w in rb.warnings]
    assert any("cond-unused.json" in w and "value set 'cond-unused' is not used by any rule" in w for w in warnings)
    assert any("shared.yaml:" in w and "policy 'unused-number' is not used by any rule" in w for w in warnings)
    assert any("opioid-in-migraine.yaml:" in w and "check 'left-over' is not used" in w for w in warnings)
    assert not any("cond-raynaud" in w for w in warnings)


def test_scenario_file_for_an_unknown_rule(rules_copy):
    shutil.copy(rules_copy / "opioid-in-migraine.tests.yaml", rules_copy / "opioid-in-migrane.tests.yaml")
    error = only(rules_copy)
    assert "opioid-in-migrane.tests.yaml: (file): scenarios for an unknown rule 'opioid-in-migrane' " \
           "(did you mean opioid-in-migraine.tests.yaml?)" in error


def test_broken_scenario_file_is_reported_by_validate(rules_copy):
    edit(rules_copy / "opioid-in-migraine.tests.yaml", "expect: no-fire", "expect: maybe")
    assert "opioid-in-migraine.tests.yaml: scenarios: scenario" in only(rules_copy)


def test_scenarios_of_a_broken_rule_are_not_called_orphans(rules_copy):
    edit(rules_copy / "opioid-in-migraine.yaml", "mode: active", "mode: loud")
    errors = problems(rules_copy)
    assert len(errors) == 1 and "mode: found 'loud'" in errors[0]


# --- FHIR check of what a card can create ----------------------------------------------------------------

def test_alternatives_build_valid_fhir_medication_requests(rulebook):
    from fhir.resources.R4B.medicationrequest import MedicationRequest

    from cds_hooks_service.cards import medication_request

    for alt in rulebook.alternatives.values():
        resource = medication_request(alt, {}, "p", "e", "Practitioner/x")
        assert MedicationRequest.model_validate(resource).status == "draft"


@pytest.mark.parametrize("old, new, words", [
    # A code with a trailing space passes the rule schema (non-empty text) but is not a FHIR `code`.
    ('code: "8704", display: prochlorperazine}', 'code: "8704 ", display: prochlorperazine}', "medicationCodeableConcept"),
    # A dose unit with an inner double space: Quantity.code is a FHIR `code` too.
    ("dose: {value: 10, unit: mg}\n\nmetoclopramide", "dose: {value: 10, unit: \"m  g\"}\n\nmetoclopramide", "doseQuantity"),
])
def test_fhir_resources_catches_a_broken_create_resource(rules_copy, old, new, words):
    edit(rules_copy / "alternatives.yaml", old, new)
    error = only(rules_copy)
    assert "alternatives.yaml:8:3: prochlorperazine-iv: the MedicationRequest this alternative creates is not valid " \
           "FHIR R4:" in error
    assert words in error


def test_fhir_validation_runs_at_load_never_per_request(rulebook, make_settings, monkeypatch):
    from fhir.resources.R4B.medicationrequest import MedicationRequest

    from cds_hooks_service.hook_call import call_service
    from cds_hooks_service.scenarios import load_scenarios
    from cds_hooks_service.services import SERVICE_FOR_HOOK

    calls = []
    original = MedicationRequest.model_validate.__func__

    def counting(cls, *a, **kw):
        calls.append(1)
        return original(cls, *a, **kw)

    monkeypatch.setattr(MedicationRequest, "model_validate", classmethod(counting))
    load_rulebook(REPO / "rules", REPO / "cards")
    assert len(calls) == len(rulebook.alternatives)
    calls.clear()
    sc = load_scenarios(REPO / "rules/opioid-in-migraine.tests.yaml", "opioid-in-migraine")[0]
    result = call_service(SERVICE_FOR_HOOK["order-sign"], sc.request("order-sign"), rulebook=rulebook, store=None,
                          settings=make_settings(fixed_now=sc.now))
    created = [a for c in result.response["cards"] for s in c.get("suggestions", []) for a in s["actions"]
               if a["type"] == "create"]
    assert created and calls == []


# --- shared definitions and policies ---------------------------------------------------------------------

def test_a_shared_policy_is_defined_once_and_used_by_every_rule(rules_copy):
    rb = load_rulebook(rules_copy, rules_copy.parent / "cards")
    users = sorted(r.id for r in rb.rules if "egfr-severe-renal-cutoff" in r.policies)
    assert users == ["dhe-contraindicated-condition", "dhe-cyp3a4-inhibitor", "dhe-triptan-ergot-24h", "dhe-vasopressor",
                     "ketamine-non-refractory-migraine", "opioid-in-migraine"]  # the last five: ketorolac's eGFR check
    for rule_id in users:
        assert rb.get(rule_id).checks["egfr-below-30"].observations[0][1:] == ("<", 30)
    # the eGFR check is written once, in shared.yaml; no eGFR cut-off is written in the rules themselves
    assert 'op: "<", value: {policy: egfr-severe-renal-cutoff}' in (rules_copy / "shared.yaml").read_text()
    for rule_id in users:
        assert 'op: "<", value: 30' not in (rules_copy / f"{rule_id}.yaml").read_text()
        assert "egfr-below-30:" not in (rules_copy / f"{rule_id}.yaml").read_text()
    # One edit in shared.yaml changes every rule, and the labels that show the number.
    edit(rules_copy / "shared.yaml", "  egfr-severe-renal-cutoff:\n    value: 30", "  egfr-severe-renal-cutoff:\n    value: 25")
    rb = load_rulebook(rules_copy, rules_copy.parent / "cards")
    for rule_id in users:
        check = rb.get(rule_id).checks["egfr-below-30"]
        assert check.observations[0][1:] == ("<", 25)
        assert "below 25" in check.label
    assert rb.get("dhe-cyp3a4-inhibitor").checks["egfr-below-30"].within == 90 * 86400


def test_a_shared_policy_changes_what_the_rules_do(rules_copy, make_settings, tmp_path):
    """Ketorolac is left out for an eGFR of 27 under the shipped cut-off (30), offered under a cut-off of 25."""
    from cds_hooks_service.hook_call import call_service
    from cds_hooks_service.scenarios import load_scenarios
    from cds_hooks_service.services import SERVICE_FOR_HOOK

    scen = tmp_path / "s.tests.yaml"
    scen.write_text(yaml.safe_dump({"now": "2026-03-01T12:00:00Z", "scenarios": [{
        "name": "DHE with clarithromycin, eGFR 27", "expect": "fire",
        "drafts": [{"drug": "3418", "text": "dihydroergotamine 1 mg IV", "route": "IV"}],
        "record": [{"given": "21212", "text": "clarithromycin 500 mg", "route": "PO", "at": "-2d"},
                   {"observation": "62238-1", "value": 27, "unit": "mL/min/{1.73_m2}", "at": "-3d"}]}]}))
    sc = load_scenarios(scen, "dhe-cyp3a4-inhibitor")[0]

    def labels(rules_dir):
        rb = load_rulebook(rules_dir, rules_dir.parent / "cards")
        result = call_service(SERVICE_FOR_HOOK["order-sign"], sc.request("order-sign"), rulebook=rb, store=None,
                              settings=make_settings(fixed_now=sc.now))
        card = next(c for c in result.response["cards"] if c["source"]["topic"]["code"] == "dhe-cyp3a4-inhibitor")
        return [s["label"] for s in card.get("suggestions", [])]

    assert not any("ketorolac" in label for label in labels(rules_copy))
    edit(rules_copy / "shared.yaml", "  egfr-severe-renal-cutoff:\n    value: 30", "  egfr-severe-renal-cutoff:\n    value: 25")
    assert any("ketorolac" in label for label in labels(rules_copy))


@pytest.mark.parametrize("old, new, words", [
    ("      within: {policy: egfr-lookback}", "      within: {policy: egfr-severe-renal-cutoff}",
     "policy 'egfr-severe-renal-cutoff' is 30 mL/min/1.73 m2; allowed here: a time window"),
    ('value: {policy: egfr-severe-renal-cutoff}}]', 'value: {policy: egfr-lookback}}]',
     "policy 'egfr-lookback' is a time window (90 days); allowed here: a number"),
    ("signOff: {status: pending, note: needs clinical-governance sign-off (clinical.md §5 item 8)}\n  egfr-lookback",
     "signOff: {status: approved}\n  egfr-lookback",
     "an approved policy names who signed it off (by) and when (on)"),
    ("label: Latest eGFR below {egfr-severe-renal-cutoff}", "label: Latest eGFR below {egfr-cut-off}",
     "the label refers to {egfr-cut-off}, which is not a policy"),
])
def test_policy_misuse_is_reported(rules_copy, words, old, new):
    edit(rules_copy / "shared.yaml", old, new)
    errors = problems(rules_copy)
    assert errors and all(words in e for e in errors), errors
    assert all("shared.yaml:" in e for e in errors), errors  # at the shared definition, not in each rule


def test_rule_and_shared_definitions_must_not_clash(rules_copy):
    edit(rules_copy / "opioid-in-migraine.yaml", "exceptions: [other-order-reason",
         "shared: [pregnancy, severe-renal-impairment, oral-route, no-such-shared]\nexceptions: [other-order-reason")
    errors = problems(rules_copy)
    assert any("shared[2]: check 'oral-route' is both defined in this rule and taken from shared.yaml" in e for e in errors)
    assert any("shared[3]: found 'no-such-shared'; allowed: a check of shared.yaml" in e for e in errors)


def test_a_shared_check_error_points_at_shared_yaml(rules_copy):
    edit(rules_copy / "shared.yaml", "condition: {valueSets: [cond-pregnancy], status: active}",
         "condition: {valueSets: [cond-pregnant], status: active}")
    errors = problems(rules_copy)
    # Reported once per rule that uses it (all six: ketorolac's contraindications), each time at shared.yaml's
    # line and column.
    line = next(i for i, t in enumerate((rules_copy / "shared.yaml").read_text().splitlines(), 1) if "cond-pregnant" in t)
    assert len(errors) == 6 and all(f"shared.yaml:{line}:29: checks.pregnancy.condition.valueSets[0]: unknown value set "
                          "'cond-pregnant'" in e for e in errors), errors


def test_basis_and_policies_are_fields_of_the_rules(rulebook):
    for rule in rulebook.rules:
        assert rule.basis and len(rule.basis) > 80, rule.id
    washout = rulebook.get("dhe-cyp3a4-inhibitor").policies["cyp3a4-inhibitor-washout"]
    assert (washout.value, washout.unit, washout.sign_off["status"]) == (14, "days", "pending")
    assert rulebook.get("dhe-cyp3a4-inhibitor").checks["strong-inhibitor-on-board"].within == 14 * 86400
    assert "14 days" in rulebook.get("dhe-cyp3a4-inhibitor").checks["strong-inhibitor-on-board"].label


# --- only_if ---------------------------------------------------------------------------------------------

def test_suggestion_offered_combines_only_if_and_unless():
    s = Suggestion("x", "label", None, unless=("u",), actions=[], only_if=("a", "b"))
    found = {"a", "b"}
    assert s.offered(found.__contains__)
    assert not s.offered({"a"}.__contains__)  # every only_if check must find evidence
    assert not s.offered({"a", "b", "u"}.__contains__)  # and no unless check
    assert Suggestion("y", "label", None, (), []).offered(set().__contains__)


def test_only_if_in_the_shipped_rules(rulebook):
    remove = next(s for s in rulebook.get("dhe-cyp3a4-inhibitor").suggestions if s.id == "remove-dhe")
    assert remove.only_if == ("strong-inhibitor-on-board",) and remove.unless == ("drafted-inhibitor",)
    assert "no-strong-inhibitor" not in rulebook.get("dhe-cyp3a4-inhibitor").checks  # the double negative is gone


@pytest.mark.parametrize("inhibitor, offered", [
    ({"ordered": "21212", "text": "clarithromycin 500 mg", "at": "-2d"}, True),  # strong: remove-dhe recommended
    ({"ordered": "4450", "text": "fluconazole 200 mg", "at": "-2d"}, False),  # moderate only
])
def test_only_if_decides_the_recommended_suggestion(rulebook, make_settings, tmp_path, inhibitor, offered):
    from cds_hooks_service.hook_call import call_service
    from cds_hooks_service.scenarios import load_scenarios
    from cds_hooks_service.services import SERVICE_FOR_HOOK

    scen = tmp_path / "s.tests.yaml"
    scen.write_text(yaml.safe_dump({"now": "2026-03-01T12:00:00Z", "scenarios": [{
        "name": "x", "expect": "fire", "drafts": [{"drug": "3418", "text": "dihydroergotamine 1 mg IV", "route": "IV"}],
        "record": [inhibitor]}]}))
    sc = load_scenarios(scen, "dhe-cyp3a4-inhibitor")[0]
    result = call_service(SERVICE_FOR_HOOK["order-sign"], sc.request("order-sign"), rulebook=rulebook, store=None,
                          settings=make_settings(fixed_now=sc.now))
    card = next(c for c in result.response["cards"] if c["source"]["topic"]["code"] == "dhe-cyp3a4-inhibitor")
    labels = {s["label"]: s.get("isRecommended") for s in card["suggestions"]}
    strong = "Remove the DHE order (strong CYP3A4 inhibitor, boxed warning)"
    moderate = "Remove the DHE order (CYP3A4 inhibitor, use with caution)"
    assert (strong in labels) is offered and (moderate in labels) is not offered
    if offered:
        assert labels[strong] is True


def test_only_if_and_unless_naming_the_same_check_is_an_error(rules_copy):
    edit(rules_copy / "dhe-cyp3a4-inhibitor.yaml", "only_if: [strong-inhibitor-on-board]",
         "only_if: [strong-inhibitor-on-board, drafted-inhibitor]")
    assert "check 'drafted-inhibitor' is in both only_if and unless" in only(rules_copy)


def test_only_if_unknown_check(rules_copy):
    edit(rules_copy / "dhe-cyp3a4-inhibitor.yaml", "only_if: [strong-inhibitor-on-board]",
         "only_if: [strong-inhibitor-onboard]")
    error = only(rules_copy)
    assert "suggestions[0].only_if[0]: unknown check 'strong-inhibitor-onboard' (did you mean " \
           "'strong-inhibitor-on-board'?)" in error


def test_missing_folders_are_one_problem_not_a_traceback(tmp_path):
    with pytest.raises(RulebookError) as exc:
        load_rulebook(tmp_path / "nope", tmp_path / "cards")
    assert [str(p) for p in exc.value.problems] == [f"{tmp_path / 'nope'}: (folder): the rules folder does not exist"]


def test_card_texts_take_policy_numbers_from_the_policies(rules_copy, make_settings):
    """Card wording shows the policy numbers (policy['name']), so changing a number cannot leave stale text."""
    from cds_hooks_service.hook_call import call_service
    from cds_hooks_service.scenarios import load_scenarios
    from cds_hooks_service.services import SERVICE_FOR_HOOK

    sc = next(s for s in load_scenarios(REPO / "rules/dhe-cyp3a4-inhibitor.tests.yaml", "dhe-cyp3a4-inhibitor")
              if s.name.startswith("DHE IV with an active ritonavir order"))

    def detail(rules_dir):
        rb = load_rulebook(rules_dir, rules_dir.parent / "cards")
        result = call_service(SERVICE_FOR_HOOK["order-sign"], sc.request("order-sign"), rulebook=rb, store=None,
                              settings=make_settings(fixed_now=sc.now))
        return next(c for c in result.response["cards"]
                    if c["source"]["topic"]["code"] == "dhe-cyp3a4-inhibitor")["detail"]

    assert "Inhibitors given or ordered in the past 14 days count" in detail(rules_copy)
    edit(rules_copy / "dhe-cyp3a4-inhibitor.yaml", "  cyp3a4-inhibitor-washout:\n    value: 14",
         "  cyp3a4-inhibitor-washout:\n    value: 21")
    assert "Inhibitors given or ordered in the past 21 days count" in detail(rules_copy)


def test_card_referring_to_an_unknown_policy(rules_copy):
    card = rules_copy.parent / "cards/dhe-cyp3a4-inhibitor.yaml"
    edit(card, "{{ policy['cyp3a4-inhibitor-washout'] }} days count", "{{ policy['cyp3a4-washout'] }} days count")
    line = next(i for i, text in enumerate(card.read_text().splitlines(), 1) if "policy['cyp3a4-washout']" in text)
    assert f"dhe-cyp3a4-inhibitor.yaml:{line}: detail: refers to policy['cyp3a4-washout'], which is not a policy of " \
           "rule 'dhe-cyp3a4-inhibitor' or of shared.yaml" in only(rules_copy)
