"""FeedbackStore on SQLite and PostgreSQL: correctness, privacy, concurrency."""
from __future__ import annotations

import multiprocessing
import threading
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import MetaData, func, select

from cds_hooks_service.store import FeedbackStore, IssuedCard, UnknownCards, feedback, issued_card, override, used_jti

UTC = timezone.utc
T0 = datetime(2025, 3, 10, 9, 0, tzinfo=UTC)
SNOMED = "http://snomed.info/sct"
LOCAL = "https://example.org/cds/override-reasons"


def card(rule="opioid-mme", *, mode="active", key=None, at=T0, uid=None, service="med-safety", client="open",
         hook_instance=None):
    return IssuedCard(
        card_uuid=uid or str(uuid.uuid4()), rule_id=rule, service_id=service,
        hook_instance=hook_instance or str(uuid.uuid4()), indicator="warning", mode=mode,
        suppression_key=key or uuid.uuid4().hex, issued_at=at, client_id=client)


def fb(card_uuid, outcome="accepted", *, at=T0, code=None, system=LOCAL, display=None,
       comment=None, suggestions=()):
    item = {"card": card_uuid, "outcome": outcome,
            "outcomeTimestamp": at.isoformat().replace("+00:00", "Z")}
    if suggestions:
        item["acceptedSuggestions"] = [{"id": s} for s in suggestions]
    if code or comment:
        item["overrideReason"] = {}
        if code:
            item["overrideReason"]["reason"] = {"code": code, "system": system, "display": display}
        if comment:
            item["overrideReason"]["userComment"] = comment
    return item


def feedback_rows(store):
    with store.engine.connect() as conn:
        return [r._asdict() for r in conn.execute(select(feedback).order_by(feedback.c.id))]


def count_feedback(store):
    with store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(feedback)).scalar_one()


@pytest.fixture
def store(store_url):
    s = FeedbackStore.from_url(store_url)
    yield s
    s.close()


def test_ping_and_reopen_existing_schema(store, store_url):
    assert store.ping()
    again = FeedbackStore(store_url)  # tables exist already: no error
    assert again.ping()
    again.close()


def test_record_cards_and_feedback(store):
    c, c2 = card("dhe-triptan-24h"), card("dhe-triptan-24h")
    store.record_cards([c, c2])
    store.record_cards([])  # no-op
    store.record_cards([c])  # re-recording the same card is harmless
    n = store.record_feedback("med-safety", [
        fb(c.card_uuid, "accepted", suggestions=["s-1", "s-2"]),
        fb(c2.card_uuid, "overridden", code="benefit-outweighs-risk", display="Benefit outweighs risk"),
    ])
    assert n == 2
    rows = feedback_rows(store)
    assert len(rows) == 2
    known, over = rows
    assert known["card_uuid"] == c.card_uuid and known["rule_id"] == "dhe-triptan-24h"
    assert known["outcome"] == "accepted" and known["service_id"] == "med-safety" and known["client_id"] == "open"
    assert known["accepted_suggestions"] == '["s-1", "s-2"]'
    assert known["outcome_timestamp"] == T0 and known["outcome_timestamp"].tzinfo is not None
    assert known["received_at"].tzinfo is not None
    assert over["rule_id"] == "dhe-triptan-24h" and over["outcome"] == "overridden"
    assert (over["override_system"], over["override_code"], over["override_display"]) == (
        LOCAL, "benefit-outweighs-risk", "Benefit outweighs risk")
    assert store.record_feedback("med-safety", []) == 0


def test_feedback_only_for_cards_issued_to_that_client(store):
    """Issue 10.2: feedback on a card never issued, or issued to another client, is refused whole: nothing of
    the batch is stored, and the override index is untouched. (The HTTP view also requires the card to be the
    service's own, through issued_to.)"""
    mine, theirs, other_service = card(client="iss-a"), card(client="iss-b"), card(client="iss-a", service="other")
    store.record_cards([mine, theirs, other_service])
    assert store.issued_to("iss-a", "med-safety", [other_service.card_uuid]) == {}
    for bad in (str(uuid.uuid4()), theirs.card_uuid):
        with pytest.raises(UnknownCards) as caught:
            store.record_feedback("med-safety", [fb(mine.card_uuid, "overridden", code="x"),
                                                 fb(bad, "overridden", code="x")], client_id="iss-a")
        assert caught.value.card_uuids == [bad]
    assert count_feedback(store) == 0
    with store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(override)).scalar_one() == 0
    assert store.record_feedback("med-safety", [fb(mine.card_uuid, "overridden", code="x")], client_id="iss-a") == 1
    assert store.issued_to("iss-a", "med-safety", [mine.card_uuid, theirs.card_uuid, "nope"]) == {
        mine.card_uuid: "opioid-mme"}
    assert feedback_rows(store)[0]["client_id"] == "iss-a"


