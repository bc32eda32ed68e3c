"""Verification of the JWT a CDS Client sends with every call (CDS Hooks 2.0, "Trusting CDS Clients").

Configuration (read by the app, not here): env ``CDS_JWT_ISSUERS`` names a JSON file

    [{"iss": "https://sandbox.cds-hooks.org", "jwks": {"keys": [...]}},
     {"iss": "https://ehr.example.org", "jwks_url": "https://ehr.example.org/.well-known/jwks.json"}]

Each trusted client (``iss``) gives either a static JWK Set (``jwks``) or the one URL its keys are
fetched from (``jwks_url``); together the two lists are the spec's "allowlist of iss and jku". An entry
may also list ``"fhirServers": [base URLs]``: the only FHIR servers calls from that issuer may have the
service read (fhir_servers.py); without it the issuer's requests must prefetch everything.

Token rules beyond the signature: header ``typ`` must be ``JWT`` (any case; CDS Hooks 2.0 requires it),
``aud`` must be the configured public URL (``CDS_PUBLIC_URL``) + path (never derived from the request's
Host or X-Forwarded-* headers), ``exp`` at most ``max_lifetime`` seconds after ``iat``, ``jti`` used once.

JWKS fetches (``jwks_url``): keys are cached 5 minutes; an unknown ``kid`` refetches at most once per
cooldown (30 s); a failed fetch is remembered for ``failure_ttl`` (30 s) and answered from that memory;
at most 5 fetches per issuer per minute; a fetch ends at its timeout however slowly the answer trickles in. A fetch runs outside any lock that other issuers' calls wait on;
calls of the same issuer whose kid is cached (even past its lifespan) are answered from the cache; only calls
with an unknown kid wait for the fetch in flight (at most the fetch timeout) instead of fetching too.

``jku`` handling: a token may carry a ``jku`` header (the URL of the client's JWK Set).
* Issuer configured with ``jwks_url``: ``jku``, when present, must equal that URL exactly; keys are only
  ever fetched from the configured URL, never from a URL taken from a token.
* Issuer configured with static ``jwks``: ``jku`` is allowed but ignored. The CDS Hooks Sandbox always
  sends its hosted ``https://sandbox.cds-hooks.org/.well-known/jwks.json`` (also when built and run
  locally), while tests and offline development pin the Sandbox's public JWKS in the config file.

Failures raise :class:`AuthError`; its ``reason`` is for server logs only (answer the client 401 with
no detail) and never contains the token. Nothing here logs.
"""
from __future__ import annotations

import json
import math
import os
import threading
import time
from collections import deque
from datetime import datetime, timezone
from typing import Any, Callable
from urllib.parse import urlsplit

import jwt
import requests
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from . import fhir_transport
from .fhir_servers import parse_entry_servers, parse_target

