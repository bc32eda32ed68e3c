"""Evaluate compiled rules against the drafted orders and the patient's record.

The engine is generic: it knows the kinds of check a rule file may use (condition, medication,
medicationClasses, observation, procedure, orderReason, drafted, all/any/not), never a rule.
For every rule and drafted order it returns a :class:`Finding` (fired, suppressed by an
exception) and, when asked, a trace saying why each check matched or not.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from .facts import (DRAFT_TYPES, MEDICATION_TYPES, NEGATIVE_INTERPRETATIONS, POSITIVE_INTERPRETATIONS, MedicationFact,
                    MedicationIndex, Normaliser, ObservationFact, add_time, category_matches, milli_iu_per_ml,
                    order_categories, route_matches)
from .index import RecordIndex
from .rulebook import CHECK_KINDS, INDICATOR_RANK, Check, Rule, Rulebook, Trigger, contraindications, normalise_unit

_ACTIVE_CONDITION = frozenset({"active", "recurrence", "relapse"})
_UNCONFIRMED = frozenset({"unconfirmed", "provisional", "differential"})  # clinical.md §4.0: one level lower


@dataclass
class Evidence:
    check: str
    label: str
    indicator: str | None
    items: list[dict]  # at most HookContext.max_evidence_items, newest first where the check orders them
    total: int = -1  # how many the check found (items lists the first of them); -1: len(items)

    def __post_init__(self):
        if self.total < 0:
            self.total = len(self.items)

    @property
    def more(self) -> int:
        """Found but not listed (the card says "and N more")."""
        return self.total - len(self.items)


@dataclass(frozen=True)
class LeftOut:
    """An alternative no suggestion of the card offers, because one of its contraindications (alternatives.yaml,
    checks of shared.yaml) found evidence in this patient's record: the card says so in one line."""
    alternative: str  # its name in alternatives.yaml
    evidence: Evidence | None  # the first contraindication found; None: it could not be checked, see `unread`
    unread: tuple[str, ...] = ()  # data keys a contraindication needs that could not be read at all


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
    excluded_suggestions: frozenset[str] = frozenset()  # left out by their `only_if`/`unless` checks or contraindications
    left_out: tuple[LeftOut, ...] = ()  # alternatives left out for a contraindication, in suggestion order
    possible: bool = False  # the level rests on unconfirmed diagnoses only, lowered one step ("possible")
    # Set once by hook_call.record: fired | excepted | suppressed | shadow | not fired, and why it is not shown.
    outcome: str = ""
    reason: str = ""
    excluded_override_reasons: frozenset[str] = frozenset()  # override reason codes that do not fit this finding

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
    max_evidence_items: int = 10  # items listed per check; the rest are counted
    unread: frozenset[str] = frozenset()  # data keys that could not be read at all (hook_call sets them)


_NO_TIME = datetime.min.replace(tzinfo=timezone.utc)


def _newest_first(m: MedicationFact) -> datetime:
    """Sort key (with reverse=True): the latest exposure first, entries without a time last."""
    return m.exposure or _NO_TIME


def _when(t: datetime | None) -> str | None:
    return t.isoformat().replace("+00:00", "Z") if t else None


_NO_REFS: dict = {}  # shared by the checks that count no drafts; never written to


class _Found:
    """What a check found for the whole call, whichever draft is judged: the qualifying facts (in the order
    the card lists them) and the counts its trace note needs. Drafts are excluded per judged draft."""

    __slots__ = ("facts", "considered", "draft_refs", "considered_draft_refs", "note", "dated", "days")

    def __init__(self, facts: list, considered: int = 0, draft_refs: dict[str, int] | None = None,
                 considered_draft_refs: dict[str, int] | None = None, note: str = ""):
        self.facts = facts
        self.considered = considered
        # how many qualifying drafts, and drafts in the value sets, have each ref (read with .get(ref, 0))
        self.draft_refs = draft_refs if draft_refs is not None else _NO_REFS
        self.considered_draft_refs = considered_draft_refs if considered_draft_refs is not None else _NO_REFS
        self.note = note
        self.dated: list | None = None  # a count (atLeast): the record entries dated within the window, and
        self.days = 0  # on how many different days


