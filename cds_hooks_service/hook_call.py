"""One CDS Hooks service call, from a validated request body to the response: decide -> record -> render.

decide  drafts to facts; which rules trigger (none: no patient data is read); gather only the data they
        need; index the record once by concept; evaluate each (rule, draft) within the evaluation deadline
        (CPU time of the request's thread)
record  the cards to issue are recorded (client, rule, one-way key: no patient data); the store answers
        which were overridden at order-select for the same draft. Then every finding gets its one
        outcome: fired, excepted (and why), suppressed (overridden), shadow, merged (a conflict between two
        drafted orders: on the other order's card, sharing its outcome), or not fired
render  cards for the fired findings, most severe first, within the cards and bytes of one response: per
        drafted order a lead card holding the actions (each suggestion once per response), at most two
        critical cards, one card per conflict between two drafted orders; what could not be read; one
        "check not completed" card naming every rule that could not be completed

Nothing here needs Flask or SQLAlchemy: the pharmacists' commands (explain, replay, test) run it as is.
"""
from __future__ import annotations

import hmac
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import orjson

from .cards import (alternative_lines, drop_repeated_lines, info_card, markdown_escape, render_card,
                    unrecommend_cancellation)
from .clients import OPEN_CLIENT, Client
from .engine import Finding, HookContext, draft_facts, evaluate_rule, triggered
from .errors import PreconditionFailed, store_failure
from .facts import MedicationFact, Normaliser
from .index import RecordIndex, RuleConcepts
from .limits import Limits
from .patient_data import (DATA_LABELS, NO_FHIR_SERVER, UNTRUSTED_FHIR_SERVER, PatientData, gather, gaps_note,
                           is_partly_read)
from .rulebook import Rule, Rulebook
from .services import CdsService

log = logging.getLogger(__name__)
SUPPRESSION_WINDOW = timedelta(hours=24)  # an override at order-select holds for the same draft this long
INDICATOR_ORDER = {"critical": 0, "warning": 1, "info": 2}
LATE = "could not be checked within the time allowed for one request (CDS_EVAL_DEADLINE)"

# The one outcome of each finding.
FIRED = "fired"  # a card is shown
EXCEPTED = "excepted"  # an exception of the rule matched (reason: which)
SUPPRESSED = "suppressed"  # overridden at order-select for the same draft order
SHADOW = "shadow"  # the rule is in shadow mode: counted, not shown
NOT_FIRED = "not fired"  # evaluated, no evidence (kept only for the explain trace)
MERGED = "merged"  # the same conflict between two drafted orders is on the other order's card (one card)

MAX_CRITICAL_CARDS = 2  # per response (issue 9 §4); further critical findings are shown as warnings


@dataclass
class Decision:
    """What the rules found for one call, before anything is recorded or shown."""

    ctx: HookContext
    findings: list[Finding]
    data: PatientData
    live: list[tuple[Rule, MedicationFact]]  # the (rule, draft) pairs whose triggers matched
    not_evaluated: list[tuple[Rule, MedicationFact]] = field(default_factory=list)  # past the deadline


@dataclass
class HookResult:
    response: dict
    findings: list[Finding] = field(default_factory=list)  # each with its outcome (and reason)
    data: PatientData | None = None
    not_completed: list[str] = field(default_factory=list)  # ids of rules answered with "Check not completed"

    def with_outcome(self, *outcomes: str) -> list[Finding]:
        return [f for f in self.findings if f.outcome in outcomes]


def suppression_key(secret: bytes, body: dict, finding: Finding, client_id: str = OPEN_CLIENT.id,
                    drafts: dict[str, MedicationFact] | None = None, indicator: str | None = None) -> str:
    """One-way key for (client, FHIR server, patient, draft order, its drug, rule, level): no patient data is
    stored. The client is part of it: one client's override never suppresses another client's card. The level
    (``indicator``, default the finding's) is part of it so that an override holds only for a card no more
    severe than the one overridden: a warning overridden at order-select does not silence the critical card
    the same order gets at order-sign once its route is known (see :func:`covering_keys`).

    A conflict between drafted orders only (every evidence item is another drafted order, e.g. DHE and
    sumatriptan drafted together) is keyed by all its orders, the same from either side (``drafts``: the
    drafted orders by reference): its one card stands for the finding of each order, so an override of it,
    given on either order's card, holds for the conflict.

    The key is HMAC-SHA256 (hex) of "client|fhirServer|patientId|<order>|rule|level" (<order>: "ref|drugs", or
    "conflict:ref#drugs;ref#drugs"). Stored overrides hold these keys: the format must not change."""
    return _level_key(secret, _suppression_message(body, finding, client_id, drafts), indicator or finding.indicator)


