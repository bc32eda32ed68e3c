"""Alternatives safe for this patient (issue 9 §3): each alternative's contraindications are data on the
alternative (rules/alternatives.yaml, naming checks of rules/shared.yaml), applied by the engine on every card
that offers it; a left-out alternative gets one line saying why, once per response."""
from __future__ import annotations

from datetime import timedelta

import pytest

from cds_hooks_service.cards import finding_phrase
from cds_hooks_service.engine import Evidence, unsafe_alternatives
from cds_hooks_service.hook_call import call_service
from cds_hooks_service.rulebook import load_rulebook
from cds_hooks_service.services import SERVICE_FOR_HOOK
from tests.helpers import DHE, HYDROMORPHONE, MIGRAINE, NOW, SUMATRIPTAN_GIVEN, edit, rule_errors, request_body

EGFR_22 = {"observation": "62238-1", "value": 22, "unit": "mL/min/1.73m2", "at": "-3d", "display": "eGFR"}
CAD = {"condition": "I25.10", "display": "Atherosclerotic heart disease of native coronary artery"}
KETAMINE = {"drug": "238084", "text": "ketamine 0.2 mg/kg IV", "route": "IV"}


def _load(rules_dir):
    return load_rulebook(rules_dir, rules_dir.parent / "cards")




def _cards(rulebook, settings, hook="order-sign", **body) -> list[dict]:
    result = call_service(SERVICE_FOR_HOOK[hook], request_body(hook=hook, **body), rulebook=rulebook, store=None,
                          settings=settings)
    return result.response["cards"]


def _card(cards, rule_id) -> dict:
    return next(c for c in cards if c["source"]["topic"]["code"] == rule_id)


def _labels(card) -> list[str]:
    return [s["label"] for s in card.get("suggestions", [])]


# --- validate -------------------------------------------------------------------------------------------

def test_unknown_check_in_an_alternatives_contraindications_names_file_and_alternative(rules_copy):
    edit(rules_copy / "alternatives.yaml", "contraindications: [egfr-below-30,", "contraindications: [egfr-below-03,")
    errors = rule_errors(rules_copy, scenarios=True)
    assert len(errors) == 1, errors
    line = next(i for i, t in enumerate((rules_copy / "alternatives.yaml").read_text().splitlines(), 1)
                if "egfr-below-03" in t)
    assert f"alternatives.yaml:{line}:" in errors[0]
    assert "ketorolac-iv.contraindications[0]: alternative 'ketorolac-iv': unknown check 'egfr-below-03' " \
           "(did you mean 'egfr-below-30'?); an alternative's contraindications are checks of rules/shared.yaml" \
           in errors[0]


@pytest.mark.parametrize("new,words", [
    ("contraindications: [Egfr below 30,", "ketorolac-iv.contraindications[0]: found 'Egfr below 30'"),
    ("contraindications: [{x: 1},", "ketorolac-iv.contraindications[0]: found a mapping"),
])
def test_contraindications_must_be_a_list_of_names(rules_copy, new, words):
    edit(rules_copy / "alternatives.yaml", "contraindications: [egfr-below-30,", new)
    errors = rule_errors(rules_copy, scenarios=True)  # reported, never a crash
    assert len(errors) == 1 and "alternatives.yaml" in errors[0] and words in errors[0], errors


def test_contraindications_not_a_list_is_one_error(rules_copy):
    text = (rules_copy / "alternatives.yaml").read_text()
    start = text.index("  contraindications: [egfr-below-30,")
    end = text.index("]", start) + 1
    (rules_copy / "alternatives.yaml").write_text(text[:start] + "  contraindications: egfr-below-30" + text[end:])
    errors = rule_errors(rules_copy, scenarios=True)
    assert len(errors) == 1 and "ketorolac-iv.contraindications: found 'egfr-below-30'; allowed: a list" in errors[0]


