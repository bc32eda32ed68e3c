"""How the service talks to a FHIR server: a pinned address, a hard deadline, one bounded pool per process.

* :class:`PinnedAdapter` (a requests transport adapter) sends every request of one FHIR client to the one
  address that was resolved and checked (fhir_servers.pick_address), whatever host the request URL seems to
  name; TLS still verifies the certificate against the server's name and sends it as SNI, and the Host
  header stays the name. Before sending, the URL is parsed again with urllib3's parser and must name the
  same scheme, host and port, without user info; so no URL trick (``http://OTHER\\@SAME/``) reaches another
  host, and DNS is never asked again after the check (no DNS-rebinding window).
* :func:`deadline_scope`: every socket opened or used inside it is shut down when the deadline passes (one
  watchdog thread per process), so a server that trickles its answer cannot keep a thread or a socket
  beyond the time budget.
* :func:`submit`: the one bounded pool of FHIR reads of this process (``CDS_FHIR_MAX_CONCURRENCY`` threads,
  at most 4x that many reads waiting); :func:`resolve`: name resolution on a small pool of its own, waited
  for only until the deadline.
"""
from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from requests.adapters import HTTPAdapter
from urllib3 import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import ConnectTimeoutError, LocationParseError, NewConnectionError
from urllib3.util import parse_url

from . import fhir_servers
from .fhir_servers import DEFAULT_PORTS, FhirServerRefused, Resolver, Target, pick_address

DEFAULT_MAX_CONCURRENCY = 16
DNS_THREADS = 4


# ---------------------------------------------------------------- urllib3's DEBUG lines

class _WithholdRequestTargets(logging.Filter):
    """urllib3 logs every request line at DEBUG ('http://host:port "GET /fhir/Condition?patient=<id> HTTP/1.1"
    200 512'): FHIR paths and queries carry patient ids, so they are withheld whatever level an operator sets
    (hosts, ports and status codes stay)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(a, str) and ("/" in a or "?" in a) for a in record.args):
            record.args = tuple(_withheld(a) if isinstance(a, str) else a for a in record.args)
        return True


def _withheld(text: str) -> str:
    if text.startswith(("/", "?")):
        return "(path withheld)"
    if "://" in text:  # a whole URL (redirect and retry lines): keep its origin
        scheme, _, rest = text.partition("://")
        return f"{scheme}://{rest.split('/', 1)[0].split('?', 1)[0]}/(path withheld)"
    return text


logging.getLogger("urllib3.connectionpool").addFilter(_WithholdRequestTargets())


# ---------------------------------------------------------------- the deadline watchdog

class _Watchdog:
    """Shuts down registered sockets at their deadlines (a blocked recv then returns at once)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._live: dict[int, socket.socket] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self.fired = 0  # sockets shut down at their deadline (tests and logs)

    def watch(self, sock: socket.socket, deadline: float) -> int:
        with self._cond:
            if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="fhir-deadline", daemon=True)
                self._thread.start()
            token = next(self._ids)
            self._live[token] = sock
            heapq.heappush(self._heap, (deadline, token))
            self._cond.notify()
            return token

    def unwatch(self, token: int) -> None:
        with self._cond:
            self._live.pop(token, None)

    def _run(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0][1] not in self._live:
                    heapq.heappop(self._heap)  # finished in time
                if not self._heap:
                    self._cond.wait()
                    continue
                left = self._heap[0][0] - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                _, token = heapq.heappop(self._heap)
                sock = self._live.pop(token, None)
                if sock is not None:
                    self.fired += 1
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)


WATCHDOG = _Watchdog()
_scope = threading.local()


@contextlib.contextmanager
def deadline_scope(deadline: float):
    """Sockets this thread opens or sends on inside the block are shut down at ``deadline``."""
    _scope.deadline, _scope.tokens, _scope.socks = deadline, [], set()
    try:
        yield
    finally:
        for token in _scope.tokens:
            WATCHDOG.unwatch(token)
        _scope.deadline, _scope.tokens, _scope.socks = None, [], set()


def _watch(sock: socket.socket | None) -> None:
    deadline = getattr(_scope, "deadline", None)
    if sock is None or deadline is None or id(sock) in _scope.socks:
        return
    _scope.socks.add(id(sock))
    _scope.tokens.append(WATCHDOG.watch(sock, deadline))