def covering_keys(secret: bytes, body: dict, finding: Finding, client_id: str = OPEN_CLIENT.id,
                  drafts: dict[str, MedicationFact] | None = None) -> tuple[str, ...]:
    """The keys whose override suppresses this finding's card: its own level's and every more severe one's (an
    override of a critical card also holds for the warning the same order gets later)."""
    rank = INDICATOR_ORDER[finding.indicator]
    message = _suppression_message(body, finding, client_id, drafts)  # the same for every level
    return tuple(_level_key(secret, message, level)
                 for level, r in sorted(INDICATOR_ORDER.items(), key=lambda kv: kv[1]) if r <= rank)


def _suppression_message(body: dict, finding: Finding, client_id: str,
                         drafts: dict[str, MedicationFact] | None) -> str:
    """What :func:`suppression_key` keys, but the level."""
    context = body.get("context") or {}
    orders = [finding.draft]
    others = conflict_drafts(finding)
    if others and drafts is not None and all(ref in drafts for ref in others):
        orders += [drafts[ref] for ref in sorted(others)]
    named = sorted((d.ref, ",".join(sorted(c[1] for c in d.concepts))) for d in orders)
    what = list(named[0]) if len(named) == 1 else ["conflict:" + ";".join(f"{ref}#{drug}" for ref, drug in named)]
    return "|".join([client_id, str(body.get("fhirServer", "")), str(context.get("patientId", ""))]
                    + what + [finding.rule.id])


def _level_key(secret: bytes, message: str, level: str) -> str:
    return hmac.digest(secret, f"{message}|{level}".encode(), "sha256").hex()


def conflict_drafts(finding: Finding) -> set[str]:
    """The other drafted orders a finding rests on, when it rests on drafted orders only (none listed beyond the
    card's cap); empty otherwise."""
    items = [i for e in finding.evidence for i in e.items]
    if not items or any(e.more for e in finding.evidence) or any(i.get("source") != "draft" for i in items):
        return set()
    return {i.get("ref") for i in items} - {finding.draft.ref, None}


def call_service(service: CdsService, body: dict, *, rulebook: Rulebook, store, settings,
                 now: datetime | None = None, trace: bool = False, session=None,
                 client: Client = OPEN_CLIENT) -> HookResult:
    """``store``: a FeedbackStore, or None to record nothing (the pharmacists' commands)."""
    now = now or settings.fixed_now or datetime.now(timezone.utc)
    limits = settings.limits
    decision = decide(service, body, rulebook=rulebook, settings=settings, limits=limits, now=now, trace=trace,
                      session=session, client=client)
    if decision is None:
        return HookResult({"cards": []})
    issued = record(decision, body, store=store, secret=settings.suppression_secret, service=service, client=client)
    cards, not_completed = render(decision, issued, rulebook=rulebook, limits=limits)
    return HookResult({"cards": cards}, decision.findings, decision.data, not_completed)


