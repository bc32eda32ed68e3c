"""Validation of a hook request and of a feedback body: the JSON Schemas (compiled once) and the limits,
with the first problem answered as a 400 naming the field.

The hook request is checked first by a validator compiled to Python code (fastjsonschema: ~10 us against
jsonschema's ~150-250 us per call); only a request it refuses goes through jsonschema, which words the 400
(and stays the authority: a request jsonschema accepts is accepted). The fast check is built only from
keywords that mean the same in fastjsonschema's draft-07 and the schemas' draft 2020-12 (``FAST_KEYWORDS``);
a schema using any other keyword is checked by jsonschema alone, so a schema edit can never make the fast
check accept what jsonschema would refuse."""
from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

import fastjsonschema
import jsonschema

from .errors import BadRequest
from .limits import Limits
from .request_body import for_schema

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
    request_top = inline({k: v for k, v in request_schema.items() if k != "$defs"})
    return {
        "request": cls(request_schema),
        "order-select": cls(hook_schema("order-select")),
        "order-sign": cls(hook_schema("order-sign")),
        "feedback": cls(feedback_schema),
        "fast": {name: fast_check(schema) for name, schema in (
            ("request", request_top), ("order-select", hook_schema("order-select")),
            ("order-sign", hook_schema("order-sign")))},
    }


# Keywords whose draft-07 meaning (fastjsonschema) is the 2020-12 meaning (jsonschema) for these schemas'
# uses; dependentRequired is draft-07's "dependencies" with a list; const/enum only with string values (a
# Python ``==`` would take True for 1); items only as one schema (2020-12 has no array form).
FAST_KEYWORDS = {"type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems",
                 "minLength", "maxLength", "pattern", "minimum", "maximum", "if", "then", "else", "const", "enum",
                 "dependentRequired", "format", "title", "description", "$schema", "$id"}


def _draft7(node):
    """The schema in draft-07 words, or None if it uses a keyword outside FAST_KEYWORDS (or a $ref left)."""
    if not isinstance(node, dict):
        return None
    out = {}
    for key, value in node.items():
        if key not in FAST_KEYWORDS:
            return None
        if key in ("$schema", "$id", "title", "description", "format"):  # format: an annotation (not asserted)
            continue
        if key == "properties":
            value = {name: _draft7(sub) for name, sub in value.items()}
            if any(sub is None for sub in value.values()):
                return None
        elif key in ("items", "if", "then", "else") or (key == "additionalProperties" and isinstance(value, dict)):
            value = _draft7(value)
            if value is None:
                return None
        elif key == "const" and not isinstance(value, str):
            return None
        elif key == "enum" and not all(isinstance(v, str) for v in value):
            return None
        elif key == "dependentRequired":
            key = "dependencies"
        out[key] = value
    return out


def fast_check(schema: dict):
    """A function instance -> bool compiled once from ``schema`` (2020-12, ``$defs`` inlined), or None when
    the schema uses a keyword the compiled check would not read the same way."""
    draft7 = _draft7(schema)
    if draft7 is None:
        return None
    compiled = fastjsonschema.compile({"$schema": "http://json-schema.org/draft-07/schema#", **draft7},
                                      use_formats=False)

    def is_valid(instance) -> bool:
        try:
            compiled(instance)
        except fastjsonschema.JsonSchemaException:
            return False
        return True

    return is_valid


def checked(validators, name: str, instance, prefix: str = "") -> None:
    """BadRequest naming the first problem of ``instance`` against the schema ``name``. The compiled check
    answers a valid instance; jsonschema words (and decides) the rest."""
    fast = validators.get("fast", {}).get(name)
    if fast is not None and fast(instance):
        return
    first_error(validators[name], instance, prefix=prefix)


def validate_request(body: object, service, validators, limits: Limits = Limits()) -> dict:
    """The body, if it is a valid request for this service within the limits; else BadRequest."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    checked(validators, "request", for_schema(body))  # (a typed prefetch Bundle is checked as the object it was)
    if "\x00" in body["hookInstance"]:  # stored; PostgreSQL text cannot hold NUL
        raise BadRequest("hookInstance must not contain NUL characters", field="hookInstance")
    if body["hook"] != service.hook:
        raise BadRequest(f"service {service.id!r} answers the {service.hook!r} hook, not {body['hook']!r}", field="hook")
    if not isinstance(body.get("context"), dict):
        raise BadRequest("context must be an object", field="context")
    check_draft_count(body["context"], limits)  # before the context schema walks every draft
    checked(validators, service.hook, body["context"], prefix="context")
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