def test_a_rule_may_not_shadow_a_contraindication_of_an_alternative_it_offers(rules_copy):
    # The opioid rule offers ketorolac; a rule-level `pregnancy` of its own would silently change what
    # ketorolac is checked for on this card only.
    edit(rules_copy / "opioid-in-migraine.yaml", "  oral-route:\n",
         "  pregnancy:\n    label: Pregnancy (own)\n    condition: {valueSets: [cond-pregnancy], status: any}\n"
         "  oral-route:\n")
    errors = rule_errors(rules_copy, scenarios=True)
    assert len(errors) == 1, errors
    assert "opioid-in-migraine.yaml" in errors[0] and "check 'pregnancy' is defined in this rule, but it is also a " \
        "contraindication of alternative 'ketorolac-iv' (alternatives.yaml), which suggestion 'replace-ketorolac' " \
        "offers" in errors[0]


def test_contraindication_checks_are_part_of_every_rule_offering_the_alternative(rulebook):
    for rule in rulebook.rules:
        offers = {a for s in rule.suggestions for a in s.alternatives}
        if "ketorolac-iv" not in offers:
            continue
        for name in rulebook.alternatives["ketorolac-iv"]["contraindications"]:
            assert rule.checks[name].shared, (rule.id, name)
    # so the data they read is prefetched / read; it is not what the rule's own logic needs
    opioid = rulebook.get("opioid-in-migraine")
    # whether it fires rests on conditions only; since 1.2.0 the overuse count (recent-opioid-orders, which only
    # raises the card's level) reads opioid orders and administrations: data the card reads when it can
    assert opioid.needs == {"conditions"}
    assert opioid.card_needs == {"medicationRequests", "medicationAdministrations"}
    assert opioid.alternative_needs == {"observations", "procedures", "medicationStatements"}
    assert "62238-1" in rulebook.prefetch["observations"]


# --- the mechanism -------------------------------------------------------------------------------------

def test_one_edit_in_alternatives_yaml_applies_on_every_card_offering_it(rules_copy, make_settings):
    """No rule is edited: a contraindication added to prochlorperazine leaves it out of every card."""
    text = (rules_copy / "alternatives.yaml").read_text()
    start = text.index("prochlorperazine-iv:")
    end = text.index("\n\n", start)
    (rules_copy / "alternatives.yaml").write_text(
        text[:end] + "\n  contraindications: [coronary-artery-disease]" + text[end:])
    rb = _load(rules_copy)
    settings = make_settings()
    opioid = _card(_cards(rb, settings, drafts=[HYDROMORPHONE], record=[MIGRAINE, CAD]), "opioid-in-migraine")
    ketamine = _card(_cards(rb, settings, drafts=[KETAMINE], record=[MIGRAINE, CAD]),
                     "ketamine-non-refractory-migraine")
    for card in (opioid, ketamine):
        assert not any("prochlorperazine" in label for label in _labels(card)), _labels(card)
        assert any("metoclopramide" in label for label in _labels(card))
        assert "**Prochlorperazine not offered:** Atherosclerotic heart disease of native coronary artery." \
            in card["detail"]
    # with the shipped rules prochlorperazine is offered to the same patient
    shipped = _card(_cards(_shipped(), settings, drafts=[HYDROMORPHONE], record=[MIGRAINE, CAD]), "opioid-in-migraine")
    assert any("prochlorperazine" in label for label in _labels(shipped))


def _shipped():
    from tests.helpers import shipped_rulebook
    return shipped_rulebook()  # loaded once per process, as the rulebook fixture


SUMATRIPTAN_SUGGESTION = """  - id: replace-sumatriptan
    label: Replace with sumatriptan 6 mg SC (AHS Level B)
    actions: [{delete: draft}, {create: sumatriptan-sc}]
"""


@pytest.fixture
def with_sumatriptan(rules_copy):
    """The shipped rules offer no sumatriptan: a copy whose opioid card offers it."""
    edit(rules_copy / "opioid-in-migraine.yaml", "  - id: add-dexamethasone\n",
         SUMATRIPTAN_SUGGESTION + "  - id: add-dexamethasone\n")
    return _load(rules_copy)