# -- decide ---------------------------------------------------------------------------------------------
def decide(service: CdsService, body: dict, *, rulebook: Rulebook, settings, limits: Limits, now: datetime,
           trace: bool = False, session=None, client: Client = OPEN_CLIENT) -> Decision | None:
    """The findings of the rules that trigger on the drafts judged, or None when none triggers."""
    context = body["context"]
    normaliser = Normaliser(rulebook.terminology)
    drafts, medications = draft_facts(context.get("draftOrders"), normaliser)
    if service.hook == "order-select":
        selected = set(context.get("selections") or [])
        targets = [d for d in drafts if d.ref in selected]
    else:
        targets = drafts
    ctx = HookContext(hook=service.hook, now=now, patient_id=context.get("patientId"),
                      encounter_id=context.get("encounterId"), user_id=context.get("userId"),
                      drafts=drafts, targets=targets, max_evidence_items=limits.max_evidence_items)

    rules = rulebook.for_hook(service.hook)
    live = [(rule, draft) for draft in targets for rule in rules if triggered(rule, draft)]
    candidates = [(rule, draft) for draft in targets for rule in rules] if trace else live
    if not candidates:
        return None

    data = _gather(live, body, rulebook, settings, session, client)
    ctx.unread = frozenset(k for k, why in data.unavailable.items() if not is_partly_read(why))  # alternatives
    record_index = RecordIndex(data.resources, normaliser, medications, drafts,
                               None if trace else RuleConcepts.of(rulebook, [rule for rule, _ in live]))
    decision = Decision(ctx, [], data, live)
    # The deadline counts this request's own CPU time (its thread's): other requests sharing the worker's
    # GIL, or other processes of a loaded machine, do not make a check "not completed"; its own work does.
    deadline = time.thread_time() + limits.eval_deadline
    for i, (rule, draft) in enumerate(candidates):
        if time.thread_time() >= deadline:
            decision.not_evaluated = [pair for pair in candidates[i:] if triggered(*pair)]
            break
        finding = evaluate_rule(rule, draft, ctx, record_index, rulebook, trace=trace)
        if finding is not None:
            decision.findings.append(finding)
    return decision


def _gather(live, body: dict, rulebook: Rulebook, settings, session, client: Client) -> PatientData:
    needs = set().union(*(rule.needs for rule, _ in live))  # the data that decides whether a rule fires
    optional = set().union(*(rule.card_needs | rule.alternative_needs for rule, _ in live)) - needs
    data = gather(needs | optional, body, templates=rulebook.prefetch, budget=settings.time_budget,
                  connect_timeout=settings.fhir_connect_timeout, read_timeout=settings.fhir_read_timeout,
                  session=session, allowed_servers=client.fhir_servers,
                  private_networks=getattr(settings, "fhir_private_networks", ()),
                  ca_bundle=getattr(settings, "fhir_ca_bundle", None))
    untrusted = sorted(k for k, why in data.unavailable.items() if why == UNTRUSTED_FHIR_SERVER and k in needs)
    if untrusted:  # as without fhirServer (CDS Hooks 2.0: 412 when the data can be had neither way)
        raise PreconditionFailed("cannot evaluate the safety rules: prefetch lacks " + ", ".join(untrusted)
                                 + " and the FHIR server named in fhirServer is not trusted for this client",
                                 field="fhirServer")
    missing_server = sorted(k for k, why in data.unavailable.items() if why == NO_FHIR_SERVER and k in needs)
    if missing_server:
        raise PreconditionFailed(
            "cannot evaluate the safety rules: prefetch lacks " + ", ".join(missing_server)
            + " and the request names no fhirServer to read them from", field="prefetch")
    return data


