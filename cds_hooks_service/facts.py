"""Normalise FHIR resources (plain dicts, leniently parsed) into the facts the rules read.

Real drafts are not strict R4: the CDS Hooks Sandbox sends ``reasonCode`` and ``category`` as single
objects and may omit ``intent``; ``doseAndRate`` may be an object; ``Bundle.type`` may be missing.
Nothing here raises on odd shapes: a field of the wrong type is treated as absent.
"""
from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from typing import NamedTuple

from .terminology import CACHE_KEY_MAX_CHARS, Concept, DrugMatch, Terminology, concept

MEDICATION_TYPES = ("MedicationRequest", "MedicationAdministration", "MedicationStatement")  # record sources
# DSTU2 servers (the Sandbox's default) send MedicationOrder drafts; they read the same way.
DRAFT_TYPES = ("MedicationRequest", "MedicationOrder")

IGNORED_MEDICATION_STATUSES = frozenset({"entered-in-error", "cancelled", "draft", "not-taken", "not-done", "revoked"})
_ACTIVE_STATUSES = {
    "MedicationRequest": frozenset({"active", "on-hold"}),
    "MedicationStatement": frozenset({"active", "intended", "on-hold"}),
    "MedicationAdministration": frozenset({"in-progress", "on-hold"}),
}
_CONDITION_EXCLUDED = frozenset({"refuted", "entered-in-error"})
INTERPRETATION_SYSTEMS = frozenset({"http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                                    "http://hl7.org/fhir/v3/ObservationInterpretation",
                                    "http://terminology.hl7.org/CodeSystem/v2-0078", "http://hl7.org/fhir/v2/0078"})
# A qualitative test (op "positive") reads as positive with one of these interpretation codes: POS positive,
# DET detected, A/AA abnormal, H/HH/HU high (above the non-pregnant reference range for an hCG); and as
# negative with NEG, ND (not detected) or N (normal), whatever else the result says.
POSITIVE_INTERPRETATIONS = frozenset({"POS", "DET", "A", "AA", "H", "HH", "HU"})
NEGATIVE_INTERPRETATIONS = frozenset({"NEG", "ND", "N"})
# International units per volume, as factors to mIU/mL (1 mIU/mL = 1 IU/L); the bracketed UCUM spellings too.
_MILLI_IU_PER_ML = {"miu/ml": 1.0, "iu/l": 1.0, "mu/ml": 1.0, "u/l": 1.0, "iu/ml": 1000.0, "u/ml": 1000.0}


def milli_iu_per_ml(value: float | None, unit: str | None) -> float | None:
    """A quantity in international units per volume as mIU/mL (= IU/L); None for other or unstated units."""
    if value is None or not isinstance(unit, str):
        return None
    factor = _MILLI_IU_PER_ML.get(unit.replace("[", "").replace("]", "").replace(" ", "").lower())
    return value * factor if factor is not None else None


_OBS_STATUSES = frozenset({"final", "amended", "corrected", "preliminary", "registered"})

