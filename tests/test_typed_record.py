"""The typed decoding of the prefetched record (request_body, typed_record) gives what the dictionary path gives:
the same facts for every resource it decodes, the same answer for every example request, the same 400 for
every body orjson refuses (but one difference, on purpose: an out-of-range number in a field never read)."""
from __future__ import annotations

import json
import re

import msgspec
import orjson
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from cds_hooks_service import request_body, typed_record
from cds_hooks_service.config import Settings
from cds_hooks_service.errors import BadRequest
from cds_hooks_service.examples import examples
from cds_hooks_service.facts import MedicationIndex, Normaliser, parse_time
from cds_hooks_service.hook_call import call_service
from cds_hooks_service.index import RecordIndex, RuleConcepts
from cds_hooks_service.patient_data import _from_prefetch
from cds_hooks_service.services import SERVICE_FOR_HOOK
from cds_hooks_service.terminology import ICD10CM, LOINC, SNOMED
from tests.helpers import REPO, shipped_rulebook

INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
KINDS = {"conditions": "conditions", "observations": "observations", "procedures": "procedures",
         "medicationRequests": "medications", "medicationAdministrations": "medications",
         "medicationStatements": "medications"}
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
# hydromorphone, DHE, sumatriptan (and a sumatriptan tablet), clarithromycin, ketamine, lidocaine, epinephrine
DRUGS = frozenset((RXNORM, c) for c in ("3423", "3418", "37418", "313160", "21212", "6130", "6387", "3992"))
# Value sets as a check would ask for them (None: the explain trace, which keeps every fact).
RELEVANT = [None, frozenset(), frozenset({(ICD10CM, "G43.909"), (SNOMED, "37796009")}),
            frozenset({(LOINC, "8480-6"), (LOINC, "2160-0")}), frozenset({(SNOMED, "80146002"), (ICD10CM, "X1")}),
            frozenset({(RXNORM, "3423"), (RXNORM, "37418")}), frozenset({(RXNORM, "3418"), (RXNORM, "6387")})]
# What a medicationReference "Medication/m1" and a reasonReference "Condition/x" point at (the draft bundle's).
BUNDLED = [{"resourceType": "Medication", "id": "m1", "code": {"coding": [{"system": RXNORM, "code": "3418"}]},
            "form": {"text": "injection"}},
           {"resourceType": "Condition", "id": "x", "code": {"coding": [{"system": ICD10CM, "code": "G43.909"}]}}]

# -- resources: the usual shapes, and (odd=True) now and then any JSON value in any field ------------------------
_ANY = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(["", "x", "final", "G43.909", "Bundle", "Condition"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["coding", "text", "code", "value", "reference", "end", "resourceType"]), inner, max_size=3),
    max_leaves=6)