# -- record ---------------------------------------------------------------------------------------------
def record(decision: Decision, body: dict, *, store, secret: bytes, service: CdsService,
           client: Client = OPEN_CLIENT) -> dict[int, str]:
    """Record the cards to issue and give every finding its outcome. Returns card ids by id(finding)."""
    mirrors = mirrored_findings(decision.findings)
    to_issue = [f for f in decision.findings if f.evidence and f.suppressed_by is None and id(f) not in mirrors]
    drafts = {d.ref: d for d in decision.ctx.drafts}
    covering = {id(f): covering_keys(secret, body, f, client.id, drafts) for f in to_issue}  # own level's last
    card_ids = {id(f): str(uuid.uuid4()) for f in to_issue}
    overridden: set[str] = set()
    if store is not None and to_issue:
        from .store import IssuedCard  # only with a store (SQLAlchemy): the commands run without one

        ctx = decision.ctx
        issued = [IssuedCard(card_ids[id(f)], f.rule.id, service.id, str(body.get("hookInstance")), f.indicator,
                             f.rule.mode, covering[id(f)][-1], ctx.now, client.id, covering[id(f)])
                  for f in to_issue]
        # order-sign: a card overridden at order-select for the same draft and rule, at the same or a more severe
        # level, is not raised again
        since = ctx.now - SUPPRESSION_WINDOW if service.hook == "order-sign" else None
        overridden = _issue(store, issued, since)
    for f in decision.findings:
        if id(f) in mirrors:
            continue
        f.outcome, f.reason = outcome_of(f, not overridden.isdisjoint(covering.get(id(f), ())))
    for f in decision.findings:  # a merged finding shares the outcome of the card that stands for it
        if id(f) in mirrors:
            lead = mirrors[id(f)]
            f.outcome, f.reason = outcome_of(f, False)
            if f.outcome in (FIRED, SHADOW):
                if lead.outcome == SUPPRESSED:
                    f.outcome, f.reason = SUPPRESSED, f"the card of {lead.rule.id} for {lead.draft.ref}, which " \
                        "stands for this conflict, was overridden at order-select"
                else:
                    f.outcome, f.reason = MERGED, f"merged into the card of {lead.rule.id} for {lead.draft.ref}"
    return card_ids


def mirrored_findings(findings: list[Finding]) -> dict[int, Finding]:
    """Findings that repeat an earlier one from the other side: the same rule for drafted order X, found
    only because of drafted order Y, where Y's finding was found because of X (DHE and sumatriptan drafted
    together). One conflict between two drafted orders is one card: the first order's. Returns, by
    id(finding), the finding whose card stands for it."""
    named: dict[tuple[str, str], set[str]] = {}  # (rule, draft ref) -> the draft refs its evidence names
    first: dict[tuple[str, str], Finding] = {}
    out: dict[int, Finding] = {}
    for f in findings:
        if not f.evidence or f.suppressed_by is not None:
            continue
        items = [i for e in f.evidence for i in e.items]
        refs = {i.get("ref") for i in items}
        only_drafts = all(i.get("source") == "draft" for i in items) and not any(e.more for e in f.evidence)
        if only_drafts and refs and all(f.draft.ref in named.get((f.rule.id, r), ()) for r in refs):
            out[id(f)] = min((first[(f.rule.id, r)] for r in refs), key=findings.index)
            continue
        named[(f.rule.id, f.draft.ref)] = {i.get("ref") for i in items if i.get("source") == "draft"}
        first[(f.rule.id, f.draft.ref)] = f
    return out


def _issue(store, issued: list, since: datetime | None) -> set[str]:
    """Record the issued cards; the suppression keys overridden since ``since``. A store failure never
    loses the cards: they are answered unrecorded (no suppression applied), the failure logged and counted."""
    try:
        return store.issue_cards(issued, skip_overridden_since=since)
    except Exception as exc:  # noqa: BLE001 - whatever the store raised, the warnings go out
        from . import metrics  # the service's (Flask, prometheus): only a running service has a store

        log.error("feedback store failed on the hook path (%s): %d card(s) answered without being recorded; "
                  "override suppression not applied", store_failure(exc), len(issued))
        metrics.store_error("issue_cards")
        return set()


def outcome_of(finding: Finding, overridden: bool) -> tuple[str, str]:
    """The one outcome of a finding, and why it is not shown (empty when it is)."""
    if not finding.evidence:
        return NOT_FIRED, ""
    if finding.suppressed_by is not None:
        return EXCEPTED, f"exception: {finding.suppressed_by.label}"
    if overridden:
        return SUPPRESSED, "overridden for this draft order at order-select"
    if finding.rule.mode != "active":
        return SHADOW, "shadow mode: counted, not shown"
    return FIRED, ""


