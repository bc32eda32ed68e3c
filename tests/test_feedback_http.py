"""Feedback acknowledged with 200 is stored: 20 concurrent HTTP clients x 50 items, SQLite and PostgreSQL."""
from __future__ import annotations

import threading
import uuid
from datetime import datetime, timezone
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from sqlalchemy import func, select
from werkzeug.serving import make_server

from cds_hooks_service.cards import OVERRIDE_REASON_SYSTEM
from cds_hooks_service.store import FeedbackStore, IssuedCard

CLIENTS, ITEMS = 20, 50
RULE, SERVICE = "opioid-in-migraine", "migraine-med-safety-sign"


def test_concurrent_feedback_is_all_stored(make_app, store_url, rulebook):
    app = make_app(database_url=store_url)
    reasons = [r["code"] for r in rulebook.get(RULE).override_reasons]
    now = datetime.now(timezone.utc)
    cards = [[IssuedCard(str(uuid.uuid4()), RULE, SERVICE, "h", "warning", "active", uuid.uuid4().hex, now)
              for _ in range(ITEMS)] for _ in range(CLIENTS)]  # feedback is taken only for cards issued
    app.extensions["cds"].store.record_cards([c for batch in cards for c in batch])
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}/cds-services/{SERVICE}/feedback"

    def client(n: int) -> list[int]:
        statuses = []
        with requests.Session() as session:
            for i, card in enumerate(cards[n]):
                item = {"card": card.card_uuid, "outcome": "overridden",
                        "overrideReason": {"reason": {"system": OVERRIDE_REASON_SYSTEM,
                                                      "code": reasons[i % len(reasons)]}},
                        "outcomeTimestamp": "2026-03-01T12:00:00Z"}
                statuses.append(session.post(url, json={"feedback": [item]}, timeout=30).status_code)
        return statuses

    try:
        with ThreadPoolExecutor(CLIENTS) as pool:
            statuses = [s for result in pool.map(client, range(CLIENTS)) for s in result]
    finally:
        server.shutdown()
    assert statuses.count(200) == CLIENTS * ITEMS
    # read back through a separate connection: everything acknowledged is there
    from cds_hooks_service.store import feedback as feedback_table

    check = FeedbackStore(store_url)
    with check.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(feedback_table)).scalar_one() == CLIENTS * ITEMS
    check.close()


def test_feedback_while_the_store_is_down_is_answered_503_and_can_be_sent_again(make_app, _postgres_cluster, rulebook,
                                                                               caplog):
    """A real outage: the service's PostgreSQL database is dropped under it (its connections terminated). Feedback is
    answered 503 with Retry-After and an OperationOutcome saying nothing was stored (not a 500), and so is the admin
    page; once the database is back, the same request is stored. The log names the failure by type, without the
    driver's message."""
    name = _postgres_cluster.create_database("outage")
    url = _postgres_cluster.admin_url(name)
    admin_token = "an-admin-token-for-the-outage-test-0123456789"
    try:
        client = make_app(database_url=url, admin_token=admin_token).test_client()
        store = client.application.extensions["cds"].store
        card = IssuedCard(str(uuid.uuid4()), RULE, SERVICE, "h", "warning", "active", uuid.uuid4().hex,
                          datetime.now(timezone.utc))
        store.record_cards([card])
        reason = {"system": OVERRIDE_REASON_SYSTEM, "code": rulebook.get(RULE).override_reasons[0]["code"]}
        body = {"feedback": [{"card": card.card_uuid, "outcome": "overridden", "overrideReason": {"reason": reason},
                              "outcomeTimestamp": "2026-03-01T12:00:00Z"}]}
        _postgres_cluster.drop_database(name)
        r = client.post(f"/cds-services/{SERVICE}/feedback", json=body)
        assert r.status_code == 503, r.get_data(as_text=True)
        assert r.headers["Retry-After"].isdigit()
        issue = r.get_json()["issue"][0]
        assert issue["code"] == "transient" and "nothing of this request was stored" in issue["details"]["text"]
        assert "store failed on feedback (OperationalError" in caplog.text and name not in caplog.text
        r = client.get("/admin/stats.json", headers={"Authorization": f"Bearer {admin_token}"})
        assert r.status_code == 503 and r.get_json()["issue"][0]["code"] == "transient"

        _postgres_cluster.execute(f'CREATE DATABASE "{name}"')  # the database is back (empty: schema, card again)
        FeedbackStore(url).close()  # a new store on an empty database creates the schema
        store.record_cards([card])  # the running service's own store reconnects
        r = client.post(f"/cds-services/{SERVICE}/feedback", json=body)
        assert r.status_code == 200 and r.get_json() == {"stored": 1}
    finally:
        _postgres_cluster.drop_database(name)
