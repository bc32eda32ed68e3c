"""JWT client authentication (cds_hooks_service.auth): the CDS Hooks 2.0 "Trusting CDS Clients" matrix."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid

import jwt
import pytest
import requests
import responses
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from cds_hooks_service.auth import AuthError, JwtVerifier, expected_audience
from tests.helpers import REPO
from tests.sandbox_client import (
    FIXTURES,
    SANDBOX_ISS,
    SANDBOX_JKU,
    SANDBOX_KID,
    mint_jwt,
    sandbox_claims,
    sandbox_jwt,
    sandbox_private_key,
)

AUD = "https://cds.example.org/cds-services/med-check-select"
EHR_ISS = "https://ehr.example.org"
EHR_JWKS_URL = "https://ehr.example.org/.well-known/jwks.json"

# CDS Hooks 2.0.1 (HL7/cds-hooks, input/pagecontent/index.md, "Trusting CDS Clients" > Example):
# the example JWK Set and the complete signed token. Its payload carries "sub": "client_id" (left over
# from 1.0) besides the claims shown in the spec's payload example; exp is 2015-01-29.
SPEC_ISS = "https://fhir-ehr.example.com/"
SPEC_AUD = "https://cds.example.org/cds-services/some-service"
SPEC_JWKS = {
    "keys": [
        {
            "kty": "EC",
            "use": "sig",
            "crv": "P-384",
            "kid": "example-kid",
            "x": "46SDH7Znh821wblCBglA61sNE9ZrHYKKt3qRtRTmSXyOI_FIGBLWrWa0GPUkDCEk",
            "y": "XMcRuuoGW7CXjQdy-F5i3FeBE0x9hPLdeFdSoDd3ELmx404tLX0VRRcqzAsPhXcI",
            "alg": "ES384",
        }
    ]
}
SPEC_TOKEN = (
    "eyJhbGciOiJFUzM4NCIsInR5cCI6IkpXVCIsImtpZCI6ImV4YW1wbGUta2lkIiwiamt1IjoiaHR0cHM6Ly9maGlyLWVoci5leGFtcGxlLmNvbS9qd2tfdXJpIn0"
    ".eyJpc3MiOiJodHRwczovL2ZoaXItZWhyLmV4YW1wbGUuY29tLyIsInN1YiI6ImNsaWVudF9pZCIsImF1ZCI6Imh0dHBzOi8vY2RzLmV4YW1wbGUub3JnL2Nkcy1zZXJ2aWNlcy9zb21lLXNlcnZpY2UiLCJleHAiOjE0MjI1Njg4NjAsImlhdCI6MTMxMTI4MDk3MCwianRpIjoiZWUyMmIwMjEtZTFiNy00NjExLWJhNWItOGVlYzZhMzNhYzFlIiwidGVuYW50IjoiMmRkZDZjM2EtOGU5YS00NGM2LWEzMDUtNTIxMTFhZDMwMmEyIn0"
    ".CUFPkplnWd6YGIvzoHolWCQBDsCL8QtTWKGg_QFpS169WrqDGzktRi-_we6-6rVzbjerU27ZKww_SW0-b9RTz-dPJNcqsueMio8r6EqXUXhbLm_ch3XFSbDlGHDl_tqo"
)


# --- keys and helpers ----------------------------------------------------------------------------------

def _public_jwk(private_key, kid: str, alg: str) -> dict:
    algo = jwt.algorithms.ECAlgorithm if alg.startswith("ES") else jwt.algorithms.RSAAlgorithm
    jwk = json.loads(algo.to_jwk(private_key.public_key()))
    return {**jwk, "kid": kid, "use": "sig", "alg": alg}


@pytest.fixture(scope="module")
def ehr_p384():
    """A second, locally generated P-384 issuer (nothing committed)."""
    key = ec.generate_private_key(ec.SECP384R1())
    return key, {"keys": [_public_jwk(key, "ehr-p384", "ES384")]}


@pytest.fixture(scope="module")
def ehr_rsa():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key, {"keys": [_public_jwk(key, "ehr-rsa", "RS384")]}


@pytest.fixture(scope="module")
def sandbox_jwks() -> dict:
    return json.loads((FIXTURES / "jwks.json").read_text())


@pytest.fixture
def verifier() -> JwtVerifier:
    return JwtVerifier.from_file(FIXTURES / "issuers-sandbox.json")


def _claims(iss: str = EHR_ISS, aud=AUD, **overrides) -> dict:
    now = int(time.time())
    claims = {"iss": iss, "aud": aud, "exp": now + 300, "iat": now, "jti": str(uuid.uuid4())}
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _reject(verifier: JwtVerifier, header: str | None, audience: str = AUD) -> AuthError:
    with pytest.raises(AuthError) as info:
        verifier.verify(header, audience)
    return info.value


# --- accepted ------------------------------------------------------------------------------------------

def test_sandbox_shaped_es384_token_accepted(verifier):
    token = sandbox_jwt(AUD)
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "ES384", "typ": "JWT", "kid": SANDBOX_KID, "jku": SANDBOX_JKU}

    claims = verifier.verify(f"Bearer {token}", AUD)

    assert claims["iss"] == SANDBOX_ISS and claims["aud"] == AUD
    assert set(claims) == {"iss", "aud", "exp", "iat", "jti"}  # what jwt-generator.js sends


def test_rs384_token_accepted(ehr_rsa):
    key, jwks = ehr_rsa
    v = JwtVerifier([{"iss": EHR_ISS, "jwks": jwks}])
    token = mint_jwt(key, "RS384", "ehr-rsa", _claims())
    assert v.verify(f"Bearer {token}", AUD)["iss"] == EHR_ISS


def test_second_p384_issuer_accepted_alongside_sandbox(ehr_p384, sandbox_jwks):
    key, jwks = ehr_p384
    v = JwtVerifier([{"iss": SANDBOX_ISS, "jwks": sandbox_jwks}, {"iss": EHR_ISS, "jwks": jwks}])
    assert v.verify(f"Bearer {mint_jwt(key, 'ES384', 'ehr-p384', _claims())}", AUD)["iss"] == EHR_ISS
    assert v.verify(f"Bearer {sandbox_jwt(AUD)}", AUD)["iss"] == SANDBOX_ISS


def test_aud_as_one_element_list_accepted(verifier):
    assert verifier.verify(f"Bearer {sandbox_jwt([AUD])}", AUD)["aud"] == [AUD]


def test_lowercase_bearer_scheme_accepted(verifier):
    assert verifier.verify(f"bearer {sandbox_jwt(AUD)}", AUD)


def test_spec_example_token_verifies_against_spec_jwks():
    """The token published in the CDS Hooks 2.0.1 spec, checked at a time inside its lifetime
    (its exp is in 2015; pinning the clock stands in for "exp checking disabled")."""
    v = JwtVerifier([{"iss": SPEC_ISS, "jwks": SPEC_JWKS}], clock=lambda: 1422568860 - 60,
                    max_lifetime=4 * 365 * 86400)  # the example's exp is 3.5 years after its iat
    claims = v.verify(f"Bearer {SPEC_TOKEN}", SPEC_AUD)
    assert claims["jti"] == "ee22b021-e1b7-4611-ba5b-8eec6a33ac1e"
    assert claims["tenant"] == "2ddd6c3a-8e9a-44c6-a305-52111ad302a2"

    now = JwtVerifier([{"iss": SPEC_ISS, "jwks": SPEC_JWKS}])
    assert "expired" in _reject(now, f"Bearer {SPEC_TOKEN}", SPEC_AUD).reason


# --- rejected: algorithm and header ----------------------------------------------------------------------

def test_alg_none_rejected(verifier):
    token = jwt.encode(sandbox_claims(AUD), None, algorithm="none", headers={"kid": SANDBOX_KID})
    assert "alg 'none' not allowed" in _reject(verifier, f"Bearer {token}").reason


def test_hs256_signed_with_the_public_key_pem_rejected(verifier):
    """Classic key confusion: HMAC keyed with the issuer's public key PEM (built by hand; PyJWT refuses)."""
    pem = sandbox_private_key().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": SANDBOX_KID}).encode())
    payload = _b64(json.dumps(sandbox_claims(AUD)).encode())
    signature = _b64(hmac.new(pem, f"{header}.{payload}".encode(), hashlib.sha256).digest())
    assert "alg 'HS256' not allowed" in _reject(verifier, f"Bearer {header}.{payload}.{signature}").reason