# -- render ---------------------------------------------------------------------------------------------
def render(decision: Decision, card_ids: dict[int, str], *, rulebook: Rulebook, limits: Limits) -> tuple[list, list]:
    """The response's cards (bounded) and the ids of the rules answered with "check not completed".

    One clear card per problem (issue 9 §4): each rule's finding keeps its own card (own uuid, so feedback,
    overrides and analytics stay per rule), but for each drafted order the most severe card leads: it names
    the order's other problems, and a suggestion (same label, or same actions) is offered on one card only,
    the first. At most MAX_CRITICAL_CARDS critical cards per response; a further critical finding is shown as
    a warning saying so. At most one "Check not completed" card, naming every check in plain words."""
    ctx = decision.ctx
    unavailable = decision.data.unavailable
    fired = [f for f in decision.findings if f.outcome == FIRED]
    lead: dict[str, Finding] = {}
    for f in sorted(fired, key=lambda f: INDICATOR_ORDER[f.indicator]):
        lead.setdefault(f.draft.ref, f)
    fired.sort(key=lambda f: (INDICATOR_ORDER[f.indicator], lead[f.draft.ref] is not f))
    shown = fired[:limits.max_cards]
    cards = []
    offered_labels: set[str] = set()
    offered_actions: set[tuple] = set()
    created: dict[str, str] = {}  # alternatives offered on a card of this response -> that card's rule title
    critical = 0
    lead_summary: dict[str, str] = {}
    merged = [m for m in decision.findings if m.outcome == MERGED]
    shown_lines: set[str] = set()  # "<drug> not offered: ..." lines already shown (one card says each)
    for f in shown:
        lines = alternative_lines(f, rulebook.alternatives, ctx.now)
        card = _finding_card(f, card_ids[id(f)], ctx, rulebook, unavailable, lines)
        drop_repeated_lines(card, lines, shown_lines)
        _add_mirror_suggestions(card, f, merged, ctx, rulebook)
        first = lead[f.draft.ref]
        if first is f:
            others = [g.rule.title for g in shown if g.draft.ref == f.draft.ref and g is not f]
            if others:
                card["detail"] = card.get("detail", "") + "\n\n**Also for this order** (separate card" + \
                    ("s" if len(others) > 1 else "") + "): " + markdown_escape("; ".join(others)) + "."
        if first is f:
            lead_summary[f.draft.ref] = card["summary"]
        if _offer_once(card, offered_labels, offered_actions, f.draft, created, f.rule.title) and first is not f:
            card["detail"] = card.get("detail", "") + "\n\n_The actions for this order are on the card \u201c" + \
                markdown_escape(lead_summary.get(f.draft.ref, first.rule.title)) + "\u201d._"
        if card["indicator"] == "critical":
            critical += 1
            if critical > MAX_CRITICAL_CARDS:
                card["indicator"] = "warning"
                for suggestion in card.get("suggestions", []):
                    unrecommend_cancellation(suggestion)
                card["detail"] = card.get("detail", "") + "\n\n_A critical finding, shown as a warning only " \
                    f"because this response already holds {MAX_CRITICAL_CARDS} critical cards._"
        cards.append(card)
    not_completed = _not_completed(decision, rulebook)
    if not_completed:
        cards.append(_not_completed_card(list(not_completed.values())))
    cards.sort(key=lambda c: INDICATOR_ORDER[c["indicator"]])
    cards = _bounded(cards, [f.rule.title for f in fired[limits.max_cards:]], limits)
    return cards, list(not_completed)


def _add_mirror_suggestions(card: dict, f: Finding, merged: list[Finding], ctx: HookContext,
                            rulebook: Rulebook) -> None:
    """The card of a conflict between two drafted orders offers the actions for either order (keep one)."""
    refs = {i.get("ref") for e in f.evidence for i in e.items if i.get("source") == "draft"}
    for m in merged:
        if m.rule is f.rule and m.draft.ref in refs:
            other = render_card(m, now=ctx.now, patient_id=ctx.patient_id, encounter_id=ctx.encounter_id,
                                user_id=ctx.user_id, alternatives=rulebook.alternatives, card_uuid=card["uuid"])
            extra = other.get("suggestions", [])
            for s in extra:  # at-most-one: only the card's own first choice may be recommended
                s.pop("isRecommended", None)
            if extra:
                card["suggestions"] = card.get("suggestions", []) + extra
                card["selectionBehavior"] = f.rule.selection_behavior


