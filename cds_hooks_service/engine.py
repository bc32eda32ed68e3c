"""Evaluate compiled rules against the drafted orders and the patient's record.

The engine is generic: it knows the kinds of check a rule file may use (condition, medication,
medicationClasses, observation, procedure, orderReason, drafted, all/any/not), never a rule.
For every rule and drafted order it returns a :class:`Finding` (fired, suppressed by an
exception) and, when asked, a trace saying why each check matched or not.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property

from .facts import (DRAFT_TYPES, IGNORED_MEDICATION_STATUSES, MEDICATION_TYPES, route_matches, ConditionFact, MedicationFact, MedicationIndex, Normaliser, ObservationFact,
                    ProcedureFact)
from .rulebook import INDICATOR_RANK, Check, Rule, Rulebook, Trigger

_ACTIVE_CONDITION = frozenset({"active", "recurrence", "relapse"})


class PatientRecord:
    """The patient's record as FHIR resources per data key; facts are built lazily, once."""

    def __init__(self, resources: dict[str, list[dict]], normaliser: Normaliser, medications: MedicationIndex,
                 exclude_refs: frozenset[str] = frozenset(), relevant_conditions: frozenset | None = None):
        self._relevant_conditions = relevant_conditions  # conditions coded otherwise never match a check
        self._resources = resources
        self._normaliser = normaliser
        self._medications = medications
        self._exclude = exclude_refs  # the drafts themselves, if the EHR also returns them

    def _of(self, key: str) -> list[dict]:
        return [r for r in self._resources.get(key) or [] if isinstance(r, dict)]

    @cached_property
    def medications(self) -> list[MedicationFact]:
        out = []
        for key in ("medicationRequests", "medicationAdministrations", "medicationStatements"):
            for r in self._of(key):
                if r.get("resourceType") not in MEDICATION_TYPES + DRAFT_TYPES:
                    continue
                fact = self._normaliser.medication(r, self._medications)
                if fact.ref not in self._exclude and fact.status not in IGNORED_MEDICATION_STATUSES:
                    out.append(fact)
        return out

    @cached_property
    def conditions(self) -> list[ConditionFact]:
        facts = (self._normaliser.condition(r, self._relevant_conditions)
                 for r in self._of("conditions") if r.get("resourceType") == "Condition")
        return [f for f in facts if f]

    @cached_property
    def observations(self) -> list[ObservationFact]:
        out: list[ObservationFact] = []
        for r in self._of("observations"):
            if r.get("resourceType") == "Observation":
                out += self._normaliser.observations(r)
        return out

    @cached_property
    def procedures(self) -> list[ProcedureFact]:
        facts = (self._normaliser.procedure(r) for r in self._of("procedures") if r.get("resourceType") == "Procedure")
        return [f for f in facts if f]


@dataclass
class Evidence:
    check: str
    label: str
    indicator: str | None
    items: list[dict]


@dataclass
class Finding:
    rule: Rule
    draft: MedicationFact
    trigger: str
    indicator: str
    evidence: list[Evidence]
    cautions: list[Evidence]
    suppressed_by: Evidence | None = None
    trace: list[dict] = field(default_factory=list)
    excluded_suggestions: frozenset[str] = frozenset()  # left out by their `only_if`/`unless` checks

    @property
    def fired(self) -> bool:
        return self.suppressed_by is None

    def matched(self, check_name: str) -> bool:
        return any(e.check == check_name for e in self.evidence + self.cautions)


@dataclass
class HookContext:
    hook: str
    now: datetime
    patient_id: str | None
    encounter_id: str | None
    user_id: str | None
    drafts: list[MedicationFact]  # every medication draft of the order session
    targets: list[MedicationFact]  # the drafts to judge (selections for order-select, all for order-sign)


def _when(t: datetime | None) -> str | None:
    return t.isoformat().replace("+00:00", "Z") if t else None


