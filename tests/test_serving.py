"""Server plumbing (issue 12): a port in use, the start-up line, liveness/readiness probes, the log format.

Real processes on loopback: ``python -m cds_hooks_service serve`` and gunicorn with gunicorn.conf.py; a real
PostgreSQL database dropped under the running app for the probes; a real pseudo-terminal for the log format.
"""
from __future__ import annotations

import io
import json
import logging
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import time
from urllib.parse import urlsplit

import pytest

from cds_hooks_service import logs, serving
from tests.helpers import REPO
from tests.plugins.gunicorn_service import GunicornService, cleaned_env, free_port

ISSUERS = REPO / "tests/fixtures/sandbox/issuers-sandbox.json"


def serve_env(tmp_path, **more) -> dict[str, str]:
    return cleaned_env() | {"CDS_INSTANCE_DIR": str(tmp_path), "DATABASE_URL": f"sqlite:///{tmp_path / 's.db'}",
                            "CDS_RULES_POLL_SECONDS": "0"} | more


# -- a port in use -----------------------------------------------------------------------------------------
@pytest.fixture
def busy_port():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_serve_refuses_a_port_in_use_in_one_line(tmp_path, busy_port):
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "cds_hooks_service", "serve", "--port", str(busy_port)],
                          env=serve_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr == f"error: cannot start: 127.0.0.1:{busy_port} is already in use (another service, or this " \
                          "one started twice); stop it or choose another PORT\n"
    assert time.monotonic() - started < 30  # no bind retries