def test_client_and_long_hook_instance_are_stored_in_full(store):
    """Issue 10.9: columns as wide as the request schema allows (hookInstance maxLength 200; PostgreSQL
    refused the old varchar(64) with an error, and the hook call answered 500)."""
    issuer = "https://ehr.example.org/" + "i" * 1000
    c = card(client=issuer, hook_instance="h" * 200)
    store.record_cards([c])
    with store.engine.connect() as conn:
        row = conn.execute(select(issued_card).where(issued_card.c.card_uuid == c.card_uuid)).one()
    assert row.hook_instance == "h" * 200 and row.client_id == issuer


def test_any_jti_is_stored_at_a_fixed_width(store):
    """Issue 10.9: a jti longer than the column (or holding NUL) is a replay check like any other, not a 500."""
    exp = datetime.now(UTC) + timedelta(minutes=5)
    for jti in ("j" * 5000, "nul\x00in-jti"):
        assert store.use_jti(jti, exp) is True
        assert store.use_jti(jti, exp) is False
    with store.engine.connect() as conn:
        assert {len(j) for j in conn.execute(select(used_jti.c.jti)).scalars()} == {64}


def test_feedback_is_idempotent(store):
    c = card()
    store.record_cards([c])
    items = [fb(c.card_uuid, "overridden", code="x"), fb(c.card_uuid, "accepted")]
    assert store.record_feedback("med-safety", items) == 2
    # same card/outcome/instant again, also written with a different UTC offset
    again = fb(c.card_uuid, "overridden", code="x")
    again["outcomeTimestamp"] = T0.astimezone(timezone(timedelta(hours=2))).isoformat()
    assert store.record_feedback("med-safety", [again, fb(c.card_uuid, "accepted")]) == 2
    assert count_feedback(store) == 2
    # a later, distinct outcome is new
    store.record_feedback("med-safety", [fb(c.card_uuid, "accepted", at=T0 + timedelta(seconds=1))])
    assert count_feedback(store) == 3


def test_user_comment_never_stored(store, store_url, tmp_path):
    secret = "Pt Jane Q. Doe MRN 4471-22 says ketamine helped"
    c, c2 = card(), card()
    store.record_cards([c, c2])
    store.record_feedback("med-safety", [
        fb(c.card_uuid, "overridden", code="patient-preference", comment=secret),
        fb(c2.card_uuid, "overridden", comment="  "),  # blank comment, no reason
    ])
    rows = feedback_rows(store)
    assert [r["has_comment"] for r in rows] == [True, False]
    md = MetaData()
    md.reflect(store.engine)
    assert {"cds_issued_card", "cds_feedback", "cds_used_jti"} <= set(md.tables)
    with store.engine.connect() as conn:
        dump = repr([list(conn.execute(select(t))) for t in md.sorted_tables])
    assert "patient-preference" in dump  # sanity: the dump does contain the data
    for fragment in (secret, "Jane", "4471-22", "ketamine helped"):
        assert fragment not in dump
    if store_url.startswith("sqlite"):
        store.close()
        raw = b"".join(p.read_bytes() for p in tmp_path.glob("store-under-test.sqlite3*"))
        assert b"4471-22" not in raw and b"Jane" not in raw


def test_overridden_keys(store):
    k_over, k_acc, k_old, k_none = "k-over", "k-acc", "k-old", "k-none"
    cards = [card(key=k_over, at=T0), card(key=k_acc, at=T0),
             card(key=k_old, at=T0 - timedelta(days=30)), card(key=k_none, at=T0)]
    store.record_cards(cards)
    store.record_feedback("med-safety", [
        fb(cards[0].card_uuid, "overridden", code="x"),
        fb(cards[1].card_uuid, "accepted"),
        fb(cards[2].card_uuid, "overridden", code="x"),
    ])
    since = T0 - timedelta(days=7)
    assert store.overridden_keys([k_over, k_acc, k_old, k_none, "other"], since) == {k_over}
    assert store.overridden_keys([k_over, k_old], T0 - timedelta(days=60)) == {k_over, k_old}
    assert store.overridden_keys(iter([k_over]), T0 + timedelta(seconds=1)) == set()
    assert store.overridden_keys([], since) == set()
    many = [f"k{i}" for i in range(1500)] + [k_over]  # more than one IN-chunk
    assert store.overridden_keys(many, since) == {k_over}
    with pytest.raises(ValueError):
        store.overridden_keys([k_over], datetime(2025, 1, 1))  # naive datetime refused


