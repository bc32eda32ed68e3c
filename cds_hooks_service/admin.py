"""Read-only rule analytics for the pharmacists who own the rules.

``GET /admin`` (HTML) shows the rules side by side for a date range (``from``/``to``, UTC days, default
the last 30 days): cards shown, shadow would-fire counts, the override rate with its volume and 95 %
interval, accepted cards and suggestions, cards without feedback, a "candidate for tuning" flag; per rule
a daily chart (override rate with its interval above the cards per day) and the top override reasons.
``GET /admin/rules/<rule_id>/overrides`` lists the individual overrides of one rule; ``/admin/rules.csv``
and ``/admin/overrides.csv`` export the table and the overrides; ``/admin/stats.json`` the figures.
The queries are in analytics.py (aggregated in SQL). They take seconds over a year of a busy service's cards,
so every view runs away from the hook calls (``off_loop``): under the gevent worker, whose connections share one
thread, a view run there held up every hook call of its worker until it was done. They run on a pool of two
native threads of their own per worker (``serving.ADMIN_THREADS``); further views wait their turn.

Access needs the admin token (``CDS_ADMIN_TOKEN``), sent as the password of HTTP Basic (any user
name) or as ``Authorization: Bearer <token>``. Without a configured token the page does not exist
(404). The store holds no patient data, so nothing patient-level can be shown here.
"""
from __future__ import annotations

import base64
import binascii
import contextvars
import csv
import functools
import hashlib
import hmac
import io
import math
import re
import secrets
from datetime import date, datetime, timedelta, timezone

from flask import Blueprint, Response, abort, current_app, jsonify, make_response, render_template, request

from . import analytics
from .analytics import Window
from .cards import suggestion_uuid
from .errors import BadRequest, NotFound, error_response
from .ratelimit import FailureLimiter
from .runtime import runtime
from .services import SERVICES

UTC = timezone.utc
DEFAULT_DAYS = 30
MAX_DAYS = 366
QUICK_DAYS = (7, 30, 90, 365)
PAGE_SIZE = 100  # overrides per drill-down page
MAX_EXPORT_ROWS = 100_000  # overrides per CSV export
RULE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
REALM = "cds-admin"

bp = Blueprint("admin", __name__, template_folder="templates")


def off_loop(view):
    """The view run by ``Runtime.run_admin`` (the admin's native threads under gevent, where SQLite and psycopg
    release the GIL while the database works; the calling thread elsewhere), in a copy of the request's context:
    the hook calls of the worker are served meanwhile. Its exceptions are raised here, for Flask's error
    handlers."""
    @functools.wraps(view)
    def run(**view_args):
        return runtime().run_admin(contextvars.copy_context().run, functools.partial(view, **view_args))

    return run


# -- access ---------------------------------------------------------------
def _presented_secret(header: str | None) -> bytes | None:
    """The secret in an ``Authorization`` header: the Basic password or the Bearer token."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        return value.encode("latin-1", "replace")  # WSGI headers are latin-1 decoded bytes
    if scheme.lower() == "basic" and value:
        try:
            decoded = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return None
        _user, sep, password = decoded.partition(b":")
        return password if sep else None
    return None


def _authorised(token: str) -> bool:
    presented = _presented_secret(request.headers.get("Authorization"))
    if presented is None:
        return False
    # equal-length digests: the comparison reveals neither content nor length of the token
    return hmac.compare_digest(hashlib.sha256(presented).digest(), hashlib.sha256(token.encode("utf-8")).digest())


# Failed admin logins per client address: 10 a minute, then 429 until the oldest failure is a minute old.
ADMIN_FAILURES_PER_MINUTE = 10


def _failures() -> FailureLimiter:
    """This app's limiter (one per app, so per worker process)."""
    limiter = current_app.extensions.get("cds.admin_failures")
    if limiter is None:
        limiter = current_app.extensions["cds.admin_failures"] = FailureLimiter(ADMIN_FAILURES_PER_MINUTE, 60.0)
    return limiter


