"""Feedback store: issued cards, CDS Hooks 2.0 feedback, and JWT replay ids.

SQLAlchemy Core on two backends:

* SQLite file (embedded default, ``sqlite:///path/file.db``): WAL journal,
  ``synchronous=NORMAL``, a 30 s busy timeout, and every write transaction
  opened with ``BEGIN IMMEDIATE`` so concurrent writers (threads, or gunicorn
  worker processes sharing the file) queue on the write lock instead of
  failing with "database is locked" when a read would have to be upgraded.
* PostgreSQL (``postgresql://user@host:port/db``), via the psycopg 3 driver.

Tables (created if missing):

``cds_issued_card``
    card_uuid PK, rule_id, service_id, client_id (the JWT ``iss`` of the client the card was sent to, or
    "open"), hook_instance, indicator, mode ("active" | "shadow"), suppression_key (opaque HMAC
    hex of client, patient, draft order and rule; not indexed: no query reads cards by it), issued_at; index
    (rule_id, issued_at).
``cds_feedback``
    id PK, card_uuid (indexed), service_id, client_id, rule_id, outcome, override_system, override_code,
    override_display, has_comment, accepted_suggestions (JSON text list of ids),
    outcome_timestamp, received_at; UNIQUE(card_uuid, outcome, outcome_timestamp). Feedback is stored only
    for a card issued to the same client (:class:`UnknownCards` otherwise).
``cds_override``
    card_uuid PK, suppression_key, issued_at (of the card); index (suppression_key, issued_at). One row per
    card overridden, written with its "overridden" feedback: the hot path's "was this draft's card overridden
    at order-select?" is then an index lookup, however often the same draft order has been seen.
``cds_used_jti``
    jti PK (the SHA-256 hex of the JWT's jti: fixed width whatever the client sends), expires_at.

Column widths are the request schema's limits (schemas/*.json) or wider, and NUL characters are refused
before a request reaches the store, so no client input makes PostgreSQL refuse a write.

No patient data and no tokens are stored: the suppression key is an HMAC, and
the free-text ``userComment`` of an override is reduced to ``has_comment``.
All timestamps are timezone-aware UTC in Python (SQLite stores them as naive
UTC text, PostgreSQL as ``timestamptz``).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Iterable

from sqlalchemy import (
    Boolean, bindparam, Column, DateTime, Index, Integer, MetaData, String, Table, Text,
    UniqueConstraint, create_engine, event, func, select, text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.types import TypeDecorator

from .clients import OPEN_CLIENT_ID

UTC = timezone.utc
_JTI_PURGE_INTERVAL_S = 300
_JTI_PURGE_GRACE = timedelta(minutes=10)  # keep recently expired ids (clock-skew leeway)
_IN_CHUNK = 500
CLIENT_ID_WIDTH = 2048  # a JWT issuer (a URL) from the operator's CDS_JWT_ISSUERS file
HOOK_INSTANCE_WIDTH = 200  # = schemas/cds-request.json hookInstance maxLength
CARD_UUID_WIDTH = 64  # = schemas/feedback.json card maxLength (this service's card ids are 36-character UUIDs)


def _utc(dt: datetime) -> datetime:
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"timezone-aware datetime required, got naive {dt!r}")
    return dt.astimezone(UTC)


class UTCDateTime(TypeDecorator):
    """Aware-UTC datetimes on both backends (naive UTC text on SQLite)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        value = _utc(value)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = MetaData()

issued_card = Table(
    "cds_issued_card", metadata,
    Column("card_uuid", String(CARD_UUID_WIDTH), primary_key=True),
    Column("rule_id", String(200), nullable=False),
    Column("service_id", String(200), nullable=False),
    Column("client_id", String(CLIENT_ID_WIDTH), nullable=False, server_default=OPEN_CLIENT_ID),
    Column("hook_instance", String(HOOK_INSTANCE_WIDTH), nullable=False),
    Column("indicator", String(16), nullable=False),
    Column("mode", String(16), nullable=False),
    Column("suppression_key", String(128), nullable=False),  # not indexed: read only with the row (0003)
    Column("issued_at", UTCDateTime(), nullable=False),
    Index("ix_cds_issued_card_rule_issued", "rule_id", "issued_at"),
)

