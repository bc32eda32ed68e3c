"""Unit tests of how the record is read as clinicians write it (issue 9 §2): routes of local products,
the end of a course, MedicationStatement.dateAsserted, reasonReference, hCG values and interpretation codes."""
from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given, settings, strategies as st

from cds_hooks_service.engine import _compare, draft_facts
from cds_hooks_service.facts import (MedicationIndex, Normaliser, milli_iu_per_ml, parse_duration, parse_time,
                                     route_matches)
from cds_hooks_service.index import RecordIndex, RuleConcepts
from cds_hooks_service.terminology import ICD10CM, RXNORM

NOW = parse_time("2026-03-01T12:00:00Z")
INTERP = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"


def _med(normaliser, **fields):
    r = {"resourceType": "MedicationRequest", "id": "m1", "status": "active", "intent": "order", **fields}
    return normaliser.medication(r, MedicationIndex([]))


def _cc(code=None, text=None):
    cc = {}
    if code:
        cc["coding"] = [{"system": RXNORM, "code": code}]
    if text:
        cc["text"] = text
    return cc


@pytest.fixture
def normaliser(rulebook):
    return Normaliser(rulebook.terminology)


# -- routes ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, route", [
    ("ketoconazole 2% cream", "topical"),
    ("ketoconazole 2% shampoo", "topical"),
    ("clotrimazole 1% ointment", "topical"),
    ("erythromycin 0.5% ophthalmic ointment", "ophthalmic"),
    ("phenylephrine 2.5% eye drops", "ophthalmic"),
    ("ciprofloxacin otic drops", "otic"),
    ("clotrimazole 100 mg vaginal tablet", "vaginal"),
    ("miconazole oral gel", "oral"),
    ("clotrimazole 10 mg troche", "oral"),
    ("ergotamine 2 mg suppository", "rectal"),
    ("EpiPen 0.3 mg auto-injector", "auto-injector"),
    ("lidocaine 1% with epinephrine 1:100,000 injection", "infiltration"),
    ("epinephrine 1 mg/mL injection", "injection"),
    ("ketoconazole 200 mg tablet", "oral"),
])
def test_route_is_read_from_the_product_text(normaliser, text, route):
    assert _med(normaliser, medicationCodeableConcept=_cc(text=text)).route == route


def test_route_code_wins_and_local_codes_are_local(normaliser):
    fact = _med(normaliser, medicationCodeableConcept=_cc("6135", "ketoconazole"),
                dosageInstruction=[{"route": {"coding": [{"system": "http://snomed.info/sct", "code": "6064005"}]}}])
    assert fact.route == "topical"
    assert not route_matches(fact.route, ["systemic"]) and route_matches(fact.route, ["topical"])


def test_epinephrine_with_lidocaine_by_code_is_infiltration_unless_iv(normaliser):
    combo = {"coding": [{"system": RXNORM, "code": "3992"}, {"system": RXNORM, "code": "6387"}]}
    assert _med(normaliser, medicationCodeableConcept=combo).route == "infiltration"
    iv = [{"route": {"coding": [{"system": "http://snomed.info/sct", "code": "47625008"}]}}]
    assert _med(normaliser, medicationCodeableConcept=combo, dosageInstruction=iv).route == "intravenous"


def test_route_aliases():
    assert route_matches(None, ["systemic"]) and route_matches("oral", ["systemic"])
    assert not route_matches("ophthalmic", ["systemic"]) and route_matches("ophthalmic", ["topical"])
    assert route_matches("auto-injector", ["intramuscular"]) and route_matches("auto-injector", ["parenteral"])
    assert not route_matches("auto-injector", ["intravenous", "injection", "unknown"])


# -- exposure time ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, seconds", [
    ({"value": 14, "code": "d"}, 14 * 86400), ({"value": 2, "unit": "weeks"}, 14 * 86400),
    ({"value": 12, "code": "h"}, 12 * 3600), ({"value": -1, "code": "d"}, None), ({"value": 3, "code": "x"}, None),
    ({"value": True, "code": "d"}, None), ("14d", None), ({"value": 1e9, "code": "a"}, None),
])
def test_parse_duration(value, seconds):
    d = parse_duration(value)
    assert (d.total_seconds() if d else None) == seconds