class Evaluation:
    """One rule against one drafted order. Check results are memoised, the trace is optional.

    The record part of a check (what it finds in the record and among the other drafts) is computed once
    per call and kept in ``record.shared``; per draft only the listed items are built (at most
    ``ctx.max_evidence_items``), so a check costs its hits once, and each finding a bounded amount.
    """

    def __init__(self, rule: Rule, draft: MedicationFact, ctx: HookContext, record: RecordIndex,
                 rulebook: Rulebook, trace: bool):
        self.rule, self.draft, self.ctx, self.record = rule, draft, ctx, record
        self.terminology = rulebook.terminology
        self.limit = ctx.max_evidence_items
        self._memo: dict[str, Evidence | None] = {}
        self.trace: list[dict] | None = [] if trace else None
        self._categories: frozenset[str] | None = None  # the draft's order categories, read on first use

    def check(self, name: str) -> Evidence | None:
        memo = self._memo
        if name in memo:
            return memo[name]
        memo[name] = None  # guards against cycles (also refused at load time)
        c = self.rule.checks[name]
        items, total, note = _KIND_METHODS[c.kind](self, c)
        evidence = Evidence(name, c.label, c.indicator, items, total) if total else None
        memo[name] = evidence
        if self.trace is not None:
            self.trace.append({"check": name, "kind": c.kind, "label": c.label, "matched": bool(total),
                               "why": note, "evidence": items})
        return evidence

    def _shared(self, c: Check, compute) -> _Found:
        # A check of shared.yaml is the same in every rule (a rule cannot redefine it), so it is computed once per
        # call for all rules: the contraindications of an alternative several cards offer cost one look-up.
        key = ("(shared)" if c.shared else self.rule.id, c.name)
        found = self.record.shared.get(key)
        if found is None:
            found = self.record.shared[key] = compute(c)
        return found

    # -- check kinds -----------------------------------------------------------------------------
    def _in_window(self, c: Check, t: datetime | None) -> bool:
        return c.within is None or (t is not None and t >= self.ctx.now - timedelta(seconds=c.within))

    def _condition(self, c: Check):
        found = self._shared(c, self._find_conditions)
        items = []
        for cond in found.facts[:self.limit]:
            code = sorted(cond.concepts & c.valueset)[0]
            items.append({"kind": "condition", "display": cond.display, "system": code[0], "code": code[1],
                          "status": cond.clinical_status or "unknown", "time": _when(cond.time),
                          "possible": cond.verification_status in ("unconfirmed", "provisional", "differential"),
                          "ref": cond.ref})
        return items, len(found.facts), found.note

    def _find_conditions(self, c: Check) -> _Found:
        status = c.spec.get("status", "active")
        confirmed_only = c.spec.get("verification") == "confirmed"
        encounter = f"Encounter/{self.ctx.encounter_id}" if self.ctx.encounter_id else None
        qualifying, seen = [], 0
        for cond in self.record.conditions.matching(c.valueset):
            seen += 1
            if status == "active" and not (cond.clinical_status in _ACTIVE_CONDITION or cond.clinical_status is None
                                           or (encounter is not None and cond.encounter == encounter)):
                continue
            if c.within is not None and cond.time is not None and not self._in_window(c, cond.time):
                continue
            if confirmed_only and cond.verification_status in _UNCONFIRMED:
                continue
            qualifying.append(cond)
        total = len(self.record.conditions)
        if qualifying:
            note = f"{len(qualifying)} of {total} conditions qualify"
        elif seen:
            note = f"{seen} in the value sets, none with status {status} (or within the window)"
        else:
            note = f"none of the {total} conditions is in the value sets"
        return _Found(qualifying, note=note)

    def _medication(self, c: Check):
        found = self._shared(c, self._find_medications)
        ref = self.draft.ref
        skip = found.draft_refs.get(ref, 0)  # this draft itself (and drafts sharing its reference) never count
        facts = found.facts
        at_least = c.spec.get("atLeast")
        if at_least:  # a count: only entries dated (order or dose time) within the window count and are listed
            if found.dated is None:  # the same for every draft: once per call
                since = self.ctx.now - timedelta(seconds=c.within) if c.within else None
                found.dated = [m for m in facts if m.source != "draft" and m.time is not None
                               and m.time <= self.ctx.now and (since is None or m.time >= since)]
                found.days = len({m.time.astimezone(timezone.utc).date() for m in found.dated})
            facts, skip = found.dated, 0
        total = len(facts) - skip
        considered = found.considered - found.considered_draft_refs.get(ref, 0)
        items = []
        for m in facts:
            if len(items) >= self.limit:
                break
            if skip and m.source == "draft" and m.ref == ref:
                continue
            exposure = m.exposure
            until = add_time(exposure, timedelta(seconds=c.within)) if (c.within and exposure and m.source != "draft") else None
            # A course whose stated end is past and later than its order/dose time is shown by its end.
            ended = m.source != "draft" and exposure is not None and exposure is not m.time and exposure <= self.ctx.now
            items.append({
                "kind": "medication", "display": m.display, "source": m.source,
                "how": "course ended" if ended else {
                    "draft": "ordered now", "MedicationAdministration": "given", "MedicationStatement": "taking",
                    "MedicationRequest": "ordered"}.get(m.source, "ordered"),
                "ingredients": self.terminology.ingredient_label(m.concepts & c.valueset) or m.display,
                "status": m.status or "unknown", "active": m.active, "time": _when(exposure if ended else m.time),
                "until": _when(until), "ordered": _when(m.time), "course_end": _when(m.course_end),
                "asserted": _when(m.asserted),  # list reviewed: no dose time
                "route": m.route, "matched_by": m.matched_by, "ref": m.ref,
            })
        note = f"{total} qualifying of {considered} in the value sets" if considered else "none in the value sets"
        if at_least:
            note += f"; on {found.days} distinct days (UTC), at least {at_least} needed"
            if found.days < at_least:
                return [], 0, note
        return items, total, note

    def _find_medications(self, c: Check) -> _Found:
        spec = c.spec
        sources = tuple(spec.get("sources") or MEDICATION_TYPES)
        routes = frozenset(spec["route"]) if spec.get("route") else None
        active_wanted = bool(spec.get("active"))

        def qualifies(m: MedicationFact) -> bool:
            if routes is not None and not route_matches(m.route, routes):
                return False
            is_draft = m.source == "draft"
            in_window = c.within is not None and self._in_window(c, m.exposure)
            return is_draft or in_window or (active_wanted and m.active) or (c.within is None and not active_wanted)

        draft_refs: dict[str, int] = {}
        considered_draft_refs: dict[str, int] = {}
        qualifying = []
        if spec.get("drafts", True):
            for d in self.record.drafts.matching(c.valueset):
                considered_draft_refs[d.ref] = considered_draft_refs.get(d.ref, 0) + 1
                if qualifies(d):
                    draft_refs[d.ref] = draft_refs.get(d.ref, 0) + 1
                    qualifying.append(d)
        considered = sum(considered_draft_refs.values())
        for m in self.record.medications.matching(c.valueset):
            if m.source in sources or (m.source == "MedicationOrder" and "MedicationRequest" in sources):
                considered += 1
                if qualifies(m):
                    qualifying.append(m)
        qualifying.sort(key=_newest_first, reverse=True)
        return _Found(qualifying, considered, draft_refs, considered_draft_refs)

    def _medicationClasses(self, c: Check):
        found = self._shared(c, self._find_classes)
        items = found.facts[:self.limit]
        return items, len(found.facts), found.note

    def _find_classes(self, c: Check) -> _Found:
        spec = c.spec
        sources = tuple(spec.get("sources") or ("MedicationAdministration",))
        firsts = []  # (position in the record, class order, class, fact): the first of each class given in time
        for order, (cls, vs) in enumerate(c.classes.items()):
            for m in self.record.medications.matching(vs):
                if (m.source in sources or (m.source == "MedicationOrder" and "MedicationRequest" in sources)) \
                        and self._in_window(c, m.exposure):
                    firsts.append((self.record.medications.position(m), order, cls, m, vs))
                    break
        firsts.sort(key=lambda f: f[:2])
        found = {cls: {"kind": "medication", "class": cls, "display": m.display, "source": m.source, "how": "given",
                       "time": _when(m.time), "ref": m.ref,
                       "ingredients": self.terminology.ingredient_label(m.concepts & vs) or m.display}
                 for _, _, cls, m, vs in firsts}
        enough = len(found) >= spec["min"]
        note = f"{len(found)} of {spec['min']} classes needed: {', '.join(found) or 'none'}"
        return _Found(list(found.values()) if enough else [], note=note)

    def _observation(self, c: Check):
        found = self._shared(c, self._find_observations)
        items = [{"kind": "observation", "display": o.display, "value": o.value, "unit": o.unit,
                  "result": o.value_text, "time": _when(o.time), "ref": o.ref, "code": sorted(o.concepts & vs)[0][1]}
                 for o, vs in found.facts[:self.limit]]
        total = len(found.facts)
        return items, total, (f"{total} readings meet the threshold" if total else "no reading meets the threshold")

    def _find_observations(self, c: Check) -> _Found:
        latest_only = c.spec.get("latest", True)
        qualifying = []
        for vs, op, value in c.observations:
            readings = sorted(self.record.observations.matching(vs),
                              key=lambda o: o.time.timestamp() if o.time else 0, reverse=True)
            if latest_only:
                readings = readings[:1]
            qualifying += [(o, vs) for o in readings if self._in_window(c, o.time) and _compare(o, op, value)]
        return _Found(qualifying)

    def _score(self, c: Check):
        found = self._shared(c, self._find_score)
        return found.facts[:self.limit], len(found.facts), found.note

    def _find_score(self, c: Check) -> _Found:
        """A points score: each item's points (from the record, or ``otherwise`` when the record lacks it),
        their total against ``atLeast``. One item on the card: the total, then every item with its value,
        date and points (the record's own evidence), then the items counted as absent."""
        total, parts, missing = 0, [], []
        for item in c.score_items:
            if item.kind == "observation":
                readings = [o for o in self.record.observations.matching(item.valueset) if o.value is not None]
                readings.sort(key=lambda o: o.time.timestamp() if o.time else 0, reverse=True)
                newest = next((o for o in readings if self._in_window(c, o.time)), None)
                value = None
                if newest is not None:
                    factor = 1.0 if item.units is None else item.units.get(normalise_unit(newest.unit))
                    # converted to the bands' unit, to 2 decimals (51.3 umol/L bilirubin is 3.00 mg/dL)
                    value = round(newest.value * factor, 2) if factor is not None else None
                if value is None:
                    total += item.otherwise
                    missing.append(f"{item.label} ({item.otherwise})" if newest is None else
                                   f"{item.label} ({item.otherwise}; unit {newest.unit} not read)")
                    continue
                points = next((p for op, limit, p in item.bands
                               if {">=": value >= limit, ">": value > limit, "<=": value <= limit, "<": value < limit}[op]),
                              item.otherwise)
                total += points
                unit = newest.unit if newest.unit and not newest.unit.startswith("{") and newest.unit != "1" else ""
                date = newest.time.strftime("%Y-%m-%d") if newest.time else "date not recorded"
                parts.append({"label": item.label, "value": newest.value, "unit": newest.unit, "points": points,
                              "time": _when(newest.time), "ref": newest.ref,
                              "text": f"{item.label} {newest.value:g}{' ' + unit if unit else ''} ({date}): {points}"})
            elif item.kind == "condition":
                cond = next(iter(self.record.conditions.matching(item.valueset)), None)
                if cond is None:
                    total += item.otherwise
                    missing.append(f"{item.label} ({item.otherwise})")
                    continue
                total += item.present
                parts.append({"label": item.label, "points": item.present, "time": _when(cond.time), "ref": cond.ref,
                              "text": f"{item.label} ({cond.display}): {item.present}"})
            else:
                total += item.otherwise
                missing.append(f"{item.label} ({item.otherwise})")
        at_least = c.spec["atLeast"]
        note = f"{total} points (at least {at_least} needed); not in the record: {', '.join(missing) or 'none'}"
        if total < at_least or not parts:
            return _Found([], note=note)
        display = (f"{total} points or more: " + "; ".join(p["text"] for p in parts)
                   + (f"; not recorded, counted as: {', '.join(missing)}" if missing else "")
                   + (f". {c.spec['note']}" if c.spec.get("note") else ""))
        return _Found([{"kind": "score", "display": display, "total": total, "parts": parts, "missing": missing,
                        "ref": f"score:{c.name}", "code": c.name}], note=note)

    def _procedure(self, c: Check):
        found = self._shared(c, lambda c: _Found([p for p in self.record.procedures.matching(c.valueset)
                                                  if self._in_window(c, p.time)]))
        items = [{"kind": "procedure", "display": p.display, "time": _when(p.time), "ref": p.ref}
                 for p in found.facts[:self.limit]]
        return items, len(found.facts), f"{len(found.facts)} qualifying procedures"

    def _orderReason(self, c: Check):
        reasons, reason_texts = self.record.reasons_of(self.draft)
        hits = [r for r in reasons if r in c.valueset]
        if c.spec.get("match", "any") == "none":
            ok = bool(reasons) and not hits
            items = []
            if ok:
                display = reason_texts[0] if reason_texts else reasons[0][1]
                items = [{"kind": "reason", "display": display, "system": reasons[0][0], "code": reasons[0][1]}]
            return items, len(items), ("the order's reason is outside the value sets" if ok else "no other reason given")
        items = [{"kind": "reason", "display": (reason_texts or (code,))[0], "system": system, "code": code}
                 for system, code in hits]
        return items[:self.limit], len(items), ("the order's reason is in the value sets" if items else
                                                f"{len(reasons)} order reasons, none in the value sets")

    def _drafted(self, c: Check):
        spec = c.spec
        ok = True
        if spec.get("valueSets"):
            ok = not self.draft.concepts.isdisjoint(c.valueset)
        if ok and spec.get("route"):
            ok = route_matches(self.draft.route, spec["route"])
        categories = self._categories
        if categories is None:
            categories = self._categories = order_categories(self.draft.resource)
        if ok and spec.get("category"):
            ok = category_matches(categories, spec["category"])
        items = [{"kind": "drafted", "display": self.draft.display, "route": self.draft.route,
                  "category": ", ".join(sorted(categories)) or None}] if ok else []
        return items, len(items), ("the drafted order matches" if ok else "the drafted order does not match")

    def _combined(self, results: list[Evidence]):
        items = [i for e in results for i in e.items][:self.limit]
        return items, sum(e.total for e in results)

    def _all(self, c: Check):
        results = [self.check(n) for n in c.children]
        if all(results):
            return (*self._combined(results), "all matched")
        return [], 0, "not all matched"

    def _any(self, c: Check):
        results = [e for e in (self.check(n) for n in c.children) if e]
        return (*self._combined(results), f"{len(results)} matched")

    def _not(self, c: Check):
        inner = self.check(c.children[0])
        items = [] if inner else [{"kind": "absent", "display": c.label}]
        return items, len(items), ("inner matched" if inner else "inner absent")


