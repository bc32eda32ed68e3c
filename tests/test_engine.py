"""Unit tests of the clinical core without HTTP: terminology, facts, the concept index and the engine."""
from __future__ import annotations

from datetime import timedelta

from cds_hooks_service.engine import HookContext, draft_facts, evaluate_rule
from cds_hooks_service.facts import Normaliser, parse_time
from cds_hooks_service.index import ConceptIndex, RecordIndex, RuleConcepts
from cds_hooks_service.scenarios import expand_draft, expand_record
from cds_hooks_service.terminology import ICD10CM, RXNORM, SNOMED, concept
from tests.helpers import DHE, NOW, record_items

SUMATRIPTAN_IN = (RXNORM, "37418")
DHE_IN = (RXNORM, "3418")


def _resources(items) -> dict[str, list[dict]]:
    keys = {"Condition": "conditions", "MedicationRequest": "medicationRequests",
            "MedicationAdministration": "medicationAdministrations", "MedicationStatement": "medicationStatements",
            "Observation": "observations", "Procedure": "procedures"}
    out: dict[str, list[dict]] = {}
    for i, item in enumerate(items):
        r = expand_record(dict(item), i, NOW)
        out.setdefault(keys[r["resourceType"]], []).append(r)
    return out


def _evaluate(rulebook, rule_id, drafts, record, *, max_items=10, trace=False):
    normaliser = Normaliser(rulebook.terminology)
    bundle = {"resourceType": "Bundle", "entry": [{"resource": expand_draft(dict(d), i, NOW)}
                                                  for i, d in enumerate(drafts)]}
    facts, meds = draft_facts(bundle, normaliser)
    ctx = HookContext("order-sign", NOW, "p", None, None, facts, facts, max_evidence_items=max_items)
    index = RecordIndex(_resources(record), normaliser, meds, facts, None if trace else RuleConcepts.of(rulebook))
    rule = rulebook.get(rule_id)
    return [evaluate_rule(rule, d, ctx, index, rulebook, trace=trace) for d in facts], index


# -- terminology -----------------------------------------------------------------------------------------
def test_concept_canonicalises_system_aliases_and_icd10_dots():
    assert concept("urn:oid:2.16.840.1.113883.6.88", "3418") == (RXNORM, "3418")
    assert concept("http://hl7.org/fhir/sid/icd-10", "G43909") == (ICD10CM, "G43.909")
    assert concept(SNOMED, "") is None and concept(None, "1") is None


def test_recognise_by_code_rolls_products_up_to_ingredients(rulebook):
    match = rulebook.terminology.recognise([(RXNORM, "313160")], [])  # sumatriptan 100 MG Oral Tablet
    assert match.matched_by == "code" and SUMATRIPTAN_IN in match.concepts


def test_recognise_by_name_only_without_a_known_code(rulebook):
    by_name = rulebook.terminology.recognise([(RXNORM, "999999999")], ["D.H.E. 45 injection"])
    assert by_name.matched_by == "name" and DHE_IN in by_name.concepts
    coded = rulebook.terminology.recognise([(RXNORM, "313160")], ["dihydroergotamine"])
    assert coded.matched_by == "code" and DHE_IN not in coded.concepts  # a known code wins over the text


# -- facts -----------------------------------------------------------------------------------------------
def test_parse_time_partial_dates_and_offsets():
    assert parse_time("2026") == parse_time("2026-01-01T00:00:00Z")
    assert parse_time("2026-03-01T13:00:00+01:00") == parse_time("2026-03-01T12:00:00Z")
    assert parse_time("yesterday") is None and parse_time(7) is None


def test_observations_filtered_to_relevant_codes_keep_the_matching_component():
    bp = expand_record({"bp": [185, 110]}, 0, NOW)
    systolic = frozenset({("http://loinc.org", "8480-6")})
    facts = Normaliser.observations(bp, systolic)
    assert [f.value for f in facts] == [185.0]
    assert Normaliser.observations(bp, frozenset({("http://loinc.org", "62238-1")})) == []
    assert len(Normaliser.observations(bp)) == 3  # panel + 2 components when nothing is filtered


# -- the concept index -----------------------------------------------------------------------------------
class _Fact:
    def __init__(self, name, *concepts):
        self.name, self.concepts = name, frozenset(concepts)


def test_concept_index_returns_each_fact_once_in_record_order():
    a, b, c = (RXNORM, "1"), (RXNORM, "2"), (RXNORM, "3")
    facts = [_Fact("x", a, b), _Fact("y", c), _Fact("z", b)]
    index = ConceptIndex(facts)
    assert [f.name for f in index.matching(frozenset({a, b}))] == ["x", "z"]
    assert [f.name for f in index.matching(frozenset({c, (RXNORM, "404")}))] == ["y"]
    assert index.matching(frozenset()) == []
    assert index.position(facts[2]) == 2


