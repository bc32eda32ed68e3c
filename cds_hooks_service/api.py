"""HTTP endpoints of the CDS Service (CDS Hooks 2.0). Views are thin: parse, call, answer."""
from __future__ import annotations

import json
import logging

import orjson
from flask import Blueprint, Response, jsonify, request

from . import call_log, logs, metrics
from .auth import AuthError, expected_audience
from .clients import OPEN_CLIENT_ID, Client
from .explain import report as explain_report
from .facts import parse_time
from .errors import BadRequest, NotFound, Unauthorized, UnsupportedMediaType
from .hook_call import call_service
from .request_validation import first_error, validate_request
from .runtime import runtime
from .services import SERVICES

log = logging.getLogger(__name__)
bp = Blueprint("cds", __name__)


def read_json() -> object:
    if request.mimetype and not (request.mimetype.endswith("/json") or request.mimetype.endswith("+json")):
        raise UnsupportedMediaType(f"send the body as application/json, not {request.mimetype}")
    raw = request.get_data(cache=False)
    if not raw.strip():
        raise BadRequest("the request body is empty; a JSON object is expected")
    try:
        # orjson: strict RFC 8259 (no NaN/Infinity, valid UTF-8 only, depth limit 1024), ~2x json.loads
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None


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
    client = authenticate()  # noqa: F841 (feedback is to be kept per client)
    service = get_service(service_id)
    rt = runtime()
    body = read_json()
    if not isinstance(body, dict):
        raise BadRequest("the feedback body must be a JSON object with a feedback array")
    first_error(rt.validators["feedback"], body)
    for i, item in enumerate(body["feedback"]):  # the schema checks the form; this, that it is a real instant
        if parse_time(item["outcomeTimestamp"]) is None:
            raise BadRequest(f"feedback.{i}.outcomeTimestamp is not a valid date-time",
                             field=f"feedback.{i}.outcomeTimestamp")
    stored = rt.store.record_feedback(service.id, body["feedback"])
    metrics.feedback_stored(service.id, stored)
    return jsonify({"stored": stored})


@bp.get("/healthz")
def healthz():
    rt = runtime()
    ok = rt.store.ping()
    body = {"status": "ok" if ok else "degraded", "rules": len(rt.rulebook.rules), "store": "ok" if ok else "down"}
    return jsonify(body), (200 if ok else 503)