# Route classes from SNOMED CT route codes (FHIR R4 "SNOMED CT Route Codes" value set), text and dose forms.
# An injection is intravenous, intramuscular, subcutaneous, or "injection" when the route is not stated;
# an "auto-injector" (a pen for the patient's own use) is intramuscular or subcutaneous. A rule's route
# filter naming "parenteral" matches all five (see route_matches).
PARENTERAL = frozenset({"injection", "intravenous", "intramuscular", "subcutaneous", "auto-injector"})
# Local products: no systemic exposure worth a drug-interaction card (issue 9 §2, clinical.md §4.2 B3):
# skin (cream, ointment, gel, lotion, shampoo, foam), eye, ear, vaginal, and local infiltration (a local
# anaesthetic with epinephrine infiltrated into tissue). A route filter naming "topical" matches all of
# them; "systemic" matches every route that is not one of them (an unstated route included).
LOCAL = frozenset({"topical", "ophthalmic", "otic", "vaginal", "infiltration"})
_ROUTE_CODES = {
    "47625008": "intravenous",  # Intravenous route
    "78421000": "intramuscular",  # Intramuscular route
    "34206005": "subcutaneous",  # Subcutaneous route
    "26643006": "oral",  # Oral route
    "37839007": "oral",  # Sublingual route
    "54471007": "oral",  # Buccal route
    "46713006": "nasal",  # Nasal route
    "6064005": "topical",  # Topical route
    "45890007": "transdermal",  # Transdermal route
    "54485002": "ophthalmic",  # Ophthalmic route
    "10547007": "otic",  # Otic route
    "16857009": "vaginal",  # Per vagina
    "37161004": "rectal",  # Per rectum
}
# Checked in this order: the local forms first, so "lidocaine with epinephrine injection for local
# infiltration" is infiltration, not an injection, and "ketoconazole 2% cream" is topical.
_ROUTE_WORDS = [
    (re.compile(r"\b(infiltrat\w*|local(ly)? anaesth\w*|local(ly)? anesth\w*|nerve block|field block|"
                r"digital block|dental|local infiltration|intradermal)\b"), "infiltration"),
    (re.compile(r"\b(ophthalmic|ophth|eye|eyes|intraocular|conjunctival|opth)\b"), "ophthalmic"),
    (re.compile(r"\b(otic|ear|ears|auricular)\b"), "otic"),
    (re.compile(r"\b(vaginal\w*|per vagina|pessary|pessaries|intravaginal)\b"), "vaginal"),
    (re.compile(r"\b(po|oral|orally|by mouth|sublingual|buccal)\b"), "oral"),  # "miconazole oral gel" is oral
    (re.compile(r"\b(cream|ointment|gel|lotion|shampoo|foam|cutaneous|topical\w*|dermal|to skin|"
                r"to affected area|scalp)\b"), "topical"),
    (re.compile(r"\b(iv|ivp|ivpb|intravenous\w*|infusion|drip)\b"), "intravenous"),
    (re.compile(r"\b(im|intramuscular\w*)\b"), "intramuscular"),
    (re.compile(r"\b(sc|sq|subq|subcut\w*)\b"), "subcutaneous"),
    (re.compile(r"\b(auto-?injectors?|autoinjectors?|pen-?injectors?|epipen\w*|auvi-?q)\b"), "auto-injector"),
    (re.compile(r"\b(inj\w*|syringe|cartridge|vial|parenteral)\b"), "injection"),
    (re.compile(r"\b(po|oral\w*|by mouth|tablet|capsule|lozenge|troche|sublingual|buccal)\b"), "oral"),
    (re.compile(r"\b(nasal|intranasal|nostril|nose)\b"), "nasal"),
    (re.compile(r"\b(transdermal|patch)\b"), "transdermal"),
    (re.compile(r"\b(rectal\w*|suppositor\w*|per rectum|pr)\b"), "rectal"),
]
# Local anaesthetics (RxNorm ingredients verified in codes.json: lidocaine 6387, bupivacaine 1815): an
# injection of a product that combines one with epinephrine, by no stated IV route, is local infiltration.
LOCAL_ANAESTHETICS = frozenset({("http://www.nlm.nih.gov/research/umls/rxnorm", "6387"),
                                ("http://www.nlm.nih.gov/research/umls/rxnorm", "1815")})
EPINEPHRINE = ("http://www.nlm.nih.gov/research/umls/rxnorm", "3992")
_LOCAL_ANAESTHETIC_NAMES = re.compile(r"\b(lidocaine|lignocaine|bupivacaine|articaine|mepivacaine|prilocaine|"
                                      r"ropivacaine|xylocaine|marcaine|sensorcaine|septocaine|carbocaine)\b")
_EPINEPHRINE_NAMES = re.compile(r"\b(epinephrine|adrenaline|epi)\b")


def route_matches(route: str | None, allowed: frozenset[str] | set[str] | list[str]) -> bool:
    """A rule's route filter: "parenteral" covers every injection route; "unknown" a route not stated;
    "topical" every local route (skin, eye, ear, vaginal, infiltration); "systemic" every route that is not
    local (an unstated one included); "intramuscular"/"subcutaneous" an auto-injector."""
    r = route or "unknown"
    return (r in allowed or ("parenteral" in allowed and r in PARENTERAL)
            or ("topical" in allowed and r in LOCAL) or ("systemic" in allowed and r not in LOCAL)
            or (r == "auto-injector" and ("intramuscular" in allowed or "subcutaneous" in allowed)))


# MedicationRequest.category (FHIR R4 code system medicationrequest-category; the STU3 URL too): where the
# medication is to be taken. "unknown" in a rule's category filter: the order states none of these.
ORDER_CATEGORY_SYSTEMS = frozenset({"http://terminology.hl7.org/CodeSystem/medicationrequest-category",
                                    "http://hl7.org/fhir/medication-request-category"})
ORDER_CATEGORIES = frozenset({"inpatient", "outpatient", "community", "discharge"})