class Evaluation:
    """One rule against one drafted order. Check results are memoised, the trace is optional."""

    def __init__(self, rule: Rule, draft: MedicationFact, ctx: HookContext, record: PatientRecord,
                 rulebook: Rulebook, trace: bool):
        self.rule, self.draft, self.ctx, self.record = rule, draft, ctx, record
        self.terminology = rulebook.terminology
        self._memo: dict[str, Evidence | None] = {}
        self.trace: list[dict] | None = [] if trace else None

    def check(self, name: str) -> Evidence | None:
        if name in self._memo:
            return self._memo[name]
        self._memo[name] = None  # guards against cycles (also refused at load time)
        c = self.rule.checks[name]
        items, note = getattr(self, "_" + c.kind)(c)
        evidence = Evidence(name, c.label, c.indicator, items) if items else None
        self._memo[name] = evidence
        if self.trace is not None:
            self.trace.append({"check": name, "kind": c.kind, "label": c.label, "matched": bool(items),
                               "why": note, "evidence": items})
        return evidence

    # -- check kinds -----------------------------------------------------------------------------
    def _in_window(self, c: Check, t: datetime | None) -> bool:
        return c.within is None or (t is not None and t >= self.ctx.now - timedelta(seconds=c.within))

    def _condition(self, c: Check):
        status = c.spec.get("status", "active")
        items, seen = [], 0
        for cond in self.record.conditions:
            if cond.concepts.isdisjoint(c.valueset):
                continue
            seen += 1
            on_this_encounter = bool(self.ctx.encounter_id) and cond.encounter == f"Encounter/{self.ctx.encounter_id}"
            if status == "active" and not (cond.clinical_status in _ACTIVE_CONDITION or cond.clinical_status is None
                                           or on_this_encounter):
                continue
            if c.within is not None and cond.time is not None and not self._in_window(c, cond.time):
                continue
            code = sorted(cond.concepts & c.valueset)[0]
            items.append({"kind": "condition", "display": cond.display, "system": code[0], "code": code[1],
                          "status": cond.clinical_status or "unknown", "time": _when(cond.time),
                          "possible": cond.verification_status in ("unconfirmed", "provisional", "differential"),
                          "ref": cond.ref})
        total = len(self.record.conditions)
        if items:
            note = f"{len(items)} of {total} conditions qualify"
        elif seen:
            note = f"{seen} in the value sets, none with status {status} (or within the window)"
        else:
            note = f"none of the {total} conditions is in the value sets"
        return items, note

    def _medication_candidates(self, sources: tuple[str, ...], drafts: bool):
        if drafts:
            for d in self.ctx.drafts:
                if d.ref != self.draft.ref:
                    yield d
        for m in self.record.medications:
            if m.source in sources or (m.source == "MedicationOrder" and "MedicationRequest" in sources):
                yield m

    def _medication(self, c: Check):
        spec = c.spec
        sources = tuple(spec.get("sources") or MEDICATION_TYPES)
        routes = frozenset(spec["route"]) if spec.get("route") else None
        items, considered = [], 0
        for m in self._medication_candidates(sources, spec.get("drafts", True)):
            hit = m.concepts & c.valueset
            if not hit:
                continue
            considered += 1
            if routes is not None and not route_matches(m.route, routes):
                continue
            is_draft = m.source == "draft"
            in_window = c.within is not None and self._in_window(c, m.time)
            active = bool(spec.get("active")) and m.active
            if not (is_draft or in_window or active or (c.within is None and not spec.get("active"))):
                continue
            until = m.time + timedelta(seconds=c.within) if (c.within and m.time and not is_draft) else None
            items.append({
                "kind": "medication", "display": m.display, "source": m.source,
                "how": {"draft": "ordered now", "MedicationAdministration": "given",
                        "MedicationStatement": "taking", "MedicationRequest": "ordered"}.get(m.source, "ordered"),
                "ingredients": self.terminology.ingredient_label(hit) or m.display, "status": m.status or "unknown",
                "active": m.active, "time": _when(m.time), "until": _when(until), "route": m.route,
                "matched_by": m.matched_by, "ref": m.ref,
            })
        items.sort(key=lambda i: i["time"] or "", reverse=True)  # newest first
        note = f"{len(items)} qualifying of {considered} in the value sets" if considered else "none in the value sets"
        return items, note

    def _medicationClasses(self, c: Check):
        spec = c.spec
        sources = tuple(spec.get("sources") or ("MedicationAdministration",))
        found: dict[str, dict] = {}
        for m in self._medication_candidates(sources, False):
            if not self._in_window(c, m.time):
                continue
            for cls, vs in c.classes.items():
                if cls not in found and not m.concepts.isdisjoint(vs):
                    found[cls] = {"kind": "medication", "class": cls, "display": m.display, "source": m.source,
                                  "how": "given", "time": _when(m.time), "ref": m.ref,
                                  "ingredients": self.terminology.ingredient_label(m.concepts & vs) or m.display}
        enough = len(found) >= spec["min"]
        note = f"{len(found)} of {spec['min']} classes needed: {', '.join(found) or 'none'}"
        return (list(found.values()) if enough else []), note

    def _observation(self, c: Check):
        latest_only = c.spec.get("latest", True)
        items = []
        for vs, op, value in c.observations:
            readings = [o for o in self.record.observations if not o.concepts.isdisjoint(vs)]
            readings.sort(key=lambda o: o.time.timestamp() if o.time else 0, reverse=True)
            if latest_only:
                readings = readings[:1]
            for o in readings:
                if self._in_window(c, o.time) and _compare(o, op, value):
                    items.append({"kind": "observation", "display": o.display, "value": o.value, "unit": o.unit,
                                  "result": o.value_text, "time": _when(o.time), "ref": o.ref,
                                  "code": sorted(o.concepts & vs)[0][1]})
        return items, (f"{len(items)} readings meet the threshold" if items else "no reading meets the threshold")

    def _procedure(self, c: Check):
        items = [{"kind": "procedure", "display": p.display, "time": _when(p.time), "ref": p.ref}
                 for p in self.record.procedures if not p.concepts.isdisjoint(c.valueset) and self._in_window(c, p.time)]
        return items, f"{len(items)} qualifying procedures"

    def _orderReason(self, c: Check):
        reasons = self.draft.reasons
        hits = [r for r in reasons if r in c.valueset]
        if c.spec.get("match", "any") == "none":
            ok = bool(reasons) and not hits
            items = []
            if ok:
                display = self.draft.reason_texts[0] if self.draft.reason_texts else reasons[0][1]
                items = [{"kind": "reason", "display": display, "system": reasons[0][0], "code": reasons[0][1]}]
            return items, ("the order's reason is outside the value sets" if ok else "no other reason given")
        items = [{"kind": "reason", "display": (self.draft.reason_texts or (code,))[0], "system": system, "code": code}
                 for system, code in hits]
        return items, ("the order's reason is in the value sets" if items else
                       f"{len(reasons)} order reasons, none in the value sets")

    def _drafted(self, c: Check):
        spec = c.spec
        ok = True
        if spec.get("valueSets"):
            ok = not self.draft.concepts.isdisjoint(c.valueset)
        if ok and spec.get("route"):
            ok = route_matches(self.draft.route, spec["route"])
        items = [{"kind": "drafted", "display": self.draft.display, "route": self.draft.route}] if ok else []
        return items, ("the drafted order matches" if ok else "the drafted order does not match")

    def _all(self, c: Check):
        results = [self.check(n) for n in c.children]
        if all(results):
            return [i for e in results for i in e.items], "all matched"
        return [], "not all matched"

    def _any(self, c: Check):
        results = [e for e in (self.check(n) for n in c.children) if e]
        return [i for e in results for i in e.items], f"{len(results)} matched"

    def _not(self, c: Check):
        inner = self.check(c.children[0])
        return ([] if inner else [{"kind": "absent", "display": c.label}]), ("inner matched" if inner else "inner absent")


