"""Small, bounded FHIR R4 REST client: fetches the prefetch keys a CDS client did not send.

Errors carry the prefetch key and a short technical `reason` that never contains the access token, URLs or
patient data, so it is safe to log; callers are shown only `plain_reason(error)` (no status codes or exception
names). Original exceptions are not chained (their text holds URLs). Where the client may connect, and how the
connection is pinned and cut at the deadline: fhir_servers.py and fhir_transport.py.

Paging: a search follows its ``next`` links (only below this server's base URL) until the last page, or until a
cap (pages, entries, bytes of all its pages) or the deadline; what was read before a cap, the deadline or a
later page's failure is returned as a ``SearchResult`` with ``incomplete`` set (a long record read in part).
``Continuation`` continues a search whose first page the CDS client prefetched, from that page's next link.
"""
from __future__ import annotations

import http.cookiejar
import json
import re
import threading
import time
from concurrent.futures import wait
from dataclasses import dataclass
from urllib.parse import urljoin

import requests
from requests.utils import requote_uri

from . import fhir_transport
from .fhir_servers import FhirServerRefused, Resolver, Target, parse_target

MAX_BODY_BYTES = 32 * 1024 * 1024
_READ_PATH = re.compile(r"[A-Z][A-Za-z]+/(?!\.\.?$)[A-Za-z0-9\-.]{1,64}")  # Type/id; id not "." or ".."


class FhirError(Exception):
    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key, self.reason = key, reason

    def __repr__(self) -> str:
        return f"{type(self).__name__}(key={self.key!r}, reason={self.reason!r})"


class FhirUnavailable(FhirError):
    """Connect error, timeout, time budget exhausted, HTTP 5xx/429."""


class FhirUnauthorized(FhirError):
    """HTTP 401/403."""


class FhirBadResponse(FhirError):
    """Unusable answer: not JSON, truncated, wrong resourceType, OperationOutcome, paging loop/limits."""


class _SearchBytesExhausted(FhirBadResponse):
    """A later page would take one search's pages past its byte cap: the search ends with the pages before."""


class FhirRefused(FhirUnavailable):
    """Not contacted: the server's address is not allowed (private, link-local, loopback not listed)."""


# What a CDS client is told about a failed read: plain words, no exception names or status codes (those
# would make the "Check not completed" card a port scanner). The technical reason goes to the log.
PLAIN_REASONS = {"unavailable": "the FHIR server could not be reached",
                 "http_error": "the FHIR server answered with an error",
                 "unauthorized": "the FHIR server answered with an error",
                 "bad_response": "the FHIR server gave an answer that could not be used",
                 "next_link": "the next page link points outside the FHIR server named in fhirServer"}


def plain_reason(error: Exception) -> str:
    reason = error.reason if isinstance(error, FhirError) else ""
    if reason.startswith("next link"):  # refused: not followed, nothing sent there
        return PLAIN_REASONS["next_link"]
    if reason.startswith(("HTTP ", "server returned OperationOutcome")) or isinstance(error, FhirUnauthorized):
        return PLAIN_REASONS["http_error"]  # it answered, with an error status or an OperationOutcome
    for cls, kind in ((FhirUnavailable, "unavailable"), (FhirBadResponse, "bad_response")):
        if isinstance(error, cls):
            return PLAIN_REASONS[kind]
    return "the FHIR server could not be read"


@dataclass(frozen=True)
class SearchResult:
    key: str
    resources: list[dict]
    pages: int
    # Why the search stopped before its last page (a technical reason, for the log), None when read whole. A long
    # record is cut at the page, entry or byte cap, or at the time budget; what was read before is kept (a
    # newest-first search keeps the newest) and the caller says the list was only partly read.
    incomplete: str | None = None
    sorted_newest_first: bool = False


@dataclass(frozen=True)
class Continuation:
    """The rest of a search whose first page the CDS client prefetched (CDS Hooks 2.0: "a CDS Client MAY
    paginate prefetch results"): its ``next`` link is followed on this server, checked exactly as this client's
    own next links are (same scheme, host and port, below the base path; never another host)."""
    resource_type: str  # the type the prefetch template searched for
    next_url: str  # the prefetched Bundle's next link, as sent
    resources: tuple = ()  # the prefetched first page
    sorted_newest_first: bool = False


class _Progress:
    """Pages read so far by one search; fetch_all keeps them when the time budget ends the search midway."""

    def __init__(self, resources=(), pages: int = 0):
        self._lock = threading.Lock()
        self.resources, self.pages = list(resources), pages
        self.given = pages  # pages the caller already had (a prefetched first page), not read here

    def read_here(self) -> bool:
        with self._lock:
            return self.pages > self.given

    def add(self, page: list[dict]) -> None:
        with self._lock:
            self.resources.extend(page)
            self.pages += 1

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return len(self.resources), self.pages

    def snapshot(self) -> tuple[list[dict], int]:
        with self._lock:
            return list(self.resources), self.pages