def test_course_end_from_bounds_supply_and_validity(normaliser):
    ordered = "2026-02-13T12:00:00Z"  # 16 days before NOW
    bounds = _med(normaliser, authoredOn=ordered, dosageInstruction=[
        {"timing": {"repeat": {"boundsPeriod": {"start": ordered, "end": "2026-02-27T12:00:00Z"}}}}])
    assert bounds.time == parse_time(ordered) and bounds.exposure == parse_time("2026-02-27T12:00:00Z")
    duration = _med(normaliser, authoredOn=ordered, dosageInstruction=[
        {"timing": {"repeat": {"boundsDuration": {"value": 14, "code": "d"}}}}])
    assert duration.exposure == parse_time(ordered) + timedelta(days=14)
    supply = _med(normaliser, authoredOn=ordered, dispenseRequest={"expectedSupplyDuration": {"value": 10, "code": "d"}})
    assert supply.exposure == parse_time(ordered) + timedelta(days=10)
    validity = _med(normaliser, authoredOn=ordered, dispenseRequest={"validityPeriod": {"end": "2026-02-20T00:00:00Z"}})
    assert validity.exposure == parse_time("2026-02-20T00:00:00Z")
    plain = _med(normaliser, authoredOn=ordered)
    assert plain.course_end is None and plain.exposure == plain.time


def test_date_asserted_is_no_dose_time(normaliser):
    r = {"resourceType": "MedicationStatement", "id": "s", "status": "active", "dateAsserted": "2026-03-01T10:00:00Z",
         "medicationCodeableConcept": _cc("37418")}
    fact = normaliser.medication(r, MedicationIndex([]))
    assert fact.time is None and fact.exposure is None and fact.active
    assert fact.asserted == parse_time("2026-03-01T10:00:00Z")  # shown as when the list was reviewed
    r["effectiveDateTime"] = "2026-03-01T09:00:00Z"
    assert normaliser.medication(r, MedicationIndex([])).time == parse_time("2026-03-01T09:00:00Z")


# -- reasonReference -------------------------------------------------------------------------------------
def _condition(cid, code, verification="confirmed"):
    return {"resourceType": "Condition", "id": cid, "code": {"coding": [{"system": ICD10CM, "code": code}]},
            "verificationStatus": {"coding": [{"code": verification}]}}


def test_reason_reference_contained_bundle_and_record(rulebook, normaliser):
    draft = {"resourceType": "MedicationRequest", "id": "d1", "status": "draft", "intent": "order",
             "medicationCodeableConcept": _cc("897745"),
             "contained": [_condition("c", "S72.001A")],
             "reasonReference": [{"reference": "#c"}, {"reference": "Condition/in-bundle"},
                                 {"reference": "https://ehr.example/fhir/Condition/in-record/_history/2"},
                                 {"reference": "Condition/refuted"}, {"reference": "Condition/nowhere"}]}
    bundle = {"resourceType": "Bundle", "entry": [{"resource": draft}, {"resource": _condition("in-bundle", "S52.501A")}]}
    facts, meds = draft_facts(bundle, normaliser)
    assert [f.ref for f in facts] == ["MedicationRequest/d1"]
    fact = facts[0]
    assert set(fact.reasons) == {(ICD10CM, "S72.001A"), (ICD10CM, "S52.501A")}
    assert fact.reason_refs == ("Condition/in-record", "Condition/refuted", "Condition/nowhere")
    record = {"conditions": [_condition("in-record", "G43.909"), _condition("refuted", "S82.001A", "refuted")]}
    index = RecordIndex(record, normaliser, meds, facts, RuleConcepts.of(rulebook))
    reasons, _ = index.reasons_of(fact)
    assert set(reasons) == {(ICD10CM, "S72.001A"), (ICD10CM, "S52.501A"), (ICD10CM, "G43.909")}


# -- observations ----------------------------------------------------------------------------------------
def _obs(normaliser, **fields):
    r = {"resourceType": "Observation", "id": "o", "status": "final",
         "code": {"coding": [{"system": "http://loinc.org", "code": "21198-7"}]}, **fields}
    return normaliser.observations(r)[0]


