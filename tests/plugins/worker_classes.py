"""Subclasses of the service's gevent worker for tests/test_connection_fairness.py; everything else is the
production worker.

* ``LongTurnWorker``: a turn of LONG_TURN seconds, so that a test can land a stop inside a turn.
* ``BlindStopCheckWorker``: a graceful stop's check of an idle connection takes BLIND_FOR seconds and misses what
  arrives meanwhile: the race of a request arriving just as a stop checks its connection, made wide enough to hit.
"""
import time

from cds_hooks_service.gevent_worker import GeventWorker

LONG_TURN = 2.0
BLIND_FOR = 0.6


class LongTurnWorker(GeventWorker):
    turn = LONG_TURN


class BlindStopCheckWorker(GeventWorker):
    @staticmethod
    def _arrived(sock) -> bool:
        deadline = time.monotonic() + BLIND_FOR
        while time.monotonic() < deadline:
            pass  # nothing else runs in the worker meanwhile: a request that arrives now stays unread
        return False