def order_categories(resource: dict) -> frozenset[str]:
    """The medicationrequest-category codes of an order (a coding without a system counts; the Sandbox
    sends ``category`` as one object, R4 as a list)."""
    found = set()
    for cc in as_list(resource.get("category")):
        if not isinstance(cc, dict):
            continue
        for coding in as_list(cc.get("coding")):
            if not isinstance(coding, dict):
                continue
            code, system = coding.get("code"), coding.get("system")
            if isinstance(code, str) and code in ORDER_CATEGORIES \
                    and (system is None or isinstance(system, str) and system in ORDER_CATEGORY_SYSTEMS):
                found.add(code)
    return frozenset(found)


def category_matches(categories: frozenset[str], allowed) -> bool:
    """A rule's category filter: any stated category in ``allowed``; "unknown" when none is stated."""
    return bool(categories & set(allowed)) or (not categories and "unknown" in allowed)


def parse_time(value: object) -> datetime | None:
    """A FHIR date/dateTime/instant as an aware UTC datetime; partial dates take their first instant."""
    if not isinstance(value, str) or len(value) < 4:
        return None
    text = value.strip()
    try:
        if len(text) == 4:
            return datetime(int(text), 1, 1, tzinfo=timezone.utc)
        if len(text) == 7:
            return datetime(int(text[:4]), int(text[5:7]), 1, tzinfo=timezone.utc)
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    try:
        return parsed.astimezone(timezone.utc)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00 is before the first representable UTC instant
        return None


_DURATION_UNITS = {"s": 1, "sec": 1, "second": 1, "seconds": 1, "min": 60, "minute": 60, "minutes": 60,
                   "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600, "d": 86400, "day": 86400, "days": 86400,
                   "wk": 604800, "week": 604800, "weeks": 604800, "mo": 2629800, "month": 2629800,
                   "months": 2629800, "a": 31557600, "year": 31557600, "years": 31557600}
_MAX_DURATION = 366 * 86400 * 10  # a stated course longer than ten years is read as no course end


def parse_duration(value: object) -> timedelta | None:
    """A FHIR Duration (UCUM code s/min/h/d/wk/mo/a, or a unit word) as a timedelta; None when unreadable."""
    if not isinstance(value, dict):
        return None
    number = value.get("value")
    if isinstance(number, bool) or not isinstance(number, (int, float)) or number < 0:
        return None
    unit = value.get("code") if isinstance(value.get("code"), str) else value.get("unit")
    seconds = _DURATION_UNITS.get(unit.strip().lower() if isinstance(unit, str) else "")
    if seconds is None or number * seconds > _MAX_DURATION:
        return None
    return timedelta(seconds=number * seconds)


def add_time(t: datetime, d: timedelta) -> datetime | None:
    """t + d, or None past the last representable instant (a hostile 9999-12-31 start)."""
    try:
        return t + d
    except OverflowError:
        return None


def as_list(value: object) -> list:
    """R4 arrays that real clients sometimes send as a single object."""
    if type(value) is list or isinstance(value, list):  # (the exact type first: the parser's, and the fastest test)
        return value
    if isinstance(value, dict):
        return [value]
    return []


def codeable_concepts(value: object) -> tuple[list[Concept], list[str]]:
    """Concepts and texts (text + coding displays) of a CodeableConcept or a list of them (a single coding
    object where R4 has a list is read as that list; anything else of the wrong type as absent)."""
    concepts: list[Concept] = []
    texts: list[str] = []
    if isinstance(value, dict) and isinstance(value.get("coding"), list):  # the usual shape, read in one pass
        text = value.get("text")
        if isinstance(text, str):
            texts.append(text)
        _read_codings(value["coding"], concepts, texts)
        return concepts, texts
    for cc in (value,) if isinstance(value, dict) else value if isinstance(value, list) else ():
        if not isinstance(cc, dict):
            continue
        text = cc.get("text")
        if isinstance(text, str):
            texts.append(text)
        codings = cc.get("coding")
        _read_codings((codings,) if isinstance(codings, dict) else codings if isinstance(codings, list) else (),
                      concepts, texts)
    return concepts, texts


def _read_codings(codings, concepts: list[Concept], texts: list[str]) -> None:
    """Adds the concepts and displays of ``codings`` (a list or tuple; entries that are not objects are skipped)."""
    for coding in codings:
        if isinstance(coding, dict):
            c = concept(coding.get("system"), coding.get("code"))
            if c:
                concepts.append(c)
            display = coding.get("display")
            if isinstance(display, str):
                texts.append(display)


@lru_cache(maxsize=256)
def bare_codes(concepts: frozenset[Concept]) -> frozenset[str]:
    """The code strings of ``concepts``, also without dots (a coding may write ICD-10 "G43.909" as "G43909"):
    a resource none of whose codings has one of these strings matches none of the concepts. (A frozenset keeps
    its hash, so the look-up per resource is one dictionary probe.)"""
    return frozenset(c for _, code in concepts for c in (code, code.replace(".", "")))