def test_typ_other_than_jwt_rejected(verifier):
    token = mint_jwt(sandbox_private_key(), "ES384", SANDBOX_KID, sandbox_claims(AUD),
                     extra_headers={"typ": "at+jwt"})
    assert "typ" in _reject(verifier, f"Bearer {token}").reason


def test_missing_kid_rejected(verifier):
    token = mint_jwt(sandbox_private_key(), "ES384", None, sandbox_claims(AUD))
    assert "no kid" in _reject(verifier, f"Bearer {token}").reason


def test_unknown_kid_rejected(verifier):
    token = mint_jwt(sandbox_private_key(), "ES384", "not-a-sandbox-kid", sandbox_claims(AUD))
    assert "unknown kid" in _reject(verifier, f"Bearer {token}").reason


def test_key_with_use_enc_is_not_used(sandbox_jwks):
    enc_and_sig = {"keys": [{**sandbox_jwks["keys"][0], "kid": "enc-key", "use": "enc"}, sandbox_jwks["keys"][0]]}
    v = JwtVerifier([{"iss": SANDBOX_ISS, "jwks": enc_and_sig}])
    token = mint_jwt(sandbox_private_key(), "ES384", "enc-key", sandbox_claims(AUD))
    assert "unknown kid" in _reject(v, f"Bearer {token}").reason