@bp.before_request
def _guard():
    token = runtime().settings.admin_token
    if not token:
        abort(404)  # page disabled: answered like any unknown URL
    client = request.remote_addr or "unknown"
    wait = _failures().blocked(client)
    if wait:
        response = error_response(429, "too many failed admin logins from this address; try again later",
                                  "throttled")
        response.headers["Retry-After"] = str(math.ceil(wait))
        return _no_store(response)
    if not _authorised(token):
        _failures().failed(client)
        response = error_response(401, "admin credentials required: HTTP Basic (password = admin token) "
                                       "or 'Authorization: Bearer <admin token>'", "login")
        response.headers["WWW-Authenticate"] = f'Basic realm="{REALM}", charset="UTF-8"'
        return _no_store(response)
    return None


@bp.after_request
def _headers(response):
    return _no_store(response)


def _no_store(response):
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers.setdefault("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'")
    return response


# -- the reporting window ---------------------------------------------------
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _today() -> date:
    settings = runtime().settings
    return (settings.fixed_now or datetime.now(UTC)).astimezone(UTC).date()


def _date_param(name: str) -> date | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return None
    try:
        if not _DATE.fullmatch(raw):
            raise ValueError
        return date.fromisoformat(raw)
    except ValueError:
        raise BadRequest(f"{name} must be a date written YYYY-MM-DD (UTC), got {raw[:20]!r}", field=name) from None


def _days_param() -> int | None:
    raw = request.args.get("days")
    if raw is None or raw == "":
        return None
    days = int(raw) if re.fullmatch(r"[0-9]{1,4}", raw) else 0
    if not 1 <= days <= MAX_DAYS:
        raise BadRequest(f"days must be a whole number from 1 to {MAX_DAYS}, got {raw[:20]!r}", field="days")
    return days


def _window_param() -> Window:
    """``from``/``to`` (UTC days, both included; default: the last 30 days, today included), or ``days=N``
    for the last N days."""
    days, first, last = _days_param(), _date_param("from"), _date_param("to")
    if days is not None:
        if first or last:
            raise BadRequest("give either days or from/to, not both", field="days")
        last = _today()
        return Window(last - timedelta(days=days - 1), last)
    last = last or _today()
    first = first or last - timedelta(days=DEFAULT_DAYS - 1)
    if first > last:
        raise BadRequest(f"from ({first}) is after to ({last})", field="from")
    if (last - first).days + 1 > MAX_DAYS:
        raise BadRequest(f"the date range may span at most {MAX_DAYS} days, got {(last - first).days + 1}",
                         field="from")
    return Window(first, last)


def _range_args(window: Window) -> dict:
    return {"from": window.first.isoformat(), "to": window.last.isoformat()}


# -- figures ------------------------------------------------------------------
def _store_rule_ids() -> list[str]:
    return analytics.rule_ids(runtime().store)


