"""The service's gevent worker with a turn of LONG_TURN seconds, so that a test can land a stop inside a turn
(tests/test_connection_fairness.py). Everything else is the production worker."""
from cds_hooks_service.gevent_worker import GeventWorker

LONG_TURN = 2.0


class LongTurnWorker(GeventWorker):
    turn = LONG_TURN