def test_token_signed_by_another_key_under_the_sandbox_kid_rejected(verifier, ehr_p384):
    forged = mint_jwt(ehr_p384[0], "ES384", SANDBOX_KID, sandbox_claims(AUD), extra_headers={"jku": SANDBOX_JKU})
    assert "bad signature" in _reject(verifier, f"Bearer {forged}").reason


def test_alg_not_matching_the_key_type_rejected(ehr_rsa, sandbox_jwks):
    """RS384 header, but the kid selects the Sandbox's EC key."""
    v = JwtVerifier([{"iss": SANDBOX_ISS, "jwks": sandbox_jwks}])
    token = mint_jwt(ehr_rsa[0], "RS384", SANDBOX_KID, sandbox_claims(AUD))
    assert "does not fit" in _reject(v, f"Bearer {token}").reason


def test_es256_header_with_a_p384_key_rejected(sandbox_jwks):
    v = JwtVerifier([{"iss": SANDBOX_ISS, "jwks": sandbox_jwks}])
    p256 = ec.generate_private_key(ec.SECP256R1())
    token = mint_jwt(p256, "ES256", SANDBOX_KID, sandbox_claims(AUD))
    assert "invalid JWT" in _reject(v, f"Bearer {token}").reason


# --- rejected: claims ------------------------------------------------------------------------------------

def _sandbox_token(**overrides) -> str:
    claims = {**sandbox_claims(AUD), **overrides}
    return mint_jwt(sandbox_private_key(), "ES384", SANDBOX_KID, {k: v for k, v in claims.items() if v is not None},
                    extra_headers={"jku": SANDBOX_JKU})


def test_expired_rejected(verifier):
    now = int(time.time())
    assert "expired" in _reject(verifier, f"Bearer {_sandbox_token(iat=now - 400, exp=now - 100)}").reason


def test_expired_within_leeway_accepted(verifier):
    now = int(time.time())
    assert verifier.verify(f"Bearer {_sandbox_token(iat=now - 310, exp=now - 10)}", AUD)


def test_iat_in_the_future_rejected(verifier):
    now = int(time.time())
    assert "iat is in the future" in _reject(verifier, f"Bearer {_sandbox_token(iat=now + 120, exp=now + 400)}").reason


