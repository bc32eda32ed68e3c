"""A hook request's body, decoded: the prefetched record's usual shapes typed, everything else as orjson gives it.

The prefetched record (conditions, medications, observations, procedures) is most of a request's bytes and
of its objects. Each of its Bundles is decoded straight into ``typed_record``'s Structs (the fields the rules
read; the rest is skipped, never built); every other part of the body (hook, context with the draft orders,
the patient, ...) is cut out as raw JSON and parsed by orjson, as the whole body was before. The body returned is the
dictionary the request's JSON gives, except that a prefetch value decoded typed is that Struct.

When the body is not of that shape (a key the request model does not name, a Bundle of another form, a field
of another JSON type, anything the typed decoding refuses), the whole body is parsed by orjson and read as
dictionaries: the same answer, by the lenient readers. A body orjson refuses is a 400 naming orjson's reason,
whichever way it went. One difference, on purpose: a number beyond a double's range (orjson refuses 1e400) in
a part of a prefetched Bundle that the service never reads (a resource's unread field, the Bundle's total, ...)
is skipped, not refused.
"""
from __future__ import annotations

import msgspec
import orjson
from msgspec import UNSET, Raw, Struct, UnsetType

from .errors import BadRequest
from .patient_data import DATA_LABELS
from .typed_record import BUNDLES

# The members of a CDS Hooks 2.0 request.
_MEMBERS = ("hook", "hookInstance", "fhirServer", "fhirAuthorization", "context", "prefetch", "extension")
# The prefetch keys the rules read (patient_data.DATA_LABELS): a typed Bundle (typed_record.BUNDLES) or raw JSON.
_Prefetch = msgspec.defstruct("Prefetch", [
    (key, BUNDLES[key] | None | UnsetType, UNSET) if key in BUNDLES else (key, Raw, UNSET) for key in DATA_LABELS],
    forbid_unknown_fields=True)
_Request = msgspec.defstruct("Request", [
    (name, _Prefetch | None | UnsetType, UNSET) if name == "prefetch" else (name, Raw, UNSET) for name in _MEMBERS],
    forbid_unknown_fields=True)
_DECODER = msgspec.json.Decoder(_Request)
# What the typed decoding may refuse: a malformed body or one of another shape (msgspec), a raw part orjson
# refuses, nesting deeper than the decoder's recursion limit. The body then goes to orjson whole.
_REFUSED = (msgspec.MsgspecError, orjson.JSONDecodeError, RecursionError, UnicodeDecodeError)


def decode(raw: bytes) -> object:
    """The JSON value of a request body; BadRequest when it is not JSON (orjson's reason)."""
    try:
        if not raw.isascii():  # msgspec does not check the UTF-8 of what it skips: checked here first
            raw.decode("utf-8")
        return _body(_DECODER.decode(raw))
    except _REFUSED:
        return decode_plain(raw)


def decode_plain(raw: bytes) -> object:
    """The JSON value of a body, as dictionaries and lists; BadRequest when it is not JSON (orjson's reason)."""
    try:
        # orjson: strict RFC 8259 (no NaN/Infinity, valid UTF-8 only, depth limit 1024), ~2x json.loads
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None


def _body(request: Struct) -> dict:
    body = {}
    for name in _MEMBERS:
        value = getattr(request, name)
        if value is UNSET:
            continue
        if name != "prefetch":
            body[name] = orjson.loads(memoryview(value))
        elif value is None:
            body[name] = None
        else:
            prefetch = body[name] = {}
            for key in DATA_LABELS:
                item = getattr(value, key)
                if item is not UNSET:
                    prefetch[key] = orjson.loads(memoryview(item)) if type(item) is Raw else item
    return body


def for_schema(body: dict) -> dict:
    """The body as the request's JSON Schema sees it: a typed prefetch value (it was a JSON object) as ``{}``."""
    prefetch = body.get("prefetch")
    if not isinstance(prefetch, dict) or not any(isinstance(v, Struct) for v in prefetch.values()):
        return body
    return {**body, "prefetch": {k: {} if isinstance(v, Struct) else v for k, v in prefetch.items()}}
