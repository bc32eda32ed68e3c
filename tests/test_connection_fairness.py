"""Kept-alive connections take turns in a gevent worker (real gunicorn, production config, one worker).

A gevent greenlet yields only when a read would block. A client whose next request is already waiting when its
answer is written (a fast client under load, or one that pipelines) was served request after request while
every other connection of the worker waited: under wrk on a loaded machine, p99 of 0.3 to 4 s and time-outs at
32 connections (bench/README.md). After each answer on a kept-alive connection the worker now yields for one
pass of the event loop (gevent_worker.TURN). These tests count calls, they do not time them:

* one connection pipelining cannot hold the worker (it could, before);
* a kept-alive connection is not starved by connection-per-call traffic (it was, with a first fix that waited
  for an idle event loop);
* a graceful stop answers every call the application ran, also one sent right after the previous answer (a
  call could be run and its answer lost when the stop closed a connection whose next request had arrived).
"""
from __future__ import annotations

import http.client
import json
import random
import re
import signal
import socket
import threading
import time

import pytest

from tests.helpers import MIGRAINE, SIGN, request_body
from tests.plugins.gunicorn_service import GunicornService

PIPELINED = 200
ACETAMINOPHEN = {"drug": "198440", "text": "acetaminophen 500 mg tablet", "route": "oral"}  # no rule's drug
BODY = json.dumps(request_body(drafts=(ACETAMINOPHEN,), record=(MIGRAINE,))).encode()  # about 1 ms of work
HEADERS = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with GunicornService(tmp_path_factory.mktemp("fairness"), workers=1) as svc:
        yield svc


def _hook_call(query: str = "") -> bytes:
    """An order-sign call that triggers no rule: about a millisecond of work and a small answer ("cards": [])."""
    return (f"POST {SIGN}{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(BODY)}\r\n\r\n").encode() + BODY


def _read_answer(sock: socket.socket) -> bytes:
    """One whole answer (headers and a Content-Length body) from a blocking socket; returns its head."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before an answer"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-answer"
        body += chunk
    return head


def _read_waiting(sock: socket.socket) -> bytes:
    """What has arrived on ``sock``, read without waiting (on a socket with a time-out Python would wait for
    more data even with MSG_DONTWAIT, so the socket is made non-blocking for the read)."""
    timeout = sock.gettimeout()
    sock.setblocking(False)
    data = b""
    try:
        while True:
            try:
                chunk = sock.recv(1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            data += chunk
    finally:
        sock.settimeout(timeout)
    return data


def _keepalive() -> int:
    """gunicorn.conf.py's keepalive (seconds), read from the file: importing it would monkey-patch this process."""
    from tests.plugins.gunicorn_service import REPO

    return int(re.search(r"^keepalive = (\d+)", (REPO / "gunicorn.conf.py").read_text(), re.M).group(1))


def _connect(port: int, receive_buffer: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer:  # set before connecting: the TCP window is agreed then
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    return sock


def _pipelining_trial(port: int, call: bytes) -> tuple[int, int] | None:
    """(A's answers that arrived after B sent its call and before B's answer, A's answers in all so far), or None
    when most of A's calls were answered before B could send (the test process was held up: no verdict)."""
    # A's answers stay unread while B waits: the receive buffer holds them all, so that A's greenlet never
    # waits to write (which would make it yield, fix or no fix).
    with _connect(port, 4 * PIPELINED * 1024) as a, _connect(port) as b:
        for sock in (a, b):  # both connections accepted, their greenlets waiting for a next request
            sock.sendall(call)
            assert _read_answer(sock).startswith(b"HTTP/1.1 200")
        a.sendall(call * PIPELINED)
        data = b""
        while b"HTTP/1.1 " not in data:  # A's greenlet is serving its calls one after the other
            chunk = a.recv(65536)
            assert chunk, "A's connection closed"
            data += chunk
        data += _read_waiting(a)
        before = data.count(b"HTTP/1.1 ")
        if before > PIPELINED // 2:
            return None
        b.sendall(call)
        assert _read_answer(b).startswith(b"HTTP/1.1 200")
        data += _read_waiting(a)
        assert len(data) < a.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2, "A's answers filled its buffer"
    assert data.count(b"HTTP/1.1 200 OK") == data.count(b"HTTP/1.1 "), data[:2000]
    return data.count(b"HTTP/1.1 ") - before, data.count(b"HTTP/1.1 ")


def test_a_connection_whose_requests_are_always_waiting_does_not_hold_the_worker(service):
    call = _hook_call()
    for _ in range(3):
        trial = _pipelining_trial(service.port, call)
        if trial is not None:
            break
    else:
        pytest.fail("in three trials most of A's calls were answered before B could send one: the test process "
                    "was held up for 100 ms or more each time")
    while_b_waited, in_all = trial
    # Before the fix all of A's calls were answered before B's. With turns, B waits for the call A's greenlet is
    # on and, on a busy machine, a few more.
    assert while_b_waited <= 10, f"B was answered only after {while_b_waited} more of A's calls ({in_all} in all)"


def test_a_kept_alive_connection_gets_its_turns_under_connection_per_call_traffic(service):
    """K calls one after the other on one kept-alive connection while 4 threads call on a new connection each
    time. With turns each ready connection is served once per pass of the event loop, so K gets about as many
    calls through as one of the threads. (A first fix waited for an idle event loop, which a saturated worker
    never has: K got 5 calls through in 4 s while the others made 3,500.)"""
    threads, seconds = 4, 1.5
    stop = time.monotonic() + seconds
    others: list[int] = []

    def background():
        n = 0
        while time.monotonic() < stop:
            conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=30)
            conn.request("POST", SIGN, BODY, {**HEADERS, "Connection": "close"})
            assert conn.getresponse().read()
            conn.close()
            n += 1
        others.append(n)

    pool = [threading.Thread(target=background) for _ in range(threads)]
    for t in pool:
        t.start()
    k, calls = http.client.HTTPConnection("127.0.0.1", service.port, timeout=30), 0
    try:
        while time.monotonic() < stop:
            k.request("POST", SIGN, BODY, HEADERS)
            response = k.getresponse()
            assert response.status == 200 and response.read()
            calls += 1
    finally:
        k.close()
        for t in pool:
            t.join()
    per_thread = sum(others) / threads
    assert calls >= per_thread / 4, f"K made {calls} calls while each other thread made {per_thread:.0f}"