def test_nbf_in_the_future_rejected(verifier):
    now = int(time.time())
    assert "nbf" in _reject(verifier, f"Bearer {_sandbox_token(nbf=now + 120)}").reason


def test_wrong_aud_rejected(verifier):
    other = "https://cds.example.org/cds-services/other-service"
    assert "aud" in _reject(verifier, f"Bearer {sandbox_jwt(other)}").reason
    assert "aud" in _reject(verifier, f"Bearer {sandbox_jwt(AUD + '/')}").reason  # exact match only
    assert "aud" in _reject(verifier, f"Bearer {sandbox_jwt([AUD, other])}").reason  # one-element lists only


@pytest.mark.parametrize("claim", ["iss", "aud", "exp", "iat", "jti"])
def test_missing_required_claim_rejected(verifier, claim):
    if claim == "iss":  # without iss no issuer can be picked
        assert "not allowlisted" in _reject(verifier, f"Bearer {_sandbox_token(iss=None)}").reason
    else:
        assert claim in _reject(verifier, f"Bearer {_sandbox_token(**{claim: None})}").reason


def test_non_finite_exp_rejected(verifier):
    """json.loads accepts NaN; NaN compares False both ways and must not pass as "not expired"."""
    payload = json.dumps({**sandbox_claims(AUD), "exp": float("nan")}).encode()  # json.dumps writes NaN
    token = jwt.PyJWS().encode(payload, sandbox_private_key(), algorithm="ES384",
                               headers={"kid": SANDBOX_KID, "typ": "JWT"})
    assert "exp is not a finite number" in _reject(verifier, f"Bearer {token}").reason


@pytest.mark.parametrize("claim", ["exp", "iat", "nbf"])
def test_huge_integer_times_rejected_not_a_crash(verifier, claim):
    """JSON integers have no size limit: 10**400 is not a float (math.isfinite raised OverflowError: a 500)."""
    payload = json.dumps({**sandbox_claims(AUD), claim: 10**400}).encode()
    token = jwt.PyJWS().encode(payload, sandbox_private_key(), algorithm="ES384",
                               headers={"kid": SANDBOX_KID, "typ": "JWT"})
    assert f"{claim} is not a finite number" in _reject(verifier, f"Bearer {token}").reason


def test_unknown_iss_rejected(verifier):
    token = _sandbox_token(iss="https://evil.example.org")
    assert "not allowlisted" in _reject(verifier, f"Bearer {token}").reason


def test_replayed_jti_rejected(sandbox_jwks):
    seen: set[str] = set()

    def replay_check(jti, exp):
        assert exp.tzinfo is not None
        if jti in seen:
            return False
        seen.add(jti)
        return True

    v = JwtVerifier([{"iss": SANDBOX_ISS, "jwks": sandbox_jwks}], replay_check=replay_check)
    header = f"Bearer {sandbox_jwt(AUD)}"
    v.verify(header, AUD)
    assert "replayed" in _reject(v, header).reason
    v.verify(f"Bearer {sandbox_jwt(AUD)}", AUD)  # a fresh jti is fine


@pytest.mark.parametrize(
    "header",
    [None, "", "   ", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Token abc", "Bearer not-a-jwt",
     "Bearer a.b.c", "Bearer eyJhbGciOiJFUzM4NCJ9.e30", "Bearer x y"],
)
def test_missing_or_garbage_authorization_header_rejected(verifier, header):
    _reject(verifier, header)


# --- jwks_url issuers ----------------------------------------------------------------------------------------

@responses.activate
def test_jwks_url_fetched_once_and_cached(ehr_p384):
    key, jwks = ehr_p384
    responses.get(EHR_JWKS_URL, json=jwks)
    v = JwtVerifier([{"iss": EHR_ISS, "jwks_url": EHR_JWKS_URL}])

    for _ in range(2):
        token = mint_jwt(key, "ES384", "ehr-p384", _claims(), extra_headers={"jku": EHR_JWKS_URL})
        assert v.verify(f"Bearer {token}", AUD)["iss"] == EHR_ISS

    assert len(responses.calls) == 1