@pytest.mark.parametrize("hook", ["order-select", "order-sign"])
@pytest.mark.parametrize("record,line", [
    ([CAD], "**Sumatriptan not offered:** Atherosclerotic heart disease of native coronary artery."),
    ([{"given": "3418", "text": "dihydroergotamine 1 mg IV", "route": "IV", "at": "-3h"}], "**Sumatriptan not offered:** DHE or ergot within 24 h: dihydroergotamine "
                                          "1 mg IV, given 3 h ago."),
    ([{"bp": [190, 100], "at": "-1h"}], "**Sumatriptan not offered:** Uncontrolled BP (180/120 or more)"),
    ([{"condition": "G43.401", "display": "Hemiplegic migraine, not intractable, with status migrainosus"}],
     "**Sumatriptan not offered:** Hemiplegic migraine, not intractable, with status migrainosus."),
])
def test_sumatriptan_is_checked_for_its_own_contraindications(with_sumatriptan, make_settings, hook, record, line):
    card = _card(_cards(with_sumatriptan, make_settings(), hook=hook, drafts=[HYDROMORPHONE], record=[MIGRAINE, *record]),
                 "opioid-in-migraine")
    assert not any("sumatriptan" in label for label in _labels(card)), _labels(card)
    assert line in card["detail"]
    assert card["detail"].count("not offered") == 1


def test_sumatriptan_offered_says_what_was_not_checked(with_sumatriptan, make_settings):
    card = _card(_cards(with_sumatriptan, make_settings(), drafts=[HYDROMORPHONE], record=[MIGRAINE]),
                 "opioid-in-migraine")
    assert any("sumatriptan" in label for label in _labels(card))
    assert "_Sumatriptan: not checked here: stroke or TIA, other triptan in 24 h, MAO-A inhibitor._" in card["detail"]
    create = next(a for s in card["suggestions"] if "sumatriptan" in s["label"] for a in s["actions"]
                  if a["type"] == "create")
    assert create["description"].endswith("(not checked here: stroke or TIA, other triptan in 24 h, MAO-A inhibitor)")


def test_the_first_contraindication_found_is_named_and_one_line_per_alternative(rulebook, make_settings):
    record = [MIGRAINE, EGFR_22, {"condition": "N18.4", "display": "Chronic kidney disease, stage 4 (severe)"},
              {"condition": "O09.90", "display": "Supervision of high risk pregnancy, unspecified"}]
    card = _card(_cards(rulebook, make_settings(), drafts=[HYDROMORPHONE], record=record), "opioid-in-migraine")
    assert card["detail"].count("Ketorolac not offered") == 1
    assert "**Ketorolac not offered:** latest eGFR 22 mL/min/1.73m2 (3 days ago)." in card["detail"]


def test_one_line_per_response_when_several_cards_would_offer_it(rulebook, make_settings):
    record = [dict(SUMATRIPTAN_GIVEN, at="-3h"), {"ordered": "21212", "text": "clarithromycin 500 mg PO BID"}, CAD,
              EGFR_22]
    for hook in ("order-select", "order-sign"):
        cards = _cards(rulebook, make_settings(), hook=hook, drafts=[DHE], record=record)
        assert len(cards) >= 3
        text = "\n".join(c.get("detail", "") for c in cards)
        assert text.count("Ketorolac not offered") == 1
        assert not any("ketorolac" in label.lower() for c in cards for label in _labels(c))


