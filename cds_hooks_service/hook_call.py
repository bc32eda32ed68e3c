"""One CDS Hooks service call, from a validated request body to the response.

validate -> draft orders to facts -> which rules trigger -> gather only the data they need ->
evaluate -> drop cards overridden earlier for the same draft -> render -> record issued cards.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from .cards import info_card, markdown_escape, render_card
from .clients import OPEN_CLIENT, Client
from .engine import Finding, HookContext, draft_facts, evaluate_rule, triggered
from .errors import BadRequest, PreconditionFailed
from .facts import Normaliser
from .index import RecordIndex, RuleConcepts
from .patient_data import DATA_LABELS, NO_FHIR_SERVER, PatientData, gather
from .rulebook import Rulebook
from .services import CdsService
from .store import FeedbackStore, IssuedCard

log = logging.getLogger(__name__)
SUPPRESSION_WINDOW = timedelta(hours=24)  # an override at order-select holds for the same draft this long


@dataclass
class HookResult:
    response: dict
    findings: list[Finding] = field(default_factory=list)
    data: PatientData | None = None
    suppressed: list[tuple[Finding, str]] = field(default_factory=list)  # (finding, why not shown)
    not_completed: list[str] = field(default_factory=list)  # ids of rules answered with "Check not completed"


def validate_request(body: object, service: CdsService, validators) -> dict:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    first_error(validators["request"], body)
    if body["hook"] != service.hook:
        raise BadRequest(f"service {service.id!r} answers the {service.hook!r} hook, not {body['hook']!r}", field="hook")
    if not isinstance(body.get("context"), dict):
        raise BadRequest("context must be an object", field="context")
    first_error(validators[service.hook], body["context"], prefix="context")
    return body


def first_error(validator, instance, prefix: str = "") -> None:
    error = next(iter(sorted(validator.iter_errors(instance), key=lambda e: len(e.absolute_path))), None)
    if error is None:
        return
    path = ".".join([prefix] * bool(prefix) + [str(p) for p in error.absolute_path])
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        field_name = ".".join(filter(None, [path, missing]))
        raise BadRequest(f"missing required field {field_name}", field=field_name)
    if error.validator == "dependentRequired":
        raise BadRequest("fhirAuthorization requires fhirServer", field="fhirServer")
    message = error.message if len(error.message) < 200 else error.message[:200] + "…"
    if error.validator in ("pattern", "type", "const", "enum", "minItems", "minLength", "maxLength"):
        shown = {"pattern": "is not in the expected format", "type": f"must be of type {error.validator_value}",
                 "const": f"must be {error.validator_value!r}", "enum": f"must be one of {error.validator_value}",
                 "minItems": "must not be empty", "minLength": "must not be empty",
                 "maxLength": "is too long"}[error.validator]
        message = f"{path or 'body'} {shown}"
    raise BadRequest(message, field=path or None)


def suppression_key(secret: bytes, body: dict, finding: Finding) -> str:
    """One-way key for (FHIR server, patient, draft order, its drug, rule): no patient data is stored."""
    context = body.get("context") or {}
    drug = ",".join(sorted(c[1] for c in finding.draft.concepts))
    message = "|".join([str(body.get("fhirServer", "")), str(context.get("patientId", "")), finding.draft.ref, drug,
                        finding.rule.id])
    return hmac.new(secret, message.encode(), hashlib.sha256).hexdigest()


def call_service(service: CdsService, body: dict, *, rulebook: Rulebook, store: FeedbackStore | None, settings,
                 now: datetime | None = None, trace: bool = False, session=None,
                 client: Client = OPEN_CLIENT) -> HookResult:
    now = now or settings.fixed_now or datetime.now(timezone.utc)
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
                      drafts=drafts, targets=targets)

    rules = rulebook.for_hook(service.hook)
    live = [(rule, draft) for draft in targets for rule in rules if triggered(rule, draft)]
    candidates = [(rule, draft) for draft in targets for rule in rules] if trace else live
    if not candidates:
        return HookResult({"cards": []})

    needs = set().union(*(rule.needs for rule, _ in live))
    data = gather(needs, body, budget=settings.time_budget, connect_timeout=settings.fhir_connect_timeout,
                  read_timeout=settings.fhir_read_timeout, session=session)
    missing_server = sorted(k for k, why in data.unavailable.items() if why == NO_FHIR_SERVER)
    if missing_server:
        raise PreconditionFailed(
            "cannot evaluate the safety rules: prefetch lacks " + ", ".join(missing_server)
            + " and the request names no fhirServer to read them from", field="prefetch")

    record = RecordIndex(data.resources, normaliser, medications, drafts, None if trace else RuleConcepts.of(rulebook))
    result = HookResult({"cards": []}, data=data)
    for rule, draft in candidates:
        finding = evaluate_rule(rule, draft, ctx, record, rulebook, trace=trace)
        if finding is not None:
            result.findings.append(finding)
    _respond(result, body, ctx, rulebook, store, settings, service)
    return result


def _respond(result: HookResult, body: dict, ctx: HookContext, rulebook: Rulebook, store, settings, service) -> None:
    fired = [f for f in result.findings if f.evidence and f.fired]
    for f in result.findings:
        if f.evidence and not f.fired:
            result.suppressed.append((f, f"exception: {f.suppressed_by.label}"))
    keys = {id(f): suppression_key(settings.suppression_secret, body, f) for f in fired}
    card_ids = {id(f): str(uuid.uuid4()) for f in fired}
    issued = [IssuedCard(card_ids[id(f)], f.rule.id, service.id, str(body.get("hookInstance")), f.indicator,
                         f.rule.mode, keys[id(f)], ctx.now) for f in fired]
    if store is not None and issued:
        # order-sign: a card overridden at order-select for the same draft and rule is not raised again
        since = ctx.now - SUPPRESSION_WINDOW if service.hook == "order-sign" else None
        overridden = store.issue_cards(issued, skip_overridden_since=since)
        for f in [f for f in fired if keys[id(f)] in overridden]:
            result.suppressed.append((f, "overridden for this draft order at order-select"))
        fired = [f for f in fired if keys[id(f)] not in overridden]

    cards = []
    unavailable = result.data.unavailable if result.data else {}
    for f in fired:
        if f.rule.mode != "active":
            continue  # shadow: evaluated and counted, not shown
        card = render_card(f, now=ctx.now, patient_id=ctx.patient_id, encounter_id=ctx.encounter_id,
                           user_id=ctx.user_id, alternatives=rulebook.alternatives, card_uuid=card_ids[id(f)])
        gaps = sorted(k for k in f.rule.needs if k in unavailable)
        if gaps:
            card["detail"] = card.get("detail", "") + "\n\n_Not checked, could not be read: " + \
                markdown_escape(", ".join(DATA_LABELS[k] for k in gaps)) + "._"
        cards.append(card)

    # A rule that could not see all it needs and did not fire must not pass for "nothing found".
    fired_rules = {f.rule.id for f in fired} | {f.rule.id for f, _ in result.suppressed}
    not_completed = {}
    for rule in rulebook.for_hook(ctx.hook):
        gaps = sorted(k for k in rule.needs if k in unavailable)
        if gaps and rule.id not in fired_rules and rule.mode == "active" and \
                any(triggered(rule, d) for d in ctx.targets):
            not_completed[rule.id] = (rule, gaps)
    result.not_completed = list(not_completed)
    for rule, gaps in not_completed.values():
        reasons = "; ".join(f"{DATA_LABELS[k]}: {unavailable[k]}" for k in gaps)
        cards.append(info_card(f"Check not completed: {rule.title}",
                               f"The service could not complete **{markdown_escape(rule.title)}** for this order "
                               f"because some patient data could not be read. {markdown_escape(reasons)}. "
                               "Check the record by hand before signing."))
    cards.sort(key=lambda c: {"critical": 0, "warning": 1, "info": 2}[c["indicator"]])
    result.response = {"cards": cards}
