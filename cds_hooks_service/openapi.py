"""GET /openapi.json: the OpenAPI 3.1 document of the service's HTTP API.

The hand-written part is ``openapi.yaml`` (paths, responses, card and discovery schemas, security).
The request schemas are not repeated there: they are the JSON Schemas the service validates requests
with (``schemas/*.json``), injected here into ``components.schemas``, and the service ids come from
``services.SERVICES``. The document is built once per process and served as the same bytes after that.
"""
from __future__ import annotations

import json
from functools import cache, lru_cache
from pathlib import Path

import yaml
from flask import Blueprint, Response, request

from .request_validation import SCHEMA_DIR
from .services import SERVICES

bp = Blueprint("openapi", __name__)
DOCUMENT = Path(__file__).with_name("openapi.yaml")
_REF = "#/components/schemas/"


def _rewrite_refs(node, prefix: str):
    """``#/$defs/x`` of a stand-alone schema -> ``#/components/schemas/<prefix>x`` of the document."""
    if isinstance(node, dict):
        return {k: (_REF + prefix + v.removeprefix("#/$defs/")
                    if k == "$ref" and isinstance(v, str) and v.startswith("#/$defs/") else _rewrite_refs(v, prefix))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_rewrite_refs(v, prefix) for v in node]
    return node


def _add_schema(components: dict, name: str, schema: dict) -> None:
    """Add a JSON Schema file as component ``name``; its ``$defs`` become components ``name.<def>``."""
    schema = {k: v for k, v in schema.items() if k not in ("$schema", "$id")}
    defs = schema.pop("$defs", {})
    for key, value in [(name, schema)] + [(f"{name}.{d}", s) for d, s in defs.items()]:
        if key in components:
            raise ValueError(f"openapi.yaml already defines components.schemas.{key}")
        components[key] = _rewrite_refs(value, f"{name}.")


@cache
def document() -> dict:
    doc = yaml.safe_load(DOCUMENT.read_text(encoding="utf-8"))
    components = doc["components"]["schemas"]
    _add_schema(components, "CdsRequest", json.loads((SCHEMA_DIR / "cds-request.json").read_text()))
    _add_schema(components, "Feedback", json.loads((SCHEMA_DIR / "feedback.json").read_text()))
    components["ServiceId"] = {
        "type": "string", "enum": list(SERVICES),
        "description": "; ".join(f"`{s.id}`: the {s.hook} hook" for s in SERVICES.values()),
    }
    hooks = list(dict.fromkeys(s.hook for s in SERVICES.values()))
    components["HookRequest"] = {
        "description": "A CDS Hooks 2.0 request; `context` as the hook defines it (CDS Hooks Library).",
        "allOf": [{"$ref": _REF + "CdsRequest"}],
        "oneOf": [{"type": "object", "required": ["hook", "context"],
                   "properties": {"hook": {"const": hook}, "context": {"$ref": f"{_REF}CdsRequest.{hook}"}}}
                  for hook in hooks],
    }
    return doc


@lru_cache(maxsize=8)  # one per mount prefix (SCRIPT_NAME); normally just ""
def _serialised(script_root: str) -> bytes:
    doc = document()
    if script_root:  # mounted under a prefix: the paths are relative to it
        doc = {**doc, "servers": [{"url": script_root}]}
    return json.dumps(doc, ensure_ascii=False).encode()


@bp.get("/openapi.json")
def openapi_json():
    return Response(_serialised(request.script_root), mimetype="application/json")
