"""The hot path's card write on SQLite (store.issue_cards): the DB-API fast path writes the same rows as
SQLAlchemy, commits before it returns, rolls back whole on a failure, and does not go through SQLAlchemy's
statement execution (what cost 0.4-0.9 ms of CPU per hook call)."""
from __future__ import annotations

import sqlite3
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import event, insert, select

from cds_hooks_service.store import FeedbackStore, IssuedCard, issued_card, override

UTC = timezone.utc
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)  # whole seconds: SQLAlchemy writes ".000000"


def card(*, key=None, at=T0, client="open") -> IssuedCard:
    return IssuedCard(str(uuid.uuid4()), "opioid-in-migraine", "migraine-med-safety-sign", "hook-1", "warning",
                      "active", key or uuid.uuid4().hex, at, client)


@pytest.fixture
def store(tmp_path):
    s = FeedbackStore(f"sqlite:///{tmp_path}/store.sqlite3")
    yield s
    s.close()


def _raw_rows(store) -> dict[str, tuple]:
    path = store.engine.url.database
    with sqlite3.connect(path) as conn:
        return {r[0]: r[1:] for r in conn.execute("SELECT card_uuid, rule_id, service_id, client_id, hook_instance, "
                                                  "indicator, mode, suppression_key, issued_at FROM cds_issued_card")}


@pytest.mark.parametrize("at", [T0, T0 + timedelta(microseconds=1234), T0.astimezone(timezone(timedelta(hours=2)))])
def test_the_fast_path_writes_the_rows_sqlalchemy_writes(store, at):
    fast, slow = card(at=at), card(at=at)
    store.issue_cards([fast])
    with store.engine.begin() as conn:
        conn.execute(insert(issued_card), [FeedbackStore._card_row(slow)])
    raw = _raw_rows(store)
    assert raw[fast.card_uuid][:-2] == raw[slow.card_uuid][:-2]
    assert raw[fast.card_uuid][-1] == raw[slow.card_uuid][-1]  # issued_at: the same text
    with store.engine.connect() as conn:
        read = {r.card_uuid: r.issued_at for r in conn.execute(select(issued_card))}
    assert read[fast.card_uuid] == at and read[fast.card_uuid].tzinfo is not None


def test_overridden_keys_are_skipped_and_returned(store):
    old, recent = card(key="k-old", at=T0 - timedelta(days=2)), card(key="k-recent", at=T0 - timedelta(hours=1))
    store.issue_cards([old, recent])
    with store.engine.begin() as conn:
        conn.execute(insert(override), [{"card_uuid": c.card_uuid, "suppression_key": c.suppression_key,
                                         "issued_at": c.issued_at} for c in (old, recent)])
    again = [card(key="k-old"), card(key="k-recent"), card(key="k-new")]
    assert store.issue_cards(again, skip_overridden_since=T0 - timedelta(hours=24)) == {"k-recent"}
    stored = _raw_rows(store)
    assert again[0].card_uuid in stored and again[2].card_uuid in stored and again[1].card_uuid not in stored
    many = [card(key=f"k-{i}") for i in range(1200)] + [card(key="k-recent")]  # more keys than one IN (...) chunk
    assert store.issue_cards(many, skip_overridden_since=T0 - timedelta(hours=24)) == {"k-recent"}
    assert len(_raw_rows(store)) == 4 + 1200


def test_a_failure_rolls_back_the_whole_batch_and_releases_the_locks(store):
    good, naive = card(), card(at=datetime(2026, 3, 1, 12, 0))  # naive datetime: refused by the column type
    with pytest.raises(ValueError):
        store.issue_cards([good, naive])
    assert _raw_rows(store) == {}
    assert store.issue_cards([good]) == set()  # the thread lock and the flock were released
    assert list(_raw_rows(store)) == [good.card_uuid]


def test_the_cards_are_committed_when_issue_cards_returns(store):
    """Seen at once by another connection (another worker process): nothing is left for later."""
    c = card()
    store.issue_cards([c])
    assert c.card_uuid in _raw_rows(store)