ALLOWED_ALGORITHMS = frozenset(
    {"ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
)
REQUIRED_CLAIMS = ("iss", "aud", "exp", "iat", "jti")
_ENTRY_KEYS = {"iss", "jwks", "jwks_url", "fhirServers"}
DEFAULT_MAX_LIFETIME = 300.0  # seconds from iat to exp (CDS_JWT_MAX_LIFETIME)
MAX_JWKS_BYTES = 256 * 1024


class AuthError(Exception):
    """The request is not authenticated. ``reason`` is for logs only; never send it to the client."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def expected_audience(public_base_url: str, path: str) -> str:
    """The URL the client must have put in ``aud``: the configured public base URL (env ``CDS_PUBLIC_URL``,
    e.g. ``https://cds.example.org``) + path. Never the request's own root URL: the Host and X-Forwarded-*
    headers are the caller's to choose, so a token minted for another service would pass.

    One trailing slash is stripped from the base, and ``path`` gets a leading slash, so
    ``("https://cds.example.org/", "/cds-services/x")`` gives ``https://cds.example.org/cds-services/x``.
    """
    if not public_base_url:
        raise ValueError("no public URL configured (CDS_PUBLIC_URL)")
    base = public_base_url[:-1] if public_base_url.endswith("/") else public_base_url
    if not path.startswith("/"):
        path = "/" + path
    return base + path


def check_public_url(url: str | None) -> str:
    """JWT mode needs ``CDS_PUBLIC_URL`` (the ``aud`` every token must carry). Raises a one-line ValueError."""
    if not url:
        raise ValueError("CDS_JWT_ISSUERS is set but CDS_PUBLIC_URL is not: set it to the service's public base "
                         "URL (e.g. https://cds.example.org); JWTs must name it in aud")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(f"CDS_PUBLIC_URL must be an absolute http(s) URL without query, got {url!r}")
    return url


class _JwksSource:
    """The keys of one ``jwks_url`` issuer: cached, fetched outside the lock, failures remembered, rate-limited.

    The lock guards only the bookkeeping (microseconds); the HTTP fetch runs without it. Each issuer has its
    own source, so an issuer whose endpoint hangs or fails delays nobody else.
    """

    def __init__(self, url: str, *, timeout: float, cooldown: float, lifespan: float = 300.0,
                 failure_ttl: float = 30.0, max_fetches: int = 5, window: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self.uri, self.timeout, self.cooldown, self.lifespan = url, timeout, cooldown, lifespan
        self.failure_ttl, self.max_fetches, self.window, self._clock = failure_ttl, max_fetches, window, clock
        self._lock = threading.Lock()
        self._keys: dict[str, jwt.PyJWK] | None = None
        self._fetched_at = -math.inf  # last successful fetch
        self._attempted_at = -math.inf  # last fetch, successful or not
        self._failed_until = -math.inf
        self._failure = ""
        self._inflight: threading.Event | None = None
        self._fetches: deque[float] = deque()
        self.fetch_count = 0
        self._session = requests.Session()
        self._session.trust_env = False  # no proxy variables, no netrc
        watched = fhir_transport.WatchedAdapter()  # the socket is shut down at the fetch's deadline
        self._session.mount("http://", watched)
        self._session.mount("https://", watched)

    def get(self, kid: str, iss: str) -> jwt.PyJWK:
        waited = False
        while True:
            with self._lock:
                now = self._clock()
                keys, fresh = self._keys, now - self._fetched_at < self.lifespan
                if keys is not None and kid in keys and fresh:
                    return keys[kid]
                if self._inflight is not None:
                    if keys is not None and kid in keys:
                        return keys[kid]  # stale but known: never wait for another caller's refetch
                    if waited:
                        raise AuthError(f"JWKS of issuer {_show(iss)} still being fetched")
                    event, mine = self._inflight, False
                elif now < self._failed_until:  # a failed fetch is remembered: no new fetch
                    if keys is not None and kid in keys:
                        return keys[kid]  # stale but known key while the endpoint is down
                    raise AuthError(f"cannot fetch JWKS of issuer {_show(iss)} (failed {self._failure}; "
                                    "retried after the failure cache expires)")
                elif waited or (keys is not None and now - self._attempted_at < self.cooldown):
                    if keys is not None and kid in keys:
                        return keys[kid]  # stale: refreshed at most once per cooldown
                    raise AuthError(f"unknown kid {_show(kid)} for issuer {_show(iss)}")
                else:
                    while self._fetches and now - self._fetches[0] > self.window:
                        self._fetches.popleft()
                    if len(self._fetches) >= self.max_fetches:
                        if keys is not None and kid in keys:
                            return keys[kid]
                        raise AuthError(f"unknown kid {_show(kid)} for issuer {_show(iss)} "
                                        f"(JWKS fetch limit of {self.max_fetches} per {self.window:.0f} s reached)")
                    self._fetches.append(now)
                    self._attempted_at = now
                    self._inflight = event = threading.Event()
                    mine = True
            if not mine:
                event.wait(self.timeout + 1.0)
                waited = True
                continue
            try:
                new_keys, failure = self._fetch(), ""
            except Exception as exc:  # noqa: BLE001 - whatever happens, the fetch in flight must end
                new_keys, failure = None, getattr(exc, "reason", type(exc).__name__)
            with self._lock:
                now = self._clock()
                if new_keys is not None:
                    self._keys, self._fetched_at, self._failed_until = new_keys, now, -math.inf
                else:
                    self._failed_until, self._failure = now + self.failure_ttl, failure
                self._inflight = None
            event.set()
            waited = True  # one fetch per call at most; the loop answers from the new state

    def _fetch(self) -> dict[str, jwt.PyJWK]:
        self.fetch_count += 1
        deadline = time.monotonic() + self.timeout
        try:
            with fhir_transport.deadline_scope(deadline), self._session.get(self.uri, headers={"Accept": "application/json"}, timeout=self.timeout,
                                   allow_redirects=False, stream=True) as resp:
                resp.raise_for_status()
                body = bytearray()
                for chunk in resp.iter_content(16 * 1024):
                    body += chunk
                    if len(body) > MAX_JWKS_BYTES:
                        raise AuthError("JWKS larger than 256 KiB")
                    if time.monotonic() > deadline:
                        raise AuthError("JWKS fetch exceeded its timeout")
            data = json.loads(bytes(body))
        except (requests.RequestException, ValueError) as e:
            if time.monotonic() >= deadline:  # the watchdog cut a trickling answer
                raise AuthError("JWKS fetch exceeded its timeout") from None
            raise AuthError(type(e).__name__) from None
        if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
            raise AuthError("not a JWK Set")
        usable = [k for k in data["keys"] if isinstance(k, dict) and k.get("use", "sig") == "sig"
                  and isinstance(k.get("kid"), str) and k["kid"] and "d" not in k and k.get("kty") != "oct"]
        try:
            keys = jwt.PyJWKSet(usable).keys if usable else []
        except jwt.PyJWTError:
            keys = []
        return {k.key_id: k for k in keys}


class _Issuer:
    def __init__(self, iss: str, keys: dict[str, jwt.PyJWK] | None, source: _JwksSource | None,
                 fhir_servers: tuple[str, ...] = ()):
        self.iss = iss
        self.keys = keys  # static: kid -> key
        self.source = source  # jwks_url
        self.fhir_servers = fhir_servers

    @property
    def jwks_url(self) -> str | None:
        return self.source.uri if self.source else None

    def signing_key(self, kid: str) -> jwt.PyJWK:
        if self.keys is not None:
            try:
                return self.keys[kid]
            except KeyError:
                raise AuthError(f"unknown kid {_show(kid)} for issuer {_show(self.iss)}") from None
        return self.source.get(kid, self.iss)


class JwtVerifier:
    """Verifies ``Authorization: Bearer <jwt>`` against an allowlist of issuers; see the module doc."""

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **kwargs: Any) -> "JwtVerifier":
        """Load the ``CDS_JWT_ISSUERS`` file. Raises ValueError naming the problem."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise ValueError(f"CDS_JWT_ISSUERS file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"CDS_JWT_ISSUERS file {path} cannot be read: {e}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"CDS_JWT_ISSUERS file {path} is not valid JSON: {e}") from None
        try:
            return cls(data, **kwargs)
        except ValueError as e:
            raise ValueError(f"CDS_JWT_ISSUERS file {path}: {e}") from None

    def __init__(
        self,
        issuers: list[dict],
        *,
        replay_check: Callable[[str, datetime], bool] | None = None,
        leeway: int = 30,
        jwks_timeout: float = 2.0,
        jwks_refresh_cooldown: float = 30.0,
        jwks_failure_ttl: float = 30.0,
        max_lifetime: float = DEFAULT_MAX_LIFETIME,
        clock: Callable[[], float] = time.time,
    ):
        """``replay_check(jti, exp)`` must record the jti until ``exp`` and return False if it was
        already seen (None = no replay protection). ``jwks_refresh_cooldown``: an unknown kid makes a
        ``jwks_url`` issuer's keys be refetched once, but not more often than this (seconds); fetched
        sets are cached 5 minutes; a failed fetch is remembered ``jwks_failure_ttl`` seconds. ``max_lifetime``:
        the most seconds ``exp`` may lie after ``iat``. ``clock``: seconds since the epoch (tests pin it)."""
        if not (isinstance(max_lifetime, (int, float)) and 0 < max_lifetime < math.inf):
            raise ValueError("the JWT max lifetime (CDS_JWT_MAX_LIFETIME) must be a positive number of seconds")
        self._issuers = _parse_issuers(issuers, jwks_timeout, jwks_refresh_cooldown, jwks_failure_ttl)
        self._max_lifetime = max_lifetime
        self._replay_check = replay_check
        self._leeway = leeway
        self._clock = clock

    @property
    def issuers(self) -> list[str]:
        return list(self._issuers)

    def fhir_servers(self, iss: str) -> tuple[str, ...]:
        """The FHIR base URLs the issuer's entry lists (``fhirServers``); empty when none."""
        issuer = self._issuers.get(iss)
        return issuer.fhir_servers if issuer else ()

    def verify(self, authorization_header: str | None, audience: str) -> dict:
        """Return the verified claims, or raise AuthError."""
        token = _bearer_token(authorization_header)
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise AuthError("malformed JWT") from None

        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS:  # rules out "none" and HS*
            raise AuthError(f"alg {_show(alg)} not allowed")
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower() != "jwt":  # CDS Hooks 2.0: typ "JWT" is required
            raise AuthError(f"typ {_show(typ)} is not JWT" if typ is not None else "JWT header has no typ")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthError("JWT header has no kid")

        iss = unverified.get("iss")  # unverified: used only to pick the issuer's keys
        issuer = self._issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise AuthError(f"issuer {_show(iss)} not allowlisted")
        if "jku" in header and issuer.jwks_url is not None and header["jku"] != issuer.jwks_url:
            raise AuthError(f"jku {_show(header['jku'])} not allowlisted for issuer {_show(iss)}")

        key = issuer.signing_key(kid)
        if not isinstance(key.key, ec.EllipticCurvePublicKey if alg.startswith("ES") else rsa.RSAPublicKey):
            raise AuthError(f"alg {alg} does not fit the {key.key_type} key {_show(kid)}")
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[alg],  # PyJWT also checks the EC curve fits alg
                options={
                    "require": list(REQUIRED_CLAIMS),
                    "verify_aud": False,  # checked below: exact match, string or one-element list
                    "verify_iss": False,  # it is the issuer whose key just verified the signature
                    "verify_exp": False,  # exp/iat/nbf checked below against self._clock
                    "verify_iat": False,
                    "verify_nbf": False,
                    "enforce_minimum_key_length": True,
                },
            )
        except jwt.InvalidSignatureError:
            raise AuthError(f"bad signature (issuer {_show(iss)}, kid {_show(kid)})") from None
        except jwt.PyJWTError as e:  # PyJWT's messages name claims/algorithms, never the token
            raise AuthError(f"invalid JWT: {type(e).__name__}: {_show(str(e))}") from None

        self._check_claims(claims, audience)
        return claims

    def _check_claims(self, claims: dict, audience: str) -> None:
        aud = claims["aud"]
        if isinstance(aud, list) and len(aud) == 1:
            aud = aud[0]
        if aud != audience:
            raise AuthError(f"aud {_show(claims['aud'])} is not {_show(audience)}")

        now = self._clock()
        exp = _number(claims, "exp")
        if exp <= now - self._leeway:
            raise AuthError("JWT expired")
        iat = _number(claims, "iat")
        if iat > now + self._leeway:
            raise AuthError("JWT iat is in the future")
        if exp - iat > self._max_lifetime:
            raise AuthError(f"JWT lifetime exp - iat of {exp - iat:.0f} s exceeds the maximum of {self._max_lifetime:.0f} s")
        if "nbf" in claims and _number(claims, "nbf") > now + self._leeway:
            raise AuthError("JWT not yet valid (nbf)")

        jti = claims["jti"]
        if not isinstance(jti, str) or not jti:
            raise AuthError("jti is not a non-empty string")
        if self._replay_check is not None:
            try:
                expires = datetime.fromtimestamp(exp, tz=timezone.utc)
            except (OverflowError, OSError, ValueError):
                raise AuthError("exp out of range") from None
            if not self._replay_check(jti, expires):
                raise AuthError(f"jti {_show(jti)} replayed (issuer {_show(claims['iss'])})")


def _bearer_token(authorization_header: str | None) -> str:
    if not authorization_header:
        raise AuthError("no Authorization header")
    scheme, _, token = authorization_header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise AuthError("Authorization header is not 'Bearer <jwt>'")
    return token


def _number(claims: dict, name: str) -> float:
    value = claims[name]
    try:  # json.loads accepts NaN/Infinity, and integers of any size (math.isfinite(10**400): OverflowError)
        finite = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    except OverflowError:
        finite = False
    if not finite:
        raise AuthError(f"{name} is not a finite number")
    return value


def _show(value: Any) -> str:
    """Attacker-supplied value, made safe and short for a log line."""
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def _parse_issuers(
    issuers: Any, jwks_timeout: float, jwks_refresh_cooldown: float, jwks_failure_ttl: float = 30.0
) -> dict[str, _Issuer]:
    if not isinstance(issuers, list) or not issuers:
        raise ValueError("issuers must be a non-empty JSON list of {iss, jwks | jwks_url} objects")
    result: dict[str, _Issuer] = {}
    for i, entry in enumerate(issuers):
        where = f"entry {i}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} is not a JSON object")
        iss = entry.get("iss")
        if not isinstance(iss, str) or not iss:
            raise ValueError(f"{where} has no 'iss' string")
        where = f"entry {i} (iss {iss!r})"
        unknown = sorted(set(entry) - _ENTRY_KEYS)
        if unknown:
            raise ValueError(f"{where} has unknown keys {unknown}; allowed: iss, jwks, jwks_url, fhirServers")
        if iss in result:
            raise ValueError(f"{where}: iss listed twice")
        has_jwks, has_url = "jwks" in entry, "jwks_url" in entry
        if has_jwks == has_url:
            raise ValueError(f"{where} needs exactly one of 'jwks' or 'jwks_url' (has {'both' if has_jwks else 'neither'})")
        servers = parse_entry_servers(entry["fhirServers"], where) if "fhirServers" in entry else ()
        if has_jwks:
            result[iss] = _Issuer(iss, _static_keys(entry["jwks"], where), None, servers)
        else:
            url = _check_jwks_url(entry["jwks_url"], where)
            source = _JwksSource(url, timeout=jwks_timeout, cooldown=jwks_refresh_cooldown,
                                 failure_ttl=jwks_failure_ttl)
            result[iss] = _Issuer(iss, None, source, servers)
    return result