@pytest.mark.parametrize("fields, positive", [
    ({"interpretation": [{"coding": [{"system": INTERP, "code": "POS"}]}]}, True),
    ({"interpretation": [{"coding": [{"system": INTERP, "code": "A"}]}]}, True),
    ({"interpretation": [{"coding": [{"system": INTERP, "code": "HH"}]}]}, True),
    ({"interpretation": [{"coding": [{"system": INTERP, "code": "NEG"}]}]}, False),
    ({"interpretation": [{"coding": [{"system": "http://example.org/local", "code": "A"}]}]}, False),
    ({"valueCodeableConcept": {"text": "Negative"}, "interpretation": [{"coding": [{"system": INTERP, "code": "A"}]}]}, False),
    ({"valueQuantity": {"value": 1250, "unit": "mIU/mL"}}, True),
    ({"valueQuantity": {"value": 40, "code": "[iU]/L"}}, True),
    ({"valueQuantity": {"value": 24, "unit": "mIU/mL"}, "interpretation": [{"coding": [{"system": INTERP, "code": "H"}]}]}, False),
    ({"valueQuantity": {"value": 30, "unit": "pmol/L"}}, False),  # other units: judged by text/flag only
    ({"valueQuantity": {"value": 30, "unit": "pmol/L"}, "interpretation": [{"coding": [{"system": INTERP, "code": "H"}]}]}, True),
])
def test_pregnancy_test_positive(normaliser, fields, positive):
    assert _compare(_obs(normaliser, **fields), "positive", 25) is positive


def test_milli_iu_per_ml():
    assert milli_iu_per_ml(5, "mIU/mL") == 5 and milli_iu_per_ml(5, "IU/L") == 5
    assert milli_iu_per_ml(0.5, "IU/mL") == 500 and milli_iu_per_ml(5, "ng/mL") is None
    assert milli_iu_per_ml(None, "mIU/mL") is None and milli_iu_per_ml(5, None) is None


# -- Child-Pugh score (kind "score") ------------------------------------------------------------------------
def _score_evidence(rulebook, record):
    from cds_hooks_service.engine import Evaluation, HookContext
    from cds_hooks_service.scenarios import expand_draft, expand_record
    normaliser = Normaliser(rulebook.terminology)
    bundle = {"resourceType": "Bundle", "entry": [{"resource": expand_draft(
        {"drug": "3418", "text": "dihydroergotamine 1 mg IV", "route": "IV"}, 0, NOW)}]}
    facts, meds = draft_facts(bundle, normaliser)
    resources = {"observations": [], "conditions": []}
    for i, item in enumerate(record):
        r = expand_record(dict(item), i, NOW)
        resources["observations" if r["resourceType"] == "Observation" else "conditions"].append(r)
    ctx = HookContext("order-sign", NOW, "p", None, None, facts, facts)
    index = RecordIndex(resources, normaliser, meds, facts, RuleConcepts.of(rulebook))
    rule = rulebook.get("dhe-contraindicated-condition")
    return Evaluation(rule, facts[0], ctx, index, rulebook, trace=False).check("child-pugh-class-c")


def test_child_pugh_card_item_names_the_values_and_the_absent_items(rulebook):
    e = _score_evidence(rulebook, [
        {"observation": "1975-2", "value": 51.3, "unit": "µmol/L", "at": "-1d"},  # 3.0 mg/dL: 2 points
        {"observation": "1751-7", "value": 2.7, "unit": "g/dL", "at": "-1d"},
        {"observation": "6301-6", "value": 2.5, "at": "-1d"},
        {"condition": "13920009", "display": "Hepatic encephalopathy"}])
    assert e is not None and e.items[0]["total"] == 11  # 2 + 3 + 3 + 2 + ascites 1
    text = e.items[0]["display"]
    assert "Total bilirubin 51.3 µmol/L" in text and ": 2;" in text and "Albumin 2.7 g/dL" in text
    assert "INR 2.5" in text and "Hepatic encephalopathy (Hepatic encephalopathy): 2" in text
    assert "Ascites (no verified code) (1)" in text