@responses.activate
def test_jwks_url_refetched_once_for_an_unknown_kid(ehr_p384):
    """Key rotation: a new kid triggers one refetch (cooldown 0 here so the test needn't wait)."""
    key, jwks = ehr_p384
    rotated = {"keys": [{**jwks["keys"][0], "kid": "ehr-p384-2"}]}
    responses.get(EHR_JWKS_URL, json=jwks)
    responses.get(EHR_JWKS_URL, json=rotated)
    v = JwtVerifier([{"iss": EHR_ISS, "jwks_url": EHR_JWKS_URL}], jwks_refresh_cooldown=0)

    v.verify(f"Bearer {mint_jwt(key, 'ES384', 'ehr-p384', _claims())}", AUD)
    v.verify(f"Bearer {mint_jwt(key, 'ES384', 'ehr-p384-2', _claims())}", AUD)
    assert len(responses.calls) == 2
    with pytest.raises(AuthError, match="unknown kid"):
        v.verify(f"Bearer {mint_jwt(key, 'ES384', 'nope', _claims())}", AUD)
    assert len(responses.calls) == 3  # one refetch, then give up


@responses.activate
def test_unknown_kid_refetch_respects_the_cooldown(ehr_p384):
    key, jwks = ehr_p384
    responses.get(EHR_JWKS_URL, json=jwks)
    v = JwtVerifier([{"iss": EHR_ISS, "jwks_url": EHR_JWKS_URL}])  # default cooldown 30 s
    v.verify(f"Bearer {mint_jwt(key, 'ES384', 'ehr-p384', _claims())}", AUD)
    for _ in range(3):
        _reject(v, f"Bearer {mint_jwt(key, 'ES384', f'random-{uuid.uuid4()}', _claims())}")
    assert len(responses.calls) == 1  # random kids cannot make us hammer the client's JWKS endpoint


@responses.activate
def test_jku_not_allowlisted_rejected_without_fetching(ehr_p384):
    key, _ = ehr_p384
    v = JwtVerifier([{"iss": EHR_ISS, "jwks_url": EHR_JWKS_URL}])
    token = mint_jwt(key, "ES384", "ehr-p384", _claims(), extra_headers={"jku": "https://evil.example.org/jwks.json"})
    assert "jku" in _reject(v, f"Bearer {token}").reason
    assert len(responses.calls) == 0


@responses.activate
def test_jwks_url_fetch_failure_is_an_auth_error(ehr_p384):
    key, _ = ehr_p384
    responses.get(EHR_JWKS_URL, body=requests.ConnectionError("down"))
    v = JwtVerifier([{"iss": EHR_ISS, "jwks_url": EHR_JWKS_URL}])
    assert "cannot fetch JWKS" in _reject(v, f"Bearer {mint_jwt(key, 'ES384', 'ehr-p384', _claims())}").reason


@responses.activate
def test_jwks_url_fetch_uses_the_configured_timeout(ehr_p384):
    key, jwks = ehr_p384
    responses.get(EHR_JWKS_URL, json=jwks)
    JwtVerifier([{"iss": EHR_ISS, "jwks_url": EHR_JWKS_URL}], jwks_timeout=1.5).verify(
        f"Bearer {mint_jwt(key, 'ES384', 'ehr-p384', _claims())}", AUD
    )
    assert responses.calls[0].request.req_kwargs["timeout"] == 1.5


def test_jku_ignored_for_static_jwks_issuer(verifier):
    """The Sandbox always sends its hosted jku; with a pinned JWKS it is neither fetched nor required."""
    token = mint_jwt(sandbox_private_key(), "ES384", SANDBOX_KID, sandbox_claims(AUD),
                     extra_headers={"jku": "https://localhost:8080/.well-known/jwks.json"})
    assert verifier.verify(f"Bearer {token}", AUD)


# --- error text ----------------------------------------------------------------------------------------------