def test_record_index_normalises_only_resources_some_rule_can_match(rulebook):
    record = record_items(200, triptans=5)
    _, index = _evaluate(rulebook, "dhe-triptan-ergot-24h", [DHE], record)
    index.medications, index.conditions, index.observations, index.procedures  # build every kind
    stats = index.stats
    assert stats["resources"] == 200  # every record resource was looked at
    assert stats["skipped"] > stats["normalised"] > 0  # lisinopril, ondansetron, diabetes, ... are skipped
    triptans = index.medications.matching(rulebook.get("dhe-triptan-ergot-24h").checks[
        "triptan-or-ergot-within-24h"].valueset)
    assert len(triptans) >= 5
    # with the explain trace everything is normalised (its notes count all conditions)
    _, full = _evaluate(rulebook, "dhe-triptan-ergot-24h", [DHE], record, trace=True)
    full.medications, full.conditions, full.observations, full.procedures
    assert full.stats["skipped"] == 0


def test_record_index_builds_a_kind_only_when_a_check_asks(rulebook):
    # the opioid rule's trigger evidence is a migraine diagnosis and the fracture reason suppresses it: its
    # suggestions (ketorolac's eGFR check) are not evaluated, so observations are never looked at
    findings, index = _evaluate(rulebook, "opioid-in-migraine", [{"drug": "897745", "route": "IV", "reason": "S72.001A"}],
                                [{"condition": "G43.909"}, {"bp": [120, 80]}])
    assert findings[0] is not None and findings[0].evidence
    assert "observations" not in index.__dict__


def test_a_call_indexes_only_what_the_rules_triggered_by_its_drafts_can_match(rulebook, monkeypatch):
    # an opioid order (whose ketorolac alternative reads eGFR) never normalises the blood-pressure readings that
    # only the DHE rules read
    loinc = "http://loinc.org"
    opioid = RuleConcepts.of(rulebook, [rulebook.get("opioid-in-migraine")])
    every = RuleConcepts.of(rulebook)
    assert (loinc, "8480-6") in every.observations and (loinc, "8480-6") not in opioid.observations
    assert (loinc, "62238-1") in opioid.observations
    assert RuleConcepts.of(rulebook, [rulebook.get("opioid-in-migraine")]) is opioid  # computed once
    normaliser = Normaliser(rulebook.terminology)
    record = _resources([{"bp": [150, 95], "at": "-1h"}, {"observation": "62238-1", "value": 22, "unit": "mL/min/{1.73_m2}",
                                                          "at": "-2d"}])
    index = RecordIndex(record, normaliser, None, [], opioid)
    assert [o.value for o in index.observations.facts] == [22.0]
    assert (index.stats["normalised"], index.stats["skipped"]) == (1, 1)

    from cds_hooks_service import hook_call
    from cds_hooks_service.config import Settings
    from cds_hooks_service.limits import Limits
    from cds_hooks_service.services import SERVICE_FOR_HOOK
    from tests.helpers import HYDROMORPHONE, MIGRAINE, request_body

    seen = []
    real = hook_call.RecordIndex

    def spy(resources, normaliser, medications, drafts, concepts):
        seen.append(concepts)
        return real(resources, normaliser, medications, drafts, concepts)

    monkeypatch.setattr(hook_call, "RecordIndex", spy)
    body = request_body("order-sign", [HYDROMORPHONE], [MIGRAINE])
    hook_call.decide(SERVICE_FOR_HOOK["order-sign"], body, rulebook=rulebook, settings=Settings(), limits=Limits(),
                     now=NOW)
    assert seen == [opioid]


def test_a_triggers_drugs_are_not_looked_for_in_the_record(rulebook):
    # the ketamine rule triggers on a drafted ketamine; no check of it reads the record's ketamine, so a record's
    # ketamine is skipped after a look-up, while its ibuprofen (ketorolac's NSAID contraindication) is read
    ketamine, ibuprofen = (RXNORM, "6130"), (RXNORM, "5640")
    rule = RuleConcepts.of(rulebook, [rulebook.get("ketamine-non-refractory-migraine")])
    assert ketamine not in rule.medications and ibuprofen in rule.medications
    normaliser = Normaliser(rulebook.terminology)
    record = _resources([{"given": "6130", "text": "ketamine 20 mg IV", "route": "IV", "at": "-3h"},
                         {"given": "5640", "text": "ibuprofen 400 mg", "route": "PO", "at": "-3h"}])
    index = RecordIndex(record, normaliser, draft_facts({}, normaliser)[1], [], rule)
    assert [m.display for m in index.medications.facts] == ["ibuprofen 400 mg"]
    # the opioid rule reads the record's opioids since 1.2.0 (recent-opioid-orders: its overuse count)
    assert (RXNORM, "3423") in RuleConcepts.of(rulebook, [rulebook.get("opioid-in-migraine")]).medications