def _new_session() -> requests.Session:
    """A session that takes nothing from the environment: no proxy variables, no netrc, no CA bundle
    variables (``trust_env`` off), and never keeps cookies."""
    s = requests.Session()
    s.trust_env = False
    s.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    return s


def _safe(text: object) -> str:
    """Server-supplied words (resourceType, issue code) pass only if they look like FHIR codes."""
    return text if isinstance(text, str) and re.fullmatch(r"[A-Za-z][A-Za-z\-]{0,39}", text) else "?"


class FhirClient:
    """Reads from one FHIR server. The caller has checked ``base_url`` against the client's allowlist; this
    class resolves its host once (inside the time budget), checks the address (``private_networks``: see
    fhir_servers.py) and sends every request to that address only."""

    def __init__(self, base_url: str, access_token: str | None = None, *, session: requests.Session | None = None,
                 connect_timeout: float = 0.5, read_timeout: float = 1.0, max_pages: int = 10,
                 max_entries: int = 2000, private_networks: tuple = (), resolver: Resolver | None = None,
                 ca_bundle: str | None = None, max_bytes: int = MAX_BODY_BYTES):
        self.target: Target = parse_target(base_url)  # ValueError: not an http(s) URL
        self.base_url = self.target.base_url
        self._headers = {"Accept": "application/fhir+json"}
        if access_token:
            self._headers["Authorization"] = f"Bearer {access_token}"
        self.session = session or _new_session()
        self.session.trust_env = False  # also for a session passed in: no netrc, no proxies from the environment
        if ca_bundle:
            self.session.verify = ca_bundle  # CDS_FHIR_CA_BUNDLE: e.g. the hospital's internal CA
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.max_pages, self.max_entries = max_pages, max_entries
        self.max_bytes = max_bytes  # one search's pages together (a single page is also held to MAX_BODY_BYTES)
        self._networks, self._resolver = tuple(private_networks), resolver
        self._pin_lock = threading.Lock()
        self._pinned: str | None = None
        self._pin_error: FhirError | None = None

    def __repr__(self) -> str:  # never show the token
        return f"FhirClient({self.base_url!r})"

    def _pin(self, key: str, deadline: float) -> None:
        """Resolve and check the server's address once; every request goes to that address."""
        with self._pin_lock:
            if self._pinned is None and self._pin_error is None:
                try:
                    ip = fhir_transport.resolve(self.target, self._networks, self._resolver, deadline)
                except FhirServerRefused as exc:
                    self._pin_error = (FhirRefused if exc.resolved else FhirUnavailable)(key, exc.reason)
                except TimeoutError as exc:
                    self._pin_error = FhirUnavailable(key, str(exc))
                else:
                    adapter = fhir_transport.PinnedAdapter(self.target, ip)
                    self.session.mount("http://", adapter)
                    self.session.mount("https://", adapter)
                    self._pinned = ip
            if self._pin_error is not None:
                raise type(self._pin_error)(key, self._pin_error.reason)

    def read(self, key: str, path: str, *, deadline: float) -> dict | None:
        path = path.strip("/")
        if not _READ_PATH.fullmatch(path):
            raise FhirError(key, "invalid read path")
        return self._get(key, f"{self.base_url}/{path}", path.split("/")[0], deadline, allow_missing=True)

    def search(self, key: str, query: str, *, deadline: float, progress: _Progress | None = None) -> SearchResult:
        if any(seg in (".", "..") for seg in query.split("?")[0].split("/")):
            raise FhirError(key, "invalid query")
        searched = query.split("?")[0].strip("/").rsplit("/", 1)[-1]  # "Condition?..." -> the type searched for
        newest_first = bool(re.search(r"(?:^|[?&])_sort=-", query))
        return self._pages(key, f"{self.base_url}/{query.lstrip('/')}", searched, deadline,
                           progress or _Progress(), newest_first)

    def follow(self, key: str, rest: Continuation, *, deadline: float, progress: _Progress | None = None) -> SearchResult:
        """The pages after a prefetched first page. The next link is checked like any other (``_next_url``):
        a link to another server or outside the base path raises, and nothing is sent there."""
        if not isinstance(rest.resource_type, str) or not re.fullmatch(r"[A-Z][A-Za-z]{1,63}", rest.resource_type):
            raise FhirError(key, "invalid query")
        progress = progress or _Progress(rest.resources, 1)
        url = self._next_url(key, {"link": [{"relation": "next", "url": rest.next_url}]})
        if url is None:
            raise FhirBadResponse(key, "prefetched next link is empty")
        return self._pages(key, url, rest.resource_type, deadline, progress, rest.sorted_newest_first)

    def _pages(self, key: str, url: str | None, searched: str, deadline: float, progress: _Progress,
               newest_first: bool) -> SearchResult:
        """Read pages from ``url`` on. Caps (pages, entries, bytes) end the search with what was read so far
        (``incomplete`` says which); a paging loop, a bad page or a next link off this server is an error."""
        seen: set[str] = set()
        size = 0
        while url:
            read, pages = progress.counts()
            if url in seen:
                raise FhirBadResponse(key, "paging loop: next link already visited")
            if pages >= self.max_pages:
                return SearchResult(key, *progress.snapshot(), f"more than {self.max_pages} pages", newest_first)
            if pages and size >= self.max_bytes:
                return SearchResult(key, *progress.snapshot(), f"more than {self.max_bytes} bytes", newest_first)
            seen.add(url)
            try:
                bundle, nbytes = self._get(key, url, "Bundle", deadline, max_bytes=self.max_bytes - size,
                                           with_size=True)
            except _SearchBytesExhausted:
                return SearchResult(key, *progress.snapshot(), f"more than {self.max_bytes} bytes", newest_first)
            size += nbytes
            entries = bundle.get("entry") or []
            if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
                raise FhirBadResponse(key, "malformed Bundle.entry")
            page = []
            for entry in entries:
                res, search = entry.get("resource"), entry.get("search")
                mode = search.get("mode", "match") if isinstance(search, dict) else "match"
                if mode == "match" and isinstance(res, dict) and res.get("resourceType") != "OperationOutcome":
                    if res.get("resourceType") != searched:  # e.g. Patients for a Condition search: not "no data"
                        raise FhirBadResponse(key, f"expected {_safe(searched)} entries, got {_safe(res.get('resourceType'))}")
                    page.append(res)
            room = self.max_entries - read
            if len(page) > room:
                progress.add(page[:max(0, room)])
                return SearchResult(key, *progress.snapshot(), f"more than {self.max_entries} entries", newest_first)
            progress.add(page)
            url = self._next_url(key, bundle)
        resources, pages = progress.snapshot()
        return SearchResult(key, resources, pages, None, newest_first)

    def fetch_all(self, queries: dict[str, str | Continuation], *,
                  budget: float) -> dict[str, SearchResult | dict | None | FhirError]:
        """All queries (a query string, or the rest of a prefetched search) at once on the process's bounded
        FHIR pool; whatever is not done at the budget is answered "time budget exhausted" (its socket is shut
        down by then: nothing keeps running), keeping the pages a search had read whole by then."""
        deadline = time.monotonic() + budget
        if not queries:
            return {}
        results: dict[str, SearchResult | dict | None | FhirError] = {}
        try:
            self._pin(next(iter(queries)), deadline)
        except FhirError as exc:
            return {key: type(exc)(key, exc.reason) for key in queries}
        futures, progress = {}, {}
        for key, q in queries.items():
            progress[key] = _Progress(q.resources, 1) if isinstance(q, Continuation) else _Progress()
            try:
                futures[key] = fhir_transport.submit(self._fetch_one, key, q, deadline, progress[key])
            except fhir_transport.PoolFull as exc:
                results[key] = FhirUnavailable(key, str(exc))
        done, _ = wait(futures.values(), timeout=max(0.0, deadline - time.monotonic()))
        for key in queries:
            if key in results:
                continue
            fut = futures[key]
            if fut not in done:
                fut.cancel()  # still waiting for a thread: never runs; running: its socket closes at the deadline
                results[key] = self._cut_short(key, queries[key], progress[key])
                continue
            try:
                results[key] = fut.result()
            except FhirError as e:
                # The budget, a timeout or an unavailable server ended a paged search after some pages: those pages
                # still count (the answer says the rest was not read). An unusable or refused page stays an error.
                cut = type(e) is FhirUnavailable and progress[key].read_here()
                results[key] = self._cut_short(key, queries[key], progress[key], e.reason) if cut else e
            except Exception as e:  # never raise out of fetch_all
                results[key] = FhirError(key, f"unexpected error ({type(e).__name__})")
        return results

    @staticmethod
    def _cut_short(key: str, query, progress: _Progress, reason: str = "time budget exhausted") -> SearchResult | FhirError:
        if not progress.read_here():
            return FhirUnavailable(key, reason)
        resources, pages = progress.snapshot()
        newest_first = query.sorted_newest_first if isinstance(query, Continuation) else \
            bool(re.search(r"(?:^|[?&])_sort=-", query))
        return SearchResult(key, resources, pages, reason, newest_first)

    def _fetch_one(self, key: str, query, deadline: float, progress: _Progress | None = None):
        if isinstance(query, Continuation):
            return self.follow(key, query, deadline=deadline, progress=progress)
        if "?" not in query and _READ_PATH.fullmatch(query.strip("/")):
            return self.read(key, query, deadline=deadline)
        return self.search(key, query, deadline=deadline, progress=progress)

    def _next_url(self, key: str, bundle: dict) -> str | None:
        """The next page, only below this server's base URL: parsed with urllib3 (the parser that connects),
        same scheme, host and port, no user info, and a path under the base path."""
        link = next((ln for ln in bundle.get("link") or [] if isinstance(ln, dict) and ln.get("relation") == "next"), None)
        if not link or not isinstance(link.get("url"), str) or not link["url"]:
            return None
        url = requote_uri(urljoin(self.base_url + "/", link["url"]))  # as requests will send it (%2e -> ".")
        try:
            target = parse_target(url)
        except ValueError:
            target = None
        if target is None or (target.scheme, target.host, target.port) != \
                (self.target.scheme, self.target.host, self.target.port):
            raise FhirBadResponse(key, "next link points to a different server")
        if not (target.path + "/").startswith(self.target.path + "/") or \
                re.search(r"%2e|%2f|%5c", target.path, re.IGNORECASE):  # encoded dots/slashes: a server may decode
            raise FhirBadResponse(key, "next link is not below the FHIR base URL")  # them into ../ (and leave the base)
        return url

    def _get(self, key: str, url: str, expected: str, deadline: float, *, allow_missing: bool = False,
             max_bytes: int = MAX_BODY_BYTES, with_size: bool = False):
        left = deadline - time.monotonic()
        if left <= 0:
            raise FhirUnavailable(key, "time budget exhausted")
        self._pin(key, deadline)
        timeout = (min(self.connect_timeout, left), min(self.read_timeout, left))
        try:
            status, body = self._send(key, url, timeout, deadline, min(max_bytes, MAX_BODY_BYTES))
        except requests.RequestException as e:
            if time.monotonic() >= deadline:  # the watchdog shut the socket down at the deadline
                raise FhirUnavailable(key, "time budget exhausted") from None
            if isinstance(e, requests.Timeout):
                raise FhirUnavailable(key, "timed out") from None
            if isinstance(e, (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError)):
                raise FhirBadResponse(key, "truncated or undecodable body") from None
            raise FhirUnavailable(key, f"request failed ({type(e).__name__})") from None
        if time.monotonic() >= deadline:  # a body cut at the deadline may look complete: never use it
            raise FhirUnavailable(key, "time budget exhausted")
        if status in (401, 403):
            raise FhirUnauthorized(key, f"HTTP {status}")
        if allow_missing and status in (404, 410):
            return None
        if status >= 500 or status == 429:
            raise FhirUnavailable(key, f"HTTP {status}")
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):
            doc = None
        rtype = doc.get("resourceType") if isinstance(doc, dict) else None
        if rtype == "OperationOutcome" and expected != "OperationOutcome":
            issues = [i for i in doc.get("issue") or [] if isinstance(i, dict)]
            worst = next((i for i in issues if i.get("severity") in ("fatal", "error")), issues[0] if issues else {})
            raise FhirBadResponse(key, f"server returned OperationOutcome: {_safe(worst.get('code'))}")
        if status != 200:
            raise FhirBadResponse(key, f"HTTP {status}")
        if rtype is None:
            raise FhirBadResponse(key, "body is not a FHIR JSON resource")
        if rtype != expected:
            raise FhirBadResponse(key, f"expected {expected}, got {_safe(rtype)}")
        return (doc, len(body)) if with_size else doc

    def _send(self, key: str, url: str, timeout: tuple[float, float], deadline: float,
              max_bytes: int = MAX_BODY_BYTES) -> tuple[int, bytes]:
        try:
            with fhir_transport.deadline_scope(deadline), \
                    self.session.get(url, headers=self._headers, timeout=timeout, stream=True,
                                     allow_redirects=False) as resp:
                return resp.status_code, self._read_body(key, resp, deadline, max_bytes)
        except fhir_transport.RequestRefused as e:
            raise FhirBadResponse(key, str(e)) from None

    @staticmethod
    def _read_body(key: str, resp: requests.Response, deadline: float, max_bytes: int = MAX_BODY_BYTES) -> bytes:
        chunks, size = [], 0
        for chunk in resp.iter_content(64 * 1024):
            size += len(chunk)
            if size > max_bytes:
                if max_bytes < MAX_BODY_BYTES:  # the search's pages together reached its byte cap
                    raise _SearchBytesExhausted(key, "search byte cap reached")
                raise FhirBadResponse(key, "response body too large")
            if time.monotonic() > deadline:
                raise FhirUnavailable(key, "time budget exhausted")
            chunks.append(chunk)
        return b"".join(chunks)
