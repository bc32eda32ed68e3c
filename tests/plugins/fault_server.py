"""A misbehaving FHIR server: a real HTTP server on loopback whose answer the test chooses per resource type.

Fixtures (function-scoped: a fresh server and a fresh request log per test):
  fault_server        `FaultServer`; `.base_url` ends in /fhir; `.route(type, behaviour)` or `.default = behaviour`
  make_fault_server   factory for more servers (e.g. a "foreign origin" a next link points to)

A behaviour is a callable `behaviour(h)` given the request handler `h` (an `http.server.BaseHTTPRequestHandler`
with `.rtype` = first path segment after /fhir, `.fault_server`, and the helpers `reply`/`reply_json`). The
functions in this module build the common ones: `json_reply`, `status`, `html`, `slow`, `trickle`,
`truncated`, `cut_connection`, `huge_body`, `wrong_entries`, `bundle_of`, `self_next_link`, `endless_pages`,
`next_link_to`, `proxy_to`. Every request is recorded (path with query, Authorization header) in `.requests`.

The server speaks HTTP/1.0 (one request per connection), so a test can cut a connection or lie about
Content-Length without upsetting the next request. Handlers that sleep wait on `.released`, which is set at
teardown, so no thread outlives the test for long.
"""
from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest
import requests

Behaviour = Callable[["_Handler"], None]


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str  # path and query, as received
    rtype: str
    authorization: str | None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    server: "_Server"

    def log_message(self, *args) -> None:  # quiet: pytest shows the assertions
        pass

    @property
    def fault_server(self) -> "FaultServer":
        return self.server.owner

    @property
    def rtype(self) -> str:
        path = urlsplit(self.path).path
        prefix = urlsplit(self.fault_server.base_url).path
        rest = path[len(prefix):] if path.startswith(prefix) else path
        return rest.strip("/").split("/")[0]

    def do_GET(self) -> None:  # http.server's naming
        owner = self.fault_server
        owner.requests.append(Recorded("GET", self.path, self.rtype, self.headers.get("Authorization")))
        behaviour = owner.routes.get(self.rtype, owner.default)
        try:
            behaviour(self)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (time budget, size limit): expected

    def reply(self, status: int, body: bytes, content_type: str = "application/fhir+json", *,
              headers: dict | None = None, length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def reply_json(self, doc, status: int = 200, **kw) -> None:
        self.reply(status, json.dumps(doc).encode(), **kw)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: "FaultServer"

    def handle_error(self, request, client_address) -> None:  # a client that hung up is not a test failure
        pass


class FaultServer:
    def __init__(self):
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self.port = self._httpd.server_address[1]
        self.origin = f"http://127.0.0.1:{self.port}"
        self.base_url = f"{self.origin}/fhir"
        self.routes: dict[str, Behaviour] = {}
        self.default: Behaviour = status(404)
        self.requests: list[Recorded] = []
        self.released = threading.Event()
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"fault-server-{self.port}", daemon=True)
        self._thread.start()

    def route(self, rtype: str, behaviour: Behaviour) -> "FaultServer":
        self.routes[rtype] = behaviour
        return self

    def requested_types(self) -> set[str]:
        return {r.rtype for r in self.requests}

    def close(self) -> None:
        self.released.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    def __repr__(self) -> str:
        return f"FaultServer({self.base_url!r})"