def may_match(value: object, codes: frozenset[str]) -> bool:
    """Whether a CodeableConcept (or a list of them) has a coding whose bare code is in ``codes``: the cheap
    test that lets the index skip a resource without building its concepts."""
    # Called for nearly every resource of the record. The usual shape (an object whose coding is a list of
    # objects with string codes) is read without type tests; anything else is read by the lenient loop.
    try:
        for coding in value["coding"]:  # type: ignore[index]
            code = coding["code"]
            if code in codes or code.strip() in codes:
                return True
        return False
    except (TypeError, KeyError, AttributeError):
        return _may_match_any_shape(value, codes)


def _may_match_any_shape(value: object, codes: frozenset[str]) -> bool:
    if isinstance(value, dict):
        value = (value,)
    elif not isinstance(value, list):
        return False
    for cc in value:
        if isinstance(cc, dict):
            codings = cc.get("coding")
            if isinstance(codings, dict):
                codings = (codings,)
            elif not isinstance(codings, list):
                continue
            for coding in codings:
                if isinstance(coding, dict):
                    code = coding.get("code")
                    if isinstance(code, str) and (code in codes or code.strip() in codes):
                        return True
    return False


def resource_may_match(r: dict, codes: frozenset[str], components: bool = False) -> bool:
    """Whether a resource's code (with ``components``, also a component's code: Observation.component, a
    list, one object read as a list of it) may be one of ``codes``: the look-up after which the index skips a
    resource."""
    if may_match(r.get("code"), codes):
        return True
    if components:
        value = r.get("component")
        for c in (value,) if isinstance(value, dict) else value if isinstance(value, list) else ():
            if isinstance(c, dict) and may_match(c.get("code"), codes):
                return True
    return False


def _ref(value: object) -> str | None:
    if isinstance(value, dict) and isinstance(value.get("reference"), str):
        return value["reference"]
    return None


def _ref_tail(reference: str | None) -> str | None:
    """'Encounter/123' or 'http://x/fhir/Encounter/123/_history/2' -> 'Encounter/123'."""
    if not reference:
        return None
    parts = reference.split("/_history/")[0].rstrip("/").split("/")
    return "/".join(parts[-2:]) if len(parts) >= 2 else reference


# The facts are immutable named tuples: one call builds hundreds of them, and a tuple is built about four times
# faster than a frozen dataclass (whose __init__ sets each field through object.__setattr__).
# The readers build them with positional arguments, each line naming its field in a comment: a named tuple
# built from 16 keyword arguments costs about three times one built from positional ones (1.4 against 0.5 us,
# most of a normalised medication's construction). tests/test_record_reading.py checks every field by name.
class MedicationFact(NamedTuple):
    source: str  # "draft" or the FHIR resource type
    ref: str  # "MedicationRequest/123"
    display: str
    concepts: frozenset[Concept]
    matched_by: str  # "code" | "name" | "none"
    matched_names: tuple[str, ...]
    status: str | None
    active: bool
    time: datetime | None
    route: str | None  # intravenous | intramuscular | subcutaneous | injection | oral | nasal | transdermal | topical
    encounter: str | None
    reasons: tuple[Concept, ...] = ()
    reason_texts: tuple[str, ...] = ()
    # The FHIR resource read: a dict for a draft (what draft-only readers such as order_categories read), a dict
    # or a typed_record.Medication for a record resource (nothing reads it as a dictionary).
    resource: object = None
    # The end of the course the record states (dosage bounds, expected supply, validity, effective period
    # end), when later than ``time``: a course ordered 16 days ago that ran until 2 days ago exposes the
    # patient until 2 days ago.
    course_end: datetime | None = None
    # reasonReference targets not found in the resource itself or the draft bundle ("Condition/123"):
    # resolved against the record's conditions when a check reads the order's reason.
    reason_refs: tuple[str, ...] = ()
    asserted: datetime | None = None  # MedicationStatement.dateAsserted: when the list was reviewed (no dose time)

    @property
    def exposure(self) -> datetime | None:
        """The latest time the record says the patient was (or will be) exposed: what windows count from."""
        if self.course_end is not None and (self.time is None or self.course_end > self.time):
            return self.course_end
        return self.time


class ConditionFact(NamedTuple):
    ref: str
    display: str
    concepts: frozenset[Concept]
    clinical_status: str | None
    verification_status: str | None
    encounter: str | None
    encounter_diagnosis: bool
    time: datetime | None


