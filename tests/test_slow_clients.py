"""Slow clients do not take the service down (issue 10, finding 3): real gunicorn on loopback, started the two
ways a user starts it (``python -m cds_hooks_service serve`` and the Procfile's command), in JWT mode.

64 connections send their headers a byte at a time and 16 send 5 MB POST bodies (no JWT) a kilobyte at a time,
reconnecting whenever the server closes them. Meanwhile discovery, /healthz and a valid hook call from another
client must all be answered (each within a 3 s client timeout; the latencies are printed, speed itself is
measured in bench/). With the old gthread workers (2 x 4 threads) the trickling connections held every thread
and the calls timed out. The server must also cut the slow connections off: headers within ``keepalive``
(5 s), bodies at CDS_BODY_TIMEOUT (here 2 s; a slow body of an authenticated call is answered 408).

Every loop here is bounded in count and time; all traffic goes to 127.0.0.1.
"""
from __future__ import annotations

import json
import select
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from tests import sandbox_client as sandbox
from tests.helpers import REPO, SCENARIO_NOW
from tests.plugins.gunicorn_service import GunicornService, procfile_command
from tests.helpers import SIGN, request_body

ISSUERS = REPO / "tests/fixtures/sandbox/issuers-sandbox.json"
BODY_TIMEOUT = 2.0
KEEPALIVE = 5.0  # gunicorn.conf.py: also the time a request's headers may take
SLOW_HEADERS, SLOW_POSTS = 64, 16
ATTACK_SECONDS = 10.0
BIG = 5_000_000  # under the 5 MiB body limit: the server has to read (or drain) it


def launched(tmp: Path, how: str, env: dict[str, str] | None = None) -> GunicornService:
    """The service as ``how`` starts it ("serve" or "procfile"), 2 workers, on a free loopback port."""
    service = GunicornService(tmp, env or {}, workers=2)
    if how == "serve":
        service.cmd = [sys.executable, "-m", "cds_hooks_service", "serve", "--port", str(service.port)]
    else:
        procfile_env, argv = procfile_command()
        service.env.update(procfile_env)
        service.cmd = argv
    return service


