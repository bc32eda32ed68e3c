"""The record's usual shapes, decoded typed (msgspec) and read into facts without a dictionary in between.

The prefetched Bundles of Conditions, medications (orders, administrations, statements), Observations and
Procedures are most of a hook request's bytes, and the index skips most of their resources after one look-up
of their codes or names. Decoded into the Structs below, a resource keeps only the fields ``facts.py`` reads
(the rest of its JSON is skipped while decoding, never built), and a field holds its JSON type or the decoding
fails: so the readers here need no type tests.

Only the usual shapes decode: a field of another JSON type (a number where a string is expected, a string
where an object is), an entry without a resource or of another resource type, a Bundle that is not one. The
whole request is then read as dictionaries (``request_body``), by the lenient readers of ``facts.py``,
which read a field of the wrong type as absent. The readers here give the facts those readers give for the
same JSON (``tests/test_typed_record.py`` checks it field by field on generated resources): where this
module and ``facts.py`` differ, this module is wrong.

Nothing here knows HTTP, the store or the FHIR client.
"""
from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal

from msgspec import UNSET, Struct, UnsetType, to_builtins

from .facts import (_CONDITION_EXCLUDED, _DURATION_UNITS, _MAX_DURATION, _OBS_STATUSES,
                    _ROUTE_CODES, INTERPRETATION_SYSTEMS, ConditionFact, MedicationFact, MedicationIndex, Normaliser,
                    ObservationFact, ProcedureFact, _ref_tail, _route_of_words, add_time, infiltration_or,
                    parse_time, read_medication, read_reason)
from .terminology import Concept, DrugMatch, concept


# -- the model: the fields facts.py reads, each of the JSON type FHIR R4 gives it ------------------------------
# gc=False: none of these can hold a reference cycle (their fields are strings, numbers, Structs and lists of
# them, never changed after decoding), so the collector need not track them. omit_defaults: msgspec.to_builtins gives the fields that were sent.
class _Model(Struct, gc=False, omit_defaults=True):
    pass


class Coding(_Model):
    system: str | None = None
    code: str | None = None
    display: str | None = None


class CodeableConcept(_Model):
    coding: list[Coding] | Coding | None = None  # one object where R4 has a list is read as that list
    text: str | None = None


Concepts = CodeableConcept | list[CodeableConcept] | None  # a CodeableConcept, or a list of them


class Reference(_Model):
    reference: str | None = None
    display: str | None = None


class Period(_Model):
    start: str | None = None
    end: str | None = None


class Quantity(_Model):
    value: float | None = None  # an integer is read as a float, as facts.py's float(value)
    unit: str | None = None
    code: str | None = None


# ``resourceType`` is required (kw_only: a required field may follow optional ones): a resource without it, or of another type, is not the usual shape (a Struct's
# tag would let it be absent). ``id``: absent is "" in a fact's reference (facts.py: ``r.get('id', '')``); a null
# id is not the usual shape.
class Condition(_Model, kw_only=True):
    resourceType: Literal["Condition"]
    id: str | UnsetType = UNSET
    code: Concepts = None
    clinicalStatus: str | CodeableConcept | list[CodeableConcept] | None = None  # a string in STU3 and before
    verificationStatus: str | CodeableConcept | list[CodeableConcept] | None = None
    category: Concepts = None
    encounter: Reference | None = None
    context: Reference | None = None  # STU3's name for encounter
    onsetDateTime: str | None = None
    recordedDate: str | None = None
    assertedDate: str | None = None  # STU3


class ObservationComponent(_Model):
    code: Concepts = None
    valueQuantity: Quantity | None = None
    valueCodeableConcept: CodeableConcept | None = None
    valueString: str | None = None
    interpretation: Concepts = None


class Observation(ObservationComponent, kw_only=True):
    resourceType: Literal["Observation"]
    id: str | UnsetType = UNSET
    status: str | None = None
    component: list[ObservationComponent] | ObservationComponent | None = None
    effectiveDateTime: str | None = None
    effectivePeriod: Period | None = None
    issued: str | None = None