def test_the_cheap_code_test_never_skips_a_resource_that_matches():
    # the index skips a resource whose codings' bare codes hit no concept before building its concepts: an
    # ICD-10 code written without its dot, or a code with spaces around it, must still match
    relevant = frozenset({(ICD10CM, "G43.909")})
    for code in ("G43.909", "G43909", " G43.909 "):
        condition = {"resourceType": "Condition", "id": "c", "code": {"coding": [{"system": ICD10CM, "code": code}]}}
        assert Normaliser.condition(condition, relevant) is not None, code
    other = {"resourceType": "Condition", "id": "c", "code": {"coding": [{"system": ICD10CM, "code": "I10"}]}}
    assert Normaliser.condition(other, relevant) is None
    egfr = frozenset({("http://loinc.org", "62238-1")})
    panel = {"resourceType": "Observation", "status": "final", "code": {"coding": [{"code": "x-panel"}]},
             "component": [{"code": {"coding": [{"system": "http://loinc.org", "code": "62238-1"}]},
                            "valueQuantity": {"value": 22}}]}
    assert [o.value for o in Normaliser.observations(panel, egfr)] == [22.0]  # found in a component


def test_recognised_medications_are_kept_per_codings_and_texts_within_a_bound(rulebook):
    from cds_hooks_service import terminology

    t = rulebook.terminology
    first = t.recognise([(RXNORM, "999999999")], ["D.H.E. 45 injection"])
    assert t.recognise([(RXNORM, "999999999")], ["D.H.E. 45 injection"]) is first  # kept
    assert t.recognise([(RXNORM, "999999999")], ["sumatriptan"]).concepts != first.concepts  # texts are in the key
    for i in range(terminology.RECOGNISED_CACHE_SIZE + 10):
        t.recognise([(RXNORM, str(i))], [])
    assert len(t._recognised) <= terminology.RECOGNISED_CACHE_SIZE


# -- the engine ------------------------------------------------------------------------------------------
def test_evidence_lists_at_most_the_limit_newest_first_and_counts_the_rest(rulebook):
    record = [{"given": "37418", "text": "sumatriptan 6 mg SC", "route": "SC", "at": f"-{h}h"} for h in range(1, 26)]
    (finding,), _ = _evaluate(rulebook, "dhe-triptan-ergot-24h", [DHE], record, max_items=10)
    evidence = next(e for e in finding.evidence if e.check == "triptan-or-ergot-within-24h")
    assert len(evidence.items) == 10 and evidence.total == 24 and evidence.more == 14  # 1 h .. 24 h ago
    times = [i["time"] for i in evidence.items]
    assert times == sorted(times, reverse=True) and times[0] == (NOW - timedelta(hours=1)).isoformat().replace(
        "+00:00", "Z")


def test_a_draft_is_never_evidence_against_itself_but_other_drafts_are(rulebook):
    two = [dict(DHE, id="a"), {"id": "b", "drug": "37418", "text": "sumatriptan 6 mg SC", "route": "SC"}]
    findings, _ = _evaluate(rulebook, "dhe-triptan-ergot-24h", two, [])
    dhe_finding, triptan_finding = findings
    assert [i["ref"] for e in dhe_finding.evidence for i in e.items] == ["MedicationRequest/b"]
    assert [i["ref"] for e in triptan_finding.evidence for i in e.items] == ["MedicationRequest/a"]
    alone, _ = _evaluate(rulebook, "dhe-triptan-ergot-24h", [DHE], [])
    assert alone == [None]


def test_check_results_are_shared_across_drafts_not_recomputed(rulebook):
    drafts = [dict(DHE, id=f"d{i}") for i in range(30)]
    record = [{"given": "37418", "text": "sumatriptan", "route": "SC", "at": "-2h"}]
    findings, index = _evaluate(rulebook, "dhe-triptan-ergot-24h", drafts, record)
    assert all(f is not None and f.evidence for f in findings)
    rule_keys = [k for k in index.shared if k[0] == "dhe-triptan-ergot-24h"]
    assert len(rule_keys) == len(set(rule_keys)) and len(rule_keys) <= len(rulebook.get("dhe-triptan-ergot-24h").checks)