def test_child_pugh_unread_unit_counts_as_absent(rulebook):
    e = _score_evidence(rulebook, [
        {"observation": "1975-2", "value": 4.0, "unit": "mmol/L", "at": "-1d"},  # not a unit the rule reads
        {"observation": "1751-7", "value": 2.5, "unit": "g/dL", "at": "-1d"},
        {"observation": "6301-6", "value": 2.5, "at": "-1d"}])
    assert e is None  # 1 + 3 + 3 + 1 + 1 = 9


def test_score_items_feed_the_rule_concepts_and_the_prefetch_query(rulebook):
    concepts = RuleConcepts.of(rulebook)
    assert ("http://loinc.org", "1975-2") in concepts.observations
    assert ("http://loinc.org", "34714-6") in concepts.observations
    assert "1751-7" in rulebook.prefetch["observations"] and "6301-6" in rulebook.prefetch["observations"]


def test_prn_course_and_completed_validity_are_no_exposure(normaliser):
    ordered = "2026-02-09T12:00:00Z"
    prn = _med(normaliser, authoredOn=ordered, dispenseRequest={"expectedSupplyDuration": {"value": 30, "code": "d"}},
               dosageInstruction=[{"asNeededBoolean": True}])
    assert prn.course_end is None and prn.exposure == parse_time(ordered)
    done = _med(normaliser, status="completed", authoredOn=ordered,
                dispenseRequest={"validityPeriod": {"end": "2027-02-09T00:00:00Z"}})
    assert done.course_end is None


def test_order_dated_year_9999_is_no_server_error(rulebook):
    """A hostile far-future date: the window end would overflow; the card still renders (was a 500)."""
    from cds_hooks_service.config import Settings
    from cds_hooks_service.hook_call import call_service
    from cds_hooks_service.scenarios import Scenario, expand_draft
    from cds_hooks_service.services import SERVICE_FOR_HOOK
    settings = Settings.from_env()
    settings.fixed_now = NOW
    record = [{"resourceType": "MedicationRequest", "id": "x", "status": "active", "intent": "order",
               "authoredOn": "9999-12-31T23:00:00Z", "medicationCodeableConcept": _cc("21212"),
               "dispenseRequest": {"expectedSupplyDuration": {"value": 3, "code": "d"}}}]
    sc = Scenario("dhe-cyp3a4-inhibitor", "far future", "fire", None, None, NOW,
                  [expand_draft({"drug": "3418", "route": "IV"}, 0, NOW)], record, None, None)
    result = call_service(SERVICE_FOR_HOOK["order-sign"], sc.request("order-sign"), rulebook=rulebook, store=None,
                          settings=settings)
    assert [c["indicator"] for c in result.response["cards"]] == ["critical"]


# -- the cheap tests run on every resource of the record (written out for speed: the same answers) ----------------
@pytest.mark.parametrize("value, expected", [
    ({"coding": [{"system": ICD10CM, "code": "G43.909"}]}, True),
    ({"coding": {"system": ICD10CM, "code": " G43909 "}}, True),  # one coding sent as an object, padded code
    ([{"text": "x"}, {"coding": [{"code": "G43.909"}]}], True),  # a list of concepts, the second one coded
    ({"coding": [{"code": "I10"}, "junk", None]}, False),
    ({"coding": [{"code": ["G43.909"]}]}, False),  # a code of the wrong type is no code
    ({"coding": "G43.909"}, False),
    # an odd coding before the match: the usual-shape loop gives way to the lenient one, which still finds it
    ({"coding": [{"code": "I10"}, {"system": ICD10CM}, {"code": "G43.909"}]}, True),
    ({"coding": [{"code": 5}, None, {"code": "G43909"}]}, True),
    ({"coding": [{"code": "I10"}, {"code": None}, {"code": {"x": 1}}]}, False),
    ({"text": "migraine"}, False),
    ("G43.909", False),
    (None, False),
])
def test_may_match_reads_odd_shapes_as_the_normaliser_does(value, expected):
    from cds_hooks_service.facts import bare_codes, may_match
    assert may_match(value, bare_codes(frozenset({(ICD10CM, "G43.909")}))) is expected


