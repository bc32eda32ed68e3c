"""Rule scenarios: the test cases that travel with each rule (``rules/<id>.tests.yaml``).

A scenario is a patient, the drafted orders and what the rule must do. Resources may be written
as full FHIR (anything with ``resourceType``) or in a shorthand that expands to valid FHIR R4:

  drafts:                                   record:
    - drug: "897745"   # RxNorm, any level    - condition: G43.909      # ICD-10-CM (or SNOMED digits)
      text: hydromorphone 2 mg IV               status: active          # clinicalStatus (default active)
      route: IV        # IV | IM | SC | PO | nasal (text)  verification: confirmed
      reason: G43.909  # reasonCode             encounter: true         # diagnosis on this encounter
      category: discharge  # MedicationRequest.category (inpatient | outpatient | community | discharge)
      medication: {contained: true}  # code via a contained Medication
                                              - given: "37418"          # MedicationAdministration
                                                at: -2h                 # time relative to `now`
                                              - ordered: "85762"        # MedicationRequest (status active)
                                              - taking: "85762"         # MedicationStatement (status active)
                                              - bp: [185, 110]          # BP panel with SBP/DBP components
                                              - observation: 62238-1    # any LOINC with value/unit or result
                                                value: 25
                                              - procedure: "<code>"     # Procedure (system: snomed by default)

Course and reason extensions (drafts and medication record items):

    reason_ref: fracture        # reasonReference to Condition/fracture (a record item with id: fracture,
                                #   or a full Condition resource listed under drafts: it goes in the bundle)
    reason_contained: {condition: S72.001A, display: ...}   # reasonReference to a contained Condition
    bounds: {start: -16d, end: -2d}   # dosage timing.repeat.boundsPeriod
    bounds_duration: 14d        # dosage timing.repeat.boundsDuration (from the order date)
    supply: 14d                 # dispenseRequest.expectedSupplyDuration
    validity: {start: -16d, end: -2d}  # dispenseRequest.validityPeriod
    period: {start: -16d, end: -2d}    # effectivePeriod (MedicationStatement / MedicationAdministration)
    prn: true                   # asNeededBoolean on every dosage (a PRN course end is no exposure time)
    taken: -2h                  # MedicationStatement.effectiveDateTime (a dose time; `at` is dateAsserted)
    asserted: false             # MedicationStatement without dateAsserted
  Observations: ``interpretation: POS`` (or a list: [H, A]) adds HL7 v3 ObservationInterpretation codes.

``expect`` is ``fire`` (a card is shown), ``no-fire`` (the rule does not fire) or ``suppressed``
(it fires but an exception hides the card); ``indicator`` optionally pins the finding's indicator.

``card`` (optional, with ``expect: fire``) asserts what the rule's card in the response shows and offers:

  card:
    indicator: warning          # the card as shown (may be lower than the finding: at most 2 critical cards)
    offers: [Remove the DHE]    # each is part of the label of a suggestion on this card
    not_offers: [ketorolac]     # no suggestion label on this card contains it (case-insensitive)
    recommends: [Remove]        # a suggestion with isRecommended: true whose label contains it
    not_recommends: [Cancel]    # no recommended suggestion's label contains it
    says: ["3 h ago"]           # in the summary or detail (case-insensitive)
    not_says: [ConnectionError]
    max_detail: 1200            # characters of the detail
    override_reasons: [BP re-checked]      # part of an override reason shown on this card (case-insensitive)
    not_override_reasons: [BP re-checked]  # no override reason on this card contains it

``response`` (optional) asserts the whole response: ``cards`` (how many), ``critical`` (how many critical),
``not_completed`` (how many "Check not completed" cards), ``says`` / ``not_says`` (in any card's text).

Every run also checks the response as a whole (issue 9 §4): no suggestion label on two cards, at most two
critical cards, at most one "Check not completed" card.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from .rulefiles import load_yaml_text, read_rule_text

from .facts import parse_time
from .terminology import ICD10CM, LOINC, RXNORM, SNOMED

PATIENT_ID = "example-patient"
ENCOUNTER_ID = "example-encounter"
USER_ID = "Practitioner/example-practitioner"
DEFAULT_NOW = "2026-03-01T12:00:00Z"
_ROUTES = {  # SNOMED CT route codes (FHIR R4 SNOMED CT Route Codes value set)
    "IV": ("47625008", "Intravenous route"), "IM": ("78421000", "Intramuscular route"),
    "SC": ("34206005", "Subcutaneous route"), "PO": ("26643006", "Oral route"), "NASAL": ("46713006", "Nasal route"),
    "TOPICAL": ("6064005", "Topical route"), "OPHTHALMIC": ("54485002", "Ophthalmic route"),
    "OTIC": ("10547007", "Otic route"), "VAGINAL": ("16857009", "Per vagina"), "RECTAL": ("37161004", "Per rectum"),
    "TRANSDERMAL": ("45890007", "Transdermal route"),
}
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
ORDER_CATEGORY_SYSTEM = "http://terminology.hl7.org/CodeSystem/medicationrequest-category"
_REL = re.compile(r"^([+-]?\d+(?:\.\d+)?)(m|h|d)$")


class ScenarioError(ValueError):
    pass


@dataclass
class Scenario:
    rule_id: str
    name: str
    expect: str
    indicator: str | None
    hook: str | None  # None: every hook the rule serves
    now: datetime
    drafts: list[dict]
    record: list[dict]
    selections: list[str] | None
    file: Path
    card: dict | None = None  # what the rule's card must show and offer (see the module doc)
    response: dict | None = None  # what the whole response must hold

    def request(self, hook: str | None = None, *, fhir_server: str | None = None) -> dict:
        """The CDS Hooks request for this scenario, with every record resource prefetched."""
        hook = hook or self.hook or "order-sign"
        context = {"userId": USER_ID, "patientId": PATIENT_ID, "encounterId": ENCOUNTER_ID,
                   "draftOrders": {"resourceType": "Bundle", "type": "collection",
                                   "entry": [{"resource": r} for r in self.drafts]}}
        if hook == "order-select":
            context["selections"] = self.selections or [
                f"{r['resourceType']}/{r['id']}" for r in self.drafts[:1]]
        body = {"hook": hook, "hookInstance": f"scenario-{self.rule_id}-{_slug(self.name)}-{hook}",
                "context": context, "prefetch": prefetch_for(self.record)}
        if fhir_server:
            body["fhirServer"] = fhir_server
        return body


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


_KEY_OF_TYPE = {"Condition": "conditions", "MedicationRequest": "medicationRequests",
                "MedicationAdministration": "medicationAdministrations", "MedicationStatement": "medicationStatements",
                "Observation": "observations", "Procedure": "procedures", "Patient": "patient"}


def prefetch_for(resources: list[dict]) -> dict:
    """Prefetch values as a client would send them: a searchset Bundle per key (empty ones too)."""
    out: dict = {"patient": {"resourceType": "Patient", "id": PATIENT_ID, "gender": "female",
                             "birthDate": "1985-04-12"}}
    for key in ("conditions", "medicationRequests", "medicationAdministrations", "medicationStatements",
                "observations", "procedures"):
        entries = [{"fullUrl": f"urn:uuid:{r['resourceType']}-{r['id']}", "resource": r, "search": {"mode": "match"}}
                   for r in resources if _KEY_OF_TYPE.get(r["resourceType"]) == key]
        out[key] = {"resourceType": "Bundle", "type": "searchset", "total": len(entries), "entry": entries}
    return out


def load_scenarios(path: Path, rule_id: str) -> list[Scenario]:
    doc = load_yaml_text(read_rule_text(path)) or {}
    if not isinstance(doc, dict) or not isinstance(doc.get("scenarios"), list):
        raise ScenarioError(f"{path}: needs a list under `scenarios`")
    default_now = parse_time(str(doc.get("now", DEFAULT_NOW)))
    out = []
    for i, s in enumerate(doc["scenarios"]):
        where = f"{path}: scenario {i + 1}"
        if not isinstance(s, dict) or not s.get("name") or s.get("expect") not in ("fire", "no-fire", "suppressed"):
            raise ScenarioError(f"{where}: needs a name and expect: fire | no-fire | suppressed")
        now = parse_time(str(s["now"])) if s.get("now") else default_now
        try:
            drafts = [expand_draft(d, j, now) for j, d in enumerate(s.get("drafts") or [])]
            record = [expand_record(r, j, now) for j, r in enumerate(s.get("record") or [])]
        except (KeyError, TypeError, ValueError) as exc:
            raise ScenarioError(f"{where} ({s['name']}): {exc}") from exc
        if not drafts:
            raise ScenarioError(f"{where} ({s['name']}): needs at least one draft")
        for key, allowed in (("card", _CARD_KEYS), ("response", _RESPONSE_KEYS)):
            if s.get(key) is not None and (not isinstance(s[key], dict) or set(s[key]) - allowed):
                raise ScenarioError(f"{where} ({s['name']}): `{key}` takes {', '.join(sorted(allowed))}")
        if s.get("card") and s["expect"] != "fire":
            raise ScenarioError(f"{where} ({s['name']}): `card` needs expect: fire")
        out.append(Scenario(rule_id, s["name"], s["expect"], s.get("indicator"), s.get("hook"), now,
                            drafts, record, s.get("selections"), path, s.get("card"), s.get("response")))
    return out


_CARD_KEYS = frozenset({"indicator", "offers", "not_offers", "recommends", "not_recommends", "says", "not_says",
                        "max_detail", "override_reasons", "not_override_reasons"})
_RESPONSE_KEYS = frozenset({"cards", "critical", "not_completed", "says", "not_says"})
NOT_COMPLETED = "Check not completed"


def response_problems(cards: list[dict]) -> list[str]:
    """What a response breaks of issue 9 §4, whatever the scenario: a suggestion label on two cards, more
    than two critical cards, more than one "Check not completed" card."""
    problems = []
    labels = [s["label"] for c in cards for s in {x["label"]: x for x in c.get("suggestions", [])}.values()]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        problems.append("suggestion on two cards: " + "; ".join(repeated))
    critical = sum(c["indicator"] == "critical" for c in cards)
    if critical > 2:
        problems.append(f"{critical} critical cards (at most 2)")
    not_completed = sum(c["summary"].startswith(NOT_COMPLETED) for c in cards)
    if not_completed > 1:
        problems.append(f"{not_completed} 'Check not completed' cards (at most 1)")
    return problems


def _phrases(want: dict, key: str, items: list[str], name: str, lacks: str, has: str) -> list[str]:
    """A scenario's ``key`` / ``not_<key>`` phrases against the card's items (labels, override reasons):
    each wanted phrase is part of some item, no unwanted one is part of any (case-insensitive)."""
    problems = []
    for phrase in want.get(key) or []:
        if not any(str(phrase).lower() in item.lower() for item in items):
            problems.append(f"{lacks} {phrase!r} ({name}: {'; '.join(items) or ('none' if name == 'reasons' else 'nothing')})")
    for phrase in want.get("not_" + key) or []:
        hit = [item for item in items if str(phrase).lower() in item.lower()]
        if hit:
            problems.append(f"{has} {hit[0]!r}")
    return problems


def _text(card: dict) -> str:
    return (card.get("summary", "") + "\n" + card.get("detail", "")).lower()


def card_problems(card: dict | None, want: dict) -> list[str]:
    """What the rule's card does not show or offer of ``want`` (a scenario's ``card``)."""
    if card is None:
        return ["no card of this rule in the response"]
    problems = []
    labels = [s["label"] for s in card.get("suggestions", [])]
    if want.get("indicator") and card["indicator"] != want["indicator"]:
        problems.append(f"card shown as {card['indicator']}, expected {want['indicator']}")
    recommended = [s["label"] for s in card.get("suggestions", []) if s.get("isRecommended")]
    reasons = [r["display"] for r in card.get("overrideReasons", [])]
    # (key, the card's items and their name, "lacks a wanted phrase" wording, "has an unwanted one" wording)
    for key, items, name, lacks, has in (
            ("offers", labels, "offers", "does not offer", "offers"),
            ("recommends", recommended, "recommends", "does not recommend", "recommends"),
            ("override_reasons", reasons, "reasons", "does not offer the override reason", "offers the override reason")):
        problems += _phrases(want, key, items, name, lacks, has)
    text = _text(card)
    for phrase in want.get("says") or []:
        if str(phrase).lower() not in text:
            problems.append(f"does not say {phrase!r}")
    for phrase in want.get("not_says") or []:
        if str(phrase).lower() in text:
            problems.append(f"says {phrase!r}")
    if want.get("max_detail") and len(card.get("detail", "")) > int(want["max_detail"]):
        problems.append(f"detail has {len(card.get('detail', ''))} characters (at most {want['max_detail']})")
    return problems


def whole_response_problems(cards: list[dict], want: dict) -> list[str]:
    problems = []
    for key, count in (("cards", len(cards)), ("critical", sum(c["indicator"] == "critical" for c in cards)),
                       ("not_completed", sum(c["summary"].startswith(NOT_COMPLETED) for c in cards))):
        if key in want and count != int(want[key]):
            problems.append(f"{count} {key.replace('_', ' ')} cards in the response, expected {want[key]}")
    text = "\n".join(_text(c) for c in cards)
    for phrase in want.get("says") or []:
        if str(phrase).lower() not in text:
            problems.append(f"no card says {phrase!r}")
    for phrase in want.get("not_says") or []:
        if str(phrase).lower() in text:
            problems.append(f"a card says {phrase!r}")
    return problems


def _time(value, now: datetime) -> str:
    if value is None:
        value = "-1h"
    text = str(value)
    m = _REL.match(text)
    if m:
        seconds = float(m.group(1)) * {"m": 60, "h": 3600, "d": 86400}[m.group(2)]
        t = now + timedelta(seconds=seconds)
    else:
        t = parse_time(text)
        if t is None:
            raise ValueError(f"not a time: {text!r} (use e.g. -2h, -3d or an ISO date-time)")
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _coding(code: str, system: str | None = None, display: str | None = None) -> dict:
    code = str(code)
    if system is None:
        system = ICD10CM if re.match(r"^[A-Z][0-9]", code) else SNOMED
    system = {"icd10cm": ICD10CM, "snomed": SNOMED, "loinc": LOINC, "rxnorm": RXNORM}.get(system, system)
    out = {"system": system, "code": code}
    if display:
        out["display"] = display
    return out


def _medication_cc(item: dict, key: str) -> dict:
    code = item.get(key)
    cc: dict = {}
    if code:
        cc["coding"] = [_coding(str(code), RXNORM, item.get("display"))]
    if item.get("text"):
        cc["text"] = item["text"]
    if not cc:
        raise ValueError("a medication needs an RxNorm code or a text")
    return cc


def _dosage(item: dict) -> list[dict]:
    route = item.get("route")
    if not route:
        return []
    route_code = _ROUTES.get(str(route).upper())
    dosage = {"text": item.get("text") or str(route),
              "route": {"coding": [{"system": SNOMED, "code": route_code[0], "display": route_code[1]}]}
              if route_code else {"text": str(route)}}
    return [dosage]


def expand_draft(item: dict, index: int, now: datetime) -> dict:
    if "resourceType" in item:
        return item
    rid = item.get("id", f"draft-{index + 1}")
    resource: dict = {"resourceType": "MedicationRequest", "id": rid, "status": "draft", "intent": "order",
                      "subject": {"reference": f"Patient/{PATIENT_ID}"},
                      "encounter": {"reference": f"Encounter/{ENCOUNTER_ID}"},
                      "authoredOn": _time(item.get("at", "0m"), now)}
    _set_medication(resource, item, "drug", "dosageInstruction")
    if item.get("reason"):
        resource["reasonCode"] = [{"coding": [_coding(str(item["reason"]))]}]
    if item.get("category"):  # inpatient | outpatient | community | discharge (MedicationRequest.category)
        resource["category"] = [{"coding": [{"system": ORDER_CATEGORY_SYSTEM, "code": str(item["category"])}]}]
    _set_reason_reference(resource, item, now)
    _set_course(resource, item, now)
    return resource


def _duration(value) -> dict:
    m = _REL.match(str(value).lstrip("+"))
    if not m:
        raise ValueError(f"not a duration: {value!r} (use e.g. 14d, 12h)")
    return {"value": float(m.group(1)), "unit": {"m": "min", "h": "h", "d": "d"}[m.group(2)],
            "system": "http://unitsofmeasure.org", "code": {"m": "min", "h": "h", "d": "d"}[m.group(2)]}


def _period(value, now: datetime) -> dict:
    if not isinstance(value, dict):
        raise ValueError("a period needs start and/or end")
    return {k: _time(value[k], now) for k in ("start", "end") if value.get(k) is not None}


def _set_reason_reference(resource: dict, item: dict, now: datetime) -> None:
    refs = []
    for ref in ([item["reason_ref"]] if isinstance(item.get("reason_ref"), str) else item.get("reason_ref") or []):
        refs.append({"reference": ref if "/" in ref or ref.startswith("#") else f"Condition/{ref}"})
    if item.get("reason_contained"):
        cond = expand_record(dict(item["reason_contained"], id="reason"), 0, now)
        resource.setdefault("contained", []).append(cond)
        refs.append({"reference": "#reason"})
    if refs:
        resource["reasonReference"] = refs


def _set_course(resource: dict, item: dict, now: datetime) -> None:
    """Course end fields (boundsPeriod/boundsDuration on every dosage, dispenseRequest, effectivePeriod)."""
    repeat = {}
    if item.get("bounds"):
        repeat["boundsPeriod"] = _period(item["bounds"], now)
    if item.get("bounds_duration"):
        repeat["boundsDuration"] = _duration(item["bounds_duration"])
    if repeat:
        field = "dosageInstruction" if "dosageInstruction" in resource or resource["resourceType"] == "MedicationRequest" \
            else "dosage"
        dosages = resource.get(field)
        if dosages is None:
            dosages = [{"text": item.get("text") or "as directed"}]
        for d in (dosages if isinstance(dosages, list) else [dosages]):
            d["timing"] = {"repeat": dict(repeat)}
        resource[field] = dosages
    dispense = {}
    if item.get("supply"):
        dispense["expectedSupplyDuration"] = _duration(item["supply"])
    if item.get("validity"):
        dispense["validityPeriod"] = _period(item["validity"], now)
    if dispense:
        resource["dispenseRequest"] = dispense
    if item.get("prn"):  # as needed: every dosage gets asNeededBoolean
        field = "dosageInstruction" if resource["resourceType"] == "MedicationRequest" else "dosage"
        dosages = resource.get(field) or [{"text": item.get("text") or "as needed"}]
        for d in (dosages if isinstance(dosages, list) else [dosages]):
            d["asNeededBoolean"] = True
        resource[field] = dosages
    if item.get("period"):
        resource["effectivePeriod"] = _period(item["period"], now)


def _set_medication(resource: dict, item: dict, key: str, dosage_field: str) -> None:
    how = item.get("medication") or {}
    cc = _medication_cc(item, key)
    if how.get("contained"):
        resource["contained"] = [{"resourceType": "Medication", "id": "med", "code": cc}]
        resource["medicationReference"] = {"reference": "#med"}
    else:
        resource["medicationCodeableConcept"] = cc
    dosage = _dosage(item)
    if dosage:
        resource[dosage_field] = dosage if dosage_field == "dosageInstruction" else dosage[0]


def expand_record(item: dict, index: int, now: datetime) -> dict:
    if "resourceType" in item:
        return item
    rid = str(item.get("id", f"r{index + 1}"))
    subject = {"reference": f"Patient/{PATIENT_ID}"}
    if "condition" in item:
        r = {"resourceType": "Condition", "id": rid,
             "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                            "code": item.get("status", "active")}]},
             "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                                                "code": item.get("verification", "confirmed")}]},
             "code": {"coding": [_coding(item["condition"], item.get("system"), item.get("display"))]},
             "subject": subject, "recordedDate": _time(item.get("at", "-30d"), now)}
        if item.get("display"):
            r["code"]["text"] = item["display"]
        if item.get("encounter"):
            r["encounter"] = {"reference": f"Encounter/{ENCOUNTER_ID}"}
            r["category"] = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-category",
                                          "code": "encounter-diagnosis"}]}]
        return r
    if "given" in item:
        r = {"resourceType": "MedicationAdministration", "id": rid, "status": item.get("status", "completed"),
             "subject": subject, "effectiveDateTime": _time(item.get("at"), now)}
        _set_medication(r, item, "given", "dosage")
        if "dosage" in r:
            r["dosage"] = {"text": r["dosage"]["text"], "route": r["dosage"]["route"]}
        if item.get("period"):
            del r["effectiveDateTime"]
            r["effectivePeriod"] = _period(item["period"], now)
        return r
    if "ordered" in item:
        r = {"resourceType": "MedicationRequest", "id": rid, "status": item.get("status", "active"),
             "intent": "order", "subject": subject, "authoredOn": _time(item.get("at", "-7d"), now)}
        _set_medication(r, item, "ordered", "dosageInstruction")
        _set_course(r, item, now)
        return r
    if "taking" in item:
        r = {"resourceType": "MedicationStatement", "id": rid, "status": item.get("status", "active"),
             "subject": subject}
        if item.get("asserted", True):
            r["dateAsserted"] = _time(item.get("at", "-30d"), now)
        if item.get("taken") is not None:
            r["effectiveDateTime"] = _time(item["taken"], now)
        _set_medication(r, item, "taking", "dosage")
        if "dosage" in r:
            r["dosage"] = [r["dosage"]]
        _set_course(r, item, now)
        return r
    if "bp" in item:
        sbp, dbp = item["bp"]
        return {"resourceType": "Observation", "id": rid, "status": "final",
                "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                          "code": "vital-signs"}]}],
                "code": {"coding": [{"system": LOINC, "code": "85354-9", "display": "Blood pressure panel"}]},
                "subject": subject, "effectiveDateTime": _time(item.get("at"), now),
                "component": [
                    {"code": {"coding": [{"system": LOINC, "code": "8480-6", "display": "Systolic blood pressure"}]},
                     "valueQuantity": {"value": sbp, "unit": "mmHg", "system": "http://unitsofmeasure.org",
                                       "code": "mm[Hg]"}},
                    {"code": {"coding": [{"system": LOINC, "code": "8462-4", "display": "Diastolic blood pressure"}]},
                     "valueQuantity": {"value": dbp, "unit": "mmHg", "system": "http://unitsofmeasure.org",
                                       "code": "mm[Hg]"}}]}
    if "observation" in item:
        r = {"resourceType": "Observation", "id": rid, "status": item.get("status", "final"),
             "code": {"coding": [_coding(item["observation"], LOINC, item.get("display"))]},
             "subject": subject, "effectiveDateTime": _time(item.get("at"), now)}
        if "value" in item:
            r["valueQuantity"] = {"value": item["value"], "unit": item.get("unit", "1")}
        elif "result" in item:
            r["valueCodeableConcept"] = {"text": str(item["result"])}
        if item.get("interpretation"):
            codes = item["interpretation"] if isinstance(item["interpretation"], list) else [item["interpretation"]]
            r["interpretation"] = [{"coding": [{"system": INTERPRETATION, "code": str(c)}]} for c in codes]
        return r
    if "procedure" in item:
        return {"resourceType": "Procedure", "id": rid, "status": "completed",
                "code": {"coding": [_coding(item["procedure"], item.get("system", "snomed"), item.get("display"))]},
                "subject": subject, "performedDateTime": _time(item.get("at", "-10d"), now)}
    raise ValueError(f"unknown record item {sorted(item)}; use condition, given, ordered, taking, bp, "
                     "observation, procedure or a full FHIR resource")


@dataclass
class ScenarioResult:
    scenario: Scenario
    hook: str
    outcome: str  # fire | no-fire | suppressed
    indicator: str | None
    passed: bool
    message: str


def scenario_file(rule) -> Path:
    return rule.path.with_name(rule.raw.get("tests") or f"{rule.id}.tests.yaml")


def run_scenarios(rulebook, settings, rule_ids: list[str] | None = None,
                  progress=None) -> tuple[list[ScenarioResult], list[str]]:
    """Run every rule's scenarios on each hook the rule serves. Returns results and problems
    (a rule without scenarios, or without at least one firing and one non-firing scenario).
    ``progress(iterable, total)`` optionally wraps the rules (e.g. in a progress bar)."""
    from .hook_call import EXCEPTED, FIRED, SHADOW, SUPPRESSED, call_service
    from .services import SERVICE_FOR_HOOK
    results: list[ScenarioResult] = []
    problems: list[str] = []
    rules = [r for r in rulebook.rules if not rule_ids or r.id in rule_ids]
    for rule in (progress(rules, len(rules)) if progress else rules):
        path = scenario_file(rule)
        if not path.exists():
            problems.append(f"{rule.id}: no scenario file {path.name} beside the rule")
            continue
        try:
            scenarios = load_scenarios(path, rule.id)
        except ScenarioError as exc:
            problems.append(str(exc))
            continue
        expects = {s.expect for s in scenarios}
        if "fire" not in expects or not expects & {"no-fire", "suppressed"}:
            problems.append(f"{rule.id}: needs at least one scenario that fires and one that does not")
        for sc in scenarios:
            hooks = [sc.hook] if sc.hook else sorted(rule.hooks)
            for hook in hooks:
                settings.fixed_now = sc.now
                result = call_service(SERVICE_FOR_HOOK[hook], sc.request(hook), rulebook=rulebook, store=None,
                                      settings=settings)
                outcome, indicator = "no-fire", None
                for f in result.findings:
                    if f.rule.id == rule.id and f.outcome in (FIRED, SHADOW, EXCEPTED, SUPPRESSED):
                        outcome, indicator = ("fire" if f.outcome in (FIRED, SHADOW) else "suppressed"), f.indicator
                        break
                ok = outcome == sc.expect and (sc.indicator is None or outcome != "fire" or indicator == sc.indicator)
                msg = "" if ok else (f"expected {sc.expect}" + (f" ({sc.indicator})" if sc.indicator else "")
                                     + f", got {outcome}" + (f" ({indicator})" if indicator else ""))
                cards = result.response["cards"]
                wrong = response_problems(cards)
                if ok and sc.card:
                    card = next((c for c in cards if c["source"].get("topic", {}).get("code") == rule.id), None)
                    wrong += card_problems(card, sc.card)
                if sc.response:
                    wrong += whole_response_problems(cards, sc.response)
                if wrong:
                    ok = False
                    msg = "; ".join(([msg] if msg else []) + wrong)
                results.append(ScenarioResult(sc, hook, outcome, indicator, ok, msg))
    settings.fixed_now = None
    return results, problems
