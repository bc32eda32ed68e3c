"""Validation of a hook request and of a feedback body: the JSON Schemas (compiled once) and the limits,
with the first problem answered as a 400 naming the field."""
from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema

from .errors import BadRequest
from .limits import Limits

SCHEMA_DIR = Path(__file__).parent / "schemas"


def load_validators() -> dict:
    request_schema = json.loads((SCHEMA_DIR / "cds-request.json").read_text())
    feedback_schema = json.loads((SCHEMA_DIR / "feedback.json").read_text())
    cls = jsonschema.Draft202012Validator
    defs = request_schema["$defs"]

    def inline(node):  # "#/$defs/x" replaced by x: jsonschema resolves a $ref on every use (~40% of the time)
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            return inline(defs[ref.removeprefix("#/$defs/")]) if ref.startswith("#/$defs/") else \
                {k: inline(v) for k, v in node.items()}
        return [inline(v) for v in node] if isinstance(node, list) else node

    hook_schema = lambda hook: inline(defs[hook])  # noqa: E731
    return {
        "request": cls(request_schema),
        "order-select": cls(hook_schema("order-select")),
        "order-sign": cls(hook_schema("order-sign")),
        "feedback": cls(feedback_schema),
    }


def validate_request(body: object, service, validators, limits: Limits = Limits()) -> dict:
    """The body, if it is a valid request for this service within the limits; else BadRequest."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    first_error(validators["request"], body)
    if "\x00" in body["hookInstance"]:  # stored; PostgreSQL text cannot hold NUL
        raise BadRequest("hookInstance must not contain NUL characters", field="hookInstance")
    if body["hook"] != service.hook:
        raise BadRequest(f"service {service.id!r} answers the {service.hook!r} hook, not {body['hook']!r}", field="hook")
    if not isinstance(body.get("context"), dict):
        raise BadRequest("context must be an object", field="context")
    check_draft_count(body["context"], limits)  # before the context schema walks every draft
    first_error(validators[service.hook], body["context"], prefix="context")
    check_fhir_server_url(body.get("fhirServer"))
    return body


def check_fhir_server_url(value: object) -> None:
    """fhirServer, when given, is an http(s) URL with a host that urllib can parse (``http://[::1`` made
    urlsplit raise ValueError deep in the FHIR client: a 500). Which servers are trusted is fhir_client's."""
    if value is None:
        return
    try:
        parts = urlsplit(value) if isinstance(value, str) else None
        valid = parts is not None and parts.scheme in ("http", "https") and bool(parts.hostname) and \
            (parts.port or 0) >= 0
    except ValueError:  # invalid IPv6 literal, port out of range or not a number
        valid = False
    if not valid:
        raise BadRequest("fhirServer is not a valid http(s) URL", field="fhirServer")


def check_draft_count(context: dict, limits: Limits) -> None:
    drafts = context.get("draftOrders")
    entries = drafts.get("entry") if isinstance(drafts, dict) else None
    if isinstance(entries, list) and len(entries) > limits.max_drafts:
        raise BadRequest(f"context.draftOrders holds {len(entries)} orders; this service checks at most "
                         f"{limits.max_drafts} per request (CDS_MAX_DRAFTS)", field="context.draftOrders")


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