def collect(window: Window) -> dict:
    """Per-rule figures: the rulebook's rules in rulebook order, then rules known only to the store that
    have cards in the window."""
    rt = runtime()
    store = rt.store
    known = [rule.id for rule in rt.rulebook.rules]
    ids = list(dict.fromkeys(known + _store_rule_ids()))
    days = analytics.daily(store, ids, window)
    reasons = analytics.top_reasons(store, ids, window)

    def figures(rule_id, title, mode, enabled, in_rulebook):
        rule_days = days.get(rule_id, {})
        return _rule_figures(rule_id, title, mode, enabled, in_rulebook, analytics.totals_of(rule_days),
                             analytics.day_figures(rule_days), reasons.get(rule_id, []))

    rules = [figures(rule.id, rule.title, rule.mode, rule.enabled, True) for rule in rt.rulebook.rules]
    for rule_id in sorted(set(days) - set(known)):
        rules.append(figures(rule_id, None, analytics.totals_of(days[rule_id])["last_mode"], None, False))
    shown = sum(r["shown"] for r in rules)
    overridden = sum(r["overridden"] for r in rules)
    return {
        "from": window.first.isoformat(), "to": window.last.isoformat(), "days": window.days,
        "since": window.start.isoformat().replace("+00:00", "Z"), "until": window.last.isoformat(),
        "tuning_rule": {"min_cards": analytics.TUNING_MIN_CARDS, "override_rate_above": analytics.TUNING_OVERRIDE_RATE},
        "totals": {"shown": shown, "would_fire": sum(r["would_fire"] for r in rules), "overridden": overridden,
                   "override_rate": overridden / shown if shown else None},
        "rules": rules,
    }


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _rule_figures(rule_id, title, mode, enabled, in_rulebook, row, by_day, reasons) -> dict:
    row = row or {}
    shown, overridden = row.get("active", 0), row.get("overridden", 0)
    no_feedback = shown - row.get("with_feedback", 0)
    interval = analytics.wilson_interval(overridden, shown)
    return {
        "rule_id": rule_id,
        "title": title,
        "mode": mode,  # the rule's configured mode (for a rule no longer in the rulebook: of its last card)
        "enabled": enabled,
        "in_rulebook": in_rulebook,
        "issued_mode": row.get("last_mode"),  # mode of the most recent card in the window; None if none
        "shown": shown,  # active cards: shown to clinicians
        "would_fire": row.get("shadow", 0),  # shadow cards: evaluated and counted, not shown
        "overridden": overridden,
        "override_rate": _share(overridden, shown),
        "override_rate_95": list(interval) if interval else None,
        "accepted": row.get("accepted", 0),
        "acceptance_rate": _share(row.get("accepted", 0), shown),
        "suggestion_accepted": row.get("suggestion_accepted", 0),
        "no_feedback": no_feedback,
        "no_feedback_share": _share(no_feedback, shown),
        "tuning_candidate": analytics.is_tuning_candidate(shown, overridden),
        "top_override_reasons": reasons,
        "by_day": by_day,
    }


# -- chart geometry (numbers only; the template draws and escapes) -----------
W = 720
LEFT, RIGHT = 60, 84  # the right margin holds the labels of the period and tuning lines
RATE_TOP, RATE_H = 16, 120  # override rate panel
COUNT_GAP, COUNT_H = 26, 84  # cards-per-day panel below it
X_LABELS = 18  # below the last panel
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
SMALL_DAY = 10  # days with fewer active cards than this are drawn hollow: their rate says little


def _short_day(day: str) -> str:
    d = date.fromisoformat(day)
    return f"{d.day} {_MONTHS[d.month - 1]}"


def _pct(v: float) -> str:
    return f"{v:.0%}"


def _nice_max(v: int) -> int:
    """A round axis maximum >= v (1, 2, 5, 10, 20, 50, ...)."""
    v = max(v, 1)
    base = 10 ** (len(str(v)) - 1)
    for m in (1, 2, 5, 10):
        if v <= m * base:
            return m * base
    return 10 * base