def _static_keys(jwks: Any, where: str) -> dict[str, jwt.PyJWK]:
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list) or not jwks["keys"]:
        raise ValueError(f"{where}: 'jwks' must be a JWK Set object with a non-empty 'keys' list")
    usable = []
    for n, jwk in enumerate(jwks["keys"]):
        if not isinstance(jwk, dict):
            raise ValueError(f"{where}: jwks key {n} is not a JSON object")
        if "d" in jwk or jwk.get("kty") == "oct":
            raise ValueError(f"{where}: jwks key {n} is private or symmetric key material; give public keys only")
        if jwk.get("use", "sig") == "sig" and isinstance(jwk.get("kid"), str) and jwk["kid"]:
            usable.append(jwk)
    try:
        keys = jwt.PyJWKSet(usable).keys if usable else []
    except jwt.PyJWTError:
        keys = []
    if not keys:
        raise ValueError(f"{where}: 'jwks' has no usable signing key (kty EC/RSA, a kid, use 'sig' or no use)")
    return {k.key_id: k for k in keys}


def _check_jwks_url(url: Any, where: str) -> str:
    """Checked as urllib3 (the parser that connects) reads it: ``urllib.parse`` takes the host of
    ``http://remote\\@127.0.0.1/`` to be 127.0.0.1, urllib3 connects to ``remote``."""
    try:
        target = parse_target(url)
    except ValueError as exc:
        raise ValueError(f"{where}: 'jwks_url' must be an absolute https URL ({exc})") from None
    if target.scheme == "http" and not target.is_loopback:
        raise ValueError(f"{where}: 'jwks_url' must use https (http only for localhost)")
    return url
