"""The gunicorn worker class of the service: gunicorn's gevent worker, stopping promptly.

gevent gives every connection its own greenlet, so a client sending its headers or body slowly holds a
greenlet, not one of a few threads (serving.py explains the choice). Stock gunicorn's gevent worker,
when told to stop, waits for every open connection, including kept-alive ones that are idle between
requests, until each times out (``keepalive``): a restart took up to that long for nothing. This worker
closes the connections that are idle between requests as soon as it stops; a request being handled is
finished and answered with "Connection: close" as before.
"""
from __future__ import annotations

import socket
import warnings

import gevent
from gevent.monkey import MonkeyPatchWarning
from gunicorn.workers.ggevent import GeventWorker as _GunicornGeventWorker


class GeventWorker(_GunicornGeventWorker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._idle: set = set()  # client sockets between two requests (or before their first)

    def patch(self):
        with warnings.catch_warnings():  # the master patched first (serving.patch_for_gevent): expected
            warnings.simplefilter("ignore", MonkeyPatchWarning)
            super().patch()

    def handle(self, listener, client, addr):
        self._idle.add(client)
        try:
            super().handle(listener, client, addr)
        finally:
            self._idle.discard(client)

    def handle_request(self, listener_name, req, sock, addr):
        self._idle.discard(sock)
        try:
            return super().handle_request(listener_name, req, sock, addr)
        finally:
            if self.alive:
                self._idle.add(sock)

    def handle_exit(self, sig, frame):
        super().handle_exit(sig, frame)  # alive = False: stop accepting, finish what is under way
        gevent.spawn(self._close_idle)  # not in the signal handler itself

    def _close_idle(self) -> None:
        for sock in list(self._idle):
            # On the OS socket: its greenlet then reads the end of the stream and finishes quietly (gevent's
            # own shutdown() would cancel the wait with EBADF, logged by gunicorn as a socket error).
            raw = getattr(sock, "_sock", sock)
            try:
                raw.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