def _chart(rule: dict, day_list: list[str]) -> dict | None:
    """Per day: the override rate with its 95 % interval (points sized by volume, hollow under SMALL_DAY cards)
    above the cards per day (shown, of them overridden; shadow would-fire beside). None without cards."""
    if not rule["shown"] and not rule["would_fire"]:
        return None
    data = {d["day"]: d for d in rule["by_day"]}
    has_rate, has_shadow = rule["shown"] > 0, rule["would_fire"] > 0
    n = len(day_list)
    plot_w = W - LEFT - RIGHT
    step = plot_w / n
    rate_top = RATE_TOP
    count_top = rate_top + RATE_H + COUNT_GAP if has_rate else RATE_TOP
    count_bottom = count_top + COUNT_H
    height = count_bottom + X_LABELS + 22

    def x_of(i: int) -> float:  # centre of the day's slot
        return LEFT + step * (i + 0.5)

    def y_rate(v: float) -> float:
        return rate_top + RATE_H * (1 - v)

    c_max = _nice_max(max([max(d["active"], d["shadow"]) for d in data.values()] + [1]))

    def y_count(v: float) -> float:
        return count_bottom - COUNT_H * min(v, c_max) / c_max

    max_active = max([d["active"] for d in data.values()] + [1])
    points, bars, labels = [], [], []
    both = has_rate and has_shadow
    bar_w = step * (0.4 if both else 0.7)
    for i, day in enumerate(day_list):
        d = data.get(day)
        if not d:
            continue
        x = x_of(i)
        if d["active"]:
            k, m = d["overridden"], d["active"]
            lo, hi = analytics.wilson_interval(k, m)
            rate = k / m
            title = (f"{day}: {k} of {m} card{'s' if m != 1 else ''} overridden ({_pct(rate)}; "
                     f"95% interval {_pct(lo)}–{_pct(hi)})")
            points.append({"x": round(x, 1), "y": round(y_rate(rate), 1), "y_lo": round(y_rate(lo), 1),
                           "y_hi": round(y_rate(hi), 1), "r": round(2.5 + 4.5 * math.sqrt(m / max_active), 1),
                           "small": m < SMALL_DAY, "title": title})
            bx = x - bar_w - step * 0.02 if both else x - bar_w / 2
            bars.append({"kind": "shown", "x": round(bx, 1), "w": round(bar_w, 1), "y": round(y_count(m), 1),
                         "h": round(count_bottom - y_count(m), 1), "title": f"{day}: {m} shown, {k} overridden"})
            if k:
                bars.append({"kind": "overridden", "x": round(bx, 1), "w": round(bar_w, 1),
                             "y": round(y_count(k), 1), "h": round(count_bottom - y_count(k), 1),
                             "title": f"{day}: {k} of {m} overridden"})
            if step >= 18:
                labels.append({"x": round(bx + bar_w / 2, 1), "y": round(y_count(m) - 3, 1), "text": str(m)})
        if d["shadow"]:
            bx = x + step * 0.02 if both else x - bar_w / 2
            bars.append({"kind": "shadow", "x": round(bx, 1), "w": round(bar_w, 1), "y": round(y_count(d["shadow"]), 1),
                         "h": round(count_bottom - y_count(d["shadow"]), 1),
                         "title": f"{day}: would have fired {d['shadow']} time{'s' if d['shadow'] != 1 else ''} (shadow)"})
            if step >= 18:
                labels.append({"x": round(bx + bar_w / 2, 1), "y": round(y_count(d["shadow"]) - 3, 1),
                               "text": str(d["shadow"])})

    every = max(1, -(-n // 8))  # at most 8 date labels, the last day always labelled
    x_ticks = [{"x": round(x_of(i), 1), "label": _short_day(day)}
               for i, day in enumerate(day_list) if (n - 1 - i) % every == 0]
    rate_ticks = [{"y": round(y_rate(t), 1), "label": _pct(t)} for t in (0, 0.5, 1.0)]
    ticks = (0, c_max // 2, c_max) if c_max % 2 == 0 else (0, c_max)  # a middle tick only when it is whole
    count_ticks = [{"y": round(y_count(t), 1), "label": str(t)} for t in ticks]
    period = rule["override_rate"]
    tuning_y = y_rate(analytics.TUNING_OVERRIDE_RATE)
    period_y = y_rate(period) if period is not None else None
    # the two line labels sit in the right margin; keep them apart when the lines are close
    period_label_y = None if period_y is None else (
        tuning_y + 13 if abs(period_y - tuning_y) < 12 else period_y + 4)
    return {
        "width": W, "height": height, "left": LEFT, "right": W - RIGHT,
        "has_rate": has_rate, "has_shadow": has_shadow,
        "rate_top": rate_top, "rate_bottom": rate_top + RATE_H, "rate_mid": rate_top + RATE_H / 2,
        "count_top": count_top, "count_bottom": count_bottom, "count_mid": count_top + COUNT_H / 2,
        "rate_ticks": rate_ticks, "count_ticks": count_ticks, "x_ticks": x_ticks,
        "period_y": round(period_y, 1) if period_y is not None else None,
        "period_label": f"period {_pct(period)}" if period is not None else "",
        "period_label_y": round(period_label_y, 1) if period_label_y is not None else None,
        "tuning_y": round(tuning_y, 1), "tuning_label_y": round(tuning_y + 4, 1), "margin_x": W - RIGHT + 6,
        "points": points, "bars": bars, "labels": labels,
        "label_y": count_bottom + 15, "title_y": height - 5, "mid_x": round(LEFT + plot_w / 2, 1),
    }


# -- views ----------------------------------------------------------------
def _html(template: str, **context):
    nonce = secrets.token_urlsafe(16)
    response = make_response(render_template(
        template, nonce=nonce, generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), **context))
    response.headers["Content-Security-Policy"] = (
        f"default-src 'none'; style-src 'nonce-{nonce}'; frame-ancestors 'none'; "
        "form-action 'self'; base-uri 'none'")
    return response


def _quick_ranges(window: Window) -> list[dict]:
    today = _today()
    out = []
    for d in QUICK_DAYS:
        first = today - timedelta(days=d - 1)
        out.append({"label": f"Last {d} days", "args": {"from": first.isoformat(), "to": today.isoformat()},
                    "current": window.first == first and window.last == today})
    return out


@bp.get("/admin")
@off_loop
def page():
    window = _window_param()
    figures = collect(window)
    for rule in figures["rules"]:
        rule["chart"] = _chart(rule, window.day_list())
    return _html("admin.html", f=figures, w=window, range_args=_range_args(window), quick=_quick_ranges(window))


@bp.get("/admin/stats.json")
@off_loop
def stats_json():
    return jsonify(collect(_window_param()))


# -- CSV --------------------------------------------------------------------
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value) -> str:
    """A CSV cell; text a spreadsheet would run as a formula is prefixed with an apostrophe (CSV injection)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def _csv_response(name: str, header: list[str], rows) -> Response:
    rows = iter(rows)
    run_admin = runtime().run_admin  # the rows are read while the response is sent, after the view

    def chunk(lines) -> str:
        """The next ~64 KB of the file ("" at its end): the rows are read from the database off the loop too."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\r\n")
        for line in lines:
            writer.writerow(line)
            if buf.tell() > 64_000:
                break
        return buf.getvalue()

    def generate():
        yield chunk([header])
        lines = ([_cell(v) for v in row] for row in rows)
        while data := run_admin(chunk, lines):
            yield data

    response = Response(generate(), mimetype="text/csv")
    response.headers["Content-Disposition"] = f'attachment; filename="{name}"'
    return response


