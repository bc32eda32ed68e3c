"""Keep-alive connections take turns in a gevent worker (real gunicorn, production config, one worker).

A gevent greenlet yields only when a read would block. A client whose next request is already waiting when its
answer is written (a fast client under load, or one that pipelines) was served request after request while
every other connection of the worker waited: under wrk on a loaded machine, p99 of 0.3 to 4 s and time-outs at
32 connections (bench/README.md). The worker now waits for the event loop to poll the other connections after
each answer (gevent_worker.GeventWorker.handle_request).

The test counts, it does not time: connection A sends many hook calls in one write (HTTP/1.1 pipelining, so
its next request is always there when an answer is written); once A's first answer is back, connection B sends
one. B's answer must come after a few more of A's, not after all of them.
"""
from __future__ import annotations

import json
import socket

import pytest

from tests.helpers import MIGRAINE, SIGN, request_body
from tests.plugins.gunicorn_service import GunicornService

PIPELINED = 200
ACETAMINOPHEN = {"drug": "198440", "text": "acetaminophen 500 mg tablet", "route": "oral"}  # no rule's drug


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with GunicornService(tmp_path_factory.mktemp("fairness"), workers=1) as svc:
        yield svc


def _hook_call() -> bytes:
    """An order-sign call that triggers no rule: about a millisecond of work and a small answer ("cards": []),
    so that all the answers fit in the sockets' buffers (a full buffer would make A's greenlet wait, and so
    yield, whatever the worker does)."""
    body = json.dumps(request_body(drafts=(ACETAMINOPHEN,), record=(MIGRAINE,))).encode()
    return (f"POST {SIGN} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


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


def test_a_connection_whose_requests_are_always_waiting_does_not_hold_the_worker(service):
    call = _hook_call()
    with socket.create_connection(("127.0.0.1", service.port), timeout=30) as a, \
            socket.create_connection(("127.0.0.1", service.port), timeout=30) as b:
        for sock in (a, b):  # both connections accepted, their greenlets waiting for a next request
            sock.sendall(call)
            assert _read_answer(sock).startswith(b"HTTP/1.1 200")
        a.sendall(call * PIPELINED)
        data = b""
        while b"HTTP/1.1 " not in data:  # A's greenlet is serving its calls one after the other
            chunk = a.recv(65536)
            assert chunk, "A's connection closed"
            data += chunk
        b.sendall(call)
        assert _read_answer(b).startswith(b"HTTP/1.1 200")
        data += _read_waiting(a)
    served_before_b = data.count(b"HTTP/1.1 ")
    assert data.count(b"HTTP/1.1 200 OK") == served_before_b, data[:2000]
    # Before the fix all PIPELINED answers of A went out before B's. With turns, B waits for the call A's greenlet
    # is on and, on a busy machine, a few more; never for most of them.
    assert served_before_b < PIPELINED // 4, f"B was answered only after {served_before_b} of A's {PIPELINED} calls"