feedback = Table(
    "cds_feedback", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("card_uuid", String(CARD_UUID_WIDTH), nullable=False, index=True),
    Column("service_id", String(200), nullable=False),
    Column("client_id", String(CLIENT_ID_WIDTH), nullable=False, server_default=OPEN_CLIENT_ID),
    Column("rule_id", String(200), nullable=True),  # NULL only in rows stored before feedback was checked
    Column("outcome", String(16), nullable=False),
    Column("override_system", String(500)),
    Column("override_code", String(200)),
    Column("override_display", String(500)),
    Column("has_comment", Boolean, nullable=False, default=False),
    Column("accepted_suggestions", Text, nullable=False, default="[]"),
    Column("outcome_timestamp", UTCDateTime(), nullable=False),
    Column("received_at", UTCDateTime(), nullable=False),
    UniqueConstraint("card_uuid", "outcome", "outcome_timestamp",
                     name="uq_cds_feedback_card_outcome_ts"),
)

override = Table(
    "cds_override", metadata,
    Column("card_uuid", String(CARD_UUID_WIDTH), primary_key=True),
    Column("suppression_key", String(128), nullable=False),
    Column("issued_at", UTCDateTime(), nullable=False),
    Index("ix_cds_override_key_issued", "suppression_key", "issued_at"),
)

used_jti = Table(
    "cds_used_jti", metadata,
    Column("jti", String(255), primary_key=True),
    Column("expires_at", UTCDateTime(), nullable=False, index=True),
)


@dataclass(frozen=True)
class IssuedCard:
    card_uuid: str
    rule_id: str
    service_id: str
    hook_instance: str
    indicator: str  # info | warning | critical
    mode: str  # "active" (shown) or "shadow" (evaluated, counted, not shown)
    suppression_key: str  # opaque HMAC hex of (client, FHIR server, patient, draft order, rule)
    issued_at: datetime  # tz-aware UTC
    client_id: str = OPEN_CLIENT_ID  # the client the card was sent to (JWT iss, or "open")
    # the keys whose override suppresses this card (its own level's and the more severe levels'); () = its own only
    covered_by: tuple[str, ...] = ()

    def covering(self) -> tuple[str, ...]:
        return self.covered_by or (self.suppression_key,)


class UnknownCards(ValueError):
    """Feedback named cards this service did not issue to the calling client (for this service)."""

    def __init__(self, card_uuids: list[str]):
        self.card_uuids = card_uuids
        super().__init__(f"{len(card_uuids)} card(s) not issued to this client: nothing stored")


def jti_key(jti: str) -> str:
    """What is stored for a JWT id: its SHA-256 hex (fixed width, no NUL, whatever the client sent)."""
    return hashlib.sha256(jti.encode("utf-8", "surrogatepass")).hexdigest()


def _parse_ts(value: str) -> datetime:
    """RFC 3339 -> aware UTC (naive input is taken as UTC)."""
    dt = datetime.fromisoformat(value.strip().replace("z", "Z"))
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _normalise_url(url: str) -> str:
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


_forks = 0  # how many forks this process is away from its first ancestor that imported this module


def _forked() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_forked)  # what a store's hot connection was opened in (no getpid per call)