def _resources(odd: bool):
    def usual(s):
        return st.one_of(s, s, s, s, s, s, _ANY) if odd else s

    def obj(**fields):
        return usual(st.fixed_dictionaries({}, optional=fields))

    code = st.sampled_from(["G43.909", " G43909 ", "G43909", "37796009", "8480-6", "2160-0", "80146002", "X1", "",
                            "POS", "neg", "H", "active", "refuted", "entered-in-error", "encounter-diagnosis"])
    system = st.sampled_from([ICD10CM, SNOMED, LOINC, "urn:oid:2.16.840.1.113883.6.96", INTERPRETATION,
                              "http://hl7.org/fhir/sid/icd-10", "http://example.org/other"])
    coding = obj(system=usual(system), code=usual(code), display=usual(st.sampled_from(["Migraine", "BP", ""])))
    concept = obj(coding=usual(st.lists(coding, max_size=3) | coding), text=usual(st.sampled_from(["migraine", "Pos"])))
    concepts = usual(concept | st.lists(concept, max_size=2))
    time = usual(st.sampled_from(["2024-05-01T10:00:00Z", "2024", "2024-05", "2024-05-01", "not a time", "",
                                  "9999-12-31T23:59:59-14:00", "2024-05-01T10:00:00.5+02:00"]))
    reference = obj(reference=usual(st.sampled_from(["Encounter/1", "http://x/fhir/Encounter/2/_history/1", ""])))
    status = usual(st.sampled_from(["active", "resolved", "refuted", "confirmed", "entered-in-error", "final",
                                    "amended", "cancelled", "preliminary", "completed", "not-done", "preparation"]))
    ident = usual(st.sampled_from(["c1", "o-2", "p.3"]))
    period = obj(start=time, end=time)
    unread = {"subject": reference, "note": _ANY, "meta": _ANY}  # fields no reader reads: skipped when typed
    quantity = obj(value=usual(st.integers(-10, 10**30) | st.floats(-1e6, 1e6)),  # (booleans: in _ANY)
                   unit=usual(st.sampled_from(["mmHg", "mIU/mL", ""])), code=usual(st.sampled_from(["mm[Hg]", ""])))
    values = {"code": concepts, "valueQuantity": quantity, "valueCodeableConcept": concept,
              "valueString": usual(st.sampled_from(["Positive", "NEG", ""])), "interpretation": concepts}
    component = obj(**values)

    def resource(rtype, **fields):
        return st.fixed_dictionaries({"resourceType": st.just(rtype)}, optional={"id": ident, **fields, **unread})

    drug_code = usual(st.sampled_from(sorted(code for _, code in DRUGS) + ["999999", " 3423 "]))
    drug = obj(coding=usual(st.lists(obj(system=usual(st.sampled_from([RXNORM, "http://example.org/ndc"])),
                                         code=drug_code, display=usual(st.just("Dilaudid"))), max_size=2)),
               text=usual(st.sampled_from(["hydromorphone 2 mg IV", "DHE 45", "lidocaine with epinephrine injection",
                                           "sumatriptan 6 mg autoinjector", "ketamine", "vitamin D"])))
    duration = obj(value=usual(st.integers(0, 400) | st.floats(0, 100)), unit=usual(st.sampled_from(["days", "h"])),
                   code=usual(st.sampled_from(["d", "wk", "mo", "x"])))
    dosage = obj(text=usual(st.sampled_from(["2 mg IV push", "1 tab PO", "inject SC", "local infiltration"])),
                 route=usual(obj(coding=usual(st.lists(obj(system=usual(st.just(SNOMED)), code=usual(
                     st.sampled_from(["47625008", "26643006", "34206005", "1"]))), max_size=1)),
                     text=usual(st.sampled_from(["IV", "oral", "topical"])))),
                 timing=obj(repeat=obj(boundsPeriod=period, boundsDuration=duration)),
                 asNeededBoolean=usual(st.booleans()), asNeededCodeableConcept=concept)
    dosages = usual(st.lists(dosage, max_size=2) | dosage)
    reason = obj(reference=usual(st.sampled_from(["#c", "Condition/x", "Condition/elsewhere", "#none", ""])),
                 display=usual(st.just("headache")))
    contained = usual(st.lists(usual(st.sampled_from([
        {"resourceType": "Medication", "id": "med", "code": {"coding": [{"system": RXNORM, "code": "3423"}]},
         "form": {"text": "injection"}, "amount": {"numerator": {"value": 1}}},
        {"resourceType": "Medication", "id": "med", "ingredient": [{"itemCodeableConcept": {"coding": [
            {"system": RXNORM, "code": "3418"}]}}]},
        {"resourceType": "Condition", "id": "c", "code": {"coding": [{"system": ICD10CM, "code": "G43.909"}]}},
        {"resourceType": "Condition", "id": "c", "verificationStatus": "refuted"},
        {"resourceType": "Organization", "id": "med", "name": "pharmacy"}])), max_size=2))
    medication = {
        "status": status, "medicationCodeableConcept": usual(drug | st.lists(drug, max_size=2)),
        "medicationReference": obj(reference=usual(st.sampled_from(["#med", "Medication/m1", "#gone"])),
                                   display=usual(st.just("Migranal"))),
        "contained": contained, "reasonCode": concepts, "reasonReference": usual(st.lists(reason, max_size=2) | reason),
        "dosageInstruction": dosages, "dosage": dosages, "effectiveDateTime": time, "effectivePeriod": period,
        "authoredOn": time, "dateWritten": time, "dateAsserted": time, "encounter": reference, "context": reference,
        "dispenseRequest": obj(validityPeriod=period, expectedSupplyDuration=duration)}
    medication_resource = st.one_of(*(
        resource(rtype, **medication) for rtype in ("MedicationRequest", "MedicationAdministration",
                                                    "MedicationStatement", "MedicationOrder")))
    return {
        "medicationRequests": medication_resource, "medicationAdministrations": medication_resource,
        "medicationStatements": medication_resource,
        "conditions": resource("Condition", code=concepts, clinicalStatus=status | concepts,
                               verificationStatus=status | concepts, category=concepts, encounter=reference,
                               context=reference, onsetDateTime=time, recordedDate=time, assertedDate=time),
        "observations": resource("Observation", status=status, component=usual(st.lists(component, max_size=3)
                                                                                  | component),
                                 effectiveDateTime=time, effectivePeriod=period, issued=time, **values),
        "procedures": resource("Procedure", status=status, code=concepts, performedDateTime=time,
                               performedPeriod=period),
    }