def _compare(o: ObservationFact, op: str, value: float | None) -> bool:
    if op == "positive":
        text = o.value_text or ""
        return ("positive" in text or "detected" in text or text.strip() in ("pos", "p")) and "not detected" not in text \
            and "negative" not in text
    if o.value is None or value is None:
        return False
    return {">=": o.value >= value, ">": o.value > value, "<=": o.value <= value, "<": o.value < value}[op]


def triggered(rule: Rule, draft: MedicationFact) -> list[Trigger]:
    return [t for t in rule.triggers
            if not draft.concepts.isdisjoint(t.drafted) and (t.route is None or route_matches(draft.route, t.route))]


def evaluate_rule(rule: Rule, draft: MedicationFact, ctx: HookContext, record: PatientRecord, rulebook: Rulebook,
                  *, trace: bool = False) -> Finding | None:
    """The rule's finding for one drafted order, or None when no trigger's drug and evidence match."""
    ev = Evaluation(rule, draft, ctx, record, rulebook, trace)
    for trig in triggered(rule, draft):
        evidence = [e for e in (ev.check(n) for n in trig.when) if e]
        if not evidence:
            continue
        suppressed = next((e for e in (ev.check(n) for n in rule.exceptions) if e), None)
        cautions = [e for e in (ev.check(n) for n in rule.cautions) if e]
        indicator = max((e.indicator or rule.indicator for e in evidence), key=INDICATOR_RANK.__getitem__)
        for when, adjusted in rule.adjust:
            if any(ev.check(n) for n in when):
                indicator = adjusted
                break
        excluded = frozenset(s.id for s in rule.suggestions if not s.offered(ev.check))
        return Finding(rule, draft, trig.name, indicator, evidence, cautions, suppressed, ev.trace or [], excluded)
    if trace and ev.trace is not None:
        return Finding(rule, draft, "", rule.indicator, [], [], None, ev.trace)  # not fired; trace only
    return None


def draft_facts(draft_orders: object, normaliser: Normaliser) -> tuple[list[MedicationFact], MedicationIndex]:
    """Medication drafts of a draftOrders Bundle (other order types are skipped) and its Medications."""
    entries = draft_orders.get("entry") if isinstance(draft_orders, dict) else None
    resources = [e.get("resource") for e in entries if isinstance(e, dict) and isinstance(e.get("resource"), dict)] \
        if isinstance(entries, list) else []
    index = MedicationIndex(resources)
    drafts = [normaliser.medication(r, index, source="draft") for r in resources if r.get("resourceType") in DRAFT_TYPES]
    return drafts, index