def test_the_hot_path_does_not_run_statements_through_sqlalchemy(store):
    statements = []
    event.listen(store.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    store.issue_cards([card()], skip_overridden_since=T0 - timedelta(hours=24))
    assert statements == []
    assert len(_raw_rows(store)) == 1


def test_the_hot_path_keeps_one_connection_out_of_the_pool(store):
    """No pool checkout per hook call: the same DB-API connection each time, never lent to other callers."""
    store.issue_cards([card()])
    first = store._hot_connection()
    checkouts = []
    event.listen(store.engine.pool, "checkout", lambda *a: checkouts.append(a))
    for _ in range(3):
        store.issue_cards([card()], skip_overridden_since=T0 - timedelta(hours=24))
    assert checkouts == []  # (the pooled fast path checked a connection out per call)
    assert store._hot_connection() is first
    with store.engine.connect() as conn:  # a pooled connection is another one
        assert conn.connection.dbapi_connection is not first
    assert first.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # opened with the engine's PRAGMAs
    assert len(_raw_rows(store)) == 4


def test_a_broken_hot_connection_is_replaced_and_the_next_call_works(store):
    store.issue_cards([card()])
    store._hot_connection().close()  # broken under us (as a failed disk or a killed handle would leave it)
    with pytest.raises(sqlite3.ProgrammingError):
        store.issue_cards([card()])
    c = card()
    assert store.issue_cards([c]) == set()  # the write lock was released and a new connection opened
    assert c.card_uuid in _raw_rows(store)


def test_a_connection_broken_inside_the_transaction_is_replaced(store, monkeypatch):
    """Broken after BEGIN, so that not even ROLLBACK runs: the call fails, the next one opens a new connection."""
    kept = card()
    store.issue_cards([kept])
    broken = store._hot_connection()
    row = store._fast_sqlite.row

    def break_then_fail(c):
        broken.close()
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store._fast_sqlite, "row", break_then_fail)
    with pytest.raises(sqlite3.OperationalError):
        store.issue_cards([card()])
    monkeypatch.setattr(store._fast_sqlite, "row", row)
    c = card()
    assert store.issue_cards([c]) == set()
    assert store._hot_connection() is not broken
    assert set(_raw_rows(store)) == {kept.card_uuid, c.card_uuid}


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_an_in_memory_store_keeps_its_tables_after_a_card_write(url):
    """An in-memory database lives in its thread's one pooled connection: the card write must not take it
    away from the other methods (they would find a new, empty database)."""
    store = FeedbackStore(url)
    try:
        c = card()
        store.issue_cards([c])
        assert store.issued_to("open", "migraine-med-safety-sign", [c.card_uuid]) == {c.card_uuid: c.rule_id}
        assert store.record_feedback("migraine-med-safety-sign", [
            {"card": c.card_uuid, "outcome": "overridden", "outcomeTimestamp": "2026-03-01T12:05:00Z"}]) == 1
        assert store.issue_cards([card(key=c.suppression_key)], skip_overridden_since=T0) == {c.suppression_key}
    finally:
        store.close()


def test_a_failed_write_leaves_the_hot_connection_usable(store):
    good, naive = card(), card(at=datetime(2026, 3, 1, 12, 0))
    store.issue_cards([good])
    conn = store._hot_connection()
    with pytest.raises(ValueError):
        store.issue_cards([card(), naive])
    assert store._hot_connection() is conn and not conn.in_transaction  # rolled back, kept
    assert list(_raw_rows(store)) == [good.card_uuid]


def test_a_forked_child_opens_its_own_hot_connection(store):
    import os

    store.issue_cards([card()])
    parent = store._hot_connection()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a gunicorn worker forked after the store was used
        try:
            os.close(read)
            c = card()
            ok = store._hot_connection() is not parent and store.issue_cards([c]) == set()
            os.write(write, c.card_uuid.encode() if ok else b"")
        finally:
            os._exit(0)
    os.close(write)
    child_card = os.read(read, 100).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert child_card and child_card in _raw_rows(store)
    assert store._hot_connection() is parent