class FeedbackStore:
    """Thread-safe store; one instance per process (each has its own pool)."""

    def __init__(self, url: str):
        url = _normalise_url(url)
        parsed = make_url(url)
        self.dialect = parsed.get_backend_name()
        self._lock_file = None
        if self.dialect == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                os.makedirs(os.path.dirname(os.path.abspath(parsed.database)), exist_ok=True)
                self._lock_file = os.open(os.path.abspath(parsed.database) + "-writelock", os.O_RDWR | os.O_CREAT, 0o600)
            # a local file: no dropped connections to detect, so no pre-ping round trip per checkout
            self.engine = create_engine(url, connect_args={"timeout": 30})
            event.listen(self.engine, "connect", _sqlite_on_connect)
            event.listen(self.engine, "begin", _sqlite_on_begin)
            self._insert = sqlite.insert
        elif self.dialect == "postgresql":
            self.engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20,
                                        connect_args={"connect_timeout": 5})
            self._insert = postgresql.insert
        else:
            raise ValueError(f"unsupported database URL scheme: {parsed.drivername}")
        # Hot-path statements, built once (SQLAlchemy then reuses their compiled form).
        self._insert_cards = self._insert(issued_card).on_conflict_do_nothing(index_elements=["card_uuid"])
        self._overridden_q = (
            select(override.c.suppression_key).distinct()
            .where(override.c.suppression_key.in_(bindparam("keys", expanding=True)),
                   override.c.issued_at >= bindparam("since")))
        # Write transactions: BEGIN IMMEDIATE on SQLite (no-op option elsewhere). On SQLite, writers first
        # queue on a thread lock and an flock of "<file>-writelock" (the processes sharing the file): SQLite's
        # own busy handler retries a locked database after sleeps of 1, 2, 5, 10, ... 100 ms (measured under
        # load with 2 gunicorn workers: p99 in the hundreds of ms), the kernel hands the flock over at once.
        self._writer = self.engine.execution_options(cds_write=True)
        self._write_lock = threading.Lock() if self.dialect == "sqlite" else contextlib.nullcontext()
        # The hot path's DB-API write (and its connection kept out of the pool) on a SQLite file only: an in-memory
        # database lives in the one pooled connection of its thread, which the hot path must not take away.
        self._fast_sqlite = _SqliteCardWriter(self.engine.dialect) if self._lock_file is not None else None
        self._hot: tuple[int, object] | None = None  # (fork generation, DB-API connection) of _hot_connection
        self._inherited: list = []  # hot connections of a parent process (after a fork): kept, never closed
        self._purge_lock = threading.Lock()
        self._last_purge = 0.0
        with self._write() as conn:
            if self.dialect == "postgresql":  # serialise concurrent create_all
                conn.execute(text("SELECT pg_advisory_xact_lock(7345012261)"))
            # an empty database is created at the newest schema revision; an older one is refused with the
            # command to run (`cds-hooks-service db upgrade`: migrations/, which also backfills cds_override)
            from .migrations import prepare_schema
            prepare_schema(conn, metadata)

    @contextlib.contextmanager
    def _write(self):
        with self._write_lock:
            if self._lock_file is not None:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX)  # released by the kernel if the process dies
            try:
                with self._writer.begin() as conn:
                    yield conn
            finally:
                if self._lock_file is not None:
                    fcntl.flock(self._lock_file, fcntl.LOCK_UN)

    @classmethod
    def from_url(cls, url: str) -> "FeedbackStore":
        return cls(url)

    # -- writes -----------------------------------------------------------
    @staticmethod
    def _card_row(c: IssuedCard) -> dict:
        return {"card_uuid": c.card_uuid, "rule_id": c.rule_id, "service_id": c.service_id,
                "client_id": c.client_id, "hook_instance": c.hook_instance, "indicator": c.indicator, "mode": c.mode,
                "suppression_key": c.suppression_key, "issued_at": _utc(c.issued_at)}

    def record_cards(self, cards: list[IssuedCard]) -> None:
        self.issue_cards(cards)

    def issued_to(self, client_id: str, service_id: str, card_uuids: Iterable[str]) -> dict[str, str]:
        """card_uuid -> rule_id of those of ``card_uuids`` this service issued to ``client_id``."""
        uuids = sorted(set(card_uuids))
        found: dict[str, str] = {}
        with self.engine.connect() as conn:
            for i in range(0, len(uuids), _IN_CHUNK):
                q = self._issued_to_q(uuids[i:i + _IN_CHUNK], client_id, service_id)
                found.update((uuid, rule_id) for uuid, rule_id in conn.execute(q))
        return found

    @staticmethod
    def _issued_to_q(uuids: list[str], client_id: str, service_id: str | None, *extra):
        q = (select(issued_card.c.card_uuid, issued_card.c.rule_id, *extra)
             .where(issued_card.c.card_uuid.in_(uuids), issued_card.c.client_id == client_id))
        return q if service_id is None else q.where(issued_card.c.service_id == service_id)

    def record_feedback(self, service_id: str, items: list[dict], client_id: str = OPEN_CLIENT_ID) -> int:
        """Store feedback items (CDS Hooks 2.0 form) of ``client_id`` in one transaction.

        Every item must name a card issued to ``client_id``; otherwise :class:`UnknownCards` is raised and
        nothing is stored (the HTTP view also checks, with :meth:`issued_to`, that the card is the service's
        own). The same item again is kept once."""
        if not items:
            return 0
        now = datetime.now(UTC)
        rows = []
        for item in items:
            reason = (item.get("overrideReason") or {})
            coding = reason.get("reason") or {}
            rows.append({
                "card_uuid": str(item["card"]),
                "service_id": service_id,
                "client_id": client_id,
                "rule_id": None,
                "outcome": item["outcome"],
                "override_system": coding.get("system"),
                "override_code": coding.get("code"),
                "override_display": coding.get("display"),
                "has_comment": bool((reason.get("userComment") or "").strip()),
                "accepted_suggestions": json.dumps(
                    [s["id"] for s in item.get("acceptedSuggestions") or [] if "id" in s]),
                "outcome_timestamp": _parse_ts(item["outcomeTimestamp"]),
                "received_at": now,
            })
        uuids = sorted({r["card_uuid"] for r in rows})
        stmt = self._insert(feedback).on_conflict_do_nothing(
            index_elements=["card_uuid", "outcome", "outcome_timestamp"])
        with self._write() as conn:
            cards = {}  # card_uuid -> (rule_id, suppression_key, issued_at)
            for i in range(0, len(uuids), _IN_CHUNK):
                q = self._issued_to_q(uuids[i:i + _IN_CHUNK], client_id, None,
                                      issued_card.c.suppression_key, issued_card.c.issued_at)
                cards.update((uuid, rest) for uuid, *rest in conn.execute(q))
            unknown = [u for u in uuids if u not in cards]
            if unknown:
                raise UnknownCards(unknown)
            for r in rows:
                r["rule_id"] = cards[r["card_uuid"]][0]
            conn.execute(stmt, rows)
            overridden = [{"card_uuid": u, "suppression_key": cards[u][1], "issued_at": cards[u][2]}
                          for u in sorted({r["card_uuid"] for r in rows if r["outcome"] == "overridden"})]
            if overridden:
                conn.execute(self._insert(override).on_conflict_do_nothing(index_elements=["card_uuid"]), overridden)
        return len(rows)

    def use_jti(self, jti: str, expires_at: datetime) -> bool:
        stmt = self._insert(used_jti).values(jti=jti_key(jti), expires_at=_utc(expires_at))
        stmt = stmt.on_conflict_do_nothing(index_elements=["jti"]).execution_options(
            preserve_rowcount=True)  # rowcount of an INSERT is not kept otherwise
        with self._write() as conn:
            if self._purge_due():
                cutoff = datetime.now(UTC) - _JTI_PURGE_GRACE
                conn.execute(used_jti.delete().where(used_jti.c.expires_at < cutoff))
            return conn.execute(stmt).rowcount == 1

    def _purge_due(self) -> bool:
        with self._purge_lock:
            now = time.monotonic()
            if self._last_purge and now - self._last_purge < _JTI_PURGE_INTERVAL_S:
                return False
            self._last_purge = now
            return True

    def issue_cards(self, cards: list[IssuedCard], *, skip_overridden_since: datetime | None = None) -> set[str]:
        """Record issued cards in one write transaction (the hot path: one checkout per hook call).

        With ``skip_overridden_since``, cards one of whose covering keys (``IssuedCard.covering``) received an
        "overridden" outcome for a card issued since then are not recorded; the overridden keys are returned
        (their cards are not to be shown).

        The cards are committed before this returns (so before the hook call is answered): a crash of the
        process after the answer loses none. On a SQLite file the transaction runs on a DB-API connection kept
        for it (no pool checkout) with statements rendered once (``_issue_cards_sqlite``: ~0.1 ms instead of
        ~0.4-0.9 ms of CPU through SQLAlchemy's execution layer); the columns are bound by the table's own types,
        so the rows are the same."""
        if not cards:
            return set()
        if self._fast_sqlite is not None:
            return self._issue_cards_sqlite(cards, skip_overridden_since)
        overridden: set[str] = set()
        with self._write() as conn:
            if skip_overridden_since is not None:
                keys = sorted({k for c in cards for k in c.covering()})
                overridden = set(conn.execute(self._overridden_q, {
                    "keys": keys, "since": _utc(skip_overridden_since)}).scalars())
            rows = [self._card_row(c) for c in cards if overridden.isdisjoint(c.covering())]
            if rows:
                conn.execute(self._insert_cards, rows)
        return overridden

    def _issue_cards_sqlite(self, cards: list[IssuedCard], since: datetime | None) -> set[str]:
        """issue_cards on SQLite: BEGIN IMMEDIATE, the override look-up, the insert and COMMIT on the process's
        hot-path DB-API connection (``_hot_connection``; same locks as ``_write``), with the SQL and the type
        conversions prepared once."""
        fast = self._fast_sqlite
        keys = sorted({k for c in cards for k in c.covering()})
        with self._write_lock:
            if self._lock_file is not None:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX)
            try:
                try:
                    cursor = self._hot_connection().cursor()
                except Exception:
                    self._close_hot()  # e.g. closed under us: the next call opens a new one
                    raise
                try:
                    cursor.execute("BEGIN IMMEDIATE")
                    overridden: set[str] = set()
                    for i in range(0, len(keys), _IN_CHUNK) if since is not None else ():
                        chunk = keys[i:i + _IN_CHUNK]
                        overridden.update(row[0] for row in cursor.execute(
                            fast.overridden_sql(len(chunk)), (*chunk, fast.time(_utc(since)))))
                    rows = [fast.row(c) for c in cards if overridden.isdisjoint(c.covering())]
                    if rows:
                        cursor.executemany(fast.insert_sql, rows)
                    cursor.execute("COMMIT")
                    cursor.close()
                except BaseException:
                    self._abandon(cursor)
                    raise
            finally:
                if self._lock_file is not None:
                    fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        return overridden

    def _hot_connection(self):
        """The DB-API connection of the hot path's write on SQLite (``_issue_cards_sqlite``): one per process,
        opened through the engine (so with its PRAGMAs) on first use and kept out of the pool, so that a hook
        call does not check a connection out and back in. Used only under the write locks, so by one caller at
        a time whatever the worker's threads or greenlets; a forked child opens its own."""
        hot = self._hot
        if hot is None or hot[0] != _forks:
            self._close_hot()  # (a parent's, after a fork, is kept: never used, closed or collected here)
            fairy = self.engine.raw_connection()
            fairy.detach()  # out of the pool: closed by close(), never handed to another caller
            hot = self._hot = (_forks, fairy.dbapi_connection)
        return hot[1]

    def _abandon(self, cursor) -> None:
        """After a failure on the hot path's connection: roll back what it began and close the cursor; if even
        that fails (a broken connection), close the connection, so that the next call opens a new one."""
        try:
            if cursor.connection.in_transaction:
                cursor.execute("ROLLBACK")
            cursor.close()
        except Exception:  # noqa: BLE001 - the original error is the one raised
            self._close_hot()

    def _close_hot(self) -> None:
        hot, self._hot = self._hot, None
        if hot is None:
            return
        if hot[0] != _forks:  # a parent's, inherited through fork: SQLite's connections must not be touched by
            self._inherited.append(hot[1])  # a forked child, not even closed (or collected) there
            return
        try:
            hot[1].close()
        except Exception:  # noqa: BLE001 - closing a broken connection
            pass

    # -- reads ------------------------------------------------------------
    def overridden_keys(self, keys: Iterable[str], since: datetime) -> set[str]:
        keys = sorted(set(keys))
        since = _utc(since)
        found: set[str] = set()
        with self.engine.connect() as conn:
            for i in range(0, len(keys), _IN_CHUNK):
                found.update(conn.execute(self._overridden_q, {"keys": keys[i:i + _IN_CHUNK], "since": since}).scalars())
        return found

    def stats(self, since: datetime | None = None) -> list[dict]:
        """Per-rule figures for cards issued at/after `since` (all time if None).

        Feedback counts are distinct cards; a rule's ``mode`` is the mode of its
        most recently issued card (a rule moved from shadow to active reports
        "active")."""
        ic, fb = issued_card, feedback
        cond = [ic.c.issued_at >= _utc(since)] if since is not None else []
        if self.dialect == "sqlite":
            day = func.date(ic.c.issued_at)
        else:
            day = func.to_char(func.timezone("UTC", ic.c.issued_at), "YYYY-MM-DD")
        joined = ic.join(fb, fb.c.card_uuid == ic.c.card_uuid)
        out: dict[str, dict] = {}
        latest: dict[str, datetime] = {}
        with self.engine.connect() as conn:
            q = (select(ic.c.rule_id, ic.c.mode, func.count(), func.max(ic.c.issued_at))
                 .where(*cond).group_by(ic.c.rule_id, ic.c.mode))
            for rule_id, mode, n, last in conn.execute(q):
                r = out.setdefault(rule_id, {
                    "rule_id": rule_id, "mode": mode, "issued": 0, "accepted": 0,
                    "overridden": 0, "override_rate": None, "top_override_reasons": [],
                    "by_day": []})
                r["issued"] += n
                if rule_id not in latest or last > latest[rule_id]:
                    latest[rule_id], r["mode"] = last, mode
            q = (select(ic.c.rule_id, fb.c.outcome, func.count(fb.c.card_uuid.distinct()))
                 .select_from(joined).where(*cond).group_by(ic.c.rule_id, fb.c.outcome))
            for rule_id, outcome, n in conn.execute(q):
                if outcome in ("accepted", "overridden"):
                    out[rule_id][outcome] = n
            q = (select(ic.c.rule_id, fb.c.override_system, fb.c.override_code,
                        func.max(fb.c.override_display), func.count())
                 .select_from(joined)
                 .where(*cond, fb.c.outcome == "overridden", fb.c.override_code.is_not(None))
                 .group_by(ic.c.rule_id, fb.c.override_system, fb.c.override_code))
            reasons = defaultdict(list)
            for rule_id, system, code, display, n in conn.execute(q):
                reasons[rule_id].append(
                    {"system": system, "code": code, "display": display, "count": n})
            days: dict[str, dict[str, dict]] = defaultdict(dict)
            q = select(ic.c.rule_id, day, func.count()).where(*cond).group_by(ic.c.rule_id, day)
            for rule_id, d, n in conn.execute(q):
                days[rule_id][d] = {"day": d, "issued": n, "overridden": 0}
            q = (select(ic.c.rule_id, day, func.count(fb.c.card_uuid.distinct()))
                 .select_from(joined).where(*cond, fb.c.outcome == "overridden")
                 .group_by(ic.c.rule_id, day))
            for rule_id, d, n in conn.execute(q):
                days[rule_id][d]["overridden"] = n
        for rule_id, r in out.items():
            r["override_rate"] = r["overridden"] / r["issued"] if r["issued"] else None
            r["top_override_reasons"] = sorted(
                reasons[rule_id],
                key=lambda x: (-x["count"], x["system"] or "", x["code"]))[:5]
            r["by_day"] = [days[rule_id][d] for d in sorted(days[rule_id])]
        return [out[k] for k in sorted(out)]

    # -- housekeeping -----------------------------------------------------
    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except SQLAlchemyError:
            return False

    def close(self) -> None:
        with self._write_lock:  # not while a hook call's card write runs on the hot connection
            self._close_hot()
        self.engine.dispose()
        if self._lock_file is not None:
            os.close(self._lock_file)
            self._lock_file = None