RULE_CSV = ["rule_id", "title", "mode", "in_rulebook", "from", "to", "cards_shown", "would_fire_shadow",
            "overridden", "override_rate", "override_rate_95_low", "override_rate_95_high", "accepted",
            "acceptance_rate", "suggestion_accepted", "no_feedback", "no_feedback_share", "candidate_for_tuning"]


@bp.get("/admin/rules.csv")
@off_loop
def rules_csv():
    window = _window_param()
    figures = collect(window)
    rows = [[r["rule_id"], r["title"], r["mode"], r["in_rulebook"], figures["from"], figures["to"], r["shown"],
             r["would_fire"], r["overridden"], r["override_rate"],
             *(r["override_rate_95"] or (None, None)), r["accepted"], r["acceptance_rate"],
             r["suggestion_accepted"], r["no_feedback"], r["no_feedback_share"], r["tuning_candidate"]]
            for r in figures["rules"]]
    return _csv_response(f"cds-rules_{figures['from']}_{figures['to']}.csv", RULE_CSV, rows)


OVERRIDE_CSV = ["overridden_at", "card_issued_at", "rule_id", "reason_system", "reason_code", "reason_display",
                "comment_given", "accepted_suggestions", "hook", "service_id", "indicator"]


def _rule_param(name: str = "rule") -> str | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return None
    return _known_rule(raw, field=name)


def _known_rule(rule_id: str, field: str = "rule") -> str:
    if not RULE_ID.fullmatch(rule_id):
        raise BadRequest(f"{field} is not a rule id (letters, digits, '-', '_', '.'), got {rule_id[:40]!r}", field=field)
    if rule_id not in {r.id for r in runtime().rulebook.rules} and rule_id not in _store_rule_ids():
        raise NotFound(f"no rule {rule_id!r} in the rulebook or the store")
    return rule_id


def _suggestion_labels(rule) -> object:
    """(card uuid, suggestion uuids) -> the labels of the rule's suggestions (uuids are derived from the ids)."""
    suggestions = rule.suggestions if rule else []

    def labels(card_uuid: str, uuids: list[str]) -> list[str]:
        by_uuid = {suggestion_uuid(card_uuid, s.id): s for s in suggestions}
        return [f"{by_uuid[u].label} ({by_uuid[u].id})" if u in by_uuid else "a suggestion not in the current rules"
                for u in uuids]

    return labels


