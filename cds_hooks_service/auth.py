"""Verification of the JWT a CDS Client sends with every call (CDS Hooks 2.0, "Trusting CDS Clients").

Configuration (read by the app, not here): env ``CDS_JWT_ISSUERS`` names a JSON file

    [{"iss": "https://sandbox.cds-hooks.org", "jwks": {"keys": [...]}},
     {"iss": "https://ehr.example.org", "jwks_url": "https://ehr.example.org/.well-known/jwks.json"}]

Each trusted client (``iss``) gives either a static JWK Set (``jwks``) or the one URL its keys are
fetched from (``jwks_url``); together the two lists are the spec's "allowlist of iss and jku".

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

import ipaddress
import json
import math
import os
import time
from datetime import datetime, timezone
from typing import Any, Callable
from urllib.parse import urlsplit

import jwt
import requests
from cryptography.hazmat.primitives.asymmetric import ec, rsa

ALLOWED_ALGORITHMS = frozenset(
    {"ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
)
REQUIRED_CLAIMS = ("iss", "aud", "exp", "iat", "jti")
_ENTRY_KEYS = {"iss", "jwks", "jwks_url"}


class AuthError(Exception):
    """The request is not authenticated. ``reason`` is for logs only; never send it to the client."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def expected_audience(public_base_url: str | None, request_url_root: str, path: str) -> str:
    """The URL the client must have put in ``aud``: configured public base URL (env ``CDS_PUBLIC_URL``,
    e.g. ``https://cds.example.org``) + path, else the request's root URL + path.

    One trailing slash is stripped from the base, and ``path`` gets a leading slash, so
    ``("https://cds.example.org/", ..., "/cds-services/x")`` gives ``https://cds.example.org/cds-services/x``.
    Behind a proxy, configure the public URL: the request root then says http/127.0.0.1 instead.
    """
    base = public_base_url or request_url_root
    if base.endswith("/"):
        base = base[:-1]
    if not path.startswith("/"):
        path = "/" + path
    return base + path


class _RequestsJWKClient(jwt.PyJWKClient):
    """PyJWKClient (JWK Set cache, one refetch on an unknown kid) that fetches with ``requests``:
    explicit timeout, no redirects, and mockable with ``responses`` in tests."""

    def fetch_data(self) -> Any:
        try:
            resp = requests.get(
                self.uri,
                headers={"Accept": "application/json", **self.headers},
                timeout=self.timeout,
                allow_redirects=False,
            )
            resp.raise_for_status()
            data = resp.json()
        except (requests.RequestException, ValueError) as e:
            raise jwt.PyJWKClientConnectionError(
                f"JWKS fetch failed: {type(e).__name__}"
            ) from None
        if not isinstance(data, dict):
            raise jwt.PyJWKClientError("The JWKS endpoint did not return a JSON object")
        if self.jwk_set_cache is not None:
            self.jwk_set_cache.put(data)
        self._last_successful_fetch = time.monotonic()  # PyJWKClient's refetch cooldown
        return data


class _Issuer:
    def __init__(self, iss: str, keys: dict[str, jwt.PyJWK] | None, client: _RequestsJWKClient | None):
        self.iss = iss
        self.keys = keys  # static: kid -> key
        self.client = client  # jwks_url

    @property
    def jwks_url(self) -> str | None:
        return self.client.uri if self.client else None

    def signing_key(self, kid: str) -> jwt.PyJWK:
        if self.keys is not None:
            try:
                return self.keys[kid]
            except KeyError:
                raise AuthError(f"unknown kid {_show(kid)} for issuer {_show(self.iss)}") from None
        try:
            return self.client.get_signing_key(kid)
        except jwt.PyJWKClientConnectionError as e:
            raise AuthError(f"cannot fetch JWKS of issuer {_show(self.iss)}: {e}") from None
        except jwt.PyJWTError:  # no such kid even after a refetch, or an unusable JWK Set
            raise AuthError(f"unknown kid {_show(kid)} for issuer {_show(self.iss)}") from None


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
        clock: Callable[[], float] = time.time,
    ):
        """``replay_check(jti, exp)`` must record the jti until ``exp`` and return False if it was
        already seen (None = no replay protection). ``jwks_refresh_cooldown``: an unknown kid makes a
        ``jwks_url`` issuer's keys be refetched once, but not more often than this (seconds); fetched
        sets are cached 5 minutes. ``clock``: seconds since the epoch (tests pin it)."""
        self._issuers = _parse_issuers(issuers, jwks_timeout, jwks_refresh_cooldown)
        self._replay_check = replay_check
        self._leeway = leeway
        self._clock = clock

    @property
    def issuers(self) -> list[str]:
        return list(self._issuers)

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
        if "typ" in header and header["typ"] != "JWT":
            raise AuthError(f"typ {_show(header['typ'])} is not JWT")
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
        if _number(claims, "iat") > now + self._leeway:
            raise AuthError("JWT iat is in the future")
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
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AuthError(f"{name} is not a finite number")  # json.loads accepts NaN/Infinity
    return value


def _show(value: Any) -> str:
    """Attacker-supplied value, made safe and short for a log line."""
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def _parse_issuers(
    issuers: Any, jwks_timeout: float, jwks_refresh_cooldown: float
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
            raise ValueError(f"{where} has unknown keys {unknown}; allowed: iss, jwks, jwks_url")
        if iss in result:
            raise ValueError(f"{where}: iss listed twice")
        has_jwks, has_url = "jwks" in entry, "jwks_url" in entry
        if has_jwks == has_url:
            raise ValueError(f"{where} needs exactly one of 'jwks' or 'jwks_url' (has {'both' if has_jwks else 'neither'})")
        if has_jwks:
            result[iss] = _Issuer(iss, _static_keys(entry["jwks"], where), None)
        else:
            url = _check_jwks_url(entry["jwks_url"], where)
            client = _RequestsJWKClient(
                url, timeout=jwks_timeout, lifespan=300, cooldown_duration=jwks_refresh_cooldown
            )
            result[iss] = _Issuer(iss, None, client)
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
    parts = urlsplit(url) if isinstance(url, str) else None
    if not parts or parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"{where}: 'jwks_url' must be an absolute https URL")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ValueError(f"{where}: 'jwks_url' must use https (http only for localhost)")
    return url


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