USUAL, ODD = _resources(odd=False), _resources(odd=True)


def _facts(key: str, resources: list, relevant) -> tuple:
    """The facts (and counts) the record index builds of ``resources`` under ``key``."""
    concepts = None if relevant is None else RuleConcepts(relevant, relevant, relevant, relevant)
    index = RecordIndex({key: resources}, Normaliser(shipped_rulebook().terminology), MedicationIndex(BUNDLED), [],
                        concepts)
    facts = getattr(index, KINDS[key]).facts
    if KINDS[key] == "medications":  # the resource read: the Struct or the dictionary
        assert all(type(f.resource) is (dict if isinstance(resources[0], dict) else typed_record.Medication)
                   for f in facts)
        facts = [f._replace(resource=None) for f in facts]
    return facts, dict(index.stats)


def _bundle(resources: list, link=None) -> bytes:
    bundle = {"resourceType": "Bundle", "entry": [{"resource": r} for r in resources]}
    if link is not None:
        bundle["link"] = link
    return json.dumps(bundle).encode()


def _same_facts(key: str, resources: list, relevant) -> bool:
    """Whether the Bundle of ``resources`` decodes typed; if it does, the facts must be those of the dictionaries."""
    raw = _bundle(resources)
    try:
        typed, _ = msgspec.json.decode(raw, type=typed_record.BUNDLES[key]).resources_and_next()
    except msgspec.ValidationError:
        return False  # not the usual shape: the request is read as dictionaries
    plain, _ = _from_prefetch(orjson.loads(raw))
    assert all(isinstance(r, msgspec.Struct) for r in typed)
    assert _facts(key, typed, relevant) == _facts(key, plain, relevant)
    return True


@pytest.mark.parametrize("key", sorted(KINDS))
@settings(max_examples=60, deadline=None)
@given(data=st.data(), relevant=st.sampled_from(RELEVANT))
def test_usual_shapes_decode_typed_and_give_the_dictionary_readers_facts(key, data, relevant):
    resources = data.draw(st.lists(USUAL[key], max_size=4))
    assert _same_facts(key, resources, relevant)  # every usual shape decodes typed


@pytest.mark.parametrize("key", sorted(KINDS))
@settings(max_examples=150, deadline=None)
@given(data=st.data(), relevant=st.sampled_from(RELEVANT))
def test_any_shape_that_decodes_typed_gives_the_dictionary_readers_facts(key, data, relevant):
    resources = data.draw(st.lists(ODD[key], max_size=3))
    event("decoded typed" if _same_facts(key, resources, relevant) else "read as dictionaries")


def test_the_typed_medication_reader_finds_what_a_check_looks_for():
    given = {"resourceType": "MedicationAdministration", "id": "a1", "status": "completed",
             "medicationReference": {"reference": "#med"}, "contained": [{"resourceType": "Medication", "id": "med",
                                                                          "code": {"coding": [{"system": RXNORM,
                                                                                               "code": "3418"}]}}],
             "effectiveDateTime": "2026-02-28T08:00:00Z", "dosage": {"route": {"text": "IM"}},
             "reasonReference": [{"reference": "Condition/x", "display": "migraine"}]}
    [fact], stats = _facts("medicationAdministrations",
                           [msgspec.json.decode(json.dumps(given), type=typed_record.Medication)], RELEVANT[6])
    assert (fact.ref, fact.concepts >= {(RXNORM, "3418")}, fact.route, fact.time, fact.reasons, fact.reason_texts) == (
        "MedicationAdministration/a1", True, "intramuscular", parse_time("2026-02-28T08:00:00Z"),
        ((ICD10CM, "G43.909"),), ("migraine",))
    assert stats == {"resources": 1, "normalised": 1, "skipped": 0}


