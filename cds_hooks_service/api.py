"""HTTP endpoints of the CDS Service (CDS Hooks 2.0). Views are thin: parse, call, answer."""
from __future__ import annotations

import json
import logging

import orjson
from flask import Blueprint, Response, jsonify, request

from . import call_log, logs, metrics, request_body
from .auth import AuthError, expected_audience
from .cards import OVERRIDE_REASON_SYSTEM, suggestion_uuid
from .clients import OPEN_CLIENT_ID, Client
from .explain import report as explain_report
from .facts import parse_time
from .errors import BadRequest, NotFound, Unauthorized, UnsupportedMediaType
from .hook_call import call_service
from .request_validation import first_error, validate_request
from .runtime import runtime
from .services import SERVICES
from .store import UnknownCards

log = logging.getLogger(__name__)
bp = Blueprint("cds", __name__)


def read_json(decode=request_body.decode) -> object:
    """The request's JSON body (a hook request's: ``request_body.decode``, its record's usual shapes typed)."""
    if request.mimetype and not (request.mimetype.endswith("/json") or request.mimetype.endswith("+json")):
        raise UnsupportedMediaType(f"send the body as application/json, not {request.mimetype}")
    raw = request.get_data(cache=False)
    if not raw.strip():
        raise BadRequest("the request body is empty; a JSON object is expected")
    return decode(raw)


def authenticate() -> Client:
    """The calling client: its JWT issuer (verified), or the open-mode client."""
    rt = runtime()
    if rt.verifier is None:
        return Client(OPEN_CLIENT_ID, rt.settings.fhir_servers)
    audience = expected_audience(rt.settings.public_url, request.path)  # never from Host / X-Forwarded-*
    try:
        claims = rt.verifier.verify(request.headers.get("Authorization"), audience)
    except AuthError as exc:
        log.info("JWT rejected: %s", exc.reason)  # the reason is for operators; the client gets none
        raise Unauthorized("Unauthorized") from None
    return Client(claims["iss"], rt.verifier.fhir_servers(claims["iss"]))


def get_service(service_id: str):
    service = SERVICES.get(service_id)
    if service is None:
        raise NotFound(f"no CDS Service {service_id!r}; see GET /cds-services", field="id")
    logs.set_service(service.id)
    return service


@bp.get("/cds-services")
def discovery():
    authenticate()
    prefetch = runtime().rulebook.prefetch  # generated from the loaded rules
    return jsonify({"services": [s.discovery(prefetch) for s in SERVICES.values()]})


@bp.post("/cds-services/<service_id>")
def hook(service_id: str):
    client = authenticate()
    service = get_service(service_id)
    rt = runtime()
    body = validate_request(read_json(), service, rt.validators, rt.settings.limits)
    logs.set_hook_instance(body["hookInstance"])  # on every log line from here on
    trace = rt.settings.debug_trace
    result = call_service(service, body, rulebook=rt.rulebook, store=rt.store, settings=rt.settings, trace=trace,
                          client=client)
    metrics.hook_result(result)  # counts cards, checks not completed, FHIR queries
    call_log.hook_result(result)  # the line per hook call is logged after the response
    if trace:  # CDS_DEBUG_TRACE: the explain report (codes and resource ids; no names, no patient id)
        log.info("explain %s", json.dumps(explain_report(result, rt.rulebook, service.hook), default=str))
    return Response(orjson.dumps(result.response), mimetype="application/json")  # bounded (limits.py), ~3x jsonify


@bp.post("/cds-services/<service_id>/feedback")
def feedback(service_id: str):
    """Feedback on cards this service issued to the calling client. A request is stored whole or not at all:
    one item naming an unknown card, another client's card or a reason its rule does not offer refuses the
    request (400, one issue per bad item) and nothing of it is stored; items already stored are kept once."""
    client = authenticate()
    service = get_service(service_id)
    rt = runtime()
    body = read_json(request_body.decode_plain)
    if not isinstance(body, dict):
        raise BadRequest("the feedback body must be a JSON object with a feedback array")
    first_error(rt.validators["feedback"], body)
    for i, item in enumerate(body["feedback"]):  # the schema checks the form; this, that it is a real instant
        if parse_time(item["outcomeTimestamp"]) is None:
            raise BadRequest(f"feedback.{i}.outcomeTimestamp is not a valid date-time",
                             field=f"feedback.{i}.outcomeTimestamp")
    issued = rt.store.issued_to(client.id, service.id, [item["card"] for item in body["feedback"]
                                                        if "\x00" not in item["card"]])  # NUL: refused below
    items, problems = checked_feedback(body["feedback"], issued, rt.rulebook)
    if problems:
        return refused(problems)
    try:  # the store unreachable: 503, nothing stored (create_app's handler of SQLAlchemyError)
        stored = rt.store.record_feedback(service.id, items, client.id)
    except UnknownCards as exc:  # issued_to saw them a moment ago: cannot happen unless cards are deleted
        return refused([(f"feedback.{i}.card", "not-found", "unknown card") for i, item in enumerate(items)
                        if item["card"] in exc.card_uuids])
    metrics.feedback_stored(service.id, stored)
    return jsonify({"stored": stored})


