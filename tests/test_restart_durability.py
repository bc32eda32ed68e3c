"""A service restart in the middle loses nothing that was answered 200.

The service runs under real gunicorn (production config gunicorn.conf.py, 2 gthread workers) on a SQLite file
or on PostgreSQL. 8 client threads loop: a hook call that issues a card (a new draft order id each time, so the
card is never suppressed), then feedback on that card, one to three items per POST. A request that did not get
200 (connection refused or cut by the restart) is retried as is; every item carries a client-side identity
(card uuid, outcome, outcomeTimestamp with a unique microsecond), which is the store's unique key, so a retry
of an item that was in fact stored is stored once. In the middle:

1. graceful restart: SIGTERM to the gunicorn master, wait for it to exit, start a new one on the same port;
2. crash: SIGKILL to the whole process group (master and workers), start a new one on the same port.

The clients keep going across both. At the end the database is read directly (sqlite3 / psycopg, not through
the service): every card uuid a hook call answered 200 with is in cds_issued_card, and every feedback item a
POST answered 200 is in cds_feedback, linked to the rule of its card.

Durability of the SQLite store: WAL journal with synchronous=NORMAL (store.py). A commit is written to the WAL
file (the OS page cache) before the answer goes out, so it survives the death of the process (what this test
does); it is not fsynced at each commit, so an OS crash or power loss may lose the last commits (never
corrupting the file). synchronous=FULL would survive those too, at an fsync per commit. The PostgreSQL test
cluster runs with fsync off; the test kills the service, not the database.
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import sys
import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import requests

from tests.helpers import REPO, SCENARIO_NOW
from tests.plugins.gunicorn_service import GunicornService, wait_for

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and /proc")

SIGN = "/cds-services/migraine-med-safety-sign"
BODY = json.loads((REPO / "fhir_examples/opioid-in-migraine/iv-hydromorphone-active-migraine-diagnosis.order-sign.json")
                  .read_text())
CLIENTS = 8
ACKS_PER_PHASE = 40  # feedback items acknowledged between two events, at least
EPOCH = datetime(2026, 3, 1, tzinfo=timezone.utc)


class Service(GunicornService):
    """gunicorn in its own process group (so a crash can take master and workers at once)."""

    def __init__(self, tmp: Path, database_url: str):
        super().__init__(tmp, dict(DATABASE_URL=database_url, CDS_FIXED_NOW=SCENARIO_NOW,
                                   CDS_SUPPRESSION_SECRET="restart-test-secret"),
                         workers=2, threads=4, new_session=True)

    def graceful_stop(self, timeout: float = 15) -> None:
        self.terminate(timeout)
        self._assert_group_gone()

    def crash(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # master and workers, at once
        self.proc.wait(5)
        self._assert_group_gone()

    def _assert_group_gone(self) -> None:
        assert wait_for(self.group_gone, timeout=5), "gunicorn workers outlived their master"


class FeedbackClient(threading.Thread):
    """Hook call -> card uuid -> feedback on it, in a loop; retries what did not get 200, records what did."""

    def __init__(self, base: str, index: int, stop: threading.Event):
        super().__init__(daemon=True, name=f"feedback-client-{index}")
        self.base, self.index, self.stop = base, index, stop
        self.cards: list[str] = []  # card uuids of hook calls answered 200
        self.items: list[tuple[str, str, datetime]] = []  # feedback items answered 200
        self.errors: Counter = Counter()
        self.failure: BaseException | None = None
        self._seq = 0

    def _post(self, session: requests.Session, path: str, body: dict) -> requests.Response | None:
        data = json.dumps(body)
        while not self.stop.is_set():
            try:
                r = session.post(self.base + path, data=data, headers={"Content-Type": "application/json"}, timeout=5)
            except requests.RequestException as exc:
                self.errors[type(exc).__name__] += 1
                time.sleep(0.02)
                continue
            if r.status_code == 200:
                return r
            self.errors[f"HTTP {r.status_code}"] += 1
            time.sleep(0.02)
        return None

    def _item(self, shown: dict) -> dict:
        """An item the service takes: that card's own override reasons and suggestion ids."""
        card = shown["uuid"]
        self._seq += 1
        n = self.index * 1_000_000 + self._seq  # unique per item, across clients
        ts = EPOCH + timedelta(microseconds=n)
        if self._seq % 2:
            return {"card": card, "outcome": "overridden", "outcomeTimestamp": ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                    "overrideReason": {"reason": shown["overrideReasons"][self._seq % 3],
                                       "userComment": "not stored"}}
        return {"card": card, "outcome": "accepted", "outcomeTimestamp": ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                "acceptedSuggestions": [{"id": shown["suggestions"][0]["uuid"]}]}

    def run(self) -> None:
        try:
            with requests.Session() as session:
                cycle = 0
                while not self.stop.is_set():
                    cycle += 1
                    body = json.loads(json.dumps(BODY))
                    body["hookInstance"] = f"restart-{self.index}-{cycle}"
                    body["context"]["draftOrders"]["entry"][0]["resource"]["id"] = f"draft-{self.index}-{cycle}"
                    r = self._post(session, SIGN, body)
                    if r is None:
                        return
                    cards = r.json()["cards"]
                    assert len(cards) == 1, cards
                    card = cards[0]["uuid"]
                    self.cards.append(card)
                    for batch in (1, 2, 3):
                        items = [self._item(cards[0]) for _ in range(batch)]
                        r = self._post(session, SIGN + "/feedback", {"feedback": items})
                        if r is None:
                            return
                        assert r.json() == {"stored": batch}, r.text
                        self.items.extend((i["card"], i["outcome"], _ts(i["outcomeTimestamp"])) for i in items)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.failure = exc