def test_auth_error_never_contains_the_token(verifier, ehr_p384):
    now = int(time.time())
    tokens = [
        _sandbox_token(exp=now - 100, iat=now - 400),
        _sandbox_token(iss="https://evil.example.org"),
        _sandbox_token(aud="https://elsewhere.example.org"),
        mint_jwt(sandbox_private_key(), "ES384", "bad-kid", sandbox_claims(AUD)),
        mint_jwt(ehr_p384[0], "ES384", SANDBOX_KID, sandbox_claims(AUD)),
        jwt.encode(sandbox_claims(AUD), None, algorithm="none", headers={"kid": SANDBOX_KID}),
        "eyJhbGciOiJFUzM4NCJ9.bm90IGpzb24.c2ln",
    ]
    for token in tokens:
        error = _reject(verifier, f"Bearer {token}")
        for text in (str(error), error.reason, repr(error)):
            assert token not in text
            assert all(part not in text for part in token.split(".") if len(part) > 8)


# --- configuration -------------------------------------------------------------------------------------------

def _write(tmp_path, data) -> str:
    path = tmp_path / "issuers.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_from_file_missing_file(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        JwtVerifier.from_file(tmp_path / "nope.json")


def test_from_file_invalid_json(tmp_path):
    with pytest.raises(ValueError, match="not valid JSON"):
        JwtVerifier.from_file(_write(tmp_path, "[{"))


@pytest.mark.parametrize("data", [{"iss": SANDBOX_ISS}, [], 42])
def test_from_file_not_a_list(tmp_path, data):
    with pytest.raises(ValueError, match="non-empty JSON list"):
        JwtVerifier.from_file(_write(tmp_path, data))


def test_from_file_entry_without_iss(tmp_path, sandbox_jwks):
    with pytest.raises(ValueError, match="entry 0 has no 'iss'"):
        JwtVerifier.from_file(_write(tmp_path, [{"jwks": sandbox_jwks}]))


def test_from_file_entry_with_both_jwks_and_jwks_url(tmp_path, sandbox_jwks):
    with pytest.raises(ValueError, match="exactly one of 'jwks' or 'jwks_url' \\(has both\\)"):
        JwtVerifier.from_file(_write(tmp_path, [{"iss": EHR_ISS, "jwks": sandbox_jwks, "jwks_url": EHR_JWKS_URL}]))


def test_from_file_entry_with_neither(tmp_path):
    with pytest.raises(ValueError, match="exactly one of 'jwks' or 'jwks_url' \\(has neither\\)"):
        JwtVerifier.from_file(_write(tmp_path, [{"iss": EHR_ISS}]))


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"iss": EHR_ISS, "jwks_uri": EHR_JWKS_URL}, "unknown keys \\['jwks_uri'\\]"),
        ({"iss": EHR_ISS, "jwks_url": "http://ehr.example.org/jwks.json"}, "must use https"),
        ({"iss": EHR_ISS, "jwks_url": "file:///etc/passwd"}, "absolute https URL"),
        # urllib.parse reads host 127.0.0.1, urllib3 (which connects) reads ehr.example.org: plain http to it
        ({"iss": EHR_ISS, "jwks_url": "http://ehr.example.org\\@127.0.0.1/jwks.json"}, "must use https"),
        ({"iss": EHR_ISS, "jwks_url": "https://user:pw@ehr.example.org/jwks.json"}, "user info"),
        ({"iss": EHR_ISS, "jwks": {"keys": []}}, "non-empty 'keys' list"),
        ({"iss": EHR_ISS, "jwks": {"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]}}, "symmetric"),
        ({"iss": EHR_ISS, "jwks": {"keys": [{"kty": "EC", "crv": "P-384", "kid": "k"}]}}, "no usable signing key"),
    ],
)
def test_from_file_rejects_bad_entries(tmp_path, entry, message):
    with pytest.raises(ValueError, match=message):
        JwtVerifier.from_file(_write(tmp_path, [entry]))


def test_from_file_rejects_private_key_material(tmp_path):
    private = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(sandbox_private_key()))
    with pytest.raises(ValueError, match="private"):
        JwtVerifier.from_file(_write(tmp_path, [{"iss": SANDBOX_ISS, "jwks": {"keys": [{**private, "kid": "k"}]}}]))