class Procedure(_Model, kw_only=True):
    resourceType: Literal["Procedure"]
    id: str | UnsetType = UNSET
    status: str | None = None
    code: Concepts = None
    performedDateTime: str | None = None
    performedPeriod: Period | None = None


class Duration(_Model):
    value: float | None = None
    unit: str | None = None
    code: str | None = None


class Repeat(_Model):
    boundsPeriod: Period | None = None
    boundsDuration: Duration | None = None


class Timing(_Model):
    repeat: Repeat | None = None


class Dosage(_Model):
    text: str | None = None
    route: Concepts = None
    timing: Timing | None = None
    asNeededBoolean: bool | None = None
    asNeededCodeableConcept: CodeableConcept | None = None


class DispenseRequest(_Model):
    validityPeriod: Period | None = None
    expectedSupplyDuration: Duration | None = None


class Ingredient(_Model):
    itemCodeableConcept: Concepts = None


# A resource contained in a medication resource: what a reference "#id" to a Medication (MedicationIndex.resolve,
# facts.read_medication) or to a Condition (facts.reason_condition) reads. Few resources have one: it is handed to
# those dictionary readers as the dictionary of its fields (msgspec.to_builtins), when a reference needs it.
class Contained(_Model):
    resourceType: str | None = None
    id: str | UnsetType = UNSET
    code: Concepts = None
    ingredient: list[Ingredient] | Ingredient | None = None
    form: Concepts = None
    verificationStatus: str | CodeableConcept | list[CodeableConcept] | None = None


# The record's orders, administrations and statements (and DSTU2's MedicationOrder), one shape: what
# Normaliser.drug and Normaliser.medication read.
class Medication(_Model, kw_only=True):
    resourceType: Literal["MedicationRequest", "MedicationAdministration", "MedicationStatement", "MedicationOrder"]
    id: str | UnsetType = UNSET
    status: str | None = None
    medicationCodeableConcept: Concepts = None
    medicationReference: Reference | None = None
    contained: list[Contained] | Contained | None = None
    reasonCode: Concepts = None
    reasonReference: list[Reference] | Reference | None = None
    dosageInstruction: list[Dosage] | Dosage | None = None
    dosage: list[Dosage] | Dosage | None = None
    effectiveDateTime: str | None = None
    effectivePeriod: Period | None = None
    authoredOn: str | None = None
    dateWritten: str | None = None  # DSTU2
    dateAsserted: str | None = None
    dispenseRequest: DispenseRequest | None = None
    encounter: Reference | None = None
    context: Reference | None = None  # STU3's name for encounter


class Search(_Model):
    mode: str | None = None


class Link(_Model):
    relation: str | None = None
    url: str | None = None


class ConditionEntry(_Model):
    resource: Condition
    search: Search | None = None


class ObservationEntry(_Model):
    resource: Observation
    search: Search | None = None


class ProcedureEntry(_Model):
    resource: Procedure
    search: Search | None = None


class MedicationEntry(_Model):
    resource: Medication
    search: Search | None = None


class Bundle(_Model, kw_only=True):
    resourceType: Literal["Bundle"]
    link: list[Link] | None = None

    def resources_and_next(self) -> tuple[list, str | None]:
        """As ``patient_data._from_prefetch`` reads a Bundle: the resources of the entries whose search is
        absent or of mode null or "match", and the url of the first link of relation "next" (None: none)."""
        out = [e.resource for e in self.entry or () if e.search is None or e.search.mode in (None, "match")]
        nxt = next((ln.url for ln in self.link or () if ln.relation == "next"), None)
        return out, nxt


class ConditionBundle(Bundle):
    entry: list[ConditionEntry] | None = None


class ObservationBundle(Bundle):
    entry: list[ObservationEntry] | None = None


class ProcedureBundle(Bundle):
    entry: list[ProcedureEntry] | None = None


class MedicationBundle(Bundle):
    entry: list[MedicationEntry] | None = None


# The prefetch keys whose value is decoded typed when it is a Bundle of the usual shape.
BUNDLES = {"conditions": ConditionBundle, "observations": ObservationBundle, "procedures": ProcedureBundle,
           "medicationRequests": MedicationBundle, "medicationAdministrations": MedicationBundle,
           "medicationStatements": MedicationBundle}