# The Evaluation method of each kind of check, as a function called with the evaluation (no bound method per check).
_KIND_METHODS = {kind: getattr(Evaluation, "_" + kind) for kind in CHECK_KINDS}


def _compare(o: ObservationFact, op: str, value: float | None) -> bool:
    if op == "positive":
        # A quantitative result in international units per volume is judged by the check's threshold
        # (``value``, in mIU/mL = IU/L: a local-policy number in the rule file), whatever its flag says;
        # a qualitative one by its coded/text result or its interpretation code.
        quantity = milli_iu_per_ml(o.value, o.unit)
        if value is not None and quantity is not None:
            return quantity >= value
        text = (o.value_text or "").strip()
        if "negative" in text or "not detected" in text or text in ("neg", "n") or o.interpretation & NEGATIVE_INTERPRETATIONS:
            return False
        return "positive" in text or "detected" in text or text in ("pos", "p") \
            or bool(o.interpretation & POSITIVE_INTERPRETATIONS)
    if o.value is None or value is None:
        return False
    return {">=": o.value >= value, ">": o.value > value, "<=": o.value <= value, "<": o.value < value}[op]


_LOWER = {"critical": "warning", "warning": "info", "info": "info"}


def _indicator(rule: Rule, evidence: list[Evidence]) -> tuple[str, bool]:
    """The finding's level: its strongest evidence's. Evidence that is only unconfirmed diagnoses
    (verificationStatus unconfirmed, provisional, differential) counts one level lower (clinical.md §4.0);
    ``possible`` says the level was lowered for that."""
    def level(e: Evidence) -> tuple[str, bool]:
        own = e.indicator or rule.indicator
        unconfirmed = bool(e.items) and not e.more and all(
            i.get("kind") == "condition" and i.get("possible") for i in e.items)
        return (_LOWER[own], True) if unconfirmed else (own, False)

    levels = [level(e) for e in evidence]
    top = max((lv for lv, _ in levels), key=INDICATOR_RANK.__getitem__)
    confirmed_top = any(lv == top and not lowered for lv, lowered in levels)
    return top, not confirmed_top