def test_from_file_rejects_duplicate_iss(tmp_path, sandbox_jwks):
    with pytest.raises(ValueError, match="listed twice"):
        JwtVerifier.from_file(_write(tmp_path, [{"iss": SANDBOX_ISS, "jwks": sandbox_jwks}] * 2))


def test_from_file_accepts_loopback_http_jwks_url(tmp_path):
    v = JwtVerifier.from_file(_write(tmp_path, [{"iss": EHR_ISS, "jwks_url": "http://localhost:9000/jwks.json"}]))
    assert v.issuers == [EHR_ISS]


def test_issuers_sandbox_fixture_is_the_sandbox_allowlist(verifier):
    assert verifier.issuers == [SANDBOX_ISS]


# --- expected_audience -------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "public, path, expected",
    [
        ("https://cds.example.org", "/cds-services/x", "https://cds.example.org/cds-services/x"),
        ("https://cds.example.org/", "/cds-services", "https://cds.example.org/cds-services"),
        ("https://example.org/cds", "/cds-services/x/feedback", "https://example.org/cds/cds-services/x/feedback"),
        ("http://localhost:5000", "cds-services", "http://localhost:5000/cds-services"),
    ],
)
def test_expected_audience(public, path, expected):
    assert expected_audience(public, path) == expected


@pytest.mark.parametrize("public", [None, ""])
def test_expected_audience_never_falls_back_to_the_request(public):
    with pytest.raises(ValueError, match="CDS_PUBLIC_URL"):
        expected_audience(public, "/cds-services/x")


# --- typ and lifetime (issue 10 item 4) ----------------------------------------------------------------------

def test_missing_typ_rejected(verifier):
    token = jwt.encode(sandbox_claims(AUD), sandbox_private_key(), algorithm="ES384",
                       headers={"kid": SANDBOX_KID, "typ": None})  # PyJWT adds typ JWT unless told otherwise
    assert "typ" not in jwt.get_unverified_header(token)
    assert _reject(verifier, f"Bearer {token}").reason == "JWT header has no typ"


@pytest.mark.parametrize("typ", ["jwt", "Jwt", "JWT"])
def test_typ_jwt_in_any_case_accepted(verifier, typ):
    token = mint_jwt(sandbox_private_key(), "ES384", SANDBOX_KID, sandbox_claims(AUD), extra_headers={"typ": typ})
    assert verifier.verify(f"Bearer {token}", AUD)


@pytest.mark.parametrize("typ", [1, "", "JWS", "application/jwt"])
def test_typ_not_jwt_rejected(verifier, typ):
    token = mint_jwt(sandbox_private_key(), "ES384", SANDBOX_KID, sandbox_claims(AUD), extra_headers={"typ": typ})
    assert "typ" in _reject(verifier, f"Bearer {token}").reason


def test_exp_more_than_five_minutes_after_iat_rejected(verifier):
    now = int(time.time())
    ok = _sandbox_token(iat=now, exp=now + 300)
    assert verifier.verify(f"Bearer {ok}", AUD)
    long = _sandbox_token(iat=now, exp=now + 301)
    assert "lifetime" in _reject(verifier, f"Bearer {long}").reason
    forever = _sandbox_token(iat=now, exp=now + 10 * 365 * 86400)  # a stolen token would be good for years
    assert "lifetime" in _reject(verifier, f"Bearer {forever}").reason


def test_max_lifetime_is_configurable(sandbox_jwks):
    now = int(time.time())
    v = JwtVerifier([{"iss": SANDBOX_ISS, "jwks": sandbox_jwks}], max_lifetime=60)
    assert v.verify(f"Bearer {_sandbox_token(iat=now, exp=now + 60)}", AUD)
    assert "lifetime" in _reject(v, f"Bearer {_sandbox_token(iat=now, exp=now + 120)}").reason
    for bad in (0, -1, float("inf")):
        with pytest.raises(ValueError, match="CDS_JWT_MAX_LIFETIME"):
            JwtVerifier([{"iss": SANDBOX_ISS, "jwks": sandbox_jwks}], max_lifetime=bad)