def test_prefetch_bundle_entries_read_leniently():
    from cds_hooks_service.patient_data import _from_prefetch
    ok = {"resourceType": "Condition", "id": "c1"}
    bundle = {"resourceType": "Bundle", "entry": [
        {"resource": ok}, {"resource": dict(ok, id="c2"), "search": {"mode": "match"}},
        {"resource": dict(ok, id="c3"), "search": {"mode": "include"}},  # included, not a match: not the patient's list
        {"resource": dict(ok, id="c4"), "search": "odd"},  # a search of the wrong type counts as absent
        {"resource": {"resourceType": "OperationOutcome"}}, {"resource": "x"}, "junk", None]}
    resources, nxt = _from_prefetch(bundle)
    assert [r["id"] for r in resources] == ["c1", "c2", "c4"] and nxt is None
    assert _from_prefetch({"resourceType": "Bundle", "entry": {"resource": ok}}) == ([], None)


def test_the_per_process_caches_keep_no_long_text(normaliser):
    """Review, 2026-12-02: the route and drug-name caches were bounded in entries, not in size: 200 calls with a
    1 MB dosage text each kept 200 MB alive after their requests. A text longer than CACHE_KEY_MAX_CHARS is read
    without the caches (the same answer), so no large text outlives its request."""
    from cds_hooks_service import facts
    from cds_hooks_service.terminology import CACHE_KEY_MAX_CHARS

    terminology = normaliser.terminology
    words = "lidocaine and epinephrine injection (cache test)"  # an injection route, then the local-names check
    long_text = words + " x" * CACHE_KEY_MAX_CHARS
    r = {"resourceType": "MedicationRequest", "id": "long", "status": "active", "intent": "order",
         "medicationCodeableConcept": {"text": long_text}}

    def looked_up():  # calls of the two route caches so far
        return sum(f.cache_info().hits + f.cache_info().misses
                   for f in (facts._route_of_words.cache, facts._local_names.cache))

    before = looked_up()
    assert normaliser.medication(r, MedicationIndex([])).route == "infiltration"  # read as before
    assert looked_up() == before and ((), (long_text,)) not in terminology._recognised
    r["medicationCodeableConcept"]["text"] = words
    assert normaliser.medication(r, MedicationIndex([])).route == "infiltration"
    assert looked_up() == before + 2 and ((), (words,)) in terminology._recognised  # a short text is kept


def test_every_field_of_the_facts_is_read_into_its_own_place(normaliser):
    """The readers build the facts with positional arguments (for speed): each field from a resource whose
    values all differ, checked by name, so two fields swapped in a constructor fail here."""
    from cds_hooks_service.facts import ConditionFact, MedicationFact, ObservationFact

    med = {"resourceType": "MedicationAdministration", "id": "a1", "status": "completed",
           "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "313160"}], "text": "sumatriptan 6 mg"},
           "effectivePeriod": {"start": "2026-02-28T08:00:00Z", "end": "2026-02-28T09:00:00Z"},
           "context": {"reference": "Encounter/e7"},
           "reasonCode": [{"coding": [{"system": ICD10CM, "code": "G43.909"}], "text": "migraine"}],
           "reasonReference": [{"reference": "Condition/c9", "display": "headache"}],
           "dosage": {"route": {"text": "subcutaneous"}, "text": "6 mg SC"}}
    m = normaliser.medication(med, MedicationIndex([]))
    assert len(m) == len(MedicationFact._fields) == 17
    assert (m.source, m.ref, m.display, m.matched_by, m.matched_names) == \
        ("MedicationAdministration", "MedicationAdministration/a1", "sumatriptan 6 mg", "code", ())
    assert (RXNORM, "313160") in m.concepts and m.status == "completed" and m.active is False
    assert (m.time, m.course_end) == (parse_time("2026-02-28T09:00:00Z"),) * 2  # the period end, both
    assert (m.route, m.encounter, m.resource) == ("subcutaneous", "Encounter/e7", med)
    assert (m.reasons, m.reason_texts, m.reason_refs) == (((ICD10CM, "G43.909"),), ("migraine", "headache"),
                                                          ("Condition/c9",))
    ordered = _med(normaliser, medicationCodeableConcept=_cc("313160"), authoredOn="2026-02-01T00:00:00Z",
                   dispenseRequest={"expectedSupplyDuration": {"value": 30, "unit": "days"}})
    assert (ordered.active, ordered.time, ordered.course_end) == (
        True, parse_time("2026-02-01T00:00:00Z"), parse_time("2026-03-03T00:00:00Z"))

    cond = Normaliser.condition({
        "resourceType": "Condition", "id": "c1", "clinicalStatus": {"coding": [{"code": "active"}]},
        "verificationStatus": {"coding": [{"code": "provisional"}]}, "encounter": {"reference": "Encounter/e1"},
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-category",
                                  "code": "encounter-diagnosis"}]}], "recordedDate": "2026-01-02T03:04:05Z",
        "code": {"coding": [{"system": ICD10CM, "code": "G43.909"}], "text": "Migraine"}})
    assert len(cond) == len(ConditionFact._fields) == 8
    assert (cond.ref, cond.display, cond.concepts) == ("Condition/c1", "Migraine", frozenset({(ICD10CM, "G43.909")}))
    assert (cond.clinical_status, cond.verification_status, cond.encounter, cond.encounter_diagnosis, cond.time) == \
        ("active", "provisional", "Encounter/e1", True, parse_time("2026-01-02T03:04:05Z"))

    [obs] = Normaliser.observations({
        "resourceType": "Observation", "id": "o1", "status": "final", "effectiveDateTime": "2026-02-01T10:00:00Z",
        "code": {"coding": [{"system": "http://loinc.org", "code": "33914-3"}], "text": "eGFR"},
        "valueQuantity": {"value": 42, "unit": "mL/min/1.73m2"},
        "interpretation": [{"coding": [{"system": INTERP, "code": "l"}]}]})
    assert len(obs) == len(ObservationFact._fields) == 8
    assert (obs.ref, obs.display, obs.concepts, obs.value, obs.unit, obs.value_text, obs.time, obs.interpretation) \
        == ("Observation/o1", "eGFR", frozenset({("http://loinc.org", "33914-3")}), 42.0, "mL/min/1.73m2", "l",
            parse_time("2026-02-01T10:00:00Z"), frozenset({"L"}))


