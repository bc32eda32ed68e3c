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
import time

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
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with GunicornService(tmp_path, env, workers=1) as service:
        hooks = requests.Session()
        body = request_body()

        def hook_call() -> float:
            started = time.perf_counter()
            r = hooks.post(service.base_url + SIGN, json=body, timeout=60)
            assert r.status_code == 200 and r.json()["cards"]
            return time.perf_counter() - started

        hook_call()
        for path in ("/admin?days=365", "/admin/overrides.csv?days=365"):
            answer = {}

            def admin():
                started = time.perf_counter()
                r = requests.get(service.base_url + path, headers=auth, timeout=120)
                answer.update(status=r.status_code, size=len(r.content), seconds=time.perf_counter() - started)

            thread = threading.Thread(target=admin)
            thread.start()
            waits = []
            while thread.is_alive():
                waits.append(hook_call())
            thread.join()
            assert answer["status"] == 200 and answer["size"] > 100_000, (path, answer)
            # Before: 2-3 on SQLite, the first waiting for most of the view. Now: hundreds, none waiting for it.
            # (Compared within this run, not with a fixed time.)
            assert len(waits) >= 50, f"{path}: only {len(waits)} hook call(s) answered while it ran"
            assert max(waits) < answer["seconds"] / 2, (path, max(waits), answer["seconds"])

        # The other views, and the errors raised on the admin's thread, answered as in-process.
        for path, status in (("/admin/stats.json", 200), ("/admin/rules.csv?days=365", 200),
                             ("/admin/rules/opioid-in-migraine/overrides?days=365&page=2", 200),
                             ("/admin?days=9999", 400), ("/admin/rules/no-such-rule/overrides", 404)):
            r = requests.get(service.base_url + path, headers=auth, timeout=120)
            assert r.status_code == status, (path, r.status_code, r.text[:200])
            if status >= 400:
                assert r.headers["Content-Type"].startswith("application/") and "json" in r.headers["Content-Type"]
        # Downloads abandoned after their first chunk (more than the store's 15 pooled connections) leave nothing
        # held: a whole export still comes, and the hook calls are answered.
        for _ in range(16):
            with requests.get(service.base_url + "/admin/overrides.csv?days=30", headers=auth, stream=True,
                              timeout=120) as r:
                assert r.status_code == 200 and next(r.iter_content(1024))
        r = requests.get(service.base_url + "/admin/overrides.csv?days=30", headers=auth, timeout=120)
        assert r.status_code == 200 and r.text.startswith("overridden_at,") and r.text.count("\r\n") > 1000
        hook_call()
