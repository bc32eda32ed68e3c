"""Issue 10 item 7: FHIR work is bounded. One pool of FHIR reads per process (not a pool per hook call), a total
deadline per read at which the socket is shut down (so an abandoned read keeps no thread and no socket), and
name resolution inside the time budget.

Real loopback servers that trickle or stall (tests/plugins/fault_server.py); open sockets are counted from
/proc/net/tcp (the client's side of every connection to the server's port); only the hanging DNS answer is
injected (a resolver function), as a loopback test cannot make the system resolver hang.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from cds_hooks_service import fhir_transport
from cds_hooks_service.fhir_client import FhirClient, FhirUnavailable
from tests.plugins import fault_server as fs

TOKEN = "tok-bounded-never-show"
KEYS = {k: f"{k}?patient=x" for k in ("Condition", "Observation", "Procedure", "MedicationRequest")}


def client_sockets_to(port: int) -> int:
    """Established TCP connections of this machine whose remote end is ``port`` on loopback: our side."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            remote, state = fields[2], fields[3]
            if state == "01" and int(remote.rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def fetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("fhir-fetch")]


def wait_until(predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_abandoned_reads_leave_no_threads_or_sockets(make_fault_server):
    """40 hook calls' worth of reads against a server that trickles its body for 5 s, with a 0.3 s budget:
    every call returns at its budget, and right after, no socket to the server is open and the reading threads
    are the pool's (the old code left 160 threads and 168 sockets reading for seconds)."""
    server = make_fault_server()
    server.default = fs.trickle(5)

    def one_call(_):
        t0 = time.monotonic()
        out = FhirClient(server.base_url, TOKEN).fetch_all(KEYS, budget=0.3)
        return time.monotonic() - t0, out

    with ThreadPoolExecutor(10) as callers:
        results = list(callers.map(one_call, range(40)))
    for elapsed, out in results:
        assert elapsed < 0.3 + 0.4, elapsed
        assert all(isinstance(v, FhirUnavailable) for v in out.values()), out
    assert server.requests, "the server was never asked: the test would mean nothing"
    assert wait_until(lambda: client_sockets_to(server.port) == 0, 0.5), client_sockets_to(server.port)
    assert len(fetch_threads()) <= fhir_transport.POOLS.max_workers
    assert fhir_transport.WATCHDOG.fired > 0  # the sockets were shut down at the deadline, not left to time out


def test_a_stalled_server_is_cut_at_the_deadline_too(make_fault_server):
    """No headers at all for 5 s: the socket is shut down at the budget, the thread is free at once."""
    server = make_fault_server()
    server.default = fs.slow(5)
    t0 = time.monotonic()
    out = FhirClient(server.base_url, TOKEN, read_timeout=10).fetch_all({"c": "Condition?patient=x"}, budget=0.3)
    assert time.monotonic() - t0 < 0.7 and isinstance(out["c"], FhirUnavailable)
    assert wait_until(lambda: client_sockets_to(server.port) == 0, 0.5)


def test_one_bounded_pool_per_process(make_fault_server):
    """With CDS_FHIR_MAX_CONCURRENCY=4, 12 simultaneous hook calls of 4 reads each never have more than 4
    reads at the server at once, and reads beyond what may wait are answered at once, not queued forever."""
    server = make_fault_server()
    lock, state = threading.Lock(), {"now": 0, "max": 0}

    def counted(h):
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        try:
            fs.slow(0.2)(h)
        finally:
            with lock:
                state["now"] -= 1
    server.default = counted
    before = fhir_transport.POOLS.max_workers
    fhir_transport.configure(4)
    try:
        with ThreadPoolExecutor(12) as callers:
            results = list(callers.map(
                lambda _: FhirClient(server.base_url, TOKEN).fetch_all(KEYS, budget=1.0), range(12)))
    finally:
        fhir_transport.configure(before)
    reasons = [v.reason for out in results for v in out.values() if isinstance(v, FhirUnavailable)]
    assert state["max"] <= 4, state
    assert "too many FHIR reads in progress" in reasons  # 48 reads > 4 running + 16 waiting
    assert any(not isinstance(v, FhirUnavailable) for out in results for v in out.values())


@pytest.mark.slow  # waits on a real time-out or runs a concurrency stress (tests/conftest.py)
def test_name_resolution_counts_against_the_budget():
    """A DNS server that does not answer: the call returns at its budget; the lookup thread is one of the few
    DNS threads, never the caller."""
    release = threading.Event()

    def hanging(host, port):
        release.wait(5)
        return ["93.184.216.34"]

    try:
        t0 = time.monotonic()
        out = FhirClient("https://slow-dns.example.org/fhir", TOKEN, resolver=hanging).fetch_all(
            {"c": "Condition?patient=x", "p": "Patient/x"}, budget=0.3)
        elapsed = time.monotonic() - t0
    finally:
        release.set()
    assert elapsed < 0.6, elapsed
    assert all(isinstance(v, FhirUnavailable) and "name resolution" in v.reason for v in out.values()), out


@pytest.mark.parametrize("budget", [0.0, -1.0])
def test_no_budget_left_means_no_lookup_and_no_connection(make_fault_server, budget):
    server = make_fault_server()
    calls = []
    out = FhirClient(f"http://fhir.example.org:{server.port}/fhir",
                     resolver=lambda h, p: calls.append(h) or ["127.0.0.1"]).fetch_all({"c": "Condition?x=1"},
                                                                                       budget=budget)
    assert isinstance(out["c"], FhirUnavailable) and calls == [] and server.requests == []


def test_a_trickling_https_server_is_cut_at_the_deadline(make_fault_server, tmp_path):
    """Over TLS too (the TLS socket replaces the plain one when it is wrapped): cut at the budget."""
    from tests.plugins.fault_server import tls_server

    server = tls_server(make_fault_server, tmp_path, "localhost")
    server.default = fs.trickle(5)
    client = FhirClient(f"https://localhost:{server.port}/fhir", TOKEN, ca_bundle=str(server.ca), read_timeout=10)
    fired = fhir_transport.WATCHDOG.fired
    t0 = time.monotonic()
    out = client.fetch_all({"c": "Condition?patient=x"}, budget=0.5)
    assert time.monotonic() - t0 < 0.9 and isinstance(out["c"], FhirUnavailable), out
    assert server.requests, "the request never reached the server: the test would mean nothing"
    assert wait_until(lambda: fhir_transport.WATCHDOG.fired > fired, 0.5)  # it was the watchdog that cut it
    assert wait_until(lambda: client_sockets_to(server.port) == 0, 0.5)


@pytest.mark.slow  # waits on a real time-out or runs a concurrency stress (tests/conftest.py)
def test_a_stalled_tls_handshake_ends_at_the_deadline():
    """A server that accepts the connection and never answers the TLS ClientHello. The connection's own timeout
    is longer than what is left of the budget (the TCP connect may have used most of it); the handshake still
    ends at the deadline. (It used to last the whole connection timeout: wrapping the socket for TLS detaches
    the plain socket the watchdog watches.)"""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []
    threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()
    conn = fhir_transport.PinnedHTTPSConnection("fhir.test", listener.getsockname()[1], pinned_ip="127.0.0.1",
                                                timeout=3.0)
    t0 = time.monotonic()
    try:
        with fhir_transport.deadline_scope(t0 + 0.3), pytest.raises(Exception):
            conn.connect()
        assert time.monotonic() - t0 < 1.5
    finally:
        conn.close()
        listener.close()
        for sock, _ in accepted:
            sock.close()


def test_a_hanging_name_does_not_starve_the_lookups_of_other_servers(make_fault_server):
    """One trusted FHIR server's DNS does not answer and its client keeps calling (8 hook calls in a row): the
    lookups of that one name share one DNS thread, so another client's server still resolves and is read.
    (Each call used to start its own lookup: the few DNS threads all hung on the one name.)"""
    import ipaddress

    server = make_fault_server()
    server.default = fs.bundle_of({})
    release = threading.Event()

    def resolver(host, port):
        if host == "slow-dns.example.org":
            release.wait(10)
            return ["93.184.216.34"]
        return ["127.0.0.1"]

    try:
        for _ in range(8):
            out = FhirClient("https://slow-dns.example.org/fhir", TOKEN, resolver=resolver).fetch_all(
                {"c": "Condition?patient=x"}, budget=0.1)
            assert "name resolution" in out["c"].reason
        out = FhirClient(f"http://fast.example.org:{server.port}/fhir", TOKEN, resolver=resolver,
                         private_networks=(ipaddress.ip_network("127.0.0.0/8"),)).fetch_all(
            {"c": "Condition?patient=x"}, budget=1.0)
    finally:
        release.set()
    assert not isinstance(out["c"], Exception), out
    assert len(server.requests) == 1