MAX_ISSUES_SHOWN = 20


def checked_feedback(items: list[dict], issued: dict[str, str], rulebook) -> tuple[list[dict], list[tuple]]:
    """The items as stored (override display and suggestion ids from the rule), and their problems as
    (field, issue code, message). ``issued``: card uuid -> rule id of the cards issued to this client."""
    out, problems = [], []
    for i, item in enumerate(items):
        where = f"feedback.{i}"
        card = item["card"]
        if "\x00" in card:
            problems.append((f"{where}.card", "invalid", "must not contain NUL characters"))
            continue
        rule_id = issued.get(card)
        rule = rulebook.get(rule_id) if rule_id else None
        if rule_id is None:
            problems.append((f"{where}.card", "not-found",
                             f"no card {card!r} was issued by this CDS Service to this client"))
            continue
        item = dict(item)
        coding = (item.get("overrideReason") or {}).get("reason")
        if coding is not None:
            offered = {r["code"]: r["display"] for r in (rule.override_reasons if rule else [])}
            if coding.get("system") != OVERRIDE_REASON_SYSTEM or coding.get("code") not in offered:
                codes = ", ".join(sorted(offered)) or "none (the rule offers no override reasons)"
                problems.append((f"{where}.overrideReason.reason", "code-invalid",
                                 f"not an override reason of card {card!r}; its reasons are system "
                                 f"{OVERRIDE_REASON_SYSTEM} with code {codes}"))
                continue
            item["overrideReason"] = {**item["overrideReason"],
                                      "reason": {"system": OVERRIDE_REASON_SYSTEM, "code": coding["code"],
                                                 "display": offered[coding["code"]]}}
        if item.get("acceptedSuggestions"):
            offered = {suggestion_uuid(card, s.id) for s in (rule.suggestions if rule else [])}
            wrong = [s["id"] for s in item["acceptedSuggestions"] if s["id"] not in offered]
            if wrong:
                problems.append((f"{where}.acceptedSuggestions", "code-invalid",
                                 f"{len(wrong)} id(s) are not suggestions of card {card!r}"))
                continue
        out.append(item)
    return out, problems


def refused(problems: list[tuple]):
    """400 naming every bad item (the first MAX_ISSUES_SHOWN); nothing of the request was stored."""
    issues = [{"severity": "error", "code": code, "details": {"text": f"{field}: {message}"}, "expression": [field]}
              for field, code, message in problems[:MAX_ISSUES_SHOWN]]
    more = len(problems) - MAX_ISSUES_SHOWN
    issues.append({"severity": "information", "code": "informational", "details": {"text": (
        f"nothing in this request was stored: {len(problems)} item(s) refused"
        + (f" ({more} more not listed)" if more > 0 else "")
        + "; send the other items again without them")}})
    return jsonify({"resourceType": "OperationOutcome", "issue": issues}), 400


@bp.get("/livez")
def livez():
    """Liveness: the process answers. Checks nothing else (a database blip must not restart the service)."""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
@bp.get("/healthz")
def readyz():
    """Readiness: rules loaded and the store reachable; 503 otherwise (take the instance out of rotation)."""
    rt = runtime()
    rules = len(rt.rulebook.rules) if rt.rulebook is not None else 0
    store_ok = rt.store.ping()
    ok = store_ok and rules > 0
    body = {"status": "ok" if ok else "degraded", "rules": rules, "store": "ok" if store_ok else "down"}
    return jsonify(body), (200 if ok else 503)
