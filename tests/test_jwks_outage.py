"""Issue 10 item 6: a JWKS outage is not a service outage.

A hostile JWKS server on loopback (failing, hanging or healthy) stands in for an issuer's ``jwks_url``: random
``kid``s cannot make the service hammer it, failures are remembered, a fetch holds no lock other issuers' calls
wait on, and valid calls of other issuers go through at full speed while one issuer's endpoint hangs.
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from cds_hooks_service.auth import AuthError, JwtVerifier
from tests.sandbox_client import mint_jwt

AUD = "https://cds.example.org/cds-services/x"


class JwksServer:
    """``mode``: "ok" (the JWK Set), "down" (HTTP 500), "hang" (no answer until released), "trickle" (headers,
    then a byte at a time)."""

    def __init__(self, jwks: dict, mode: str = "ok"):
        self.jwks, self.mode, self.requests = jwks, mode, 0
        self.released = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):
                pass

            def do_GET(self):
                owner.requests += 1
                if owner.mode == "hang":
                    owner.released.wait(10)
                    return
                if owner.mode == "trickle":  # a valid status line and headers, then one byte every 0.25 s for 8 s
                    self.send_response(200)
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    for _ in range(32):
                        if owner.released.wait(0.25):
                            return
                        self.wfile.write(b" ")
                        self.wfile.flush()
                    return
                if owner.mode == "down":
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = json.dumps(owner.jwks).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.released.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def _issuer(name: str):
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    return key, f"https://{name}.example.org", {"keys": [{**jwk, "kid": f"{name}-1", "use": "sig", "alg": "ES256"}]}


def _token(key, iss, kid):
    now = int(time.time())
    claims = {"iss": iss, "aud": AUD, "iat": now, "exp": now + 120, "jti": str(uuid.uuid4())}
    return f"Bearer {mint_jwt(key, 'ES256', kid, claims)}"


@pytest.fixture
def servers():
    made = []

    def make(jwks, mode="ok"):
        server = JwksServer(jwks, mode)
        made.append(server)
        return server
    yield make
    for s in made:
        s.close()


def _random_kid_calls(verifier, key, iss, n=50, parallel=10):
    def one(_):
        with pytest.raises(AuthError):
            verifier.verify(_token(key, iss, f"random-{uuid.uuid4()}"), AUD)
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(one, range(n)))


@pytest.mark.parametrize("mode", ["down", "ok"])
def test_fifty_random_kids_cause_at_most_five_fetches(servers, mode):
    key, iss, jwks = _issuer("ehr-a")
    server = servers(jwks, mode)
    v = JwtVerifier([{"iss": iss, "jwks_url": server.url}], jwks_timeout=1.0)
    _random_kid_calls(v, key, iss)
    assert 1 <= server.requests <= 5, server.requests


def test_the_fetch_limit_holds_without_a_cooldown(servers):
    """Even with the unknown-kid cooldown off, an issuer's endpoint is fetched at most 5 times a minute."""
    key, iss, jwks = _issuer("ehr-b")
    server = servers(jwks)
    v = JwtVerifier([{"iss": iss, "jwks_url": server.url}], jwks_refresh_cooldown=0, jwks_timeout=1.0)
    _random_kid_calls(v, key, iss, parallel=1)
    assert server.requests == 5
    assert v.verify(_token(key, iss, "ehr-b-1"), AUD)  # known keys still work


@pytest.mark.slow  # waits on a real time-out or runs a concurrency stress (tests/conftest.py)
def test_a_failed_fetch_is_remembered_then_retried(servers):
    key, iss, jwks = _issuer("ehr-c")
    server = servers(jwks, "down")
    v = JwtVerifier([{"iss": iss, "jwks_url": server.url}], jwks_failure_ttl=0.4, jwks_timeout=1.0)
    for _ in range(10):
        with pytest.raises(AuthError, match="cannot fetch JWKS"):
            v.verify(_token(key, iss, "ehr-c-1"), AUD)
    assert server.requests == 1
    server.mode = "ok"
    time.sleep(0.5)
    assert v.verify(_token(key, iss, "ehr-c-1"), AUD)["iss"] == iss
    assert server.requests == 2