def test_the_typed_readers_find_what_a_check_looks_for():
    """Not a comparison of two empty lists: the generated resources do give facts."""
    migraine = {"resourceType": "Condition", "id": "c1", "code": {"coding": [{"system": ICD10CM, "code": " G43909 "}]},
                "verificationStatus": {"coding": [{"code": "confirmed"}]}, "category": [{"coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/condition-category", "code": "encounter-diagnosis"}]}], "encounter": {"reference": "Encounter/9"}, "recordedDate": "2024"}
    facts, stats = _facts("conditions", [msgspec.json.decode(json.dumps(migraine), type=typed_record.Condition)],
                          RELEVANT[2])
    assert [(f.ref, f.concepts, f.verification_status, f.encounter, f.encounter_diagnosis, f.time.year)
            for f in facts] == [("Condition/c1", frozenset({(ICD10CM, "G43.909")}), "confirmed", "Encounter/9", True,
                                 2024)]
    assert stats == {"resources": 1, "normalised": 1, "skipped": 0}


# -- links and entries of a Bundle --------------------------------------------------------------------------------
_LINK = st.fixed_dictionaries({}, optional={"relation": st.sampled_from(["self", "next", "previous"]) | _ANY,
                                            "url": st.sampled_from(["http://fhir/x?page=2", ""]) | _ANY})
_ENTRY = st.fixed_dictionaries({}, optional={
    "resource": USUAL["conditions"] | st.just({"resourceType": "OperationOutcome"}) | _ANY,
    "search": st.fixed_dictionaries({}, optional={"mode": st.sampled_from(["match", "include", "outcome"]) | _ANY})
    | _ANY})


@settings(max_examples=200, deadline=None)
@given(entries=st.lists(_ENTRY, max_size=4), links=st.lists(_LINK, max_size=3) | _ANY)
def test_a_bundle_decoded_typed_gives_the_entries_and_the_next_link_the_dictionary_reader_gives(entries, links):
    raw = json.dumps({"resourceType": "Bundle", "entry": entries, "link": links}).encode()
    try:
        typed, typed_next = msgspec.json.decode(raw, type=typed_record.ConditionBundle).resources_and_next()
    except msgspec.ValidationError:
        event("read as dictionaries")
        return
    event("decoded typed")
    plain, plain_next = _from_prefetch(orjson.loads(raw))
    assert typed_next == plain_next
    assert [msgspec.to_builtins(r) for r in typed] == [_fields_read(r) for r in plain]


def _fields_read(condition: dict) -> dict:
    """A usual Condition as the typed decoding keeps it: the fields the readers read (no null: omitted)."""
    return {k: v for k, v in condition.items() if k in typed_record.Condition.__struct_fields__ and v is not None}


# -- whole request bodies ---------------------------------------------------------------------------------------
def _bundle_of(resource):
    return st.builds(lambda rs: {"resourceType": "Bundle", "entry": [{"resource": r} for r in rs]},
                     st.lists(resource, max_size=3))


# Bodies of the usual shape (each prefetch key a Bundle of its kind, or null), and bodies with anything anywhere.
_SENT = ("conditions", "observations", "medicationRequests")  # always sent: an empty prefetch would prove little
_USUAL_PREFETCH = st.fixed_dictionaries(
    {key: _bundle_of(USUAL[key]) for key in _SENT},
    optional={key: _bundle_of(USUAL[key]) | st.none() for key in KINDS if key not in _SENT} | {"patient": _ANY})
_ODD_VALUE = st.one_of(st.none(), _ANY, st.just({"resourceType": "OperationOutcome"}),
                       _bundle_of(st.one_of(*USUAL.values(), *ODD.values())))
_ODD_PREFETCH = st.one_of(_ANY, st.builds(lambda p, odd: {**p, **odd}, _USUAL_PREFETCH, st.dictionaries(
    st.sampled_from([*KINDS, "patient", "somethingElse"]), _ODD_VALUE, min_size=1, max_size=2)))


