"""Read-only rule performance page for the pharmacists who own the rules.

``GET /admin`` (HTML) and ``GET /admin/stats.json`` show, per rule of the current rulebook (and any
rule still in the store but no longer in the rulebook): cards issued, accepted, overridden, the
override rate, the top override reasons and the override rate per day as an inline SVG chart.
Shadow rules show how often they would have fired.

Access needs the admin token (``CDS_ADMIN_TOKEN``), sent as the password of HTTP Basic (any user
name) or as ``Authorization: Bearer <token>``. Without a configured token the page does not exist
(404). The store holds no patient data, so nothing patient-level can be shown here.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import re
import secrets
from datetime import date, datetime, time, timedelta, timezone

from flask import Blueprint, abort, current_app, jsonify, make_response, render_template, request

from .errors import BadRequest, error_response
from .ratelimit import FailureLimiter
from .runtime import runtime

UTC = timezone.utc
DEFAULT_DAYS = 30
MAX_DAYS = 366
REALM = "cds-admin"

bp = Blueprint("admin", __name__, template_folder="templates")


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


# -- figures --------------------------------------------------------------
def _days_param() -> int:
    raw = request.args.get("days")
    if raw is None or raw == "":
        return DEFAULT_DAYS
    days = int(raw) if re.fullmatch(r"[0-9]{1,4}", raw) else 0
    if not 1 <= days <= MAX_DAYS:
        raise BadRequest(f"days must be a whole number from 1 to {MAX_DAYS}, got {raw[:20]!r}", field="days")
    return days


def _window(days: int) -> tuple[datetime, list[str]]:
    """The last `days` UTC calendar days, today included: (start instant, ['YYYY-MM-DD', ...])."""
    settings = runtime().settings
    now = (settings.fixed_now or datetime.now(UTC)).astimezone(UTC)
    first = now.date() - timedelta(days=days - 1)
    return datetime.combine(first, time(0), tzinfo=UTC), [
        (first + timedelta(days=i)).isoformat() for i in range(days)]


def collect(days: int) -> dict:
    """Per-rule figures: the rulebook's rules in rulebook order, then rules known only to the store."""
    rt = runtime()
    since, day_list = _window(days)
    by_rule = {row["rule_id"]: row for row in rt.store.stats(since)}
    rules = []
    for rule in rt.rulebook.rules:
        rules.append(_rule_figures(rule.id, rule.title, rule.mode, rule.enabled, True, by_rule.pop(rule.id, None)))
    for rule_id in sorted(by_rule):
        row = by_rule[rule_id]
        rules.append(_rule_figures(rule_id, None, row["mode"], None, False, row))
    return {"since": since.isoformat().replace("+00:00", "Z"), "until": day_list[-1], "days": days,
            "day_list": day_list, "rules": rules}


def _rule_figures(rule_id, title, mode, enabled, in_rulebook, row) -> dict:
    row = row or {}
    return {
        "rule_id": rule_id,
        "title": title,
        "mode": mode,  # the rule's configured mode (the store's, for a rule no longer in the rulebook)
        "enabled": enabled,
        "in_rulebook": in_rulebook,
        # mode of the most recently issued card in the window; None when none were issued
        "issued_mode": row.get("mode"),
        "issued": row.get("issued", 0),
        "accepted": row.get("accepted", 0),
        "overridden": row.get("overridden", 0),
        "override_rate": row.get("override_rate"),
        "top_override_reasons": row.get("top_override_reasons", []),
        "by_day": row.get("by_day", []),
    }


# -- chart geometry (numbers only; the template draws and escapes) -------
W, H = 640, 200
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 14, 44
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _short_day(day: str) -> str:
    d = date.fromisoformat(day)
    return f"{d.day} {_MONTHS[d.month - 1]}"


def _chart(rule: dict, day_list: list[str]) -> dict | None:
    """Override rate per day (active rules) or would-fire count per day (shadow rules); None if no cards."""
    if not rule["issued"]:
        return None
    shadow = rule["issued_mode"] == "shadow"
    data = {d["day"]: d for d in rule["by_day"]}
    n = len(day_list)
    plot_w, plot_h = W - LEFT - RIGHT, H - TOP - BOTTOM
    step = plot_w / n

    def x_of(i: int) -> float:  # centre of the day's slot
        return LEFT + step * (i + 0.5)

    if shadow:
        y_max = max([data[day]["issued"] for day in day_list if day in data] + [1])
        y_max += y_max % 2 if y_max > 1 else 0  # even, so the middle tick is a whole number
        ticks = [0, y_max // 2, y_max] if y_max > 1 else [0, 1]
    else:
        y_max, ticks = 1.0, [0, 0.25, 0.5, 0.75, 1.0]

    def y_of(v: float) -> float:
        return TOP + plot_h * (1 - min(v, y_max) / y_max)

    y_ticks = [{"y": round(y_of(t), 1), "label": str(t) if shadow else f"{t:.0%}"} for t in ticks]
    every = max(1, -(-n // 7))  # at most 7 date labels, today always labelled
    x_ticks = [{"x": round(x_of(i), 1), "label": _short_day(day)}
               for i, day in enumerate(day_list) if (n - 1 - i) % every == 0]

    points, bars, segments, current = [], [], [], []
    for i, day in enumerate(day_list):
        d = data.get(day)
        if not d or not d["issued"]:
            if current:
                segments.append(current)
                current = []
            continue
        if shadow:
            y = y_of(d["issued"])
            bars.append({"x": round(x_of(i) - step * 0.35, 1), "y": round(y, 1), "w": round(step * 0.7, 1),
                         "h": round(TOP + plot_h - y, 1),
                         "title": f"{day}: would have fired {d['issued']} time{'' if d['issued'] == 1 else 's'}"})
        else:
            rate = d["overridden"] / d["issued"]
            point = {"x": round(x_of(i), 1), "y": round(y_of(rate), 1),
                     "title": f"{day}: {d['overridden']} of {d['issued']} overridden ({rate:.0%})"}
            points.append(point)
            current.append(f"{point['x']},{point['y']}")
    if current:
        segments.append(current)
    return {
        "shadow": shadow, "width": W, "height": H, "left": LEFT, "right": W - RIGHT, "top": TOP,
        "bottom": TOP + plot_h, "mid_x": round(LEFT + plot_w / 2, 1), "mid_y": round(TOP + plot_h / 2, 1),
        "y_ticks": y_ticks, "x_ticks": x_ticks, "points": points, "bars": bars,
        "lines": [" ".join(seg) for seg in segments if len(seg) > 1],
    }


# -- views ----------------------------------------------------------------
@bp.get("/admin")
def page():
    days = _days_param()
    figures = collect(days)
    for rule in figures["rules"]:
        rule["chart"] = _chart(rule, figures["day_list"])
    nonce = secrets.token_urlsafe(16)
    response = make_response(render_template(
        "admin.html", f=figures, nonce=nonce, day_choices=(7, 30, 90, 365),
        first_day=figures["day_list"][0], generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")))
    response.headers["Content-Security-Policy"] = (
        f"default-src 'none'; style-src 'nonce-{nonce}'; frame-ancestors 'none'; "
        "form-action 'self'; base-uri 'none'")
    return response


@bp.get("/admin/stats.json")
def stats_json():
    figures = collect(_days_param())
    del figures["day_list"]
    return jsonify(figures)
