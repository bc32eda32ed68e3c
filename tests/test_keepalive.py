"""Kept-alive connections survive answers given before the body was read (real gunicorn, production config).

EHRs reuse connections. gunicorn drains at most 64 KiB of a body the application did not read, and
otherwise drops a connection it had just announced as keep-alive: the client's NEXT call on it then fails
(RemoteDisconnected). So the service reads the rest of an unread body itself; a body over the size limit
(413, never read) is answered with "Connection: close" instead.
"""
from __future__ import annotations

import http.client
import io
import json
import socket

import pytest

from tests.plugins.gunicorn_service import GunicornService

BIG = 130_000  # larger than gunicorn's 64 KiB drain
LIMIT = 400_000


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("keepalive")
    with GunicornService(tmp, dict(CDS_MAX_BODY_BYTES=str(LIMIT)), workers=1) as svc:
        yield svc.port


def _call(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None,
          content_type: str = "application/json"):
    conn.request(method, path, body=body, headers={"Content-Type": content_type})
    response = conn.getresponse()
    return response.status, response.getheader("Connection"), response.read()


BODY = json.dumps({"padding": "x" * BIG}).encode()


@pytest.mark.parametrize("method, path, content_type, status", [
    ("POST", "/cds-services/no-such-service", "application/json", 404),
    ("POST", "/cds-services/migraine-med-safety-sign", "text/plain", 415),
    ("PUT", "/cds-services/migraine-med-safety-sign", "application/json", 405),
    ("POST", "/cds-services/no-such-service/feedback", "application/json", 404),
])
def test_an_early_error_keeps_the_connection_usable(service, method, path, content_type, status):
    conn = http.client.HTTPConnection("127.0.0.1", service, timeout=5)
    try:
        for _ in range(2):  # twice on the same connection, then a normal call on it
            got, connection, body = _call(conn, method, path, BODY, content_type)
            assert got == status, body
            assert connection == "keep-alive"
            assert json.loads(body)["resourceType"] == "OperationOutcome"
        assert _call(conn, "GET", "/cds-services")[0] == 200
    finally:
        conn.close()


def test_a_body_over_the_limit_is_answered_413_with_connection_close(service):
    conn = http.client.HTTPConnection("127.0.0.1", service, timeout=5)
    try:
        got, connection, body = _call(conn, "POST", "/cds-services/migraine-med-safety-sign", b"[" + b" " * LIMIT + b"]")
        assert got == 413
        assert connection == "close"
        assert "larger than the limit" in json.loads(body)["issue"][0]["details"]["text"]
    finally:
        conn.close()
    fresh = http.client.HTTPConnection("127.0.0.1", service, timeout=5)  # the service itself is fine
    assert _call(fresh, "GET", "/cds-services")[0] == 200
    fresh.close()


def test_a_client_that_stops_sending_mid_body_gets_the_early_answer_not_a_500(service):
    with socket.create_connection(("127.0.0.1", service), timeout=5) as sock:
        sock.sendall(b"POST /cds-services/no-such-service HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000\r\n\r\n" + b"x" * 1000)
        sock.shutdown(socket.SHUT_WR)  # promised 100000 bytes, sent 1000
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 404"), answer[:200]


def test_in_process_a_body_shorter_than_its_content_length_still_gets_the_early_answer(client):
    """WSGI servers that do not mark their input terminated (werkzeug's own) raise ClientDisconnected when
    the body ends early; the drain must not turn the 404 into a 500."""
    r = client.post("/cds-services/no-such-service", content_type="application/json",
                    environ_overrides={"wsgi.input": io.BytesIO(b"x" * 1000), "CONTENT_LENGTH": "100000"})
    assert r.status_code == 404
    assert r.get_json()["issue"][0]["code"] == "not-found"