def _ts(value) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def _read_sqlite(path: Path):
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        cards = {row[0] for row in conn.execute("SELECT card_uuid FROM cds_issued_card")}
        feedback = [(c, o, _ts(t), rule) for c, o, t, rule in
                    conn.execute("SELECT card_uuid, outcome, outcome_timestamp, rule_id FROM cds_feedback")]
        journal = conn.execute("PRAGMA journal_mode").fetchone()[0]
    return cards, feedback, journal


def _read_postgres(url: str):
    import psycopg

    with psycopg.connect(url) as conn:
        cards = {row[0] for row in conn.execute("SELECT card_uuid FROM cds_issued_card")}
        feedback = [(c, o, _ts(t), rule) for c, o, t, rule in
                    conn.execute("SELECT card_uuid, outcome, outcome_timestamp, rule_id FROM cds_feedback")]
    return cards, feedback


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path):
    if request.param == "sqlite":
        return "sqlite", f"sqlite:///{tmp_path / 'store.sqlite3'}"
    return "postgresql", request.getfixturevalue("fresh_postgres_url")


def test_restart_and_crash_lose_nothing_answered_200(backend, tmp_path):
    started = time.monotonic()
    kind, url = backend
    service = Service(tmp_path, url)
    stop = threading.Event()
    clients = [FeedbackClient(service.base_url, i, stop) for i in range(CLIENTS)]

    def acked() -> int:
        return sum(len(c.items) for c in clients)
    marks: dict[str, float] = {}
    try:
        service.start()
        marks["up"] = time.monotonic() - started
        for c in clients:
            c.start()
        assert wait_for(lambda: acked() >= ACKS_PER_PHASE, timeout=10), service.log_tail()

        # (1) graceful restart
        before = acked()
        service.graceful_stop()
        marks["stopped"] = time.monotonic() - started
        service.start()
        marks["restarted"] = time.monotonic() - started
        assert wait_for(lambda: acked() >= before + ACKS_PER_PHASE, timeout=10), service.log_tail()

        # (2) crash: SIGKILL to master and workers while the clients are writing
        before = acked()
        service.crash()
        marks["crashed"] = time.monotonic() - started
        service.start()
        marks["restarted after crash"] = time.monotonic() - started
        assert wait_for(lambda: acked() >= before + ACKS_PER_PHASE, timeout=10), service.log_tail()
        marks["clients done"] = time.monotonic() - started
    finally:
        stop.set()
        for c in clients:
            c.join(10)
        try:
            if service.running:
                service.graceful_stop()
        finally:
            service.kill()

    failures = [(c.name, c.failure) for c in clients if c.failure]
    assert not failures, failures
    errors = sum((c.errors for c in clients), Counter())
    assert not [e for e in errors if e.startswith("HTTP ")], f"answers other than 200: {errors}"

    if kind == "sqlite":
        cards, feedback, journal = _read_sqlite(Path(url.removeprefix("sqlite:///")))
        assert journal == "wal"
    else:
        cards, feedback = _read_postgres(url)
    acked_cards = [card for c in clients for card in c.cards]
    acked_items = [item for c in clients for item in c.items]
    assert len(set(acked_items)) == len(acked_items), "the clients' item identities are not unique"
    lost_cards = set(acked_cards) - cards
    assert not lost_cards, f"{len(lost_cards)} issued cards answered 200 are not in the database"
    stored = Counter((c, o, t) for c, o, t, _ in feedback)
    lost = [i for i in acked_items if i not in stored]
    assert not lost, f"{len(lost)} of {len(acked_items)} feedback items answered 200 are not stored: {lost[:5]}"
    assert max(stored.values()) == 1, "a retried item was stored twice"
    rules = {(c, o, t): rule for c, o, t, rule in feedback}
    assert {rules[i] for i in acked_items} == {"opioid-in-migraine"}, "feedback not linked to its card's rule"
    elapsed = time.monotonic() - started
    marks = {k: round(v, 1) for k, v in marks.items()}
    print(f"{kind}: {service.starts} starts, {len(acked_cards)} cards and {len(acked_items)} feedback items "
          f"answered 200 and all stored ({len(feedback) - len(acked_items)} more stored whose answer was lost); "
          f"client errors {dict(errors)}; timeline {marks}; {elapsed:.1f}s")
    assert elapsed < 30


def test_sqlite_store_is_wal_with_synchronous_normal(tmp_path):
    """What the restart test relies on for SQLite: WAL + synchronous=NORMAL on every connection of the store."""
    from sqlalchemy import text

    from cds_hooks_service.store import FeedbackStore

    store = FeedbackStore(f"sqlite:///{tmp_path / 's.sqlite3'}")
    try:
        with store.engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar_one() == "wal"
            assert conn.execute(text("PRAGMA synchronous")).scalar_one() == 1  # NORMAL (2 = FULL)
    finally:
        store.close()