RESOURCES = {"Condition": Condition, "Observation": Observation, "Procedure": Procedure}


# -- the readers: facts.py's, for the typed shapes -------------------------------------------------------------
def codeable_concepts(value: Concepts, concepts: list[Concept], texts: list[str]) -> None:
    """Adds what ``facts.codeable_concepts`` gives: each CodeableConcept's text, then per coding its concept
    (when it has one) and its display."""
    if type(value) is CodeableConcept and type(value.coding) is list:  # the usual shape: no tuples built
        if value.text is not None:
            texts.append(value.text)
        for c in value.coding:
            k = concept(c.system, c.code)
            if k:
                concepts.append(k)
            if c.display is not None:
                texts.append(c.display)
        return
    if value is None:
        return
    for cc in value if type(value) is list else (value,):
        if cc.text is not None:
            texts.append(cc.text)
        coding = cc.coding
        for c in coding if type(coding) is list else () if coding is None else (coding,):
            k = concept(c.system, c.code)
            if k:
                concepts.append(k)
            if c.display is not None:
                texts.append(c.display)


def may_match(value: Concepts, codes: frozenset[str]) -> bool:
    """``facts.may_match``: whether a coding's code, as sent or stripped, is one of ``codes``."""
    if type(value) is CodeableConcept and type(value.coding) is list:  # the usual shape: no tuples built
        for c in value.coding:
            code = c.code
            if code is not None and (code in codes or code.strip() in codes):
                return True
        return False
    if value is None:
        return False
    for cc in value if type(value) is list else (value,):
        coding = cc.coding
        for c in coding if type(coding) is list else () if coding is None else (coding,):
            code = c.code
            if code is not None and (code in codes or code.strip() in codes):
                return True
    return False


def _status_code(value) -> str | None:
    """``facts._status_code``: a string as sent; else the first coding's code when it is a string; else the
    first concept's code, or the first text in lower case."""
    if value is None or type(value) is str:
        return value
    if type(value) is CodeableConcept:
        coding = value.coding
        if type(coding) is list and coding and coding[0].code is not None:
            return coding[0].code
    concepts: list[Concept] = []
    texts: list[str] = []
    codeable_concepts(value, concepts, texts)
    if concepts:
        return concepts[0][1]
    return texts[0].lower() if texts else None


def _ref(value: Reference | None) -> str | None:
    return None if value is None else value.reference


def _id(value: str | UnsetType) -> str:
    return "" if value is UNSET else value


def condition(r: Condition, relevant: frozenset[Concept] | None, codes: frozenset[str] | None) -> ConditionFact | None:
    """``Normaliser.condition`` (``codes``: ``bare_codes(relevant)``)."""
    if codes is not None and not may_match(r.code, codes):
        return None
    concepts: list[Concept] = []
    texts: list[str] = []
    codeable_concepts(r.code, concepts, texts)
    if relevant is not None and relevant.isdisjoint(concepts):
        return None
    verification = _status_code(r.verificationStatus)
    if verification in _CONDITION_EXCLUDED:
        return None
    categories: list[Concept] = []
    codeable_concepts(r.category, categories, [])
    return ConditionFact(  # positional, as facts.py builds it
        f"Condition/{_id(r.id)}",  # ref
        texts[0] if texts else (concepts[0][1] if concepts else "condition"),  # display
        frozenset(concepts),  # concepts
        _status_code(r.clinicalStatus),  # clinical_status
        verification,  # verification_status
        _ref_tail(_ref(r.encounter) or _ref(r.context)),  # encounter
        any(code == "encounter-diagnosis" for _, code in categories),  # encounter_diagnosis
        parse_time(r.onsetDateTime) or parse_time(r.recordedDate) or parse_time(r.assertedDate),  # time
    )


