"""The service's gevent worker with a graceful stop's check of an idle connection that takes BLIND_FOR seconds
and misses what arrives meanwhile: the race of a request arriving just as a stop checks its connection, made
wide enough for a test to hit (tests/test_connection_fairness.py). Everything else is the production worker."""
import time

from cds_hooks_service.gevent_worker import GeventWorker

BLIND_FOR = 0.6


class BlindStopCheckWorker(GeventWorker):
    @staticmethod
    def _arrived(sock) -> bool:
        deadline = time.monotonic() + BLIND_FOR
        while time.monotonic() < deadline:
            pass  # nothing else runs in the worker meanwhile: a request that arrives now stays unread
        return False