@pytest.mark.slow  # waits on a real time-out or runs a concurrency stress (tests/conftest.py)
def test_other_issuers_are_not_delayed_while_one_jwks_endpoint_hangs(servers):
    """Issuer A's JWKS endpoint hangs (its fetch times out after 2 s); 30 calls from A with random kids are in
    flight. Meanwhile valid calls from issuer B (keys from its own jwks_url) answer in milliseconds."""
    key_a, iss_a, jwks_a = _issuer("ehr-hang")
    key_b, iss_b, jwks_b = _issuer("ehr-ok")
    hanging, healthy = servers(jwks_a, "hang"), servers(jwks_b)
    v = JwtVerifier([{"iss": iss_a, "jwks_url": hanging.url}, {"iss": iss_b, "jwks_url": healthy.url}],
                    jwks_timeout=2.0)
    assert v.verify(_token(key_b, iss_b, "ehr-ok-1"), AUD)  # B's keys are cached

    attackers = ThreadPoolExecutor(30)
    started = time.monotonic()
    futures = [attackers.submit(v.verify, _token(key_a, iss_a, f"r-{uuid.uuid4()}"), AUD) for _ in range(30)]
    time.sleep(0.2)  # A's fetch is in flight now
    slowest = 0.0
    for _ in range(20):
        t0 = time.monotonic()
        assert v.verify(_token(key_b, iss_b, "ehr-ok-1"), AUD)["iss"] == iss_b
        slowest = max(slowest, time.monotonic() - t0)
    assert slowest < 0.2, slowest
    for f in futures:
        with pytest.raises(AuthError):
            f.result(timeout=10)
    attackers.shutdown()
    assert time.monotonic() - started < 4.5  # A's callers waited for the one fetch in flight, not for 30
    assert hanging.requests == 1


def test_known_keys_are_not_held_up_by_a_refetch_in_flight(servers):
    """The cached keys are past their 5-minute lifespan and the issuer's endpoint now hangs: while the refetch
    runs (the first call after the lifespan starts it), the issuer's valid calls, whose kid is cached, are
    answered from the cache at once; they used to wait for the fetch (up to the JWKS timeout, then 401)."""
    key, iss, jwks = _issuer("ehr-stale")
    server = servers(jwks)
    v = JwtVerifier([{"iss": iss, "jwks_url": server.url}], jwks_timeout=2.0, jwks_refresh_cooldown=0.1)
    assert v.verify(_token(key, iss, "ehr-stale-1"), AUD)  # keys cached
    v._issuers[iss].source.lifespan = 0.2  # stands for the 5 minutes passing
    time.sleep(0.3)
    server.mode = "hang"
    attacker = ThreadPoolExecutor(1)
    pending = attacker.submit(v.verify, _token(key, iss, "ehr-stale-1"), AUD)  # starts the refetch
    deadline = time.monotonic() + 2
    while server.requests < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.requests == 2  # the refetch is in flight
    slowest = 0.0
    for _ in range(5):
        t0 = time.monotonic()
        assert v.verify(_token(key, iss, "ehr-stale-1"), AUD)["iss"] == iss
        slowest = max(slowest, time.monotonic() - t0)
    assert slowest < 0.5, slowest
    server.released.set()  # the endpoint now drops the connection: the refetch fails without waiting for its 2 s timeout
    assert pending.result(timeout=10)["iss"] == iss  # the fetch failed: the stale key still verifies
    attacker.shutdown()


@pytest.mark.slow  # waits on a real time-out or runs a concurrency stress (tests/conftest.py)
def test_a_trickling_jwks_endpoint_is_cut_at_the_fetch_timeout(servers):
    """Each byte arrives well within the read timeout, so only a total deadline ends the fetch (it used to run
    for as long as the server kept trickling, holding the request's thread)."""
    key, iss, jwks = _issuer("ehr-trickle")
    server = servers(jwks, "trickle")
    v = JwtVerifier([{"iss": iss, "jwks_url": server.url}], jwks_timeout=1.0)
    t0 = time.monotonic()
    with pytest.raises(AuthError):
        v.verify(_token(key, iss, "ehr-trickle-1"), AUD)
    assert time.monotonic() - t0 < 2.5
    assert server.requests == 1