def test_an_override_is_an_index_lookup_however_often_the_draft_was_seen(store):
    """The same draft order seen thousands of times (an EHR re-checking it; a load test) must not make the
    hot path's override check scan every card issued for it."""
    key = "k-busy"
    store.record_cards([card(key=key, at=T0 + timedelta(seconds=i)) for i in range(300)])
    assert store.issue_cards([card(key=key)], skip_overridden_since=T0) == set()
    overridden = card(key=key, at=T0 + timedelta(hours=1))
    store.record_cards([overridden])
    store.record_feedback("med-safety", [fb(overridden.card_uuid, "overridden", code="x")] * 2)  # a retry
    assert store.issue_cards([card(key=key)], skip_overridden_since=T0) == {key}
    assert store.issue_cards([card(key=key)], skip_overridden_since=T0 + timedelta(hours=2)) == set()
    with store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(override)).scalar_one() == 1
        if store.dialect == "sqlite":
            sql = store._overridden_q.compile(store.engine).string.replace("(__[POSTCOMPILE_keys])", "(?, ?)")
            plan = " ".join(row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, ("a", "b", "2025")))
            assert "ix_cds_override_key_issued" in plan, plan


def test_use_jti_replay(store):
    exp = datetime.now(UTC) + timedelta(minutes=5)
    assert store.use_jti("jti-1", exp) is True
    assert store.use_jti("jti-1", exp) is False
    assert store.use_jti("jti-2", exp) is True
    # a fresh instance (another worker) also sees the replay
    other = FeedbackStore(str(store.engine.url.render_as_string(hide_password=False)))
    assert other.use_jti("jti-1", exp) is False
    other.close()


def test_use_jti_purges_long_expired(store):
    long_ago = datetime.now(UTC) - timedelta(days=1)
    assert store.use_jti("old", long_ago)
    store._last_purge = 0.0  # force the next call to purge
    assert store.use_jti("new", datetime.now(UTC) + timedelta(minutes=5))
    assert store.use_jti("old", long_ago) is True  # purged, so no longer known


def test_stats_on_known_dataset(store):
    d1, d2 = T0, T0 + timedelta(days=1)
    a = [card("A", at=d1) for _ in range(3)] + [card("A", at=d2) for _ in range(2)]
    b = [card("B", mode="shadow", at=d1 + timedelta(hours=14, minutes=59))]  # 23:59 UTC
    old = card("A", at=d1 - timedelta(days=10))
    store.record_cards(a + b + [old])
    store.record_feedback("med-safety", [
        fb(a[0].card_uuid, "accepted", suggestions=["s"]),
        fb(a[1].card_uuid, "overridden", code="r1", display="Reason one"),
        fb(a[2].card_uuid, "overridden", code="r1", display="Reason one"),
        fb(a[3].card_uuid, "overridden", code="r2", system=SNOMED, display="Two"),
        fb(a[4].card_uuid, "overridden"),  # no reason given
        fb(old.card_uuid, "overridden", code="r3"),
    ])
    stats = store.stats(since=d1 - timedelta(days=1))
    assert [s["rule_id"] for s in stats] == ["A", "B"]
    sa, sb = stats
    assert sa["mode"] == "active" and sb["mode"] == "shadow"
    assert (sa["issued"], sa["accepted"], sa["overridden"]) == (5, 1, 4)
    assert sa["override_rate"] == pytest.approx(0.8)
    assert sa["top_override_reasons"] == [
        {"system": LOCAL, "code": "r1", "display": "Reason one", "count": 2},
        {"system": SNOMED, "code": "r2", "display": "Two", "count": 1},
    ]
    assert sa["by_day"] == [
        {"day": "2025-03-10", "issued": 3, "overridden": 2},
        {"day": "2025-03-11", "issued": 2, "overridden": 2},
    ]
    assert (sb["issued"], sb["accepted"], sb["overridden"], sb["override_rate"]) == (1, 0, 0, 0.0)
    assert sb["by_day"] == [{"day": "2025-03-10", "issued": 1, "overridden": 0}]
    assert sb["top_override_reasons"] == []

    everything = {s["rule_id"]: s for s in store.stats()}
    assert everything["A"]["issued"] == 6 and everything["A"]["overridden"] == 5
    assert everything["A"]["by_day"][0] == {"day": "2025-02-28", "issued": 1, "overridden": 1}
    assert store.stats(since=d2 + timedelta(days=1)) == []