class SlowClients(threading.Thread):
    """The attack: slow-header and slow-body connections, reopened when the server closes them, for
    ``ATTACK_SECONDS`` at most. ``lifetimes``: (kind, seconds from open to the server closing it)."""

    TICK = 0.2

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.lifetimes: list[tuple[str, float]] = []
        self.opened = 0
        self.answers: list[bytes] = []

    def _open(self, kind: str):
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=2)
        sock.setblocking(False)
        if kind == "headers":
            sock.send(b"GET /cds-services HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        else:
            sock.send(b"POST " + SIGN.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: " + str(BIG).encode() + b"\r\n\r\n[")
        self.opened += 1
        return {"kind": kind, "sock": sock, "since": time.monotonic()}

    def run(self):
        kinds = ["headers"] * SLOW_HEADERS + ["body"] * SLOW_POSTS
        slots = [None] * len(kinds)
        end = time.monotonic() + ATTACK_SECONDS
        try:
            while not self.stop.is_set() and time.monotonic() < end:
                for i, kind in enumerate(kinds):
                    slot = slots[i]
                    try:
                        if slot is None:
                            slots[i] = self._open(kind)
                            continue
                        readable, _, _ = select.select([slot["sock"]], [], [], 0)
                        if readable:
                            data = slot["sock"].recv(65536)
                            if data:
                                self.answers.append(data[:12])
                                continue
                            raise ConnectionResetError("closed by the server")
                        slot["sock"].send(b"a" if kind == "headers" else b" " * 1024)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:  # closed by the server (or refused): note how long it lived, reopen
                        if slot is not None:
                            self.lifetimes.append((kind, time.monotonic() - slot["since"]))
                            slot["sock"].close()
                        slots[i] = None
                time.sleep(self.TICK)
        finally:
            for slot in slots:
                if slot is not None:
                    slot["sock"].close()


def probe_calls(base: str, seconds: float) -> list[tuple[str, int | str, float]]:
    """Discovery, /healthz and a valid hook call (JWT), each on a new connection, for ``seconds``."""
    results = []
    end = time.monotonic() + seconds
    body = json.dumps(request_body())
    while time.monotonic() < end and len(results) < 300:
        for name in ("discovery", "healthz", "hook"):
            started = time.monotonic()
            try:
                if name == "healthz":
                    r = requests.get(f"{base}/healthz", timeout=3)
                elif name == "discovery":
                    r = requests.get(f"{base}/cds-services", timeout=3,
                                     headers={"Authorization": sandbox.sandbox_auth_header(f"{base}/cds-services")})
                else:
                    r = requests.post(base + SIGN, data=body, timeout=3,
                                      headers={"Content-Type": "application/json",
                                               "Authorization": sandbox.sandbox_auth_header(base + SIGN)})
                outcome: int | str = r.status_code
            except requests.RequestException as exc:
                outcome = type(exc).__name__
            results.append((name, outcome, time.monotonic() - started))
        time.sleep(0.1)
    return results


@pytest.mark.parametrize("how", ["serve", "procfile"])
def test_slow_clients_do_not_starve_the_others(tmp_path, how):
    service = launched(tmp_path, how, dict(CDS_JWT_ISSUERS=str(ISSUERS), CDS_FIXED_NOW=SCENARIO_NOW,
                                           CDS_BODY_TIMEOUT=str(BODY_TIMEOUT)))
    service.env["CDS_PUBLIC_URL"] = service.base_url
    with service:
        attack = SlowClients(service.port)
        attack.start()
        try:
            time.sleep(1.0)  # every slow connection is open and trickling
            results = probe_calls(service.base_url, ATTACK_SECONDS - 3)
            attack.join(ATTACK_SECONDS + 5)
        finally:
            attack.stop.set()
            attack.join(5)
        assert "JWT mode" in service.log()
    failed = [r for r in results if r[1] != 200]
    assert results and not failed, failed[:10]
    latencies = sorted(seconds for _, _, seconds in results)
    print(f"{how}: {len(results)} calls during the attack, all 200; latency median "
          f"{statistics.median(latencies) * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms; "
          f"{attack.opened} slow connections opened")
    # the server cut the slow connections off itself: headers after keepalive, bodies at the body deadline
    header_lives = [s for kind, s in attack.lifetimes if kind == "headers"]
    body_lives = [s for kind, s in attack.lifetimes if kind == "body"]
    assert len(header_lives) >= SLOW_HEADERS and max(header_lives) < KEEPALIVE + 3, header_lives[:5]
    assert len(body_lives) >= SLOW_POSTS and max(body_lives) < BODY_TIMEOUT + KEEPALIVE + 3, body_lives[:5]
    assert any(answer.startswith(b"HTTP/1.1 401") for answer in attack.answers)  # no JWT: 401 after the drain


def test_an_authenticated_body_that_trickles_is_answered_408(tmp_path):
    service = launched(tmp_path, "procfile", dict(CDS_JWT_ISSUERS=str(ISSUERS), CDS_BODY_TIMEOUT=str(BODY_TIMEOUT)))
    service.env["CDS_PUBLIC_URL"] = service.base_url
    with service:
        auth = sandbox.sandbox_auth_header(service.base_url + SIGN)
        with socket.create_connection(("127.0.0.1", service.port), timeout=BODY_TIMEOUT + KEEPALIVE + 5) as sock:
            started = time.monotonic()
            sock.sendall(f"POST {SIGN} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         f"Authorization: {auth}\r\nContent-Length: {BIG}\r\n\r\n{{".encode())
            answer = b""
            for _ in range(int((BODY_TIMEOUT + 3) / 0.1)):  # a kilobyte every 0.1 s until answered
                readable, _, _ = select.select([sock], [], [], 0.1)
                if readable:
                    answer = sock.recv(65536)
                    break
                sock.sendall(b" " * 1024)
            elapsed = time.monotonic() - started
            head, _, body = answer.partition(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:")))
            for _ in range(20):  # the rest of the answer's body, if it came in more than one piece
                if len(body) >= length:
                    break
                body += sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 408"), answer[:300]
    assert BODY_TIMEOUT - 0.5 < elapsed < BODY_TIMEOUT + 3
    outcome = json.loads(body[:length])
    assert outcome["issue"][0]["code"] == "timeout" and "CDS_BODY_TIMEOUT" in outcome["issue"][0]["details"]["text"]