class ObservationFact(NamedTuple):
    ref: str
    display: str
    concepts: frozenset[Concept]
    value: float | None
    unit: str | None
    value_text: str | None  # coded/string results, lower-case
    time: datetime | None
    # Observation.interpretation codes (HL7 v3 ObservationInterpretation, also v2 table 0078), upper-case:
    # POS, NEG, H, HH, L, A, N ...
    interpretation: frozenset[str] = frozenset()


class ProcedureFact(NamedTuple):
    ref: str
    display: str
    concepts: frozenset[Concept]
    time: datetime | None


def _status_code(value: object) -> str | None:
    """Condition.clinicalStatus etc.: a CodeableConcept in R4, a plain string in older versions."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):  # the common case, read directly
        coding = value.get("coding")
        if isinstance(coding, list) and coding and isinstance(coding[0], dict) and isinstance(coding[0].get("code"), str):
            return coding[0]["code"]
    concepts, texts = codeable_concepts(value)
    if concepts:
        return concepts[0][1]
    return texts[0].lower() if texts else None


class MedicationIndex:
    """Medication resources a medicationReference may point at: contained ones and bundled ones; and the
    bundled Conditions a draft's reasonReference may point at."""

    def __init__(self, resources: list[dict]):
        self._by_ref = {}
        self.conditions: dict[str, dict] = {}
        for r in resources:
            if isinstance(r, dict) and r.get("resourceType") == "Medication" and isinstance(r.get("id"), str):
                self._by_ref[f"Medication/{r['id']}"] = r
            elif isinstance(r, dict) and r.get("resourceType") == "Condition" and isinstance(r.get("id"), str):
                self.conditions[f"Condition/{r['id']}"] = r

    def resolve(self, reference: str | None, owner: dict) -> dict | None:
        if not reference:
            return None
        if reference.startswith("#"):
            for c in as_list(owner.get("contained")):
                if isinstance(c, dict) and c.get("resourceType") == "Medication" and c.get("id") == reference[1:]:
                    return c
            return None
        return self._by_ref.get(_ref_tail(reference))


def reason_condition(reference: str | None, owner: dict, conditions: dict[str, dict]) -> dict | None:
    """The Condition a reasonReference points at: contained in the resource ("#id") or among ``conditions``
    (keyed "Condition/id"). A refuted or entered-in-error Condition is no reason."""
    if not reference:
        return None
    found = None
    if reference.startswith("#"):
        found = next((c for c in as_list(owner.get("contained")) if isinstance(c, dict)
                      and c.get("resourceType") == "Condition" and c.get("id") == reference[1:]), None)
    else:
        found = conditions.get(_ref_tail(reference) or "")
    if found is None or _status_code(found.get("verificationStatus")) in _CONDITION_EXCLUDED:
        return None
    return found


# A record names the same few products with the same dosage texts again and again: the route its words say,
# and whether they name a local anaesthetic and epinephrine, are kept per tuple of words (bounded caches: at
# most 4096 entries of at most CACHE_KEY_MAX_CHARS characters each, so a few MB; longer texts are read without
# them; the patterns are fixed, so an entry never goes stale).
def _kept_for_short_words(read):
    """``read(words)``, its answers kept per tuple of words (``.cache``, an lru_cache) when the words together
    are at most CACHE_KEY_MAX_CHARS long; longer words are read without the cache."""
    cache = lru_cache(maxsize=4096)(read)

    def kept(words: tuple[str, ...]):
        return read(words) if sum(map(len, words)) > CACHE_KEY_MAX_CHARS else cache(words)

    kept.cache = cache
    return kept


@_kept_for_short_words
def _route_of_words(words: tuple[str, ...]) -> str | None:
    """The route the first text naming one says (each text tried against the patterns in their order)."""
    for text in words:
        lowered = text.lower()
        for pattern, route in _ROUTE_WORDS:
            if pattern.search(lowered):
                return route
    return None


@_kept_for_short_words
def _local_names(texts: tuple[str, ...]) -> tuple[bool, bool]:
    """Whether the texts name a local anaesthetic, and epinephrine."""
    lowered = " ".join(texts).lower()
    return bool(_LOCAL_ANAESTHETIC_NAMES.search(lowered)), bool(_EPINEPHRINE_NAMES.search(lowered))