def observations(r: Observation, relevant: frozenset[Concept] | None,
                 codes: frozenset[str] | None) -> list[ObservationFact]:
    """``Normaliser.observations``: the readings of an Observation, itself and its components."""
    if r.status not in _OBS_STATUSES:
        return []
    component = r.component
    components = component if type(component) is list else () if component is None else (component,)
    if codes is not None:
        if not may_match(r.code, codes):
            for c in components:
                if may_match(c.code, codes):
                    break
            else:
                return []
        coded: list[Concept] = []
        for part in (r, *components):
            codeable_concepts(part.code, coded, [])
        if relevant.isdisjoint(coded):
            return []
    time = parse_time(r.effectiveDateTime) or parse_time(
        r.effectivePeriod.end if r.effectivePeriod is not None else None) or parse_time(r.issued)
    ref = f"Observation/{_id(r.id)}"
    out = [_observation_fact(ref, part, time) for part in (r, *components)]
    if relevant is not None:
        out = [o for o in out if not relevant.isdisjoint(o.concepts)]
    return out


def _observation_fact(ref: str, r: ObservationComponent, time: datetime | None) -> ObservationFact:
    """``facts._observation_fact``."""
    concepts: list[Concept] = []
    texts: list[str] = []
    codeable_concepts(r.code, concepts, texts)
    value = unit = value_text = None
    quantity = r.valueQuantity
    if quantity is not None and quantity.value is not None:
        value = quantity.value
        unit = quantity.unit or quantity.code
    elif r.valueCodeableConcept is not None:
        vtexts: list[str] = []
        codeable_concepts(r.valueCodeableConcept, [], vtexts)
        value_text = " ".join(vtexts).lower() or None
    elif r.valueString is not None:
        value_text = r.valueString.lower()
    interp_concepts: list[Concept] = []
    interp_texts: list[str] = []
    codeable_concepts(r.interpretation, interp_concepts, interp_texts)
    if value_text is None and (interp_concepts or interp_texts):
        value_text = " ".join([c[1] for c in interp_concepts] + interp_texts).lower()
    return ObservationFact(  # positional, as facts.py builds it
        ref,  # ref
        texts[0] if texts else "observation",  # display
        frozenset(concepts),  # concepts
        value,  # value
        unit,  # unit
        value_text,  # value_text
        time,  # time
        frozenset(code.upper() for system, code in interp_concepts if system in INTERPRETATION_SYSTEMS),
    )


def procedure(r: Procedure, relevant: frozenset[Concept] | None, codes: frozenset[str] | None) -> ProcedureFact | None:
    """``Normaliser.procedure``."""
    if r.status in ("entered-in-error", "not-done", "preparation"):
        return None
    if codes is not None and not may_match(r.code, codes):
        return None
    concepts: list[Concept] = []
    texts: list[str] = []
    codeable_concepts(r.code, concepts, texts)
    if relevant is not None and relevant.isdisjoint(concepts):
        return None
    period = r.performedPeriod
    return ProcedureFact(
        ref=f"Procedure/{_id(r.id)}",
        display=texts[0] if texts else "procedure",
        concepts=frozenset(concepts),
        time=parse_time(r.performedDateTime) or parse_time(period.end if period is not None else None)
        or parse_time(period.start if period is not None else None),
    )


READERS = {Condition: condition, Observation: observations, Procedure: procedure}


# -- medications: Normaliser.drug and Normaliser.medication --------------------------------------------------
def _owner(r: Medication) -> dict:
    """What MedicationIndex.resolve and reason_condition read of a resource: its contained resources, as the
    dictionaries of their fields."""
    return {} if r.contained is None else {"contained": to_builtins(r.contained)}


def drug(normaliser: Normaliser, r: Medication,
         medications: MedicationIndex) -> tuple[DrugMatch, list[str], list[Concept]]:
    """``Normaliser.drug``: what the resource names, its texts and its codings' concepts."""
    concepts: list[Concept] = []
    texts: list[str] = []
    codeable_concepts(r.medicationCodeableConcept, concepts, texts)
    med_ref = r.medicationReference
    if med_ref is not None:
        med = medications.resolve(med_ref.reference, _owner(r))
        if med is not None:
            read_medication(med, concepts, texts)
        if med_ref.display is not None:
            texts.append(med_ref.display)
    return normaliser.terminology.recognise(concepts, texts), texts, concepts