class _SqliteCardWriter:
    """The hot path's SQL for SQLite, rendered once from the tables, and the row values bound by the columns'
    own types (UTCDateTime: naive UTC text in SQLAlchemy's format), so rows equal those SQLAlchemy writes."""

    COLUMNS = ("card_uuid", "rule_id", "service_id", "client_id", "hook_instance", "indicator", "mode",
               "suppression_key", "issued_at")

    def __init__(self, dialect):
        if [c.name for c in issued_card.columns] != list(self.COLUMNS):  # the metadata is the source of truth
            raise RuntimeError("cds_issued_card's columns changed: update _SqliteCardWriter.COLUMNS and row()")
        self.insert_sql = (f"INSERT INTO {issued_card.name} ({', '.join(self.COLUMNS)}) VALUES "
                           f"({', '.join('?' * len(self.COLUMNS))}) ON CONFLICT (card_uuid) DO NOTHING")
        self.time = issued_card.c.issued_at.type.dialect_impl(dialect).bind_processor(dialect)
        self._overridden: dict[int, str] = {}

    def overridden_sql(self, n: int) -> str:
        sql = self._overridden.get(n)
        if sql is None:
            sql = self._overridden[n] = (
                f"SELECT DISTINCT suppression_key FROM {override.name} WHERE suppression_key IN "
                f"({', '.join('?' * n)}) AND issued_at >= ?")
        return sql

    def row(self, c: IssuedCard) -> tuple:
        return (c.card_uuid, c.rule_id, c.service_id, c.client_id, c.hook_instance, c.indicator, c.mode,
                c.suppression_key, self.time(c.issued_at))


def _sqlite_on_connect(dbapi_conn, _record) -> None:
    dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see _sqlite_on_begin)
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _sqlite_on_begin(conn) -> None:
    conn.exec_driver_sql(
        "BEGIN IMMEDIATE" if conn.get_execution_options().get("cds_write") else "BEGIN")