def _medication_times(r: dict, dosages: list) -> tuple[datetime | None, datetime | None]:
    """(time, course_end) of a medication resource whose dosages are ``dosages``; each date is parsed once.

    time: when the record says a dose was given or the order written (effectiveDateTime, effectivePeriod end
    or start, authoredOn, dateWritten: the first stated). ``MedicationStatement.dateAsserted`` (when a
    medication list was reviewed) is never a dose time: a statement with only that has no time, so its last
    dose is unknown.

    course_end: the latest end of the course the resource states: the dosages' timing bounds (boundsPeriod.end,
    or its start / the order date + boundsDuration), ``dispenseRequest`` (validityPeriod.start or the order
    date + expectedSupplyDuration; failing those, the end of the validity period of an active or on-hold
    prescription) and ``effectivePeriod.end``. None for an as-needed (PRN) dosage: its course bounds when a
    dose may be taken, not that one was."""
    effective = parse_time(r.get("effectiveDateTime"))
    period = r.get("effectivePeriod")
    period_start = period_end = None
    if isinstance(period, dict):
        period_start, period_end = parse_time(period.get("start")), parse_time(period.get("end"))
    ordered = parse_time(r.get("authoredOn")) or parse_time(r.get("dateWritten"))
    time = effective or period_end or period_start or ordered
    dispense = r.get("dispenseRequest")
    if not dosages and not isinstance(dispense, dict):
        return time, period_end
    if any(isinstance(d, dict) and (d.get("asNeededBoolean") is True or isinstance(d.get("asNeededCodeableConcept"), dict))
           for d in dosages):
        return time, None  # as needed (PRN): the course says when a dose MAY be taken, not that one was
    start = ordered or period_start or effective
    ends = [period_end]
    for dosage in dosages:
        timing = dosage.get("timing") if isinstance(dosage, dict) else None
        repeat = timing.get("repeat") if isinstance(timing, dict) else None
        if not isinstance(repeat, dict):
            continue
        bounds = repeat.get("boundsPeriod") if isinstance(repeat.get("boundsPeriod"), dict) else {}
        ends.append(parse_time(bounds.get("end")))
        duration = parse_duration(repeat.get("boundsDuration"))
        begin = parse_time(bounds.get("start")) or start
        if duration is not None and begin is not None:
            ends.append(add_time(begin, duration))
    dispense = dispense if isinstance(dispense, dict) else {}
    validity = dispense.get("validityPeriod") if isinstance(dispense.get("validityPeriod"), dict) else {}
    supply = parse_duration(dispense.get("expectedSupplyDuration"))
    supply_start = parse_time(validity.get("start")) or start
    if supply is not None and supply_start is not None:
        ends.append(add_time(supply_start, supply))
    elif r.get("status") in ("active", "on-hold"):
        # Only for a live prescription: a completed or stopped one was not taken until its validity end.
        ends.append(parse_time(validity.get("end")))
    ends = [e for e in ends if e is not None]
    return time, (max(ends) if ends else None)


def read_reason(reference: str | None, owner: dict, conditions: dict[str, dict], reasons: list[Concept],
                reason_texts: list[str], reason_refs: list[str]) -> None:
    """Adds what a reasonReference gives: the codes and texts of the Condition it points at (contained in
    ``owner`` or among ``conditions``), or, for a Condition elsewhere, its "Condition/id" (resolved against the
    record when a check reads the order's reason)."""
    found = reason_condition(reference, owner, conditions)
    if found is not None:
        c, t = codeable_concepts(found.get("code"))
        reasons += c
        reason_texts += t
    elif reference and _ref_tail(reference).startswith("Condition/"):
        reason_refs.append(_ref_tail(reference))


def read_medication(med: dict, concepts: list[Concept], texts: list[str]) -> None:
    """Adds the concepts and texts of a Medication resource (the target of a medicationReference): its code,
    its ingredients' codes, its form's texts."""
    c2, t2 = codeable_concepts(med.get("code"))
    concepts += c2
    texts += t2
    for ing in as_list(med.get("ingredient")):
        if isinstance(ing, dict):
            c3, t3 = codeable_concepts(ing.get("itemCodeableConcept"))
            concepts += c3
            texts += t3
    _, form_texts = codeable_concepts(med.get("form"))
    texts += form_texts


def infiltration_or(route: str | None, texts: list[str], concepts: frozenset) -> str | None:
    """The route stated, or "infiltration" for a local anaesthetic combined with epinephrine injected by no
    stated IV route."""
    if route in (None, "injection", "subcutaneous"):
        names_anaesthetic, names_epinephrine = _local_names(tuple(texts))
        has_anaesthetic = names_anaesthetic or not LOCAL_ANAESTHETICS.isdisjoint(concepts)
        if has_anaesthetic and (names_epinephrine or EPINEPHRINE in concepts):
            return "infiltration"
    return route