def _body(prefetch, **odd):
    return st.fixed_dictionaries(
        {"hook": st.just("order-sign"), "hookInstance": st.just("h1"), "prefetch": prefetch,
         "context": st.fixed_dictionaries({"patientId": st.just("p1")}, optional={"draftOrders": _ANY})},
        optional={"fhirServer": st.just("http://fhir.example.org"), "extension": _ANY, **odd})


_BODY = _body(_USUAL_PREFETCH)
_ODD_BODY = _body(_USUAL_PREFETCH | _ODD_PREFETCH, unknownMember=_ANY, extension=_ANY | st.just("x"))


@settings(max_examples=250, deadline=None)
@given(body=_BODY | _ODD_BODY)
def test_a_body_decodes_to_what_orjson_gives_with_its_usual_bundles_typed(body):
    raw = json.dumps(body).encode()
    decoded, plain = request_body.decode(raw), orjson.loads(raw)
    prefetch = decoded.get("prefetch")
    typed = {k: v for k, v in prefetch.items() if isinstance(v, msgspec.Struct)} if isinstance(prefetch, dict) else {}
    event("some prefetch typed" if typed else "no prefetch typed")
    assert {k: v for k, v in decoded.items() if k != "prefetch"} == {k: v for k, v in plain.items() if k != "prefetch"}
    if not typed:
        assert decoded == plain
        return
    assert {k: v for k, v in decoded["prefetch"].items() if k not in typed} == \
        {k: v for k, v in plain["prefetch"].items() if k not in typed}
    assert set(typed) <= set(typed_record.BUNDLES)
    rule_concepts = RuleConcepts.of(shipped_rulebook())
    for key, value in typed.items():
        (typed_resources, typed_next), (resources, next_link) = _from_prefetch(value), _from_prefetch(plain["prefetch"][key])
        assert typed_next == next_link
        relevant = getattr(rule_concepts, KINDS[key])
        assert _facts(key, typed_resources, relevant) == _facts(key, resources, relevant)
        assert _facts(key, typed_resources, None) == _facts(key, resources, None)


NOT_JSON = [
    b'{"hook": "order-sign", "prefetch": {"conditions": {"resourceType": "Bundle", "entry": [{"resource": '
    b'{"resourceType": "Condition", "note": "\xff"}}]}}}',  # invalid UTF-8 in a field the typed decoding skips
    b'{"prefetch": {"conditions": {"resourceType": "Bundle", "meta": {"\xed\xa0\x80": 1}}}}',  # a UTF-8 surrogate
    b'{"prefetch": {"conditions": {"resourceType": "Bundle", "entry": [], "x": "\\ud800"}}}',  # a lone surrogate
    b'{"prefetch": {"observations": {"resourceType": "Bundle", "x": NaN}}}',
    b'{"prefetch": {"procedures": {"resourceType": "Bundle", "x": [1,]}}}',
    b'{"context": {"a": 1e400}, "prefetch": {}}',  # out of range in a part orjson parses
    b'{"prefetch": {"conditions": {"resourceType": "Bundle", "x": ' + b"[" * 2000 + b"]" * 2000 + b"}}}",
    b'{"hook": "order-sign"} trailing',
    # a number orjson cannot hold, where the typed decoding expects a contained resource
    b'{"prefetch": {"medicationRequests": {"resourceType": "Bundle", "entry": [{"resource": {"resourceType": '
    b'"MedicationRequest", "contained": [' + b"1" * 400 + b']}}]}}}',
]


@pytest.mark.parametrize("raw", NOT_JSON)
def test_a_body_orjson_refuses_is_refused_with_orjsons_reason(raw):
    with pytest.raises(orjson.JSONDecodeError) as expected:
        orjson.loads(raw)
    with pytest.raises(BadRequest) as refused:
        request_body.decode(raw)
    assert refused.value.message == f"the request body is not valid JSON: {expected.value}"


