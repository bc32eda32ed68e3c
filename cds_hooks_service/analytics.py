"""Aggregated read queries behind the ``/admin`` analytics page and its CSV exports.

Every figure is computed in SQL over a half-open UTC window ``[start, end)`` of card issue times, so a
store with millions of cards is never loaded into Python: the queries return one row per rule (and mode),
per rule and day, per rule and override reason (top few), or one page of individual overrides.

Index use (no index is added for this module): rule ids are listed with a loose index scan of
``ix_cds_issued_card_rule_issued`` (one index seek per distinct rule id), and every other query
restricts ``cds_issued_card`` by ``rule_id IN (...) AND issued_at >= :start AND issued_at < :end``, a
range search on that same index; feedback rows are joined through the index on ``cds_feedback.card_uuid``.

Counts are of distinct cards: a card with two "overridden" feedback messages counts once in the rates.
Only active cards can receive feedback (shadow cards are never shown), so rates are over active cards;
shadow cards are counted as would-fire.

Nothing here returns patient data: the store holds none (the suppression key is an HMAC, a comment is
reduced to "given or not"). Card uuids and hook instance ids are not returned either: they are not
patient data, but the EHR can link them to a patient, and the page does not need them.
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from typing import Iterator

from sqlalchemy import and_, case, func, select, text

from .store import FeedbackStore, feedback, issued_card

UTC = timezone.utc

# "candidate for tuning": overridden in more than 90 % of at least 50 active cards (issue 13)
TUNING_MIN_CARDS = 50
TUNING_OVERRIDE_RATE = 0.90
TOP_REASONS = 5
MAX_RULE_IDS = 1000  # bound on the loose index scan (a store with more rule ids is not a real rulebook)
Z95 = 1.959963984540054  # two-sided 95 % normal quantile


@dataclass(frozen=True)
class Window:
    """Whole UTC days ``first`` .. ``last`` (inclusive)."""
    first: date
    last: date

    @property
    def start(self) -> datetime:
        return datetime.combine(self.first, time(0), tzinfo=UTC)

    @property
    def end(self) -> datetime:  # exclusive
        return datetime.combine(self.last + timedelta(days=1), time(0), tzinfo=UTC)

    @property
    def days(self) -> int:
        return (self.last - self.first).days + 1

    def day_list(self) -> list[str]:
        return [(self.first + timedelta(days=i)).isoformat() for i in range(self.days)]


@contextlib.contextmanager
def _reading(store: FeedbackStore, **options):
    """A read connection. On PostgreSQL without JIT for its transaction: these queries run in well under a
    second, and compiling them (the planner's costs of the per-card sub-plans trigger it) took about 2 s."""
    with store.engine.connect() as conn:
        if store.dialect == "postgresql":  # before the options: a streaming cursor cannot run SET
            conn.exec_driver_sql("SET LOCAL jit = off")
        yield conn.execution_options(**options) if options else conn


def _day_expr(store: FeedbackStore):
    ic = issued_card
    if store.dialect == "sqlite":
        return func.date(ic.c.issued_at)  # stored as naive UTC text
    return func.to_char(func.timezone("UTC", ic.c.issued_at), "YYYY-MM-DD")


def rule_ids(store: FeedbackStore) -> list[str]:
    """Every rule id that has cards in the store, in order: a loose index scan (one seek per id)."""
    ic = issued_card
    # WITH RECURSIVE r(id) AS (SELECT min(rule_id) ... UNION ALL SELECT (SELECT min(rule_id) WHERE rule_id > r.id))
    sql = text(f"""
        WITH RECURSIVE r(id, n) AS (
            SELECT (SELECT min(rule_id) FROM {ic.name}), 1
            UNION ALL
            SELECT (SELECT min(rule_id) FROM {ic.name} WHERE rule_id > r.id), r.n + 1
            FROM r WHERE r.id IS NOT NULL AND r.n < :cap
        )
        SELECT id FROM r WHERE id IS NOT NULL""")
    with _reading(store) as conn:
        return [row[0] for row in conn.execute(sql, {"cap": MAX_RULE_IDS})]


def _in_window(ids: list[str], window: Window):
    ic = issued_card
    return and_(ic.c.rule_id.in_(ids), ic.c.issued_at >= window.start, ic.c.issued_at < window.end)


def _flag(cond):
    return func.max(case((cond, 1), else_=0))


def daily(store: FeedbackStore, ids: list[str], window: Window) -> dict[str, dict[str, dict]]:
    """Per rule and UTC day: cards per mode and the time of the last card per mode; of the active cards those
    with feedback, accepted, with a suggestion taken, overridden (cards, not feedback messages).

    Two aggregates over the (rule_id, issued_at) index range: the cards, and the cards joined with their
    feedback (reduced to one row per card first, so a card with several messages counts once)."""
    if not ids:
        return {}
    ic, fb = issued_card, feedback
    day = _day_expr(store)
    cards = (select(ic.c.rule_id, day, ic.c.mode, func.count(), func.max(ic.c.issued_at))
             .where(_in_window(ids, window)).group_by(ic.c.rule_id, day, ic.c.mode))
    per_card = (select(ic.c.rule_id.label("rule_id"), day.label("day"),
                       _flag(fb.c.outcome == "accepted").label("accepted"),
                       _flag(fb.c.accepted_suggestions != "[]").label("suggestion"),
                       _flag(fb.c.outcome == "overridden").label("overridden"))
                .select_from(ic.join(fb, fb.c.card_uuid == ic.c.card_uuid))
                .where(_in_window(ids, window), ic.c.mode != "shadow")
                .group_by(ic.c.card_uuid, ic.c.rule_id, day)).subquery()
    answered = (select(per_card.c.rule_id, per_card.c.day, func.count(), func.sum(per_card.c.accepted),
                       func.sum(per_card.c.suggestion), func.sum(per_card.c.overridden))
                .group_by(per_card.c.rule_id, per_card.c.day))
    out: dict[str, dict[str, dict]] = {}

    def cell(rule_id, d):
        return out.setdefault(rule_id, {}).setdefault(d, {
            "day": d, "active": 0, "overridden": 0, "shadow": 0, "with_feedback": 0, "accepted": 0,
            "suggestion_accepted": 0, "last": {}})

    with _reading(store) as conn:
        for rule_id, d, mode, issued, last in conn.execute(cards):
            c = cell(rule_id, d)
            c["shadow" if mode == "shadow" else "active"] += issued  # anything but shadow was shown
            c["last"][mode] = last
        for rule_id, d, with_fb, accepted, suggestion, overridden in conn.execute(answered):
            c = cell(rule_id, d)
            c["with_feedback"], c["accepted"] = with_fb, int(accepted or 0)
            c["suggestion_accepted"], c["overridden"] = int(suggestion or 0), int(overridden or 0)
    return out


def totals_of(days: dict[str, dict]) -> dict:
    """A rule's figures over the window, summed from its days (see daily); last_mode = mode of its last card."""
    out = {"active": 0, "shadow": 0, "with_feedback": 0, "accepted": 0, "suggestion_accepted": 0, "overridden": 0}
    last: dict[str, datetime] = {}
    for cell in days.values():
        for k in out:
            out[k] += cell[k]
        for mode, at in cell["last"].items():
            if mode not in last or at > last[mode]:
                last[mode] = at
    out["last_mode"] = max(last, key=last.get) if last else None
    return out


def day_figures(days: dict[str, dict]) -> list[dict]:
    """A rule's days for the chart and the JSON: day, active (shown), overridden, shadow (would fire)."""
    return [{"day": d, "active": days[d]["active"], "overridden": days[d]["overridden"], "shadow": days[d]["shadow"]}
            for d in sorted(days)]


def top_reasons(store: FeedbackStore, ids: list[str], window: Window, per_rule: int = TOP_REASONS) -> dict[str, list]:
    """Per rule, the most frequent coded override reasons (distinct cards), at most `per_rule` each."""
    if not ids:
        return {}
    ic, fb = issued_card, feedback
    n = func.count(fb.c.card_uuid.distinct())
    grouped = (select(ic.c.rule_id.label("rule_id"), fb.c.override_system.label("system"),
                      fb.c.override_code.label("code"), func.max(fb.c.override_display).label("display"),
                      n.label("n"),
                      func.row_number().over(partition_by=ic.c.rule_id,
                                             order_by=(n.desc(), fb.c.override_system, fb.c.override_code))
                      .label("rank"))
               .select_from(ic.join(fb, fb.c.card_uuid == ic.c.card_uuid))
               .where(_in_window(ids, window), fb.c.outcome == "overridden", fb.c.override_code.is_not(None))
               .group_by(ic.c.rule_id, fb.c.override_system, fb.c.override_code)).subquery()
    q = (select(grouped.c.rule_id, grouped.c.system, grouped.c.code, grouped.c.display, grouped.c.n)
         .where(grouped.c.rank <= per_rule).order_by(grouped.c.rule_id, grouped.c.rank))
    out: dict[str, list] = {}
    with _reading(store) as conn:
        for rule_id, system, code, display, count in conn.execute(q):
            out.setdefault(rule_id, []).append({"system": system, "code": code, "display": display, "count": count})
    return out


# -- individual overrides ---------------------------------------------------
def _overrides_query(ids: list[str], window: Window):
    ic, fb = issued_card, feedback
    other = feedback.alias("fb_any")
    # suggestions accepted for the same card, by any of its feedback messages (normally the "accepted" one)
    accepted = (select(func.max(other.c.accepted_suggestions))
                .where(other.c.card_uuid == ic.c.card_uuid, other.c.accepted_suggestions != "[]")
                .scalar_subquery())
    return (select(fb.c.id, fb.c.outcome_timestamp, ic.c.issued_at, ic.c.rule_id, fb.c.override_system,
                   fb.c.override_code, fb.c.override_display, fb.c.has_comment, accepted.label("accepted"),
                   ic.c.service_id, ic.c.indicator, ic.c.mode, ic.c.card_uuid)
            .select_from(ic.join(fb, and_(fb.c.card_uuid == ic.c.card_uuid, fb.c.outcome == "overridden")))
            .where(_in_window(ids, window)))


def count_overrides(store: FeedbackStore, ids: list[str], window: Window) -> int:
    """Override feedback messages (not distinct cards) on cards of `ids` issued in the window."""
    if not ids:
        return 0
    ic, fb = issued_card, feedback
    q = (select(func.count()).select_from(
        ic.join(fb, and_(fb.c.card_uuid == ic.c.card_uuid, fb.c.outcome == "overridden")))
        .where(_in_window(ids, window)))
    with _reading(store) as conn:
        return conn.execute(q).scalar_one()


def _override_row(row) -> dict:
    try:
        accepted = json.loads(row.accepted) if row.accepted else []
    except ValueError:
        accepted = []
    return {"overridden_at": row.outcome_timestamp, "issued_at": row.issued_at, "rule_id": row.rule_id,
            "reason_system": row.override_system, "reason_code": row.override_code,
            "reason_display": row.override_display, "comment_given": bool(row.has_comment),
            "accepted_suggestion_uuids": [str(u) for u in accepted if isinstance(u, str)] if isinstance(accepted, list) else [],
            "service_id": row.service_id, "indicator": row.indicator, "mode": row.mode,
            "_card_uuid": row.card_uuid}  # for mapping suggestion uuids to ids only; never shown or exported


def overrides_page(store: FeedbackStore, ids: list[str], window: Window, *, limit: int, offset: int) -> list[dict]:
    """One page of individual overrides, newest card first (the order of the (rule_id, issued_at) index)."""
    if not ids:
        return []
    ic, fb = issued_card, feedback
    q = (_overrides_query(ids, window).order_by(ic.c.issued_at.desc(), fb.c.id.desc())
         .limit(limit).offset(offset))
    with _reading(store) as conn:
        return [_override_row(row) for row in conn.execute(q)]


def iter_overrides(store: FeedbackStore, ids: list[str], window: Window, *, chunk: int = 1000) -> Iterator[dict]:
    """All overrides of the window, streamed from the database (server-side cursor), newest card first."""
    if not ids:
        return
    ic, fb = issued_card, feedback
    q = _overrides_query(ids, window).order_by(ic.c.issued_at.desc(), fb.c.id.desc())
    with _reading(store, stream_results=True, yield_per=chunk) as conn:
        for row in conn.execute(q):
            yield _override_row(row)


# -- statistics ---------------------------------------------------------------
def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval of a proportion k/n (95 % by default); None when n == 0.

    Unlike k/n alone it shows how little a small day says: 2 of 2 gives 34-100 %, 40 of 100 gives 31-50 %."""
    if n <= 0:
        return None
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def is_tuning_candidate(active: int, overridden: int) -> bool:
    """Overridden in more than 90 % of at least 50 active cards."""
    # in integers (10 * overridden > 9 * active): 45 of 50 is exactly 90 % and not flagged
    return active >= TUNING_MIN_CARDS and overridden * 100 > round(TUNING_OVERRIDE_RATE * 100) * active