class Normaliser:
    def __init__(self, terminology: Terminology):
        self.terminology = terminology

    def drug(self, resource: dict, medications: MedicationIndex) -> tuple[DrugMatch, list[str], list[Concept]]:
        """What a medication resource names (its codes, rolled up, or failing that its names), its texts and
        codings: a few dict look-ups, so a resource no rule can match is dropped before full normalisation."""
        concepts, texts = codeable_concepts(resource.get("medicationCodeableConcept"))
        med_ref = resource.get("medicationReference")
        if isinstance(med_ref, dict):
            med = medications.resolve(_ref(med_ref), resource)
            if med is not None:
                read_medication(med, concepts, texts)
            if isinstance(med_ref.get("display"), str):
                texts.append(med_ref["display"])
        return self.terminology.recognise(concepts, texts), texts, concepts

    def medication(self, resource: dict, medications: MedicationIndex, *, source: str | None = None,
                   drug: tuple[DrugMatch, list[str], list[Concept]] | None = None) -> MedicationFact:
        """The full medication fact (``drug``: the result of :meth:`drug`, when already looked up)."""
        rtype = resource.get("resourceType", "")
        match, texts, concepts = drug or self.drug(resource, medications)
        status = resource.get("status") if isinstance(resource.get("status"), str) else None
        reasons, reason_texts = codeable_concepts(resource.get("reasonCode"))
        reason_refs = []
        for target in as_list(resource.get("reasonReference")):
            read_reason(_ref(target), resource, medications.conditions, reasons, reason_texts, reason_refs)
            if isinstance(target, dict) and isinstance(target.get("display"), str):
                reason_texts.append(target["display"])
        dosages = as_list(resource.get("dosageInstruction")) + as_list(resource.get("dosage"))
        return self.medication_fact(
            source or rtype, rtype, resource.get("id", ""), (match, texts, concepts), status,
            _medication_times(resource, dosages), self._route(dosages, match.dose_form, texts, match.concepts),
            _ref_tail(_ref(resource.get("encounter")) or _ref(resource.get("context"))), reasons, reason_texts,
            reason_refs, parse_time(resource.get("dateAsserted")), resource)

    def medication_fact(self, source: str, rtype: str, ident: object, drug: tuple[DrugMatch, list[str], list[Concept]],
                        status: str | None, times: tuple[datetime | None, datetime | None], route: str | None,
                        encounter: str | None, reasons: list[Concept], reason_texts: list[str],
                        reason_refs: list[str], asserted: datetime | None, resource: object) -> MedicationFact:
        """The fact of a medication resource from what its reader read (this class's ``medication``, or
        typed_record's for a resource decoded typed): its display and whether it is active are decided here."""
        match, texts, concepts = drug
        return MedicationFact(  # positional (see above MedicationFact), fields named in the comments
            source,  # source
            f"{rtype}/{ident}",  # ref
            texts[0] if texts else self.terminology.display_of(concepts) or "unnamed medication",  # display
            match.concepts,  # concepts
            match.matched_by,  # matched_by
            match.matched_names,  # matched_names
            status,  # status
            status in _ACTIVE_STATUSES.get(rtype, ()),  # active
            times[0],  # time
            route,  # route
            encounter,  # encounter
            tuple(reasons),  # reasons
            tuple(reason_texts),  # reason_texts
            resource,  # resource
            times[1],  # course_end
            tuple(reason_refs),  # reason_refs
            asserted,  # asserted
        )

    @staticmethod
    def _route(dosages: list, dose_form: str | None, texts: list[str], concepts: frozenset = frozenset()) -> str | None:
        """The route of a medication whose dosages (dosageInstruction and dosage, as lists) are ``dosages``."""
        return infiltration_or(Normaliser._stated_route(dosages, dose_form, texts), texts, concepts)

    @staticmethod
    def _stated_route(dosages: list, dose_form: str | None, texts: list[str]) -> str | None:
        words = []
        for dosage in dosages:
            if not isinstance(dosage, dict):
                continue
            concepts, route_texts = codeable_concepts(dosage.get("route"))
            for _, code in concepts:
                if code in _ROUTE_CODES:
                    return _ROUTE_CODES[code]
            words += route_texts
            if isinstance(dosage.get("text"), str):
                words.append(dosage["text"])
        if dose_form:
            words.append(dose_form)
        words += texts
        return _route_of_words(tuple(words))

    @staticmethod
    def condition(r: dict, relevant: frozenset[Concept] | None = None) -> ConditionFact | None:
        """None for conditions that are refuted or entered in error, or coded in no value set of interest."""
        if relevant is not None and not resource_may_match(r, bare_codes(relevant)):
            return None
        concepts, texts = codeable_concepts(r.get("code"))
        if relevant is not None and relevant.isdisjoint(concepts):
            return None
        verification = _status_code(r.get("verificationStatus"))
        if verification in _CONDITION_EXCLUDED:
            return None
        categories, _ = codeable_concepts(r.get("category"))
        return ConditionFact(  # positional (see above MedicationFact), fields named in the comments
            f"Condition/{r.get('id', '')}",  # ref
            texts[0] if texts else (concepts[0][1] if concepts else "condition"),  # display
            frozenset(concepts),  # concepts
            _status_code(r.get("clinicalStatus")),  # clinical_status
            verification,  # verification_status
            _ref_tail(_ref(r.get("encounter")) or _ref(r.get("context"))),  # encounter
            any(code == "encounter-diagnosis" for _, code in categories),  # encounter_diagnosis
            parse_time(r.get("onsetDateTime")) or parse_time(r.get("recordedDate"))
            or parse_time(r.get("assertedDate")),  # time
        )

    @staticmethod
    def observations(r: dict, relevant: frozenset[Concept] | None = None) -> list[ObservationFact]:
        """The readings of an Observation (itself and its components); with ``relevant``, only those coded
        with one of these concepts (the resource is skipped after a look-up of its codes when none is)."""
        status = r.get("status")
        if not isinstance(status, str) or status not in _OBS_STATUSES:
            return []
        if relevant is not None:
            if not resource_may_match(r, bare_codes(relevant), components=True):
                return []
            if relevant.isdisjoint(_observation_codes(r)):
                return []
        time = parse_time(r.get("effectiveDateTime")) or parse_time(
            (r.get("effectivePeriod") or {}).get("end") if isinstance(r.get("effectivePeriod"), dict) else None
        ) or parse_time(r.get("issued"))
        ref = f"Observation/{r.get('id', '')}"
        out = [_observation_fact(ref, r, time)]
        for component in as_list(r.get("component")):
            if isinstance(component, dict):
                out.append(_observation_fact(ref, component, time))
        if relevant is not None:
            out = [o for o in out if not relevant.isdisjoint(o.concepts)]
        return out

    @staticmethod
    def procedure(r: dict, relevant: frozenset[Concept] | None = None) -> ProcedureFact | None:
        if r.get("status") in ("entered-in-error", "not-done", "preparation"):
            return None
        if relevant is not None and not resource_may_match(r, bare_codes(relevant)):
            return None
        concepts, texts = codeable_concepts(r.get("code"))
        if relevant is not None and relevant.isdisjoint(concepts):
            return None
        period = r.get("performedPeriod") if isinstance(r.get("performedPeriod"), dict) else {}
        return ProcedureFact(
            ref=f"Procedure/{r.get('id', '')}",
            display=texts[0] if texts else "procedure",
            concepts=frozenset(concepts),
            time=parse_time(r.get("performedDateTime")) or parse_time(period.get("end"))
            or parse_time(period.get("start")),
        )