def reason_offered(reason: dict, found) -> bool:
    """Whether a card shows this override reason (a rule's ``overrideReasons`` entry): every ``only_if`` check
    and no ``unless`` check found evidence for the finding. ``found(name)`` is the (cached) check evaluation."""
    return all(found(n) for n in reason.get("only_if", ())) and not any(found(n) for n in reason.get("unless", ()))


def triggered(rule: Rule, draft: MedicationFact) -> list[Trigger]:
    return [t for t in rule.triggers
            if not draft.concepts.isdisjoint(t.drafted) and (t.route is None or route_matches(draft.route, t.route))]


def evaluate_rule(rule: Rule, draft: MedicationFact, ctx: HookContext, record: RecordIndex, rulebook: Rulebook,
                  *, trace: bool = False) -> Finding | None:
    """The rule's finding for one drafted order, or None when no trigger's drug and evidence match."""
    ev = Evaluation(rule, draft, ctx, record, rulebook, trace)
    for trig in triggered(rule, draft):
        evidence = [e for e in (ev.check(n) for n in trig.when) if e]
        if not evidence:
            continue
        suppressed = next((e for e in (ev.check(n) for n in rule.exceptions) if e), None)
        cautions = [e for e in (ev.check(n) for n in rule.cautions) if e]
        indicator, possible = _indicator(rule, evidence)
        for when, adjusted in rule.adjust:
            if any(ev.check(n) for n in when):
                indicator, possible = adjusted, False
                break
        # A suppressed finding shows no card: its suggestions (and their contraindications) are not evaluated.
        excluded, left_out = unsafe_alternatives(rule, ev.check, rulebook.alternatives, ctx.unread) \
            if suppressed is None else (frozenset(), ())
        return Finding(rule, draft, trig.name, indicator, evidence, cautions, suppressed, ev.trace or [], excluded,
                       left_out, possible=possible, excluded_override_reasons=frozenset(
                           r["code"] for r in rule.override_reasons if not reason_offered(r, ev.check)))
    if trace and ev.trace is not None:
        return Finding(rule, draft, "", rule.indicator, [], [], None, ev.trace)  # not fired; trace only
    return None