def _hook(service_id: str) -> str:
    service = SERVICES.get(service_id)
    return service.hook if service else f"unknown service {service_id}"


def _override_view(row: dict, labels_for) -> dict:
    """What may be shown of one override: no card uuid, no hook instance, no comment text (never stored)."""
    labels = labels_for(row["rule_id"])(row["_card_uuid"], row["accepted_suggestion_uuids"])
    return {"overridden_at": row["overridden_at"], "issued_at": row["issued_at"], "rule_id": row["rule_id"],
            "reason_system": row["reason_system"], "reason_code": row["reason_code"],
            "reason_display": row["reason_display"], "comment_given": row["comment_given"],
            "accepted_suggestions": labels, "hook": _hook(row["service_id"]), "service_id": row["service_id"],
            "indicator": row["indicator"]}


def _labels_cache():
    """rule id -> its suggestion labeller; the rulebook is taken now (CSV rows are made after the request)."""
    rules = {r.id: r for r in runtime().rulebook.rules}
    cache: dict[str, object] = {}

    def get(rule_id: str):
        if rule_id not in cache:
            cache[rule_id] = _suggestion_labels(rules.get(rule_id))
        return cache[rule_id]

    return get


@bp.get("/admin/overrides.csv")
@off_loop
def overrides_csv():
    window = _window_param()
    rule_id = _rule_param()
    store = runtime().store
    ids = [rule_id] if rule_id else list(dict.fromkeys([r.id for r in runtime().rulebook.rules] + _store_rule_ids()))
    total = analytics.count_overrides(store, ids, window)
    if total > MAX_EXPORT_ROWS:
        raise BadRequest(f"{total} overrides in this range, more than the {MAX_EXPORT_ROWS} one export may hold: "
                         "choose a shorter date range or one rule", field="from")
    labels_for = _labels_cache()

    def rows():
        for row in analytics.iter_overrides(store, ids, window):
            v = _override_view(row, labels_for)
            yield [v["overridden_at"], v["issued_at"], v["rule_id"], v["reason_system"], v["reason_code"],
                   v["reason_display"], v["comment_given"], "; ".join(v["accepted_suggestions"]), v["hook"],
                   v["service_id"], v["indicator"]]

    name = f"cds-overrides_{rule_id + '_' if rule_id else ''}{window.first}_{window.last}.csv"
    return _csv_response(name, OVERRIDE_CSV, rows())


# -- drill-down: the overrides of one rule -------------------------------------
@bp.get("/admin/rules/<rule_id>/overrides")
@off_loop
def rule_overrides(rule_id: str):
    window = _window_param()
    rule_id = _known_rule(rule_id, field="rule_id")
    raw_page = request.args.get("page") or "1"
    page_no = int(raw_page) if re.fullmatch(r"[0-9]{1,6}", raw_page) else 0
    if page_no < 1:
        raise BadRequest(f"page must be a whole number from 1, got {raw_page[:20]!r}", field="page")
    store = runtime().store
    total = analytics.count_overrides(store, [rule_id], window)
    pages = max(1, -(-total // PAGE_SIZE))
    if page_no > pages:
        raise BadRequest(f"page {page_no} is past the last page ({pages})", field="page")
    labels_for = _labels_cache()
    rows = [_override_view(r, labels_for) for r in analytics.overrides_page(
        store, [rule_id], window, limit=PAGE_SIZE, offset=(page_no - 1) * PAGE_SIZE)]
    rule = next((r for r in runtime().rulebook.rules if r.id == rule_id), None)
    figures = analytics.totals_of(analytics.daily(store, [rule_id], window).get(rule_id, {}))
    return _html("admin_overrides.html", rule_id=rule_id, title=rule.title if rule else None, rows=rows,
                 total=total, page=page_no, pages=pages, page_size=PAGE_SIZE, w=window,
                 range_args=_range_args(window), shown=figures.get("active", 0),
                 overridden=figures.get("overridden", 0))