def _observation_codes(r: dict) -> list[Concept]:
    codes, _ = codeable_concepts(r.get("code"))
    for component in as_list(r.get("component")):
        if isinstance(component, dict):
            codes += codeable_concepts(component.get("code"))[0]
    return codes


def _observation_fact(ref: str, r: dict, time: datetime | None) -> ObservationFact:
    concepts, texts = codeable_concepts(r.get("code"))
    value = unit = value_text = None
    quantity = r.get("valueQuantity")
    if isinstance(quantity, dict) and isinstance(quantity.get("value"), (int, float)) \
            and not isinstance(quantity.get("value"), bool):
        value = float(quantity["value"])
        unit = quantity.get("unit") or quantity.get("code")
    elif isinstance(r.get("valueCodeableConcept"), dict):
        _, vtexts = codeable_concepts(r["valueCodeableConcept"])
        value_text = " ".join(vtexts).lower() or None
    elif isinstance(r.get("valueString"), str):
        value_text = r["valueString"].lower()
    interp_concepts, interp_texts = codeable_concepts(r.get("interpretation"))
    if value_text is None and (interp_concepts or interp_texts):
        value_text = " ".join([c[1] for c in interp_concepts] + interp_texts).lower()
    interpretation = frozenset(code.upper() for system, code in interp_concepts if system in INTERPRETATION_SYSTEMS)
    return ObservationFact(  # positional (see above MedicationFact), fields named in the comments
        ref,  # ref
        texts[0] if texts else "observation",  # display
        frozenset(concepts),  # concepts
        value,  # value
        unit if isinstance(unit, str) else None,  # unit
        value_text,  # value_text
        time,  # time
        interpretation,  # interpretation
    )