def _bound_handshake(sock: socket.socket) -> None:
    """A socket's timeout is per operation, but Python's TLS handshake counts it as one total: clamped to what
    is left before the deadline, the handshake ends by then (the watchdog cannot reach it: wrapping the socket
    for TLS detaches the plain socket it watches)."""
    deadline = getattr(_scope, "deadline", None)
    if deadline is None:
        return
    left = max(deadline - time.monotonic(), 0.001)
    current = sock.gettimeout()
    if current is None or current > left:
        sock.settimeout(left)


class _WatchedMixin:
    """Sockets of a plain (not pinned) connection, watched like the pinned ones: for the JWKS fetches."""

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _bound_handshake(sock)
        _watch(sock)
        return sock

    def connect(self) -> None:
        super().connect()
        _watch(self.sock)

    def request(self, *args, **kwargs):
        _watch(self.sock)
        return super().request(*args, **kwargs)


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = type("WatchedHTTPConnection", (_WatchedMixin, HTTPConnection), {})


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = type("WatchedHTTPSConnection", (_WatchedMixin, HTTPSConnection), {})


class WatchedAdapter(HTTPAdapter):
    """A requests adapter whose sockets are shut down at the :func:`deadline_scope` deadline (no pinning: for
    an operator-configured URL such as an issuer's ``jwks_url``)."""

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


# ---------------------------------------------------------------- pinned connections

