"""Small, bounded FHIR R4 REST client: fetches the prefetch keys a CDS client did not send.

Errors carry the prefetch key and a short `reason` that never contains the access token, URLs or patient data,
so they are safe to log and to show in cards. Original exceptions are not chained (their text holds URLs).
"""
from __future__ import annotations

import http.cookiejar
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter

MAX_WORKERS = 8
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


@dataclass(frozen=True)
class SearchResult:
    key: str
    resources: list[dict]
    pages: int


def _new_session() -> requests.Session:
    s = requests.Session()
    adapter = HTTPAdapter(pool_connections=16, pool_maxsize=2 * MAX_WORKERS, max_retries=0)
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    s.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))  # shared: never keep cookies
    return s


DEFAULT_SESSION = _new_session()


def _safe(text: object) -> str:
    """Server-supplied words (resourceType, issue code) pass only if they look like FHIR codes."""
    return text if isinstance(text, str) and re.fullmatch(r"[A-Za-z][A-Za-z\-]{0,39}", text) else "?"


def _origin(url: str) -> tuple[str, str, int | None]:
    u = urlsplit(url)
    return u.scheme.lower(), (u.hostname or "").lower(), u.port or {"http": 80, "https": 443}.get(u.scheme.lower())


class FhirClient:
    def __init__(self, base_url: str, access_token: str | None = None, *, session: requests.Session | None = None,
                 connect_timeout: float = 0.5, read_timeout: float = 1.0, max_pages: int = 10,
                 max_entries: int = 2000):
        if urlsplit(base_url).scheme not in ("http", "https"):
            raise ValueError("fhirServer must be an http(s) URL")
        self.base_url = base_url.rstrip("/")
        self._headers = {"Accept": "application/fhir+json"}
        if access_token:
            self._headers["Authorization"] = f"Bearer {access_token}"
        self.session = session or DEFAULT_SESSION
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.max_pages, self.max_entries = max_pages, max_entries

    def __repr__(self) -> str:  # never show the token
        return f"FhirClient({self.base_url!r})"

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
        deadline = time.monotonic() + budget
        if not queries:
            return {}
        pool = ThreadPoolExecutor(max_workers=min(MAX_WORKERS, len(queries)), thread_name_prefix="fhir-fetch")
        futures = {key: pool.submit(self._fetch_one, key, q, deadline) for key, q in queries.items()}
        done, _ = wait(futures.values(), timeout=max(0.0, deadline - time.monotonic()))
        pool.shutdown(wait=False, cancel_futures=True)  # stragglers stop at their own (deadline-capped) timeouts
        results: dict[str, SearchResult | dict | None | FhirError] = {}
        for key, fut in futures.items():
            if fut not in done:
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
        link = next((ln for ln in bundle.get("link") or [] if isinstance(ln, dict) and ln.get("relation") == "next"), None)
        if not link or not isinstance(link.get("url"), str) or not link["url"]:
            return None
        url = urljoin(self.base_url + "/", link["url"])
        try:
            same = _origin(url) == _origin(self.base_url)
        except ValueError:  # e.g. a non-numeric port
            same = False
        if not same:
            raise FhirBadResponse(key, "next link points to a different server")
        return url

    def _get(self, key: str, url: str, expected: str, deadline: float, *, allow_missing: bool = False):
        left = deadline - time.monotonic()
        if left <= 0:
            raise FhirUnavailable(key, "time budget exhausted")
        timeout = (min(self.connect_timeout, left), min(self.read_timeout, left))
        try:
            with self.session.get(url, headers=self._headers, timeout=timeout, stream=True,
                                  allow_redirects=False) as resp:
                status, body = resp.status_code, self._read_body(key, resp, deadline)
        except requests.Timeout:
            raise FhirUnavailable(key, "timed out") from None
        except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError):
            raise FhirBadResponse(key, "truncated or undecodable body") from None
        except requests.RequestException as e:
            raise FhirUnavailable(key, f"request failed ({type(e).__name__})") from None
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