def test_a_graceful_stop_answers_every_call_it_ran(tmp_path):
    """A client calls on one kept-alive connection, each call sent as soon as the previous answer is in, while
    the master gets SIGTERM. Every call the application ran (the access log) must have been answered: the last
    answer carries "Connection: close", or the connection ends before a call that was not run (the client may
    send it again). Before, a stop could close a connection whose next request had just arrived: the call was
    run and its answer lost (4 of 10 stops with two other clients calling). Three stops, at a random moment
    each, with two other clients calling on a new connection each time."""
    svc = GunicornService(tmp_path, workers=1, access_log_format="%(m)s %(U)s %(q)s")

    def background(until: threading.Event):
        while not until.is_set():
            try:
                other = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=30)
                other.request("POST", SIGN, BODY, {**HEADERS, "Connection": "close"})
                other.getresponse().read()
                other.close()
            except (OSError, http.client.HTTPException):
                time.sleep(0.01)  # the service is stopping

    for attempt in range(3):
        svc.start()
        done = threading.Event()
        others = [threading.Thread(target=background, args=(done,)) for _ in range(2)]
        try:
            for t in others:
                t.start()
            timer = threading.Timer(0.3 + random.random() * 0.4, lambda: svc.proc.send_signal(signal.SIGTERM))
            timer.start()
            conn, n, lost = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=30), 0, None
            while True:
                n += 1
                try:
                    conn.request("POST", f"{SIGN}?call={attempt}-{n}", BODY, HEADERS)
                    response = conn.getresponse()
                    assert response.status == 200 and response.read()
                except (http.client.RemoteDisconnected, ConnectionError):
                    lost = n
                    break
                if (response.getheader("Connection") or "").lower() == "close":
                    break
            timer.join()
            svc.proc.wait(30)
        finally:
            done.set()
            for t in others:
                t.join()
            svc.stop()
        if lost is not None:
            ran = re.search(rf"call={attempt}-{lost}\b", svc.access_log())
            assert not ran, f"stop {attempt + 1}: call {lost} was run by the service and its answer lost"