def medication(normaliser: Normaliser, r: Medication, medications: MedicationIndex,
               drug: tuple[DrugMatch, list[str], list[Concept]]) -> MedicationFact:
    """``Normaliser.medication`` of a record resource (``drug``: what :func:`drug` gave)."""
    rtype = r.resourceType
    match, texts, _ = drug
    status = r.status
    reasons: list[Concept] = []
    reason_texts: list[str] = []
    codeable_concepts(r.reasonCode, reasons, reason_texts)
    reason_refs = []
    targets = r.reasonReference
    for target in targets if type(targets) is list else () if targets is None else (targets,):
        read_reason(target.reference, _owner(r), medications.conditions, reasons, reason_texts, reason_refs)
        if target.display is not None:
            reason_texts.append(target.display)
    dosages = [*_listed(r.dosageInstruction), *_listed(r.dosage)]
    return normaliser.medication_fact(
        rtype, rtype, _id(r.id), drug, status, _medication_times(r, dosages),
        infiltration_or(_stated_route(dosages, match.dose_form, texts), texts, match.concepts),
        _ref_tail(_ref(r.encounter) or _ref(r.context)), reasons, reason_texts, reason_refs, parse_time(r.dateAsserted),
        r)


def _listed(value) -> list | tuple:
    return value if type(value) is list else () if value is None else (value,)


def _duration(d: Duration | None) -> timedelta | None:
    """``facts.parse_duration``."""
    if d is None or d.value is None or d.value < 0:
        return None
    unit = d.code if d.code is not None else d.unit
    seconds = _DURATION_UNITS.get(unit.strip().lower() if unit is not None else "")
    if seconds is None or d.value * seconds > _MAX_DURATION:
        return None
    return timedelta(seconds=d.value * seconds)


def _medication_times(r: Medication, dosages: list[Dosage]) -> tuple[datetime | None, datetime | None]:
    """``facts._medication_times``: (the time of the dose or order, the end of the course the resource states)."""
    effective = parse_time(r.effectiveDateTime)
    period = r.effectivePeriod
    period_start = period_end = None
    if period is not None:
        period_start, period_end = parse_time(period.start), parse_time(period.end)
    ordered = parse_time(r.authoredOn) or parse_time(r.dateWritten)
    time = effective or period_end or period_start or ordered
    dispense = r.dispenseRequest
    if not dosages and dispense is None:
        return time, period_end
    if any(d.asNeededBoolean is True or d.asNeededCodeableConcept is not None for d in dosages):
        return time, None  # as needed (PRN): the course says when a dose MAY be taken, not that one was
    start = ordered or period_start or effective
    ends = [period_end]
    for dosage in dosages:
        repeat = dosage.timing.repeat if dosage.timing is not None else None
        if repeat is None:
            continue
        bounds = repeat.boundsPeriod
        ends.append(parse_time(bounds.end if bounds is not None else None))
        duration = _duration(repeat.boundsDuration)
        begin = parse_time(bounds.start if bounds is not None else None) or start
        if duration is not None and begin is not None:
            ends.append(add_time(begin, duration))
    validity = dispense.validityPeriod if dispense is not None else None
    supply = _duration(dispense.expectedSupplyDuration if dispense is not None else None)
    supply_start = parse_time(validity.start if validity is not None else None) or start
    if supply is not None and supply_start is not None:
        ends.append(add_time(supply_start, supply))
    elif r.status in ("active", "on-hold"):
        ends.append(parse_time(validity.end if validity is not None else None))
    ends = [e for e in ends if e is not None]
    return time, (max(ends) if ends else None)


def _stated_route(dosages: list[Dosage], dose_form: str | None, texts: list[str]) -> str | None:
    """``Normaliser._stated_route``: a route code of a dosage; else the route its words say."""
    words: list[str] = []
    for dosage in dosages:
        concepts: list[Concept] = []
        codeable_concepts(dosage.route, concepts, words)
        for _, code in concepts:
            if code in _ROUTE_CODES:
                return _ROUTE_CODES[code]
        if dosage.text is not None:
            words.append(dosage.text)
    if dose_form:
        words.append(dose_form)
    words += texts
    return _route_of_words(tuple(words))