def _offer_once(card: dict, labels: set[str], actions: set[tuple], draft: MedicationFact,
                created: dict[str, str] | None = None, title: str = "") -> bool:
    """Drop the suggestions whose actions an earlier card of the response already offers; a label already
    used for other actions (the same alternative for another drafted order) names its order. An alternative
    that an earlier card already offers to create (``created``: medication -> that card's rule title) is not
    offered again: one order of it is enough whichever card it is accepted on, so this card offers to remove
    its own order instead, naming the card that offers the alternative (a suggestion that only adds it is
    dropped). Returns whether any suggestion was dropped."""
    created = {} if created is None else created
    kept, dropped = [], False
    for s in card.get("suggestions", []):
        makes = {_created_key(a): a for a in s.get("actions", []) if a["type"] == "create"}
        already = [k for k in makes if k in created]
        if already:
            deletes = [a for a in s["actions"] if a["type"] == "delete"]
            if not deletes:
                dropped = True
                continue
            s = {k: v for k, v in s.items() if k not in ("isRecommended", "actions", "label")} | {
                "label": f"Remove {draft.display} (the alternative is offered on the card "
                         f"\u201c{created[already[0]]}\u201d)"[:240],
                "actions": deletes}
        signature = tuple(sorted((a["type"], a.get("resourceId") or _created_key(a)) for a in s.get("actions", [])))
        if signature in actions:
            dropped = True
            continue
        if s["label"] in labels:  # the same alternative for another drafted order: name the order
            base = s["label"]
            s["label"] = f"{base}: {draft.display}"
            if s["label"] in labels:  # two drafted orders of the same name
                s["label"] = f"{base}: {draft.display} ({draft.ref.rsplit('/', 1)[-1]})"
        labels.add(s["label"])
        actions.add(signature)
        kept.append(s)
    for s in kept:
        for a in s.get("actions", []):
            if a["type"] == "create":
                created.setdefault(_created_key(a), title or card["summary"])
    if kept:
        card["suggestions"] = kept
    elif "suggestions" in card:
        del card["suggestions"]
        card.pop("selectionBehavior", None)
    return dropped


def _created_key(action: dict) -> str:
    """What a create action orders (its medication), whatever the card's label for it."""
    return orjson.dumps((action.get("resource") or {}).get("medicationCodeableConcept")).decode()


def _finding_card(f: Finding, card_id: str, ctx: HookContext, rulebook: Rulebook, unavailable: dict,
                  safety_lines: list[str]) -> dict:
    card = render_card(f, now=ctx.now, patient_id=ctx.patient_id, encounter_id=ctx.encounter_id,
                       user_id=ctx.user_id, alternatives=rulebook.alternatives, card_uuid=card_id,
                       safety_lines=safety_lines)
    more = sum(e.more for e in f.evidence + f.cautions)
    if more:
        card["detail"] = card.get("detail", "") + f"\n\n_And {more} more matching record " \
            f"entr{'y' if more == 1 else 'ies'} not listed._"
    # data not read, or only partly read (the data only alternatives read: when partly read; when not read at all,
    # the alternative is not offered and its own line says so)
    # (the data only the card's own additions read, cautions and level steps: which of them could not run)
    unchecked = _unchecked(f.rule, {k for k in f.rule.card_needs
                                    if k in unavailable and not is_partly_read(unavailable[k])})
    note = gaps_note(f.rule.needs | f.rule.card_needs | {k for k in f.rule.alternative_needs if k in unavailable
                                                         and is_partly_read(unavailable[k])}, unavailable, unchecked)
    if note:
        card["detail"] = card.get("detail", "") + "\n\n" + note
    return card


def _unchecked(rule: Rule, unread: set[str]) -> list[str]:
    """The labels of the checks the card's cautions and level adjustments rest on that read ``unread`` data
    themselves (not through other checks): what the card could not check."""
    if not unread:
        return []
    out, seen = [], set()
    todo = list(rule.cautions) + [n for names, _ in rule.adjust for n in names]
    while todo:
        name = todo.pop(0)
        check = rule.checks.get(name)
        if check is None or name in seen:
            continue
        seen.add(name)
        if check.children:
            todo += list(check.children)
        elif check.needs & unread:
            out.append(check.label)
    return list(dict.fromkeys(out))


