"""The gunicorn worker class of the service: gunicorn's gevent worker, stopping promptly.

gevent gives every connection its own greenlet, so a client sending its headers or body slowly holds a
greenlet, not one of a few threads (serving.py explains the choice). Stock gunicorn's gevent worker,
when told to stop, waits for every open connection, including kept-alive ones that are idle between
requests, until each times out (``keepalive``): a restart took up to that long for nothing. This worker
closes the connections that are idle between requests as soon as it stops; a request being handled is
finished and answered with "Connection: close" as before, and a connection accepted but not yet read is
served (its first request is on its way).

Connections take turns: after each answer on a connection kept alive, its greenlet yields for one pass of the
event loop (a timer due at once, ``TURN``), so a client whose next request is always already there cannot hold
the worker while the other connections wait (``handle_request``). A stop that comes during a connection's turn
closes it at the end of the turn, unless its next request has arrived or was pipelined behind the last one
(answered with "Connection: close").
"""
from __future__ import annotations

import socket
import time
import warnings

import gevent
from gevent.event import Event
from gevent.monkey import MonkeyPatchWarning
from gevent.pool import Pool
from gevent.server import StreamServer
from gunicorn.sock import ssl_context
from gunicorn.workers.ggevent import GeventWorker as _GunicornGeventWorker

POLL = 0.1  # seconds between the main loop's checks (gunicorn's: 1)
# A greenlet's turn ends after each answer: it sleeps on a timer due at once, which libev makes ready after its
# next poll for I/O, together with the other connections whose requests arrived; each of them is served one
# request before this one goes on. Not gevent.sleep(0): the loop polls for I/O only after 50 queued callbacks.
# Not gevent.idle(): it waits for a loop pass with nothing else pending, which a saturated worker never has
# (a kept-alive connection then waited seconds behind connection-per-call traffic).
TURN = 1e-6


class _StopWaiting(Exception):
    """Thrown, at a graceful stop, into a kept-alive connection's greenlet where it waits for its next request."""


class GeventWorker(_GunicornGeventWorker):
    turn = TURN  # (a test's subclass lengthens it, to land a stop inside a turn)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._idle: dict = {}  # client socket -> its greenlet, between two requests (not before the first: handle)
        self._stopping: Event | None = None

    def run(self):
        """gunicorn's GeventWorker.run (no server_class), waiting on an event instead of sleeping 1 s."""
        from functools import partial

        self._stopping = Event()
        ssl_args = {"ssl_context": ssl_context(self.cfg)} if self.cfg.is_ssl else {}
        servers = []
        for s in self.sockets:
            s.setblocking(1)
            server = StreamServer(s, handle=partial(self.handle, s), spawn=Pool(self.worker_connections), **ssl_args)
            if self.cfg.workers > 1:
                server.max_accept = 1
            server.start()
            servers.append(server)
        while self.alive:
            self.notify()
            self._stopping.wait(1.0)
        self._close_idle()  # also when no signal came (gunicorn's max_requests only sets alive = False)
        try:
            for server in servers:  # stop accepting
                server.close()
            deadline = time.time() + self.cfg.graceful_timeout
            while time.time() <= deadline:  # the requests under way finish
                if all(server.pool.free_count() == server.pool.size for server in servers):
                    return
                self.notify()
                gevent.sleep(POLL)
            self.log.warning("Worker graceful timeout (pid:%s)", self.pid)
            for server in servers:
                server.stop(timeout=1)
        except Exception:  # noqa: BLE001 - as gunicorn: the worker exits anyway
            pass

    def patch(self):
        with warnings.catch_warnings():  # the master patched first (serving.patch_for_gevent): expected
            warnings.simplefilter("ignore", MonkeyPatchWarning)
            super().patch()

    def handle(self, listener, client, addr):
        # A connection just accepted is not idle: its first request is usually on its way, and closing it at a
        # stop would answer that request with nothing (RemoteDisconnected at the client, no retry for a POST).
        # It is served; one that never sends is ended by the header deadline (serving.py) within the
        # graceful timeout.
        try:
            super().handle(listener, client, addr)
        finally:
            self._idle.pop(client, None)

    def handle_request(self, listener_name, req, sock, addr):
        self._idle.pop(sock, None)
        super().handle_request(listener_name, req, sock, addr)  # raises StopIteration when it closes
        # The connection stays open: take turns (TURN). A greenlet yields only when a read would block, and a fast
        # client's next request is usually there already when its answer is written: without this, one busy
        # keep-alive connection held the worker while the others waited (p99 0.3-4 s, wrk time-outs at 32
        # connections on a loaded machine; bench/README.md). The socket counts as idle (closed at a stop) only
        # after its turn: a request that arrives meanwhile, or was pipelined behind this one, is read, and answered
        # with "Connection: close".
        gevent.sleep(self.turn)
        if self.alive:
            self._idle[sock] = gevent.getcurrent()
        elif not self._request_waiting(req, sock):
            # The stop came during the turn, so _close_idle did not see this socket, and nothing is waiting:
            # close it now (gunicorn's loop closes it without reading on, so no request is run unanswered).
            # Before, its greenlet waited up to `keepalive` for a next request while the worker could not exit.
            raise StopIteration()

    def handle_exit(self, sig, frame):
        super().handle_exit(sig, frame)  # alive = False: stop accepting, finish what is under way
        gevent.spawn(self._close_idle)  # not in the signal handler itself

    def _close_idle(self) -> None:
        if self._stopping is not None:
            self._stopping.set()  # the main loop stops waiting
        loop = gevent.get_hub().loop
        for sock, greenlet in list(self._idle.items()):
            loop.run_callback(self._end_if_idle, sock, greenlet)

    def _end_if_idle(self, sock, greenlet) -> None:
        """End a connection whose greenlet waits in a read for its next request (it blocks only when gunicorn
        holds no whole request), unless that request has arrived: its greenlet then answers it with "Connection:
        close". Run as a callback of the event loop, between greenlets, so that nothing runs between the check and
        the throw: the greenlet raises where it waits, reads nothing more (no request is run and left
        unanswered), and gunicorn's handler closes the socket (``handle_error`` keeps it quiet). A shutdown of the
        socket instead left a moment in which a request arriving could still be read and run, its answer lost;
        gevent's kill() lands later, possibly in the application. A next request only partly arrived, whose
        first bytes the parser has already taken off the socket, is ended too: not run, the client sees the
        connection closed (as with the shutdown before)."""
        if self._idle.get(sock) is greenlet and not self._arrived(sock):
            greenlet.throw(_StopWaiting())

    def handle_error(self, req, client, addr, exc):
        if isinstance(exc, _StopWaiting):
            return  # a graceful stop ended a connection between two requests: nothing to answer or to log
        super().handle_error(req, client, addr, exc)

    @staticmethod
    def _arrived(sock) -> bool:
        """Whether bytes are waiting on the socket (read without consuming them)."""
        try:
            return bool(getattr(sock, "_sock", sock).recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except OSError:  # nothing waiting (BlockingIOError), or the socket is gone
            return False

    def _request_waiting(self, req, sock) -> bool:
        """Whether a next request has begun: pipelined behind ``req`` (already in gunicorn's read buffer), or on
        the socket."""
        buffered = getattr(getattr(req, "unreader", None), "buf", None)
        return (buffered is not None and len(buffered.getbuffer()) > 0) or self._arrived(sock)