def closed_port_url() -> str:
    """A loopback URL nobody listens on: connecting is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/fhir"


# ---------------------------------------------------------------- behaviours

def searchset(resources: list[dict], next_url: str | None = None) -> dict:
    b = {"resourceType": "Bundle", "type": "searchset", "total": len(resources),
         "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources]}
    if next_url:
        b["link"] = [{"relation": "next", "url": next_url}]
    return b


def json_reply(doc, code: int = 200) -> Behaviour:
    return lambda h: h.reply_json(doc, code)


def bundle_of(resources_by_type: dict[str, list[dict]]) -> Behaviour:
    """A well-behaved server: a searchset of the given resources for the searched type (empty otherwise)."""
    return lambda h: h.reply_json(searchset(resources_by_type.get(h.rtype, [])))


def status(code: int, body: bytes = b"", content_type: str = "text/plain", headers: dict | None = None) -> Behaviour:
    return lambda h: h.reply(code, body, content_type, headers=headers)


def html(code: int = 200) -> Behaviour:
    page = b"<!DOCTYPE html><html><head><title>Sign in</title></head><body><form>Login</form></body></html>"
    return status(code, page, "text/html; charset=utf-8")


def slow(seconds: float, then: Behaviour | None = None) -> Behaviour:
    """Nothing at all (not even headers) for `seconds`, then `then` (an empty searchset by default)."""
    def behaviour(h):
        h.fault_server.released.wait(seconds)
        (then or bundle_of({}))(h)
    return behaviour


def trickle(seconds: float) -> Behaviour:
    """Headers at once, then the body one byte at a time spread over `seconds` (each read is quick)."""
    def behaviour(h):
        body = json.dumps(searchset([])).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/fhir+json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        for i in range(len(body)):
            if h.fault_server.released.wait(seconds / len(body)):
                return
            h.wfile.write(body[i:i + 1])
            h.wfile.flush()
    return behaviour


def truncated(cut_connection_midway: bool) -> Behaviour:
    """A JSON body cut short: either the connection drops before Content-Length bytes arrived, or a complete
    HTTP message whose JSON is cut."""
    def behaviour(h):
        body = json.dumps(searchset([{"resourceType": h.rtype, "id": f"x{i}"} for i in range(50)])).encode()
        part = body[: len(body) // 2]
        if cut_connection_midway:
            h.reply(200, part, length=len(body))  # promises the whole body, then the connection closes
        else:
            h.reply(200, part)
    return behaviour


def cut_connection(h) -> None:
    """The connection is closed without any answer."""
    h.close_connection = True
    h.connection.shutdown(socket.SHUT_RDWR)


def huge_body(size: int) -> Behaviour:
    """`size` bytes of body (whitespace: valid JSON padding), streamed."""
    def behaviour(h):
        h.send_response(200)
        h.send_header("Content-Type", "application/fhir+json")
        h.send_header("Content-Length", str(size))
        h.end_headers()
        chunk = b" " * (1 << 20)
        sent = 0
        while sent < size:
            n = min(len(chunk), size - sent)
            h.wfile.write(chunk[:n])
            sent += n
    return behaviour


def many_entries(n: int) -> Behaviour:
    return lambda h: h.reply_json(searchset([{"resourceType": h.rtype, "id": f"r{i}"} for i in range(n)]))


def wrong_entries(rtype: str = "Patient") -> Behaviour:
    """A searchset whose match entries are of another type than the one searched for."""
    return lambda h: h.reply_json(searchset([{"resourceType": rtype, "id": f"p{i}"} for i in range(3)]))


def single_resource(h) -> None:
    """The searched type itself, not a Bundle."""
    h.reply_json({"resourceType": h.rtype, "id": "lone"})


def self_next_link(h) -> None:
    """Every page links to itself as the next page."""
    h.reply_json(searchset([], next_url=h.fault_server.origin + h.path))


def endless_pages(h) -> None:
    """Every page links to a new page."""
    n = int(urlsplit(h.path).query.rsplit("page=", 1)[-1]) if "page=" in h.path else 0
    h.reply_json(searchset([], next_url=f"{h.fault_server.base_url}/{h.rtype}?page={n + 1}"))


def next_link_to(other_origin: str) -> Behaviour:
    """A first page whose next link points to another origin (same path)."""
    return lambda h: h.reply_json(searchset([], next_url=other_origin + h.path))


def proxy_to(upstream_base: str) -> Behaviour:
    """Pass the request on to a real FHIR server (with the same Authorization header); its base URL in the
    answer (e.g. next links) is rewritten to ours."""
    def behaviour(h):
        prefix = urlsplit(h.fault_server.base_url).path
        rest = h.path[len(prefix):]
        headers = {"Accept": h.headers.get("Accept", "application/fhir+json")}
        if h.headers.get("Authorization"):
            headers["Authorization"] = h.headers["Authorization"]
        resp = requests.get(upstream_base + rest, headers=headers, timeout=10)
        body = resp.content.replace(upstream_base.encode(), h.fault_server.base_url.encode())
        h.reply(resp.status_code, body, resp.headers.get("Content-Type", "application/fhir+json"))
    return behaviour


# ---------------------------------------------------------------- fixtures

@pytest.fixture
def make_fault_server():
    servers: list[FaultServer] = []

    def make() -> FaultServer:
        server = FaultServer()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def fault_server(make_fault_server) -> FaultServer:
    return make_fault_server()


# -- TLS (tests/test_ssrf.py, tests/test_fhir_bounded.py) ---------------------------------------------------
def self_signed_certificate(tmp_path, name: str):
    """A self-signed certificate (its own CA) for ``name`` and its key, as PEM files in ``tmp_path``."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def tls_server(make_fault_server, tmp_path, name):
    """The fault server behind TLS with a certificate for ``name`` (only); records the SNI it was sent."""
    import ssl

    server = make_fault_server()
    cert, key = self_signed_certificate(tmp_path, name)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.sni = []
    context.sni_callback = lambda sock, name, ctx: server.sni.append(name)
    httpd = server._httpd
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    server.ca = cert
    return server