def test_max_lifetime_from_the_environment(monkeypatch):
    from cds_hooks_service.config import Settings
    monkeypatch.setenv("CDS_JWT_MAX_LIFETIME", "120")
    assert Settings.from_env().jwt_max_lifetime == 120
    monkeypatch.delenv("CDS_JWT_MAX_LIFETIME")
    assert Settings.from_env().jwt_max_lifetime == 300


# --- issuer entries: fhirServers -------------------------------------------------------------------------------

def test_issuer_entry_lists_its_fhir_servers(tmp_path, sandbox_jwks):
    v = JwtVerifier.from_file(_write(tmp_path, [
        {"iss": SANDBOX_ISS, "jwks": sandbox_jwks, "fhirServers": ["https://EHR.example.org:443/fhir/", "http://127.0.0.1:8080/r4"]},
        {"iss": EHR_ISS, "jwks": sandbox_jwks}]))
    assert v.fhir_servers(SANDBOX_ISS) == ("https://ehr.example.org/fhir", "http://127.0.0.1:8080/r4")
    assert v.fhir_servers(EHR_ISS) == () and v.fhir_servers("https://unknown.example.org") == ()


@pytest.mark.parametrize("servers, message", [
    ("https://ehr.example.org/fhir", "must be a list"),
    (["http://ehr.example.org/fhir"], "must use https"),
    (["https://user:pw@ehr.example.org/fhir"], "user info"),
    (["ftp://ehr.example.org/fhir"], "http"),
    (["https://ehr.example.org/fhir?x=1"], "no query"),
    (["https://[::1"], "URL"),
])
def test_issuer_entry_with_bad_fhir_servers_refused(tmp_path, sandbox_jwks, servers, message):
    with pytest.raises(ValueError, match=message):
        JwtVerifier.from_file(_write(tmp_path, [{"iss": SANDBOX_ISS, "jwks": sandbox_jwks, "fhirServers": servers}]))


# --- the app: aud never from the Host header ------------------------------------------------------------------

ISSUERS = REPO / "tests/fixtures/sandbox/issuers-sandbox.json"


def test_jwt_mode_refuses_to_start_without_public_url(make_app):
    with pytest.raises(ValueError, match="CDS_PUBLIC_URL") as info:
        make_app(jwt_issuers_file=ISSUERS, public_url=None)
    assert "\n" not in str(info.value)


def test_aud_is_never_taken_from_the_host_header(make_app):
    """A token minted for another CDS service (its aud) is refused, whatever Host and X-Forwarded-* say."""
    client = make_app(jwt_issuers_file=ISSUERS, public_url="https://cds.example.org").test_client()
    path = "/cds-services"
    for root in ("http://other-cds.example.net", "https://other-cds.example.net"):
        forged = sandbox_jwt(root + path)  # what the request's own URL would say with these headers
        r = client.get(path, headers={"Authorization": f"Bearer {forged}", "Host": "other-cds.example.net",
                                      "X-Forwarded-Proto": "https", "X-Forwarded-Host": "other-cds.example.net"})
        assert r.status_code == 401
    good = sandbox_jwt("https://cds.example.org" + path)
    assert client.get(path, headers={"Authorization": f"Bearer {good}", "Host": "evil.example"}).status_code == 200


def test_settings_from_env_refuse_jwt_mode_without_public_url(monkeypatch):
    from cds_hooks_service.config import Settings
    monkeypatch.setenv("CDS_JWT_ISSUERS", str(ISSUERS))
    monkeypatch.delenv("CDS_PUBLIC_URL", raising=False)
    with pytest.raises(ValueError, match="CDS_PUBLIC_URL") as info:
        Settings.from_env()
    assert "\n" not in str(info.value)
    monkeypatch.setenv("CDS_PUBLIC_URL", "cds.example.org")  # not a URL
    with pytest.raises(ValueError, match="absolute http"):
        Settings.from_env()
    monkeypatch.setenv("CDS_PUBLIC_URL", "https://cds.example.org")
    assert Settings.from_env().public_url == "https://cds.example.org"