# The one-pass readers of the usual shapes give the lenient readers' answers for any JSON (differential tests):
# near-usual shapes with any JSON in any place.
_ATOMS = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from(
    ["", " G43909 ", "G43.909", "match", "include", "OperationOutcome", "Condition", ICD10CM, RXNORM, "313160"]))
_JSON = st.recursive(_ATOMS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(["coding", "text", "code", "resource", "mode"]), inner, max_size=3), max_leaves=8)


def _usual_or(usual):
    return st.one_of(usual, usual, usual, _JSON)  # mostly the usual shape, sometimes anything


_CODING = _usual_or(st.fixed_dictionaries({}, optional={"system": _usual_or(st.sampled_from([ICD10CM, RXNORM])),
                                                        "code": _usual_or(st.sampled_from(["G43.909", " G43909 "])),
                                                        "display": _usual_or(st.just("Migraine"))}))
_CONCEPT = _usual_or(st.fixed_dictionaries({}, optional={"coding": _usual_or(st.lists(_CODING, max_size=3)),
                                                         "text": _usual_or(st.just("migraine"))}))
_ENTRY = _usual_or(st.fixed_dictionaries({}, optional={
    "resource": _usual_or(st.fixed_dictionaries({}, optional={
        "resourceType": _usual_or(st.sampled_from(["Condition", "OperationOutcome"]))})),
    "search": _usual_or(st.fixed_dictionaries({}, optional={"mode": _usual_or(st.sampled_from(["match", "include"]))}))}))


@settings(max_examples=500, deadline=None)
@given(value=_CONCEPT)
def test_codeable_concepts_fast_path_reads_as_the_lenient_loop(value):
    from cds_hooks_service.facts import codeable_concepts
    assert codeable_concepts(value) == codeable_concepts([value] if isinstance(value, dict) else value)


@settings(max_examples=500, deadline=None)
@given(entries=st.lists(_ENTRY, max_size=6))
def test_bundle_entries_fast_path_reads_as_the_lenient_reader(entries):
    from cds_hooks_service.patient_data import _from_prefetch, _read_entry
    expected: list = []
    for entry in entries:
        _read_entry(entry, expected)
    resources, _ = _from_prefetch({"resourceType": "Bundle", "entry": entries})
    assert [id(r) for r in resources] == [id(r) for r in expected]