def test_the_rules_own_unless_leaves_a_suggestion_out_without_a_line(rulebook):
    # DHE nasal spray: the rule offers no IV replacement (its own logic), so nothing is "not offered" for safety.
    rule = rulebook.get("dhe-contraindicated-condition")
    checks = {"nasal-dhe": Evidence("nasal-dhe", "DHE nasal spray", None, [{"kind": "drafted"}]),
              "egfr-below-30": Evidence("egfr-below-30", "eGFR", None, [{"kind": "observation", "value": 22}])}
    excluded, left_out = unsafe_alternatives(rule, checks.get, rulebook.alternatives)
    assert {"replace-ketorolac", "replace-prochlorperazine", "replace-metoclopramide"} <= excluded
    assert left_out == ()
    # without the nasal route, ketorolac is left out for its eGFR, and only ketorolac
    del checks["nasal-dhe"]
    excluded, left_out = unsafe_alternatives(rule, checks.get, rulebook.alternatives)
    assert excluded == {"replace-ketorolac"}
    assert [(lo.alternative, lo.evidence.check) for lo in left_out] == [("ketorolac-iv", "egfr-below-30")]


def test_a_suppressed_finding_does_not_evaluate_alternatives(rulebook, make_settings):
    cards = _cards(rulebook, make_settings(), drafts=[dict(HYDROMORPHONE, reason="S72.001A")], record=[MIGRAINE, EGFR_22])
    assert not any(c["source"]["topic"]["code"] == "opioid-in-migraine" for c in cards)


# --- the line -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("item,expected", [
    ({"kind": "observation", "value": 22.0, "unit": "mL/min/1.73m2", "time": NOW - timedelta(days=3)},
     "latest eGFR 22 mL/min/1.73m2 (3 days ago)"),
    ({"kind": "observation", "value": None, "unit": None, "result": "positive", "time": NOW - timedelta(hours=5)},
     "latest eGFR (5 h ago)"),
    ({"kind": "observation", "value": 22, "unit": None, "time": None}, "latest eGFR 22 (date not recorded)"),
    ({"kind": "condition", "display": "Chronic kidney disease, stage 4 (severe)", "status": "active"},
     "Chronic kidney disease, stage 4 (severe)"),
    ({"kind": "condition", "display": "Chronic kidney disease, stage 4 (severe)", "status": "resolved"},
     "Chronic kidney disease, stage 4 (severe) (resolved)"),
    ({"kind": "condition", "display": None, "code": "N18.4", "status": "active"}, "latest eGFR: N18.4"),
    ({"kind": "medication", "display": "ibuprofen 600 mg tablet", "how": "given", "time": NOW - timedelta(hours=5)},
     "latest eGFR: ibuprofen 600 mg tablet, given 5 h ago"),
    ({"kind": "medication", "display": "ketorolac 15 mg IV", "how": "ordered now", "time": None},
     "latest eGFR: ketorolac 15 mg IV, ordered now"),
    ({"kind": "procedure", "display": "Coronary artery bypass graft " * 5, "time": NOW - timedelta(days=10)},
     "Coronary artery bypass graft Coronary artery bypass graft C… (10 days ago)"),
])
def test_finding_phrase(item, expected):
    assert finding_phrase("latest eGFR", item, NOW) == expected


def test_patient_text_in_the_line_is_escaped(rulebook, make_settings):
    record = [MIGRAINE, {"condition": "N18.4", "display": "CKD 4 <b>**bold**</b> [link](http://x)"}]
    card = _card(_cards(rulebook, make_settings(), drafts=[HYDROMORPHONE], record=record), "opioid-in-migraine")
    line = next(p for p in card["detail"].split("\n\n") if "Ketorolac not offered" in p)
    assert "<b>" not in line and "&lt;b&gt;" in line and "\\*\\*bold" in line and "\\[link\\](" in line