class _PinnedMixin:
    """Connects to ``pinned_ip`` instead of resolving ``host``; ``host`` stays for Host, SNI and the
    certificate check."""

    def __init__(self, *args, pinned_ip: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.pinned_ip = pinned_ip

    def _new_conn(self) -> socket.socket:
        try:
            sock = socket.create_connection((self.pinned_ip, self.port), self.timeout)
        except socket.timeout as e:
            raise ConnectTimeoutError(self, f"connect timed out (timeout={self.timeout})") from e
        except OSError as e:
            raise NewConnectionError(self, f"failed to connect: {type(e).__name__}") from e
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _bound_handshake(sock)
        _watch(sock)
        return sock

    def connect(self) -> None:
        super().connect()
        _watch(self.sock)  # https: the TLS socket that replaced (detached) the plain one

    def request(self, *args, **kwargs):
        _watch(self.sock)  # a kept-alive connection taken from the pool
        return super().request(*args, **kwargs)


class PinnedHTTPConnection(_PinnedMixin, HTTPConnection):
    pass


class PinnedHTTPSConnection(_PinnedMixin, HTTPSConnection):
    pass


class _PinnedHTTPPool(HTTPConnectionPool):
    ConnectionCls = PinnedHTTPConnection


class _PinnedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = PinnedHTTPSConnection


_pools: OrderedDict[tuple, HTTPConnectionPool] = OrderedDict()
_pools_lock = threading.Lock()
MAX_POOLS = 32


def _pool_for(target: Target, ip: str, verify: object = True) -> HTTPConnectionPool:
    """One keep-alive pool per (scheme, host, port, address, certificate check): a connection is only reused
    for the address it was opened to and under the CA bundle that verified it."""
    key = (target.scheme, target.host, target.port, ip, str(verify), os.getpid())
    with _pools_lock:
        pool = _pools.get(key)
        if pool is not None:
            _pools.move_to_end(key)
            return pool
        cls = _PinnedHTTPSPool if target.scheme == "https" else _PinnedHTTPPool
        pool = cls(target.host, target.port, maxsize=4, block=False, retries=False, pinned_ip=ip)
        _pools[key] = pool
        while len(_pools) > MAX_POOLS:
            _, old = _pools.popitem(last=False)
            old.close()
        return pool


class RequestRefused(Exception):
    """The request URL does not name the pinned server."""


if not hasattr(HTTPAdapter, "get_connection_with_tls_context"):  # the hook this adapter pins the address with
    raise ImportError("requests >= 2.32.2 is required (HTTPAdapter.get_connection_with_tls_context)")


class PinnedAdapter(HTTPAdapter):
    """A requests adapter that sends everything to one checked address of one FHIR server."""

    def __init__(self, target: Target, ip: str):
        super().__init__(max_retries=0)
        self.target, self.ip = target, ip

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
        return _pool_for(self.target, self.ip, verify)

    def send(self, request, stream=False, timeout=None, verify=True, cert=None, proxies=None):
        try:
            u = parse_url(request.url)
        except LocationParseError:
            raise RequestRefused("unparseable URL") from None
        scheme = (u.scheme or "").lower()
        host = (u.host or "").lower().strip("[]").rstrip(".")
        if (u.auth is not None or scheme != self.target.scheme or host != self.target.host
                or (u.port or DEFAULT_PORTS.get(scheme)) != self.target.port):
            raise RequestRefused("URL does not name the checked FHIR server")
        # request.url is the URL as it goes on the wire (requests has decoded %2e to "." by now); urllib3's parser
        # resolves its dot segments as the server will, so "/fhir/%2e%2e/admin" is "/admin" here: refused
        if not ((u.path or "/").rstrip("/") + "/").startswith(self.target.path + "/"):
            raise RequestRefused("URL is not below the checked FHIR base URL")
        return super().send(request, stream=stream, timeout=timeout, verify=verify, cert=cert, proxies={})


# ---------------------------------------------------------------- the bounded pools

class _Pools:
    def __init__(self):
        self._lock = threading.Lock()
        self._pid = None
        self.max_workers = DEFAULT_MAX_CONCURRENCY  # Settings.fhir_max_concurrency, applied by Runtime
        self.fetch = self.dns = None

    def configure(self, max_workers: int) -> None:
        with self._lock:
            if max_workers != self.max_workers:
                self.max_workers = max_workers
                self._pid = None  # a new pool at the next use; the old one finishes what it runs

    def _ensure(self):
        if self._pid != os.getpid():  # first use, a new size, or a forked child (threads do not survive fork)
            with self._lock:
                if self._pid != os.getpid():
                    if self.fetch is not None and self._pid is None:  # reconfigured in this process
                        self.fetch.shutdown(wait=False)
                        self.dns.shutdown(wait=False)
                    self.fetch = ThreadPoolExecutor(self.max_workers, thread_name_prefix="fhir-fetch")
                    self.dns = ThreadPoolExecutor(DNS_THREADS, thread_name_prefix="fhir-dns")
                    self.slots = threading.BoundedSemaphore(4 * self.max_workers)
                    self._pid = os.getpid()
        return self


POOLS = _Pools()


class PoolFull(Exception):
    pass


def configure(max_workers: int) -> None:
    POOLS.configure(max(1, int(max_workers)))


def submit(fn, *args) -> Future:
    """Run ``fn(*args)`` on the process's FHIR pool; PoolFull when too many reads are already waiting."""
    pools = POOLS._ensure()
    slots = pools.slots
    if not slots.acquire(blocking=False):
        raise PoolFull("too many FHIR reads in progress")
    try:
        future = pools.fetch.submit(fn, *args)
    except BaseException:
        slots.release()
        raise
    future.add_done_callback(lambda _f: slots.release())
    return future


_lookups: dict[tuple, Future] = {}  # (resolver, host, port) -> the lookup in flight
_lookups_lock = threading.Lock()


def _lookup(host: str, port: int, resolver: Resolver) -> Future:
    """The DNS answer for (host, port) on the DNS pool; a lookup already in flight for it is shared, so a name
    whose DNS hangs holds one DNS thread however often it is asked for (never all of them)."""
    key = (resolver, host, port)
    with _lookups_lock:
        future = _lookups.get(key)
        if future is not None:
            return future
        future = _lookups[key] = POOLS._ensure().dns.submit(resolver, host, port)
    future.add_done_callback(lambda f: _forget(key, f))  # outside the lock: runs at once if already done
    return future


def _forget(key: tuple, future: Future) -> None:
    with _lookups_lock:
        if _lookups.get(key) is future:
            del _lookups[key]


def resolve(target: Target, networks: tuple, resolver: Resolver | None, deadline: float) -> str:
    """fhir_servers.pick_address, waited for until ``deadline`` at most (a hanging DNS server keeps one of
    the few DNS threads, never the caller; callers asking for the same name share its lookup)."""
    if target.literal_ip is not None:
        return pick_address(target, networks, resolver)
    left = deadline - time.monotonic()
    if left <= 0:
        raise FhirServerRefused("time budget exhausted before name resolution", resolved=False)
    future = _lookup(target.host, target.port, resolver or fhir_servers.system_resolver)
    try:
        answers = future.result(timeout=left)
    except FutureTimeout:
        raise TimeoutError("name resolution did not finish within the time budget") from None
    except (OSError, UnicodeError) as exc:
        raise FhirServerRefused(f"name resolution failed ({type(exc).__name__})", resolved=False) from None
    return pick_address(target, networks, lambda _host, _port: answers)