def test_gunicorn_refuses_a_port_in_use_in_one_line(tmp_path, busy_port):
    service = GunicornService(tmp_path, workers=1)
    cmd = [part if part != f"127.0.0.1:{service.port}" else f"127.0.0.1:{busy_port}" for part in service.cmd]
    done = subprocess.run(cmd, env=service.env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    [line] = [line for line in done.stderr.splitlines() if "cannot start" in line]
    assert f"127.0.0.1:{busy_port} is already in use" in line
    assert "Retrying" not in done.stderr and "Booting worker" not in done.stderr


def test_a_second_service_on_the_same_port_does_not_start(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    with GunicornService(tmp_path / "a", workers=1) as first:
        done = subprocess.run([sys.executable, "-m", "cds_hooks_service", "serve", "--port", str(first.port)],
                              env=serve_env(tmp_path / "b"), capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "already in use" in done.stderr


def test_reuse_port_only_when_asked(monkeypatch, busy_port):
    monkeypatch.delenv("CDS_JWT_ISSUERS", raising=False)
    with pytest.raises(serving.StartupError, match="already in use"):
        serving.startup_check([("127.0.0.1", busy_port)])
    serving.startup_check([("127.0.0.1", busy_port)], reuse_port=True)  # asked for: several servers share it
    serving.startup_check([("127.0.0.1", busy_port)], inherited_sockets=True)  # systemd / USR2 re-exec
    assert os.environ["CDS_LISTEN_HOSTS"] == "127.0.0.1"


# -- the start-up line -------------------------------------------------------------------------------------
def test_start_up_line_names_address_rules_and_mode(tmp_path):
    for name in ("open", "jwt"):
        (tmp_path / name).mkdir()
    with GunicornService(tmp_path / "open", workers=1) as service:
        line = next(line for line in service.log().splitlines() if "cds-hooks-service listening on" in line)
        assert f"http://127.0.0.1:{service.port}: 6 rules loaded, OPEN MODE" in line
    service = GunicornService(tmp_path / "jwt", dict(CDS_JWT_ISSUERS=str(ISSUERS)), workers=1)
    service.env["CDS_PUBLIC_URL"] = service.base_url
    with service:
        line = next(line for line in service.log().splitlines() if "cds-hooks-service listening on" in line)
        assert f"http://127.0.0.1:{service.port}: 6 rules loaded, JWT mode (issuers: {ISSUERS})" in line
        assert "urllib3 was imported before gevent" not in service.log()  # gunicorn.conf.py patched first


# -- probes ------------------------------------------------------------------------------------------------
def test_probes_with_the_database_down(make_app, fresh_postgres_url, _postgres_cluster):
    client = make_app(database_url=fresh_postgres_url).test_client()
    assert client.get("/livez").get_json() == {"status": "ok"}
    for path in ("/readyz", "/healthz"):
        r = client.get(path)
        assert r.status_code == 200 and r.get_json() == {"status": "ok", "rules": 6, "store": "ok"}
    _postgres_cluster.drop_database(urlsplit(fresh_postgres_url).path.lstrip("/"))  # the database goes away
    for path in ("/readyz", "/healthz"):
        r = client.get(path)
        assert r.status_code == 503 and r.get_json() == {"status": "degraded", "rules": 6, "store": "down"}
    r = client.get("/livez")  # a liveness probe must not restart the service for a database outage
    assert r.status_code == 200 and r.get_json() == {"status": "ok"}


def test_not_ready_without_rules(make_app, rulebook):
    import dataclasses

    app = make_app()
    app.extensions["cds"]._rulebook = dataclasses.replace(rulebook, rules=[])  # e.g. every rule file removed
    r = app.test_client().get("/readyz")
    assert r.status_code == 503 and r.get_json() == {"status": "degraded", "rules": 0, "store": "ok"}
    assert app.test_client().get("/livez").status_code == 200


# -- log format ----------------------------------------------------------------------------------------------
def test_log_format_auto_is_text_on_a_terminal_and_json_otherwise(monkeypatch):
    monkeypatch.delenv("CDS_LOG_FORMAT", raising=False)
    master, slave = pty.openpty()
    read_end, write_end = os.pipe()
    try:
        with open(slave, "w", closefd=False) as tty, open(write_end, "w", closefd=False) as pipe:
            assert logs.log_format(tty) == "text"
            assert logs.log_format(pipe) == "json"
            assert logs.log_format(io.StringIO()) == "json" and logs.log_format(None) == "json"
            monkeypatch.setenv("CDS_LOG_FORMAT", "json")
            assert logs.log_format(tty) == "json"
            monkeypatch.setenv("CDS_LOG_FORMAT", "text")
            assert logs.log_format(pipe) == "text"
    finally:
        for fd in (master, slave, read_end, write_end):
            os.close(fd)


def test_handlers_get_the_format_of_their_own_stream(monkeypatch):
    monkeypatch.setenv("CDS_LOG_FORMAT", "auto")
    master, slave = pty.openpty()
    try:
        with open(slave, "w", closefd=False) as tty:
            on_tty, to_buffer = logging.StreamHandler(tty), logging.StreamHandler(io.StringIO())
            logs.configure_handlers([on_tty, to_buffer])
            assert not isinstance(on_tty.formatter, type(logs.json_formatter()))
            assert isinstance(to_buffer.formatter, type(logs.json_formatter()))
    finally:
        os.close(master)
        os.close(slave)


def _read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    out = b""
    end = time.monotonic() + timeout
    while needle not in out and time.monotonic() < end:
        readable, _, _ = select.select([fd], [], [], 0.2)
        if readable:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the terminal closed
                break
            if not chunk:
                break
            out += chunk
    return out


def test_serve_on_a_terminal_logs_human_readable_lines(tmp_path):
    """`serve` started from a terminal (a real pty): its log lines are text, not JSON; piped: JSON."""
    port = free_port()
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "cds_hooks_service", "serve", "--port", str(port), "--workers", "1"],
                            env=serve_env(tmp_path), stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, cwd=REPO)
    os.close(slave)
    try:
        out = _read_until(master, b"Booting worker", timeout=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        os.close(master)
    lines = [line for line in out.decode(errors="replace").splitlines() if line.strip()]
    started = next(line for line in lines if "cds-hooks-service listening on" in line)
    assert not started.lstrip().startswith("{") and "[INFO]" in started and f"http://127.0.0.1:{port}" in started
    assert "urllib3 was imported before gevent" not in out.decode(errors="replace")  # serve execs gunicorn
    assert not any(line.lstrip().startswith("{") for line in lines)
    (tmp_path / "piped").mkdir()
    with GunicornService(tmp_path / "piped", workers=1) as piped:  # stderr to a file: JSON
        started = next(line for line in piped.log().splitlines() if "cds-hooks-service listening on" in line)
        assert started.startswith("{") and json.loads(started)["level"] == "INFO"


# -- gevent workers with the parts the service uses ------------------------------------------------------------
def test_gevent_workers_with_postgresql(tmp_path, fresh_postgres_url):
    """SQLAlchemy + psycopg 3 under the gevent worker: concurrent hook calls store their cards, feedback is
    stored, readiness sees the database (psycopg >= 3.1.14 waits through gevent by itself)."""
    import json
    from concurrent.futures import ThreadPoolExecutor

    import requests

    from tests.helpers import SCENARIO_NOW
    from tests.helpers import SIGN, request_body

    env = dict(DATABASE_URL=fresh_postgres_url,
               CDS_FIXED_NOW=SCENARIO_NOW)
    with GunicornService(tmp_path, env, workers=1) as service:
        def call(i):
            body = request_body()
            body["hookInstance"] = f"00000000-0000-4000-8000-{i:012d}"
            r = requests.post(service.base_url + SIGN, data=json.dumps(body), timeout=10,
                              headers={"Content-Type": "application/json"})
            return r.status_code, r.json()["cards"][0]["uuid"] if r.status_code == 200 else r.text

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(call, range(24)))
        assert {status for status, _ in answers} == {200}, answers[:3]
        feedback = {"feedback": [{"card": uuid, "outcome": "overridden", "outcomeTimestamp": "2026-03-01T12:00:00Z"}
                                 for _, uuid in answers[:3]]}
        r = requests.post(service.base_url + SIGN + "/feedback", json=feedback, timeout=10)
        assert r.status_code == 200 and r.json()["stored"] == 3
        assert requests.get(service.base_url + "/readyz", timeout=10).json()["store"] == "ok"
    import psycopg

    with psycopg.connect(fresh_postgres_url) as conn:
        assert conn.execute("SELECT count(*) FROM cds_issued_card").fetchone()[0] >= 24


def test_a_slow_fhir_server_does_not_hold_up_the_worker(tmp_path, fault_server):
    """FHIR reads go through gevent's sockets: while one hook call waits for a FHIR server that answers after
    1 s, the same (only) worker answers /readyz and discovery."""
    import json
    import threading

    import requests

    from tests.plugins.fault_server import slow
    from tests.helpers import hook_body

    fault_server.default = slow(1.0)
    env = dict(CDS_FHIR_SERVERS=fault_server.base_url, CDS_TIME_BUDGET="3", CDS_FHIR_READ_TIMEOUT="2.5")
    with GunicornService(tmp_path, env, workers=1) as service:
        finished: dict[str, float] = {}

        def hook_call():
            r = requests.post(service.base_url + "/cds-services/migraine-med-safety-sign",
                              data=json.dumps(hook_body(fault_server.base_url)), timeout=10,
                              headers={"Content-Type": "application/json"})
            finished["hook"] = time.monotonic()
            finished["hook_status"] = r.status_code

        caller = threading.Thread(target=hook_call)
        caller.start()
        assert wait_until(lambda: fault_server.requests, 5), "the hook call never reached the FHIR server"
        for path in ("/readyz", "/cds-services"):
            assert requests.get(service.base_url + path, timeout=5).status_code == 200
        finished["others"] = time.monotonic()
        caller.join(15)
    assert finished["hook_status"] == 200
    assert finished["others"] < finished["hook"], "the probes waited for the FHIR read"


def wait_until(predicate, seconds: float):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def test_the_fhir_deadline_holds_under_gevent_workers(tmp_path, fault_server):
    """A FHIR server that trickles its answer past the time budget: the FHIR deadline (fhir_transport's
    watchdog, a greenlet under gevent) cuts the read off, and the hook call is answered with a "Check not
    completed" card instead of waiting for the trickle."""
    import json

    import requests

    from tests.plugins.fault_server import trickle
    from tests.helpers import hook_body

    fault_server.default = trickle(8.0)
    with GunicornService(tmp_path, dict(CDS_FHIR_SERVERS=fault_server.base_url), workers=1) as service:
        started = time.monotonic()
        r = requests.post(service.base_url + "/cds-services/migraine-med-safety-sign",
                          data=json.dumps(hook_body(fault_server.base_url)), timeout=10,
                          headers={"Content-Type": "application/json"})
        elapsed = time.monotonic() - started
        assert requests.get(service.base_url + "/readyz", timeout=5).status_code == 200
    assert r.status_code == 200, r.text
    assert any(card["summary"].startswith("Check not completed") for card in r.json()["cards"]), r.json()
    assert elapsed < 6, f"answered after {elapsed:.1f} s: the 1.5 s budget did not hold"


def test_a_connection_accepted_before_a_worker_stops_is_answered(tmp_path):
    """A worker told to stop (a max_requests restart, a scale-down) closes the connections idle between
    requests, but not one it accepted whose first request is still on its way: that request is answered (a
    client whose POST meets a closed connection gets no answer and does not retry)."""
    import json as _json

    from tests.helpers import SIGN, request_body

    with GunicornService(tmp_path, dict(CDS_FIXED_NOW="2026-03-01T12:00:00Z"), workers=1,
                         wait_for_workers=True) as service:
        (worker,) = service.worker_pids()
        host, port = urlsplit(service.base_url).hostname, urlsplit(service.base_url).port
        body = _json.dumps(request_body()).encode()
        request = (f"POST {SIGN} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
        with socket.create_connection((host, port), timeout=10) as conn:
            time.sleep(0.3)  # accepted by the worker, no request yet
            os.kill(worker, signal.SIGTERM)  # graceful stop, as gunicorn's max_requests restart
            time.sleep(0.3)
            conn.sendall(request)
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