@pytest.mark.parametrize("raw", [
    b'{"prefetch": {"conditions": {"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Condition", '
    b'"id": "c1", "note": [{"value": 1e400}]}}]}}}',
    b'{"prefetch": {"conditions": {"resourceType": "Bundle", "total": ' + b"9" * 400 + b', "entry": [{"resource": '
    b'{"resourceType": "Condition", "id": "c1"}}]}}}',
    b'{"prefetch": {"medicationRequests": {"resourceType": "Bundle", "entry": [{"resource": {"resourceType": '
    b'"MedicationRequest", "id": "c1", "contained": [{"resourceType": "Medication", "amount": {"value": 1e400}}]}}]}}}',
])
def test_an_out_of_range_number_in_a_part_never_read_is_skipped_on_purpose(raw):
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(raw)
    [bundle] = request_body.decode(raw)["prefetch"].values()
    assert [e.resource.id for e in bundle.entry] == ["c1"]


def test_non_ascii_text_is_decoded_typed():
    raw = json.dumps({"prefetch": {"conditions": {"resourceType": "Bundle", "entry": [{"resource": {
        "resourceType": "Condition", "code": {"text": "Migräne ohne Aura"}, "note": [{"text": "µg ✓"}]}}]}}},
        ensure_ascii=False).encode()
    assert not raw.isascii()
    [entry] = request_body.decode(raw)["prefetch"]["conditions"].entry
    assert entry.resource.code.text == "Migräne ohne Aura"


def test_the_schema_sees_a_typed_bundle_as_the_object_it_was():
    body = request_body.decode(b'{"prefetch": {"conditions": {"resourceType": "Bundle"}, "patient": null}}')
    assert isinstance(body["prefetch"]["conditions"], typed_record.ConditionBundle)
    assert request_body.for_schema(body) == {"prefetch": {"conditions": {}, "patient": None}}
    plain = {"prefetch": {"conditions": {"resourceType": "Bundle"}}}
    assert request_body.for_schema(plain) is plain


def test_a_reason_reference_finds_a_condition_decoded_typed():
    rulebook = shipped_rulebook()
    raw = _bundle([{"resourceType": "Condition", "id": "mig", "code": {"coding": [{"system": ICD10CM,
                                                                                   "code": "G43.909"}]}},
                   {"resourceType": "Condition", "id": "ruled-out", "verificationStatus": "refuted",
                    "code": {"coding": [{"system": ICD10CM, "code": "G43.909"}]}}])
    typed, _ = msgspec.json.decode(raw, type=typed_record.ConditionBundle).resources_and_next()
    plain, _ = _from_prefetch(orjson.loads(raw))
    normaliser = Normaliser(rulebook.terminology)
    draft = normaliser.medication({"resourceType": "MedicationRequest", "id": "d1", "status": "draft",
                                   "medicationCodeableConcept": {"text": "hydromorphone"},
                                   "reasonReference": [{"reference": "Condition/mig"},
                                                       {"reference": "Condition/ruled-out"}]},
                                  MedicationIndex([]), source="draft")
    assert draft.reason_refs == ("Condition/mig", "Condition/ruled-out")
    reasons = [RecordIndex({"conditions": resources}, normaliser, MedicationIndex([]), [draft], None).reasons_of(draft)
               for resources in (typed, plain)]
    assert reasons[0] == reasons[1] == (((ICD10CM, "G43.909"),), ())


# -- every example request: the same answer either way ---------------------------------------------------------
EXAMPLES = [(ex, hook) for ex in examples(REPO / "fhir_examples") for hook in ("order-select", "order-sign")
            if hook in ex.files]
_UUID = re.compile(r'"uuid": "[^"]*"')


def _answer(body: dict, hook: str, now, trace: bool) -> str:
    settings = Settings(suppression_secret=b"t", fixed_now=now)
    result = call_service(SERVICE_FOR_HOOK[hook], body, rulebook=shipped_rulebook(), store=None, settings=settings,
                          trace=trace)
    return _UUID.sub('"uuid": "-"', json.dumps(result.response, sort_keys=True))


@pytest.mark.parametrize("example, hook", EXAMPLES, ids=[f"{e.name}-{h}" for e, h in EXAMPLES])
def test_every_example_answers_the_same_decoded_typed_or_as_dictionaries(example, hook):
    raw = example.files[hook].read_bytes()
    typed = request_body.decode(raw)
    assert any(isinstance(v, msgspec.Struct) for v in typed["prefetch"].values())  # the typed path is taken
    now = parse_time(example.now.isoformat())
    for trace in (False, True):  # (with the trace, every rule is evaluated and every fact kept)
        assert _answer(typed, hook, now, trace) == _answer(orjson.loads(raw), hook, now, trace)
