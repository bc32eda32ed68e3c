"""Gather the patient data the triggered rules need: prefetch as sent, then the FHIR server.

Per CDS Hooks 2.0, for each prefetch key:
  * a resource or Bundle      -> used (Bundle: ``search.mode == match`` entries; a ``next`` link is followed)
  * ``null``                  -> the client has no data: an empty list, not re-queried
  * an OperationOutcome       -> the client failed to prefetch: treated as absent
  * absent                    -> searched on ``fhirServer`` (Bearer token when ``fhirAuthorization`` is given)
Only the keys that the triggered rules need are resolved, so an order no rule cares about costs no
FHIR traffic. What cannot be had is returned in ``unavailable`` with a reason safe to show.

Long records. A prefetched searchset with a ``next`` link (CDS Hooks 2.0: "a CDS Client MAY paginate
prefetch results") is continued from that link on ``fhirServer``, not re-run from the start: the first page
is kept and not read twice, and the client's own paging (its sort, its snapshot of the search) is followed
to the end. The link is checked as every next link is (fhir_client._next_url: same scheme, host and port
as the trusted ``fhirServer``, below its base path); a link elsewhere is refused, nothing is sent there, and
the answer says only the first page could be read. Every search, whether continued or run here, stops at
MAX_PAGES pages, MAX_ENTRIES resources, MAX_SEARCH_BYTES bytes or the hook call's time budget; what was
read before is used (the queries ask for newest first where the type allows it, services.DATA_QUERIES, so
that is the newest part of the record), and the key is listed in ``unavailable`` as "only partly read", so
a rule that does not fire says "Check not completed" and a card that fires says what it could not check.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .cards import markdown_escape
from .fhir_client import Continuation, FhirClient, FhirError, FhirUnavailable, SearchResult, plain_reason
from .fhir_servers import parse_target, trusted_base
from .services import render_query
from .typed_record import Bundle

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
FIRST_PAGE_ONLY = "only the first page was prefetched and the rest could not be read"
PARTLY_READ = "only partly read"
# Per search (each data key): a record longer than this is read in part and said so (tests/test_long_records.py
# reads 5,000 conditions, 5 pages of 1000; twice that is allowed, and 50 pages leave room for a server that pages
# at 200). The byte cap bounds one search's pages together (one page is also capped at
# fhir_client.MAX_BODY_BYTES); 10,000 resources of 1-3 KB are 10-30 MB. Memory per hook call is bounded by
# (data keys, at most 6) x these caps, and by the process's bounded FHIR pool (fhir_transport) across calls.
MAX_PAGES = 50
MAX_ENTRIES = 10_000
MAX_SEARCH_BYTES = 32 * 1024 * 1024
log = logging.getLogger(__name__)


@dataclass
class PatientData:
    resources: dict[str, list[dict]] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)  # key -> reason (no patient data in it)
    fetched: list[str] = field(default_factory=list)  # keys that came from the FHIR server
    errors: dict[str, Exception] = field(default_factory=dict)  # key -> why the FHIR server could not give it


def is_partly_read(reason: str) -> bool:
    """An ``unavailable`` reason for data of which a part was read and is used (a long record cut short)."""
    return reason.startswith((PARTLY_READ, FIRST_PAGE_ONLY))


def gaps_note(keys, unavailable: dict[str, str], unchecked: list[str] | tuple[str, ...] = ()) -> str | None:
    """The line a card that fired adds for the data its rule needs that was not read whole, or None.
    ``unchecked``: the labels of the checks of the card that could not run for the unread data."""
    unread = sorted(k for k in keys if k in unavailable and not is_partly_read(unavailable[k]))
    partly = sorted(k for k in keys if k in unavailable and is_partly_read(unavailable[k]))
    parts = [f"{lead}: " + markdown_escape(", ".join(DATA_LABELS[k] for k in group))
             for lead, group in (("Not checked, could not be read", unread),
                                 ("Only partly read, the record is longer", partly)) if group]
    if unread and unchecked:
        parts[0] += " (so not checked: " + markdown_escape("; ".join(unchecked)) + ")"
    return "_" + "; ".join(parts) + "._" if parts else None


def _from_prefetch(value: dict | Bundle) -> tuple[list | None, str | None]:
    """(resources, the Bundle's next link or None). resources None: the value is unusable (an error).
    A Bundle decoded typed (request_body) gives its typed resources, read the same way."""
    if isinstance(value, Bundle):
        return value.resources_and_next()
    rtype = value.get("resourceType")
    if rtype == "OperationOutcome":
        return None, False
    if rtype == "Bundle":
        out: list[dict] = []
        entries = value.get("entry")
        for entry in entries if isinstance(entries, list) else ():  # once per resource of the record: kept tight
            # The usual entry ({"resource": {...}}, with no search or search.mode "match") is read without type
            # tests or calls; any other shape raises here and is read by the lenient _read_entry.
            try:
                resource = entry["resource"]
                if resource["resourceType"] != "OperationOutcome":
                    if "search" in entry and entry["search"]["mode"] != "match":
                        raise LookupError
                    out.append(resource)
            except (TypeError, LookupError):
                _read_entry(entry, out)
        links = value.get("link") if isinstance(value.get("link"), list) else []
        nxt = next((ln.get("url") for ln in links if isinstance(ln, dict) and ln.get("relation") == "next"), None)
        return out, (nxt if isinstance(nxt, str) else "") if nxt is not None else None
    if isinstance(rtype, str):
        return [value], None
    return None, None


def _read_entry(entry: object, out: list[dict]) -> None:
    """A Bundle entry of any shape: its resource is used when it is an object that is no OperationOutcome and
    the entry's search is absent, null, not an object, or of mode null or "match"."""
    if isinstance(entry, dict):
        resource = entry.get("resource")
        if isinstance(resource, dict) and resource.get("resourceType") != "OperationOutcome":
            search = entry.get("search")
            if search is None or not isinstance(search, dict) or search.get("mode") in (None, "match"):
                out.append(resource)


def partly_read(result: SearchResult, prefetched_first_page: bool = False) -> str:
    """Plain words for a search that stopped before its end (no exception names, status codes or URLs)."""
    n = len(result.resources)
    which = "none" if not n else f"the newest {n:,}" if result.sorted_newest_first else f"{n:,}"
    if result.incomplete == "time budget exhausted":
        why = "the rest did not arrive in the time allowed"
    elif (result.incomplete or "").startswith("more than "):  # a page, entry or byte cap
        why = "the rest is beyond what the service reads in one call"
    else:  # a later page failed (timed out, server unavailable)
        why = "the rest could not be read: " + plain_reason(FhirUnavailable(result.key, result.incomplete or ""))
    first = "the first page was prefetched; " if prefetched_first_page else ""
    return f"{PARTLY_READ} ({first}{which} read, {why})"


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
    to_fetch: dict[str, str | Continuation] = {}
    partial: dict[str, list[dict]] = {}
    for key in sorted(keys):
        if key in prefetch:
            value = prefetch[key]
            if value is None:
                data.resources[key] = []
                continue
            resources, next_link = _from_prefetch(value) if isinstance(value, (dict, Bundle)) else (None, None)
            if resources is not None and next_link is None:
                data.resources[key] = resources
                continue
            if resources is not None:  # a first page: the rest is read from its next link (below)
                partial[key] = resources
                rtype = templates[key].split("?")[0].strip("/")
                to_fetch[key] = Continuation(rtype, next_link, tuple(resources),
                                             sorted_newest_first="_sort=-" in templates[key])
                continue
        query = render_query(templates[key], context)
        if query is None:
            data.unavailable[key] = "the hook context lacks the patient id needed to search for it"
        else:
            to_fetch[key] = query
    if not to_fetch:
        return data

    def first_page_only(key: str, why: str) -> None:  # a prefetched first page is used, and said to be only that
        data.resources[key] = partial[key]
        data.unavailable[key] = f"{FIRST_PAGE_ONLY}: {why}"

    server = body.get("fhirServer")
    if not isinstance(server, str) or not server:
        for key in to_fetch:
            if key in partial:  # not a 412: the first page is evaluated, the answer says the rest was not read
                first_page_only(key, "the request names no fhirServer")
            else:
                data.unavailable[key] = NO_FHIR_SERVER
        return data
    base = trusted_base(server, allowed_servers)
    if base is None:
        log.warning("fhirServer %s is not on this client's FHIR server allowlist: not contacted (%d prefetch "
                    "key(s) unavailable)", _origin_for_log(server), len(to_fetch))
        for key in to_fetch:
            if key in partial:
                first_page_only(key, "the FHIR server named in fhirServer is not trusted for this client")
            else:
                data.unavailable[key] = UNTRUSTED_FHIR_SERVER
        return data
    auth = body.get("fhirAuthorization") if isinstance(body.get("fhirAuthorization"), dict) else {}
    client = FhirClient(base, auth.get("access_token"), session=session, connect_timeout=connect_timeout,
                        read_timeout=read_timeout, private_networks=private_networks, resolver=resolver,
                        ca_bundle=ca_bundle, max_pages=MAX_PAGES, max_entries=MAX_ENTRIES,
                        max_bytes=MAX_SEARCH_BYTES)
    results = client.fetch_all(to_fetch, budget=budget)
    for key, result in results.items():
        if isinstance(result, SearchResult):
            data.resources[key] = result.resources
            data.fetched.append(key)
            if result.incomplete:
                # technical reason and sizes for operators (no patient data); the client gets words
                log.warning("FHIR read of prefetch key %s stopped before the end: %s (%d resources, %d pages)",
                            key, result.incomplete, len(result.resources), result.pages)
                data.unavailable[key] = partly_read(result, key in partial)
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
                first_page_only(key, plain_reason(result))
            else:
                data.unavailable[key] = plain_reason(result)
    return data
