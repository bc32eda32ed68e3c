"""Normalise FHIR resources (plain dicts, leniently parsed) into the facts the rules read.

Real drafts are not strict R4: the CDS Hooks Sandbox sends ``reasonCode`` and ``category`` as single
objects and may omit ``intent``; ``doseAndRate`` may be an object; ``Bundle.type`` may be missing.
Nothing here raises on odd shapes: a field of the wrong type is treated as absent.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone

from .terminology import Concept, DrugMatch, Terminology, concept

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
_OBS_STATUSES = frozenset({"final", "amended", "corrected", "preliminary", "registered"})

# Route classes from SNOMED CT route codes (FHIR R4 "SNOMED CT Route Codes" value set), text and dose forms.
# An injection is intravenous, intramuscular, subcutaneous, or "injection" when the route is not stated;
# a rule's route filter naming "parenteral" matches all four (see route_matches).
PARENTERAL = frozenset({"injection", "intravenous", "intramuscular", "subcutaneous"})
_ROUTE_CODES = {
    "47625008": "intravenous",  # Intravenous route
    "78421000": "intramuscular",  # Intramuscular route
    "34206005": "subcutaneous",  # Subcutaneous route
    "26643006": "oral",  # Oral route
    "46713006": "nasal",  # Nasal route
}
_ROUTE_WORDS = [
    (re.compile(r"\b(iv|ivp|ivpb|intravenous\w*|infusion|drip)\b"), "intravenous"),
    (re.compile(r"\b(im|intramuscular\w*)\b"), "intramuscular"),
    (re.compile(r"\b(sc|sq|subq|subcut\w*)\b"), "subcutaneous"),
    (re.compile(r"\b(inj\w*|syringe|cartridge|auto-?injector|vial|parenteral)\b"), "injection"),
    (re.compile(r"\b(po|oral\w*|by mouth|tablet|capsule|lozenge|sublingual|buccal)\b"), "oral"),
    (re.compile(r"\b(nasal|intranasal|nostril|nose)\b"), "nasal"),
    (re.compile(r"\b(transdermal|patch)\b"), "transdermal"),
    (re.compile(r"\b(ophthalmic|eye|topical|rectal|suppository)\b"), "topical"),
]


def route_matches(route: str | None, allowed: frozenset[str] | set[str] | list[str]) -> bool:
    """A rule's route filter: "parenteral" covers every injection route; "unknown" a route not stated."""
    r = route or "unknown"
    return r in allowed or ("parenteral" in allowed and r in PARENTERAL)


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


