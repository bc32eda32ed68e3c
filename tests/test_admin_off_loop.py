"""/admin does not hold up the hook calls: real gunicorn (production config, 1 gevent worker) over a store of
200,000 cards filled by bench/admin_analytics.py's own filler (a year before CDS_FIXED_NOW), on a SQLite file and
on PostgreSQL.

A year's view or a year's override export takes a second or more there on SQLite (14 s over 1,000,000 cards). Run
on the worker's event loop, as before, it held up every hook call of the worker until it was done: two or three
hook calls were answered while it ran, the first after waiting for all of it. Now the admin views run on a
native thread (admin.off_loop): the hook calls are answered meanwhile. This counts them; it times nothing. (On
PostgreSQL psycopg's waits for the server already let the other connections run; there the case checks that the
views work from the native thread.)
"""
from __future__ import annotations

import importlib.util
import threading

import pytest
import requests

from cds_hooks_service.store import FeedbackStore
from tests.helpers import REPO, SCENARIO_NOW, SIGN, request_body
from tests.plugins.gunicorn_service import GunicornService

TOKEN = "an-admin-token-for-this-test-0123456789"
CARDS = 200_000


def _bench_fill():
    spec = importlib.util.spec_from_file_location("admin_analytics", REPO / "bench" / "admin_analytics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.fill


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_hook_calls_are_answered_while_admin_reads_a_year_of_cards(tmp_path, database, request):
    url = f"sqlite:///{tmp_path / 'store.sqlite3'}" if database == "sqlite" else \
        request.getfixturevalue("fresh_postgres_url")
    store = FeedbackStore(url)
    _bench_fill()(store, CARDS)
    store.engine.dispose()
    env = {"CDS_ADMIN_TOKEN": TOKEN, "CDS_FIXED_NOW": SCENARIO_NOW, "DATABASE_URL": url}
    with GunicornService(tmp_path, env, workers=1) as service:
        hooks = requests.Session()
        body = request_body()

        def hook_call() -> bool:
            r = hooks.post(service.base_url + SIGN, json=body, timeout=60)
            return r.status_code == 200 and bool(r.json()["cards"])

        assert hook_call()
        for path in ("/admin?days=365", "/admin/overrides.csv?days=365"):
            answer = {}

            def admin():
                r = requests.get(service.base_url + path, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120)
                answer.update(status=r.status_code, size=len(r.content))

            thread = threading.Thread(target=admin)
            thread.start()
            answered = 0
            while thread.is_alive():
                assert hook_call()
                answered += 1
            thread.join()
            assert answer["status"] == 200 and answer["size"] > 100_000, (path, answer)
            # Before: 1-2 (the worker did nothing else until the view was done). Now: hundreds.
            assert answered >= 5, f"{path}: only {answered} hook call(s) answered while it ran"
