"""Small, bounded FHIR R4 REST client: fetches the prefetch keys a CDS client did not send.

Errors carry the prefetch key and a short technical `reason` that never contains the access token, URLs or
patient data, so it is safe to log; callers are shown only `plain_reason(error)` (no status codes or exception
names). Original exceptions are not chained (their text holds URLs). Where the client may connect, and how the
connection is pinned and cut at the deadline: fhir_servers.py and fhir_transport.py.
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


class FhirRefused(FhirUnavailable):
    """Not contacted: the server's address is not allowed (private, link-local, loopback not listed)."""


# What a CDS client is told about a failed read: plain words, no exception names or status codes (those
# would make the "Check not completed" card a port scanner). The technical reason goes to the log.
PLAIN_REASONS = {"unavailable": "the FHIR server could not be reached",
                 "http_error": "the FHIR server answered with an error",
                 "unauthorized": "the FHIR server answered with an error",
                 "bad_response": "the FHIR server gave an answer that could not be used"}


def plain_reason(error: Exception) -> str:
    reason = error.reason if isinstance(error, FhirError) else ""
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
                 ca_bundle: str | None = None):
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

    def search(self, key: str, query: str, *, deadline: float) -> SearchResult:
        if any(seg in (".", "..") for seg in query.split("?")[0].split("/")):
            raise FhirError(key, "invalid query")
        url: str | None = f"{self.base_url}/{query.lstrip('/')}"
        searched = query.split("?")[0].strip("/").rsplit("/", 1)[-1]  # "Condition?..." -> the type searched for
        seen: set[str] = set()
        resources: list[dict] = []
        while url:
            if url in seen:
                raise FhirBadResponse(key, "paging loop: next link already visited")
            if len(seen) >= self.max_pages:
                raise FhirBadResponse(key, f"more than {self.max_pages} pages")
            seen.add(url)
            bundle = self._get(key, url, "Bundle", deadline)
            entries = bundle.get("entry") or []
            if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
                raise FhirBadResponse(key, "malformed Bundle.entry")
            for entry in entries:
                res, search = entry.get("resource"), entry.get("search")
                mode = search.get("mode", "match") if isinstance(search, dict) else "match"
                if mode == "match" and isinstance(res, dict) and res.get("resourceType") != "OperationOutcome":
                    if res.get("resourceType") != searched:  # e.g. Patients for a Condition search: not "no data"
                        raise FhirBadResponse(key, f"expected {_safe(searched)} entries, got {_safe(res.get('resourceType'))}")
                    resources.append(res)
            if len(resources) > self.max_entries:
                raise FhirBadResponse(key, f"more than {self.max_entries} entries")
            url = self._next_url(key, bundle)
        return SearchResult(key, resources, len(seen))

    def fetch_all(self, queries: dict[str, str], *, budget: float) -> dict[str, SearchResult | dict | None | FhirError]:
        """All queries at once on the process's bounded FHIR pool; whatever is not done at the budget is
        answered "time budget exhausted" (its socket is shut down by then: nothing keeps running)."""
        deadline = time.monotonic() + budget
        if not queries:
            return {}
        results: dict[str, SearchResult | dict | None | FhirError] = {}
        try:
            self._pin(next(iter(queries)), deadline)
        except FhirError as exc:
            return {key: type(exc)(key, exc.reason) for key in queries}
        futures = {}
        for key, q in queries.items():
            try:
                futures[key] = fhir_transport.submit(self._fetch_one, key, q, deadline)
            except fhir_transport.PoolFull as exc:
                results[key] = FhirUnavailable(key, str(exc))
        done, _ = wait(futures.values(), timeout=max(0.0, deadline - time.monotonic()))
        for key in queries:
            if key in results:
                continue
            fut = futures[key]
            if fut not in done:
                fut.cancel()  # still waiting for a thread: never runs; running: its socket closes at the deadline
                results[key] = FhirUnavailable(key, "time budget exhausted")
                continue
            try:
                results[key] = fut.result()
            except FhirError as e:
                results[key] = e
            except Exception as e:  # never raise out of fetch_all
                results[key] = FhirError(key, f"unexpected error ({type(e).__name__})")
        return results

    def _fetch_one(self, key: str, query: str, deadline: float):
        if "?" not in query and _READ_PATH.fullmatch(query.strip("/")):
            return self.read(key, query, deadline=deadline)
        return self.search(key, query, deadline=deadline)

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
        if not (target.path + "/").startswith(self.target.path + "/"):
            raise FhirBadResponse(key, "next link is not below the FHIR base URL")
        return url

    def _get(self, key: str, url: str, expected: str, deadline: float, *, allow_missing: bool = False):
        left = deadline - time.monotonic()
        if left <= 0:
            raise FhirUnavailable(key, "time budget exhausted")
        self._pin(key, deadline)
        timeout = (min(self.connect_timeout, left), min(self.read_timeout, left))
        try:
            status, body = self._send(key, url, timeout, deadline)
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
        return doc

    def _send(self, key: str, url: str, timeout: tuple[float, float], deadline: float) -> tuple[int, bytes]:
        try:
            with fhir_transport.deadline_scope(deadline), \
                    self.session.get(url, headers=self._headers, timeout=timeout, stream=True,
                                     allow_redirects=False) as resp:
                return resp.status_code, self._read_body(key, resp, deadline)
        except fhir_transport.RequestRefused as e:
            raise FhirBadResponse(key, str(e)) from None

    @staticmethod
    def _read_body(key: str, resp: requests.Response, deadline: float) -> bytes:
        chunks, size = [], 0
        for chunk in resp.iter_content(64 * 1024):
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise FhirBadResponse(key, "response body too large")
            if time.monotonic() > deadline:
                raise FhirUnavailable(key, "time budget exhausted")
            chunks.append(chunk)
        return b"".join(chunks)