def test_stats_top_five_reasons_and_mode_switch(store):
    cards = [card("C", mode="shadow", at=T0)] + [
        card("C", at=T0 + timedelta(hours=1 + i)) for i in range(7)]
    store.record_cards(cards)
    store.record_feedback("med-safety", [
        fb(c.card_uuid, "overridden", code=f"r{min(i, 6)}") for i, c in enumerate(cards)])
    (s,) = store.stats()
    assert s["mode"] == "active"  # most recent card's mode
    assert s["issued"] == 8 and s["overridden"] == 8 and s["override_rate"] == 1.0
    assert len(s["top_override_reasons"]) == 5
    assert s["top_override_reasons"][0] == {"system": LOCAL, "code": "r6", "display": None, "count": 2}


# -- concurrency -------------------------------------------------------------

N_THREADS, PER_THREAD = 20, 50


@pytest.mark.slow  # waits on a real time-out or runs a concurrency stress (tests/conftest.py)
def test_concurrent_feedback_nothing_lost(store, store_url):
    cards = [card(f"rule-{t % 4}") for t in range(N_THREADS) for _ in range(PER_THREAD)]
    store.record_cards(cards)
    per_instance = store_url.startswith("sqlite")  # mimic separate worker processes
    stores = [FeedbackStore(store_url) if per_instance else store for _ in range(N_THREADS)]
    barrier = threading.Barrier(N_THREADS)
    errors = []

    def client(t):
        try:
            barrier.wait(timeout=30)
            for i in range(PER_THREAD):
                c = cards[t * PER_THREAD + i]
                outcome = "overridden" if i % 2 else "accepted"
                assert stores[t].record_feedback(
                    "med-safety", [fb(c.card_uuid, outcome, code="r1" if i % 2 else None)]) == 1
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(t,)) for t in range(N_THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    if per_instance:
        for s in stores:
            s.close()
    assert not errors, errors[:3]
    total = N_THREADS * PER_THREAD
    fresh = FeedbackStore(store_url)
    try:
        assert count_feedback(fresh) == total
        stats = fresh.stats()
        assert sum(s["accepted"] + s["overridden"] for s in stats) == total
        assert sum(s["overridden"] for s in stats) == total // 2
    finally:
        fresh.close()


@pytest.mark.slow  # waits on a real time-out or runs a concurrency stress (tests/conftest.py)
def test_concurrent_jti_single_use(store, store_url):
    exp = datetime.now(UTC) + timedelta(minutes=5)
    jtis = [f"jti-{i}" for i in range(25)]
    per_instance = store_url.startswith("sqlite")
    stores = [FeedbackStore(store_url) if per_instance else store for _ in range(10)]
    barrier = threading.Barrier(len(stores))
    wins, errors = [], []

    def client(s):
        try:
            barrier.wait(timeout=30)
            wins.extend(j for j in jtis if s.use_jti(j, exp))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=client, args=(s,)) for s in stores]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    if per_instance:
        for s in stores:
            s.close()
    assert not errors, errors[:3]
    assert sorted(wins) == sorted(jtis)  # every jti accepted exactly once


def _process_writer(url, worker, n, barrier):
    s = FeedbackStore(url)  # each process opens (and maybe creates) the database itself
    barrier.wait(timeout=60)
    for i in range(n):
        s.record_cards([card(f"proc-{worker}", uid=f"{worker}-{i}")])
        s.record_feedback("med-safety", [fb(f"{worker}-{i}", "overridden", code="r")])
    s.close()


def test_sqlite_multiprocess_writers(tmp_path):
    url = f"sqlite:///{tmp_path}/shared.db"  # not created beforehand
    ctx = multiprocessing.get_context("spawn")
    n_proc, per_proc = 4, 100
    barrier = ctx.Barrier(n_proc)
    procs = [ctx.Process(target=_process_writer, args=(url, w, per_proc, barrier))
             for w in range(n_proc)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * n_proc
    s = FeedbackStore(url)
    try:
        assert count_feedback(s) == n_proc * per_proc
        stats = s.stats()
        assert [(x["rule_id"], x["issued"], x["overridden"]) for x in stats] == [
            (f"proc-{w}", per_proc, per_proc) for w in range(n_proc)]
        with s.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        s.close()
