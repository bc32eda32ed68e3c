"""Gather the patient data the triggered rules need: prefetch as sent, then the FHIR server.

Per CDS Hooks 2.0, for each prefetch key:
  * a resource or Bundle      -> used (Bundle: ``search.mode == match`` entries; a next page is fetched)
  * ``null``                  -> the client has no data: an empty list, not re-queried
  * an OperationOutcome       -> the client failed to prefetch: treated as absent
  * absent                    -> searched on ``fhirServer`` (Bearer token when ``fhirAuthorization`` is given)
Only the keys that the triggered rules need are resolved, so an order no rule cares about costs no
FHIR traffic. What cannot be had is returned in ``unavailable`` with a reason safe to show.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .fhir_client import FhirClient, FhirError, SearchResult, plain_reason
from .fhir_servers import parse_target, trusted_base
from .services import render_query

DATA_LABELS = {
    "conditions": "conditions (problem list and diagnoses)",
    "medicationRequests": "medication orders",
    "medicationAdministrations": "medications given",
    "medicationStatements": "medications taken (medication list)",
    "observations": "blood pressure, eGFR and pregnancy test results",
    "procedures": "procedures",
    "patient": "patient demographics",
}
NO_FHIR_SERVER = "not prefetched, and the request names no fhirServer to read it from"
UNTRUSTED_FHIR_SERVER = "not prefetched, and the FHIR server named in fhirServer is not trusted for this client"
log = logging.getLogger(__name__)


@dataclass
class PatientData:
    resources: dict[str, list[dict]] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)  # key -> reason (no patient data in it)
    fetched: list[str] = field(default_factory=list)  # keys that came from the FHIR server
    errors: dict[str, Exception] = field(default_factory=dict)  # key -> why the FHIR server could not give it


def _from_prefetch(value: dict) -> tuple[list[dict] | None, bool]:
    """(resources, complete). resources None: the value is unusable (an error)."""
    rtype = value.get("resourceType")
    if rtype == "OperationOutcome":
        return None, False
    if rtype == "Bundle":
        out = []
        for entry in value.get("entry") or []:
            if not isinstance(entry, dict) or not isinstance(entry.get("resource"), dict):
                continue
            mode = (entry.get("search") or {}).get("mode") if isinstance(entry.get("search"), dict) else None
            if mode in (None, "match") and entry["resource"].get("resourceType") != "OperationOutcome":
                out.append(entry["resource"])
        has_next = any(isinstance(link, dict) and link.get("relation") == "next" for link in value.get("link") or [])
        return out, not has_next
    if isinstance(rtype, str):
        return [value], True
    return None, False


def _origin_for_log(url: object) -> str:
    """scheme://host:port of a caller-supplied URL (no path: it may hold ids), or a placeholder."""
    try:
        target = parse_target(url)
    except ValueError:
        return "(not an http(s) URL)"
    return f"{target.scheme}://{target.host}:{target.port}"[:200]


def gather(keys: set[str], body: dict, *, templates: dict[str, str], budget: float, connect_timeout: float,
           read_timeout: float, session=None, allowed_servers: tuple[str, ...] = (), private_networks: tuple = (),
           resolver=None, ca_bundle: str | None = None) -> PatientData:
    """``templates``: data key -> query template generated from the loaded rules (Rulebook.prefetch).
    ``allowed_servers``: the calling client's trusted FHIR base URLs (clients.Client.fhir_servers); a
    ``fhirServer`` not among them is never contacted (its keys are UNTRUSTED_FHIR_SERVER)."""
    data = PatientData()
    prefetch = body.get("prefetch") if isinstance(body.get("prefetch"), dict) else {}
    context = body.get("context") or {}
    to_fetch: dict[str, str] = {}
    partial: dict[str, list[dict]] = {}
    for key in sorted(keys):
        if key in prefetch:
            value = prefetch[key]
            if value is None:
                data.resources[key] = []
                continue
            resources, complete = _from_prefetch(value)
            if resources is not None and complete:
                data.resources[key] = resources
                continue
            if resources is not None:
                partial[key] = resources  # a first page: fetch the whole search instead
        query = render_query(templates[key], context)
        if query is None:
            data.unavailable[key] = "the hook context lacks the patient id needed to search for it"
        else:
            to_fetch[key] = query
    if not to_fetch:
        return data

    server = body.get("fhirServer")
    if not isinstance(server, str) or not server:
        for key in to_fetch:
            data.unavailable[key] = NO_FHIR_SERVER
        return data
    base = trusted_base(server, allowed_servers)
    if base is None:
        log.warning("fhirServer %s is not on this client's FHIR server allowlist: not contacted (%d prefetch "
                    "key(s) unavailable)", _origin_for_log(server), len(to_fetch))
        for key in to_fetch:
            data.unavailable[key] = UNTRUSTED_FHIR_SERVER
        return data
    auth = body.get("fhirAuthorization") if isinstance(body.get("fhirAuthorization"), dict) else {}
    client = FhirClient(base, auth.get("access_token"), session=session, connect_timeout=connect_timeout,
                        read_timeout=read_timeout, private_networks=private_networks, resolver=resolver,
                        ca_bundle=ca_bundle)
    results = client.fetch_all(to_fetch, budget=budget)
    for key, result in results.items():
        if isinstance(result, SearchResult):
            data.resources[key] = result.resources
            data.fetched.append(key)
        elif isinstance(result, dict):
            data.resources[key] = [result]
            data.fetched.append(key)
        elif result is None:
            data.resources[key] = []
            data.fetched.append(key)
        else:
            data.errors[key] = result
            # the technical reason is for operators (no URL, token or patient data in it); the client gets words
            log.warning("FHIR read of prefetch key %s failed: %s (%s)", key, type(result).__name__,
                        result.reason if isinstance(result, FhirError) else "unknown error")
            if key in partial:
                data.resources[key] = partial[key]
                data.unavailable[key] = f"only the first page was prefetched and the rest could not be read: " \
                                        f"{plain_reason(result)}"
            else:
                data.unavailable[key] = plain_reason(result)
    return data