def _not_completed(decision: Decision, rulebook: Rulebook) -> dict[str, tuple[Rule, list[str]]]:
    """Rules that must not pass for "nothing found": data they need could not be read and they did not
    fire, or the evaluation deadline came before they were evaluated for some drafted order."""
    ctx, unavailable = decision.ctx, decision.data.unavailable
    if not unavailable and not decision.not_evaluated:  # every rule's data was read, every pair evaluated
        return {}
    answered = {f.rule.id for f in decision.findings if f.evidence}
    out: dict[str, tuple[Rule, list[str]]] = {}
    live_rules = {rule.id for rule, _ in decision.live}
    for rule in rulebook.for_hook(ctx.hook):
        gaps = sorted(k for k in rule.needs if k in unavailable)
        if gaps and rule.id not in answered and rule.mode == "active" and rule.id in live_rules:
            out[rule.id] = (rule, [f"{DATA_LABELS[k]}: {unavailable[k]}" for k in gaps])
    late: dict[str, int] = {}
    for rule, _ in decision.not_evaluated:
        if rule.mode == "active":
            late[rule.id] = late.get(rule.id, 0) + 1
    for rule_id, n in late.items():
        rule = next(r for r, _ in decision.not_evaluated if r.id == rule_id)
        reasons = out.get(rule_id, (rule, []))[1]
        out[rule_id] = (rule, reasons + [f"{n} of the drafted orders {LATE}"])
    return out


def _not_completed_card(items: list[tuple[Rule, list[str]]]) -> dict:
    """One card for every check that could not be completed: which checks, which data could not be read and
    why, in plain words (the technical reason is in the log and /metrics)."""
    titles = list(dict.fromkeys(rule.title for rule, _ in items))
    reasons = list(dict.fromkeys(r for _, rs in items for r in rs))
    unread = [r for r in reasons if not r.endswith(LATE)]
    late = [r for r in reasons if r.endswith(LATE)]
    summary = f"Check not completed: {titles[0]}" if len(titles) == 1 else \
        f"Check not completed: {len(titles)} safety checks could not be run in full"
    detail = ("The service could not complete " + ("this safety check" if len(titles) == 1 else
                                                     f"these {len(titles)} safety checks")
              + " for the drafted orders:\n\n" + "\n".join(f"- {markdown_escape(t)}" for t in titles))
    if unread:
        detail += "\n\nSome patient data could not be read: " + "; ".join(markdown_escape(r) for r in unread) + "."
    if late:
        detail += "\n\nSome orders could not be checked in time: " + "; ".join(markdown_escape(r) for r in late) + "."
    return info_card(summary, detail + "\n\nCheck the record by hand before signing.")


def _bounded(cards: list[dict], not_rendered: list[str], limits: Limits) -> list[dict]:
    """At most ``max_cards`` cards and ``max_response_bytes`` of them; what is left out is named in one card."""
    budget = limits.max_response_bytes - 8 * 1024  # room for the card naming what was left out
    shown, left_out, size = [], [], 0
    for card in cards:
        n = len(orjson.dumps(card))
        if len(shown) < limits.max_cards and size + n <= budget:
            shown.append(card)
            size += n
        else:
            left_out.append(card)
    if not left_out and not not_rendered:
        return shown
    names: dict[str, int] = {}
    for title in [c["summary"] if c["indicator"] == "info" else c["source"]["topic"]["display"] for c in left_out] \
            + not_rendered:
        names[title] = names.get(title, 0) + 1
    total = len(left_out) + len(not_rendered)
    detail = (f"This response holds at most {limits.max_cards} cards and {limits.max_response_bytes // 1024} KiB; "
              f"{total} more card{'s' if total != 1 else ''} for these orders {'are' if total != 1 else 'is'} not "
              "shown" + (": " + markdown_escape("; ".join(f"{t} ({n})" for t, n in names.items())) if names else "")
              + ". Review the orders one by one (or in smaller groups) to see every warning.")
    shown.append(info_card(f"{total} more card{'s' if total != 1 else ''} not shown (limit per response)", detail,
                           topic="cards-not-shown"))
    return shown