def test_a_stop_during_a_connections_turn_closes_it_at_the_end_of_the_turn(tmp_path):
    """A stop that comes while a kept-alive connection has its turn (after an answer, before the socket counts as
    idle) closes that connection when the turn ends. Before, the connection was left open and its greenlet waited
    for a next request up to `keepalive`, holding the worker's exit. The turn is lengthened to LONG_TURN seconds
    (a subclass) so that the stop lands inside it. A connection whose next request is sent during the turn, and
    one that pipelined two calls in one write (the second already in gunicorn's read buffer, none on the socket),
    get that next call answered, with "Connection: close" (a first version of the change closed the pipelining
    connection after the service had run its second call: the answer was lost). A connection whose turn was
    over is closed at once, with nothing sent and nothing logged as an error (a version that killed idle
    greenlets made gunicorn answer them with a 500 and log a traceback)."""
    from tests.plugins.worker_classes import LONG_TURN

    keepalive = _keepalive()
    svc = GunicornService(tmp_path, workers=1, wait_for_workers=True,
                          args=("--worker-class", "tests.plugins.worker_classes.LongTurnWorker"))
    svc.start()
    try:
        waiting = _connect(svc.port)  # its turn is over when the stop comes: idle, closed at once
        waiting.sendall(_hook_call())
        assert b" 200 " in _read_answer(waiting).split(b"\r\n")[0]
        time.sleep(LONG_TURN + 0.3)
        idle, busy, piped = _connect(svc.port), _connect(svc.port), _connect(svc.port)
        for sock in (idle, busy):
            sock.sendall(_hook_call())
            assert b" 200 " in _read_answer(sock).split(b"\r\n")[0]
        answered = time.monotonic()  # both connections are in their turn now
        piped.sendall(_hook_call() + _hook_call())
        assert b" 200 " in _read_answer(piped).split(b"\r\n")[0]  # the second waits for the end of the turn
        svc.proc.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        waiting.settimeout(30)
        assert waiting.recv(1) == b"", "the connection idle at the stop got data (an answer it did not ask for?)"
        waiting_closed_after = time.monotonic() - stopped
        time.sleep(0.3)
        busy.sendall(_hook_call())  # arrives during its turn, after the stop
        for sock in (busy, piped):
            head = _read_answer(sock)
            assert b" 200 " in head.split(b"\r\n")[0] and b"connection: close" in head.lower()
        idle.settimeout(30)
        assert idle.recv(1) == b"", "the idle connection got data instead of being closed"
        closed_after = time.monotonic() - answered
        svc.proc.wait(30)
        exited_after = time.monotonic() - answered
    finally:
        svc.stop()
    assert waiting_closed_after < 1, f"a connection idle at the stop was closed {waiting_closed_after:.1f} s later"
    assert "Error handling" not in svc.log() and "Traceback" not in svc.log(), svc.log_tail()
    limit = LONG_TURN + keepalive / 2  # the old code: LONG_TURN + keepalive
    assert closed_after < limit, f"closed {closed_after:.1f} s after the answer (turn {LONG_TURN} s)"
    assert exited_after < limit, f"the service exited {exited_after:.1f} s after the answer"


def test_a_call_arriving_as_a_stop_checks_its_idle_connection_is_answered_or_not_run(tmp_path):
    """A graceful stop checks each connection idle between two requests and ends it unless its next request has
    arrived. A request arriving just as that check runs must not be read afterwards: it would be run and its
    answer lost (the socket was shut). The race is microseconds wide in production; a worker subclass whose
    check takes BLIND_FOR seconds and misses what arrives meanwhile makes it certain. The call is either
    answered or not run (the access log), never run and unanswered: the stop now ends the connection's greenlet
    where it waits, in the same step of the event loop as the check."""
    svc = GunicornService(tmp_path, workers=1, wait_for_workers=True, access_log_format="%(m)s %(U)s %(q)s",
                          args=("--worker-class", "tests.plugins.worker_classes.BlindStopCheckWorker"))
    svc.start()
    try:
        conn = _connect(svc.port)
        conn.sendall(_hook_call())
        assert b" 200 " in _read_answer(conn).split(b"\r\n")[0]
        time.sleep(0.3)  # its turn is over: idle, waiting for its next request
        svc.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)  # the stop's check of the connection is running (BLIND_FOR)
        try:
            conn.sendall(_hook_call("?call=late"))
        except OSError:
            pass  # already closed: the call cannot have run
        data = b""
        conn.settimeout(30)
        try:
            while chunk := conn.recv(65536):
                data += chunk
        except OSError:  # reset: closed with the call unread
            pass
        svc.proc.wait(30)
    finally:
        svc.stop()
    ran = "call=late" in svc.access_log()
    assert b" 200 " in data or not ran, "the service ran the call that arrived as the stop checked its " \
                                         "connection, and its answer was lost"
    assert "Error handling" not in svc.log() and "Traceback" not in svc.log(), svc.log_tail()


def test_a_worker_stopping_after_max_requests_closes_its_idle_connections(tmp_path):
    """gunicorn's max_requests restarts a worker without a signal (it only marks the worker as no longer alive):
    its kept-alive connections idle between requests are closed as at a graceful stop, not left to time out
    after `keepalive` seconds while the worker cannot exit."""
    keepalive = _keepalive()
    svc = GunicornService(tmp_path, workers=1, wait_for_workers=True, args=("--max-requests", "6"))
    svc.start()  # (its readiness checks are the worker's first requests: one or two)
    try:
        waiting, last = _connect(svc.port), _connect(svc.port)
        waiting.sendall(_hook_call())
        assert b" 200 " in _read_answer(waiting).split(b"\r\n")[0]
        time.sleep(0.3)  # idle between two requests
        for _ in range(6):  # until the worker's last request
            last.sendall(_hook_call())
            head = _read_answer(last)
            assert b" 200 " in head.split(b"\r\n")[0]
            if b"connection: close" in head.lower():
                break
        else:
            raise AssertionError("the worker did not stop after --max-requests")
        answered = time.monotonic()
        waiting.settimeout(30)
        assert waiting.recv(1) == b""
        closed_after = time.monotonic() - answered
    finally:
        svc.stop()
    assert closed_after < keepalive / 2, f"the idle connection was closed {closed_after:.1f} s after the last answer"
    assert "Error handling" not in svc.log() and "Traceback" not in svc.log(), svc.log_tail()