def test_a_shared_check_is_computed_once_per_call_for_every_rule(rulebook):
    """Ketorolac's eGFR check on the three DHE cards of one order is one look-up of the record."""
    from cds_hooks_service.engine import HookContext, draft_facts, evaluate_rule
    from cds_hooks_service.facts import Normaliser
    from cds_hooks_service.index import RecordIndex, RuleConcepts
    from cds_hooks_service.scenarios import expand_draft, expand_record

    normaliser = Normaliser(rulebook.terminology)
    facts, meds = draft_facts({"resourceType": "Bundle", "entry": [{"resource": expand_draft(dict(DHE), 0, NOW)}]},
                              normaliser)
    record = [dict(SUMATRIPTAN_GIVEN, at="-3h"), {"ordered": "21212", "text": "clarithromycin 500 mg PO BID"}, CAD,
              {"observation": "62238-1", "value": 60, "unit": "mL/min/1.73m2", "at": "-3d"}]
    resources: dict[str, list] = {}
    for i, item in enumerate(record):
        r = expand_record(dict(item), i, NOW)
        key = {"Condition": "conditions", "Observation": "observations", "MedicationRequest": "medicationRequests",
               "MedicationAdministration": "medicationAdministrations"}[r["resourceType"]]
        resources.setdefault(key, []).append(r)
    index = RecordIndex(resources, normaliser, meds, facts, RuleConcepts.of(rulebook))
    ctx = HookContext("order-sign", NOW, "p", None, None, facts, facts)
    findings = [evaluate_rule(rulebook.get(r), facts[0], ctx, index, rulebook)
                for r in ("dhe-contraindicated-condition", "dhe-cyp3a4-inhibitor", "dhe-triptan-ergot-24h")]
    assert all(f is not None and "replace-ketorolac" not in f.excluded_suggestions for f in findings)
    assert [k for k in index.shared if k[1] == "egfr-below-30"] == [("(shared)", "egfr-below-30")]


@pytest.mark.parametrize("hook", ["order-select", "order-sign"])
def test_data_only_an_alternative_needs_missing_leaves_it_out_not_the_card(rulebook, make_settings, hook):
    """No observations or procedures prefetched and no fhirServer: the opioid rule itself needs neither (no 412,
    no "not completed"), but ketorolac cannot be checked, so it is not offered and the card says why."""
    body = request_body(hook=hook, drafts=[HYDROMORPHONE], record=[MIGRAINE])
    del body["prefetch"]["observations"], body["prefetch"]["procedures"]
    result = call_service(SERVICE_FOR_HOOK[hook], body, rulebook=rulebook, store=None, settings=make_settings())
    [card] = result.response["cards"]
    assert card["source"]["topic"]["code"] == "opioid-in-migraine"
    assert not any("ketorolac" in label.lower() for label in _labels(card))
    assert any("prochlorperazine" in label for label in _labels(card))
    assert "**Ketorolac not offered:** not checked, could not read: lab results, procedures." in card["detail"]
    assert "_Not checked" not in card["detail"]  # the rule's own data was read whole


def test_every_line_fits_its_reserve_in_the_card_length_budget(rulebook, make_settings):
    """Each alternative line is at most ALTERNATIVE_LINE_MAX characters, however long the record's names, so the
    reserve card_length keeps for it (issue 9 §4: details of about 1,200 characters) holds."""
    from cds_hooks_service.cards import ALTERNATIVE_LINE_MAX, alternative_notes_reserve
    long_name = "Chronic kidney disease, stage 4 (severe), " + "with a very long free-text description " * 4
    for record in ([MIGRAINE, {"condition": "N18.4", "display": long_name}],
                   [MIGRAINE, {"given": "5640", "text": "ibuprofen " + "x" * 200, "route": "PO", "at": "-5h"}],
                   [MIGRAINE]):
        card = _card(_cards(rulebook, make_settings(), drafts=[HYDROMORPHONE], record=record), "opioid-in-migraine")
        lines = [p for p in card["detail"].split("\n\n") if "Ketorolac not offered" in p or "not checked here" in p]
        assert len(lines) == 1 and len(lines[0]) <= ALTERNATIVE_LINE_MAX, lines
    assert alternative_notes_reserve(rulebook.get("opioid-in-migraine"), rulebook.alternatives) == \
        ALTERNATIVE_LINE_MAX + 2  # one alternative with lines (ketorolac)