def unsafe_alternatives(rule: Rule, found, alternatives: dict,
                        unread: frozenset[str] = frozenset()) -> tuple[frozenset[str], tuple[LeftOut, ...]]:
    """The suggestions the card leaves out, and why for those left out for the patient's safety.

    A suggestion is left out by its own ``only_if``/``unless`` (the rule's logic: no line on the card), or
    because an alternative it orders has a contraindication (its ``contraindications`` in alternatives.yaml)
    that finds evidence: then one :class:`LeftOut` per alternative, whichever card offers it. An alternative
    whose contraindication could not be checked because the data it reads could not be read at all (``unread``
    data keys) is left out too: an unchecked alternative is not offered as if it were safe. ``found(name)`` is
    the (memoised) check evaluation of the finding."""
    excluded: set[str] = set()
    left_out: dict[str, LeftOut] = {}
    for s in rule.suggestions:
        if not s.offered(found):
            excluded.add(s.id)
            continue
        for alt in s.alternatives:
            if alt not in left_out:
                names = contraindications(alternatives[alt])
                hit = next((e for e in (found(n) for n in names) if e), None)
                missing = tuple(sorted({k for n in names for k in rule.checks[n].needs} & unread)) if hit is None \
                    else ()
                if hit is None and not missing:
                    continue
                left_out[alt] = LeftOut(alt, hit, missing)
            excluded.add(s.id)
            break
    return frozenset(excluded), tuple(left_out.values())


def draft_facts(draft_orders: object, normaliser: Normaliser) -> tuple[list[MedicationFact], MedicationIndex]:
    """Medication drafts of a draftOrders Bundle (other order types are skipped) and its Medications."""
    entries = draft_orders.get("entry") if isinstance(draft_orders, dict) else None
    resources = [e.get("resource") for e in entries if isinstance(e, dict) and isinstance(e.get("resource"), dict)] \
        if isinstance(entries, list) else []
    index = MedicationIndex(resources)
    drafts = [normaliser.medication(r, index, source="draft") for r in resources if r.get("resourceType") in DRAFT_TYPES]
    return drafts, index