def as_list(value: object) -> list:
    """R4 arrays that real clients sometimes send as a single object."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        return [value]
    return []


def codeable_concepts(value: object) -> tuple[list[Concept], list[str]]:
    """Concepts and texts (text + coding displays) of a CodeableConcept or a list of them."""
    concepts: list[Concept] = []
    texts: list[str] = []
    for cc in as_list(value):
        if not isinstance(cc, dict):
            continue
        if isinstance(cc.get("text"), str):
            texts.append(cc["text"])
        for coding in as_list(cc.get("coding")):
            if isinstance(coding, dict):
                c = concept(coding.get("system"), coding.get("code"))
                if c:
                    concepts.append(c)
                if isinstance(coding.get("display"), str):
                    texts.append(coding["display"])
    return concepts, texts


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


@dataclass(frozen=True)
class MedicationFact:
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
    resource: dict = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class ConditionFact:
    ref: str
    display: str
    concepts: frozenset[Concept]
    clinical_status: str | None
    verification_status: str | None
    encounter: str | None
    encounter_diagnosis: bool
    time: datetime | None


@dataclass(frozen=True)
class ObservationFact:
    ref: str
    display: str
    concepts: frozenset[Concept]
    value: float | None
    unit: str | None
    value_text: str | None  # coded/string results, lower-case
    time: datetime | None


@dataclass(frozen=True)
class ProcedureFact:
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
    """Medication resources a medicationReference may point at: contained ones and bundled ones."""

    def __init__(self, resources: list[dict]):
        self._by_ref = {}
        for r in resources:
            if isinstance(r, dict) and r.get("resourceType") == "Medication" and isinstance(r.get("id"), str):
                self._by_ref[f"Medication/{r['id']}"] = r

    def resolve(self, reference: str | None, owner: dict) -> dict | None:
        if not reference:
            return None
        if reference.startswith("#"):
            for c in as_list(owner.get("contained")):
                if isinstance(c, dict) and c.get("resourceType") == "Medication" and c.get("id") == reference[1:]:
                    return c
            return None
        return self._by_ref.get(_ref_tail(reference))


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
        return MedicationFact(
            source=source or rtype,
            ref=f"{rtype}/{resource.get('id', '')}",
            display=(texts[0] if texts else self.terminology.display_of(concepts) or "unnamed medication"),
            concepts=match.concepts,
            matched_by=match.matched_by,
            matched_names=match.matched_names,
            status=status,
            active=status in _ACTIVE_STATUSES.get(rtype, ()),
            time=self._medication_time(resource),
            route=self._route(resource, match.dose_form, texts),
            encounter=_ref_tail(_ref(resource.get("encounter")) or _ref(resource.get("context"))),
            reasons=tuple(reasons),
            reason_texts=tuple(reason_texts),
            resource=resource,
        )

    @staticmethod
    def _medication_time(r: dict) -> datetime | None:
        period = r.get("effectivePeriod") if isinstance(r.get("effectivePeriod"), dict) else {}
        for value in (r.get("effectiveDateTime"), period.get("end"), period.get("start"),
                      r.get("authoredOn"), r.get("dateWritten"), r.get("dateAsserted")):
            t = parse_time(value)
            if t:
                return t
        return None

    @staticmethod
    def _route(r: dict, dose_form: str | None, texts: list[str]) -> str | None:
        words = []
        for dosage in as_list(r.get("dosageInstruction")) + as_list(r.get("dosage")):
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
        for text in words:
            lowered = text.lower()
            for pattern, route in _ROUTE_WORDS:
                if pattern.search(lowered):
                    return route
        return None

    @staticmethod
    def condition(r: dict, relevant: frozenset[Concept] | None = None) -> ConditionFact | None:
        """None for conditions that are refuted or entered in error, or coded in no value set of interest."""
        concepts, texts = codeable_concepts(r.get("code"))
        if relevant is not None and relevant.isdisjoint(concepts):
            return None
        verification = _status_code(r.get("verificationStatus"))
        if verification in _CONDITION_EXCLUDED:
            return None
        categories, _ = codeable_concepts(r.get("category"))
        return ConditionFact(
            ref=f"Condition/{r.get('id', '')}",
            display=texts[0] if texts else (concepts[0][1] if concepts else "condition"),
            concepts=frozenset(concepts),
            clinical_status=_status_code(r.get("clinicalStatus")),
            verification_status=verification,
            encounter=_ref_tail(_ref(r.get("encounter")) or _ref(r.get("context"))),
            encounter_diagnosis=any(code == "encounter-diagnosis" for _, code in categories),
            time=parse_time(r.get("onsetDateTime")) or parse_time(r.get("recordedDate"))
            or parse_time(r.get("assertedDate")),
        )

    @staticmethod
    def observations(r: dict, relevant: frozenset[Concept] | None = None) -> list[ObservationFact]:
        """The readings of an Observation (itself and its components); with ``relevant``, only those coded
        with one of these concepts (the resource is skipped after a look-up of its codes when none is)."""
        if r.get("status") not in _OBS_STATUSES:
            return []
        if relevant is not None and relevant.isdisjoint(_observation_codes(r)):
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
    return ObservationFact(ref=ref, display=texts[0] if texts else "observation", concepts=frozenset(concepts),
                           value=value, unit=unit if isinstance(unit, str) else None, value_text=value_text, time=time)
