"""The admin page (GET /admin and its drill-down, CSV and JSON views): access control, figures, date range,
the tuning flag, exports, escaping, index use, PostgreSQL, and a real browser."""
from __future__ import annotations

import base64
import csv
import dataclasses
import io
import os
import re
import shutil
import threading
import uuid
from datetime import datetime, timedelta, timezone
from html import unescape
from pathlib import Path

import pytest
from markupsafe import escape
from sqlalchemy import event, text

from cds_hooks_service import analytics
from cds_hooks_service.cards import suggestion_uuid
from cds_hooks_service.store import IssuedCard

UTC = timezone.utc
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)  # conftest SCENARIO_NOW (settings.fixed_now)
TOKEN = "s3cret-admin-token-for-tests-0123456789"  # 32+ characters
REASONS = "https://example.org/cds/override-reasons"
SHADOW_RULE = "ketamine-non-refractory-migraine"
OPIOID = "opioid-in-migraine"
CYP = "dhe-cyp3a4-inhibitor"
TRIPTAN = "dhe-triptan-ergot-24h"  # the tuning candidate: 55 of 60 overridden
VASO = "dhe-vasopressor"  # exactly 90 % (45 of 50): not a candidate
CONTRA = "dhe-contraindicated-condition"  # a 2-of-2 day next to a 40-of-100 day
SIGN, SELECT = "migraine-med-safety-sign", "migraine-med-safety-select"
CHROMIUM = "/usr/bin/chromium"
REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"  # screenshots of the browser tests (ignored by git)
SECRET_COMMENT = "free text that is never stored"


def basic(password: str, user: str = "pharmacist") -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def admin_rulebook(rulebook):
    """The real rulebook (the run's, not changed: a copy), with the ketamine rule switched to shadow mode."""
    rules = [dataclasses.replace(r, mode="shadow") if r.id == SHADOW_RULE else r for r in rulebook.rules]
    return dataclasses.replace(rulebook, rules=rules)


@pytest.fixture
def make_admin_app(make_settings, admin_rulebook):
    from cds_hooks_service import create_app

    def make(**overrides):
        overrides.setdefault("admin_token", TOKEN)
        return create_app(make_settings(**overrides), rulebook=admin_rulebook)

    return make


def _card(rule_id, at, mode="active", service=SIGN, indicator="warning"):
    return IssuedCard(card_uuid=str(uuid.uuid4()), rule_id=rule_id, service_id=service,
                      hook_instance=str(uuid.uuid4()), indicator=indicator, mode=mode,
                      suppression_key=uuid.uuid4().hex, issued_at=at)


def _fb(card, outcome, code=None, display=None, suggestions=(), comment=SECRET_COMMENT, later=30):
    at = (card.issued_at + timedelta(seconds=later)).isoformat().replace("+00:00", "Z")
    item = {"card": card.card_uuid, "outcome": outcome, "outcomeTimestamp": at}
    if code:
        item["overrideReason"] = {"reason": {"system": REASONS, "code": code, "display": display}}
        if comment:
            item["overrideReason"]["userComment"] = comment
    if suggestions:
        item["acceptedSuggestions"] = [{"id": suggestion_uuid(card.card_uuid, s)} for s in suggestions]
    return item


def day(n, h=9):
    return NOW.replace(hour=h) - timedelta(days=n)


def fill(store, *, evil_display=False):
    """Several days of cards and feedback. Returns the expected per-rule figures for the last 30 days."""
    # opioid: days -6, -5, -4 (one run), then -1, 0 (a second run after a gap)
    opioid = ([_card(OPIOID, day(6, h)) for h in (8, 9, 10, 11)] + [_card(OPIOID, day(5, h)) for h in (8, 9)]
              + [_card(OPIOID, day(4, h), service=SELECT) for h in (8, 9, 10)]
              + [_card(OPIOID, day(1, h)) for h in (8, 9)] + [_card(OPIOID, day(0, h)) for h in (8, 9)])
    cyp = [_card(CYP, day(3)), _card(CYP, day(1))]
    shadow = [_card(SHADOW_RULE, day(5, h), "shadow") for h in (8, 9, 10)] + \
             [_card(SHADOW_RULE, day(1, h), "shadow") for h in (8, 9)]
    old = [_card(OPIOID, NOW - timedelta(days=45))]  # outside the default window
    retired = [_card("retired-rule", day(2))]  # a rule no longer in the rulebook
    store.record_cards(opioid + cyp + shadow + old + retired)
    tolerated = "<script>alert('x')</script> tolerated before" if evil_display else "Tolerated before"
    items = (
        [_fb(c, "overridden", "tolerated", tolerated) for c in (opioid[0], opioid[1], opioid[9])]
        + [_fb(opioid[4], "overridden", "tolerated", tolerated, comment=None)]
        + [_fb(c, "overridden", "benefit", "Benefit outweighs risk") for c in (opioid[6], opioid[11])]
        + [_fb(opioid[7], "overridden")]  # no coded reason
        + [_fb(opioid[7], "overridden", later=90)]  # a second override message for the same card
        + [_fb(c, "accepted") for c in (opioid[2], opioid[3])]
        + [_fb(opioid[12], "accepted", suggestions=["replace-prochlorperazine"])]
        # accepted a suggestion at order-select, then overrode the card at order-sign
        + [_fb(opioid[4], "accepted", suggestions=["replace-metoclopramide"], later=10)]
        + [_fb(cyp[0], "accepted"), _fb(old[0], "overridden", "tolerated", tolerated)]
    )
    store.record_feedback(SIGN, items)
    return {
        # 13 shown; 7 cards overridden (8 messages); 4 accepted, 2 with a suggestion; 3 cards without feedback
        OPIOID: {"shown": 13, "overridden": 7, "rate": "54%", "volume": "7 of 13", "accepted": 4,
                 "acceptance": "31%", "suggestion": 2, "no_feedback": 3, "no_feedback_share": "23%"},
        CYP: {"shown": 2, "overridden": 0, "rate": "0%", "volume": "0 of 2", "accepted": 1, "acceptance": "50%",
              "suggestion": 0, "no_feedback": 1, "no_feedback_share": "50%"},
        SHADOW_RULE: {"would_fire": 5},
        "opioid_cards": opioid,
    }


def fill_volume(store):
    """Rules for the tuning flag and the volume-beside-rate chart."""
    cards, items = [], []

    def add(rule_id, n, k, when):
        batch = [_card(rule_id, when + timedelta(minutes=i)) for i in range(n)]
        cards.extend(batch)
        items.extend(_fb(c, "overridden", "tolerated", "Tolerated before") for c in batch[:k])

    add(TRIPTAN, 30, 28, day(3))
    add(TRIPTAN, 30, 27, day(2))  # 55 of 60 = 91.7 %: a candidate
    add(VASO, 50, 45, day(2))  # 90 % exactly: not more than 90 %
    add(CONTRA, 2, 2, day(3))  # 2 of 2 ...
    add(CONTRA, 100, 40, day(2))  # ... beside 40 of 100
    add("small-rule", 49, 49, day(1))  # 100 % but below 50 cards
    store.record_cards(cards)
    store.record_feedback(SIGN, items)


def text_of(fragment: str) -> str:
    return " ".join(unescape(re.sub(r"<[^>]+>", " ", fragment)).split())


def row_cells(html: str, rule_id: str) -> dict[str, str]:
    m = re.search(rf'<tr data-rule="{re.escape(rule_id)}"[^>]*>(.*?)</tr>', html, re.S)
    assert m, f"no summary row for {rule_id}"
    return {k: text_of(v) for k, v in re.findall(r'<td[^>]*data-field="([\w-]+)">(.*?)</td>', m.group(1), re.S)}


def rule_section(html: str, rule_id: str) -> str:
    section = html[html.index(f'id="rule-{rule_id}"'):]
    return section[:section.index("</section>")]


# -- access ---------------------------------------------------------------
@pytest.mark.parametrize("path", ["/admin", "/admin/stats.json"])
def test_disabled_without_token(make_admin_app, path):
    client = make_admin_app(admin_token=None).test_client()
    for headers in ({}, basic(TOKEN), bearer(TOKEN)):
        response = client.get(path, headers=headers)
        assert response.status_code == 404
        assert response.get_json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize("path", ["/admin", "/admin/stats.json"])
@pytest.mark.parametrize("headers", [
    {}, basic("wrong"), basic(TOKEN[:-1]), basic(TOKEN + "x"), bearer("wrong"), bearer(""),
    {"Authorization": "Basic not-base64!"}, {"Authorization": "Basic " + base64.b64encode(TOKEN.encode()).decode()},
    {"Authorization": TOKEN}, {"Authorization": f"Token {TOKEN}"},
], ids=["none", "basic-wrong", "basic-short", "basic-long", "bearer-wrong", "bearer-empty",
        "basic-garbage", "basic-no-colon", "bare-token", "other-scheme"])
def test_unauthorised(make_admin_app, path, headers):
    response = make_admin_app().test_client().get(path, headers=headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith('Basic realm="cds-admin"')
    assert response.headers["Cache-Control"] == "no-store"
    body = response.get_json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["code"] == "login"
    assert TOKEN not in response.get_data(as_text=True)


@pytest.mark.parametrize("headers", [basic(TOKEN), basic(TOKEN, user=""), basic(TOKEN, user="anyone else"),
                                     bearer(TOKEN), {"Authorization": f"bearer   {TOKEN}"}],
                         ids=["basic", "basic-no-user", "basic-other-user", "bearer", "bearer-lowercase"])
def test_authorised(make_admin_app, headers):
    client = make_admin_app().test_client()
    page = client.get("/admin", headers=headers)
    assert page.status_code == 200
    assert page.mimetype == "text/html"
    assert page.headers["Cache-Control"] == "no-store"
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]
    stats = client.get("/admin/stats.json", headers=headers)
    assert stats.status_code == 200 and stats.headers["Cache-Control"] == "no-store"


def test_token_from_env(monkeypatch, tmp_path):
    from cds_hooks_service.config import Settings

    monkeypatch.setenv("CDS_INSTANCE_DIR", str(tmp_path))
    monkeypatch.setenv("CDS_SUPPRESSION_SECRET", "x")
    monkeypatch.setenv("CDS_ADMIN_TOKEN", "from-env")
    assert Settings.from_env().admin_token == "from-env"
    monkeypatch.setenv("CDS_ADMIN_TOKEN", "")
    assert Settings.from_env().admin_token is None
    monkeypatch.delenv("CDS_ADMIN_TOKEN")
    assert Settings.from_env().admin_token is None


# -- the date range -------------------------------------------------------
@pytest.mark.parametrize("days", ["0", "-1", "+7", " 7", "abc", "1.5", "367", "99999"])
def test_bad_days(make_admin_app, days):
    response = make_admin_app().test_client().get(f"/admin?days={days}", headers=basic(TOKEN))
    assert response.status_code == 400
    assert response.get_json()["issue"][0]["expression"] == ["days"]


@pytest.mark.parametrize("path", ["/admin", "/admin/stats.json", "/admin/rules.csv", "/admin/overrides.csv",
                                  f"/admin/rules/{OPIOID}/overrides"])
@pytest.mark.parametrize("query, field", [
    ("from=2026-13-01", "from"), ("to=yesterday", "to"), ("from=2026-2-1", "from"), ("to=2026-02-30", "to"),
    ("from=2026-03-01&to=2026-02-01", "from"), ("from=2025-01-01&to=2026-03-01", "from"),
    ("days=7&from=2026-02-01", "days"),
], ids=["month-13", "word", "short", "feb-30", "reversed", "too-long", "days-and-from"])
def test_bad_range(make_admin_app, path, query, field):
    response = make_admin_app().test_client().get(f"{path}?{query}", headers=basic(TOKEN))
    assert response.status_code == 400
    body = response.get_json()
    assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["expression"] == [field]


def test_date_range(make_admin_app):
    app = make_admin_app()
    fill(app.extensions["cds"].store)
    client = app.test_client()
    data = client.get("/admin/stats.json", headers=bearer(TOKEN)).get_json()
    assert (data["from"], data["to"], data["days"]) == ("2026-01-31", "2026-03-01", 30)  # default: last 30 days
    # from/to: both days included
    html = client.get("/admin?from=2026-02-23&to=2026-02-24", headers=bearer(TOKEN)).get_data(as_text=True)
    assert row_cells(html, OPIOID)["shown"] == "6"  # 4 on the 23rd + 2 on the 24th
    assert row_cells(html, SHADOW_RULE)["would-fire"] == "3"
    assert 'name="from" value="2026-02-23"' in html and 'name="to" value="2026-02-24"' in html
    html = client.get("/admin?from=2026-01-16&to=2026-01-31", headers=bearer(TOKEN)).get_data(as_text=True)
    assert row_cells(html, OPIOID)["shown"] == "0"
    html = client.get("/admin?from=2026-01-01", headers=bearer(TOKEN)).get_data(as_text=True)
    assert row_cells(html, OPIOID)["shown"] == "14"  # includes the 45-day-old card
    # days=N is a shortcut for the last N days
    html = client.get("/admin?days=1", headers=bearer(TOKEN)).get_data(as_text=True)
    assert row_cells(html, OPIOID)["shown"] == "2" and row_cells(html, CYP)["shown"] == "0"
    html = client.get("/admin?from=2025-12-02&to=2026-03-01", headers=bearer(TOKEN)).get_data(as_text=True)
    assert 'aria-current="page">Last 90 days' in html


# -- content --------------------------------------------------------------
def test_rules_side_by_side(make_admin_app, admin_rulebook):
    app = make_admin_app()
    expected = fill(app.extensions["cds"].store)
    html = app.test_client().get("/admin", headers=basic(TOKEN)).get_data(as_text=True)
    for rule_id in (OPIOID, CYP):
        want, cells = expected[rule_id], row_cells(html, rule_id)
        assert cells["shown"] == str(want["shown"])
        assert cells["override-rate"] == f"{want['rate']} {want['volume']}"  # the rate with its volume
        assert cells["accepted"] == f"{want['accepted']} {want['acceptance']}"
        assert cells["suggestion"] == str(want["suggestion"])
        assert cells["no-feedback"] == f"{want['no_feedback_share']} {want['no_feedback']} card" + (
            "s" if want["no_feedback"] != 1 else "")
        assert cells["would-fire"] == "–" and cells["tuning"] == ""
    # the shadow rule's would-fire count in the same table, beside the active rules' cards shown
    shadow = row_cells(html, SHADOW_RULE)
    assert shadow["would-fire"] == "5" and shadow["shown"] == "0" and shadow["override-rate"] == "–"
    total = row_cells(html, "__all__")
    assert total["shown"] == "16" and total["would-fire"] == "5"  # 13 + 2 + 1 retired; 5 shadow
    assert total["override-rate"] == "44% 7 of 16"
    # every rule of the rulebook is listed, with its title, also those without cards
    for rule in admin_rulebook.rules:
        assert f'data-rule="{rule.id}"' in html
        assert str(escape(rule.title)) in html
    assert row_cells(html, VASO)["shown"] == "0" and row_cells(html, VASO)["override-rate"] == "–"
    # a rule known only to the store is still shown
    assert 'data-rule="retired-rule"' in html and "not in the current rulebook" in html
    # top override reasons, most frequent first (distinct cards)
    section = rule_section(html, OPIOID)
    assert section.index("Tolerated before") < section.index("Benefit outweighs risk")
    assert re.search(r"Tolerated before <code>tolerated</code> – <strong>4</strong>", section)
    assert f'href="/admin/rules/{OPIOID}/overrides?from=2026-01-31&amp;to=2026-03-01"' in section
    assert "The 7 overrides one by one" in section
    # one chart per rule with cards, with accessible name and axis titles
    assert html.count('<svg class="chart"') == 4  # opioid, cyp, shadow ketamine, retired
    assert section.count('<circle class="rate-point') == 5  # 5 days with opioid cards
    assert section.count('class="bar-shown"') == 5
    assert "Override rate and cards per day for Opioid ordered for migraine or headache" in section
    assert "Day (UTC)" in section and ">Override rate</text>" in section and ">Cards</text>" in section
    assert "Would-fire count per day for" in rule_section(html, SHADOW_RULE)
    assert rule_section(html, SHADOW_RULE).count('class="bar-shadow"') == 2
    assert SECRET_COMMENT not in html


def test_stats_json(make_admin_app, admin_rulebook):
    app = make_admin_app()
    fill(app.extensions["cds"].store)
    response = app.test_client().get("/admin/stats.json?days=30", headers=bearer(TOKEN))
    assert response.mimetype == "application/json"
    data = response.get_json()
    assert data["from"] == "2026-01-31" and data["to"] == "2026-03-01" and data["since"] == "2026-01-31T00:00:00Z"
    assert data["tuning_rule"] == {"min_cards": 50, "override_rate_above": 0.9}
    ids = [r["rule_id"] for r in data["rules"]]
    assert ids == [r.id for r in admin_rulebook.rules] + ["retired-rule"]
    rules = {r["rule_id"]: r for r in data["rules"]}
    opioid = rules[OPIOID]
    assert (opioid["shown"], opioid["would_fire"], opioid["overridden"], opioid["accepted"],
            opioid["suggestion_accepted"], opioid["no_feedback"]) == (13, 0, 7, 4, 2, 3)
    assert opioid["override_rate"] == pytest.approx(7 / 13)
    lo, hi = opioid["override_rate_95"]
    assert 0.25 < lo < 7 / 13 < hi < 0.81
    assert opioid["top_override_reasons"] == [
        {"system": REASONS, "code": "tolerated", "display": "Tolerated before", "count": 4},
        {"system": REASONS, "code": "benefit", "display": "Benefit outweighs risk", "count": 2}]
    assert opioid["by_day"] == [
        {"day": "2026-02-23", "active": 4, "overridden": 2, "shadow": 0},
        {"day": "2026-02-24", "active": 2, "overridden": 1, "shadow": 0},
        {"day": "2026-02-25", "active": 3, "overridden": 2, "shadow": 0},
        {"day": "2026-02-28", "active": 2, "overridden": 1, "shadow": 0},
        {"day": "2026-03-01", "active": 2, "overridden": 1, "shadow": 0}]
    assert rules[SHADOW_RULE]["mode"] == rules[SHADOW_RULE]["issued_mode"] == "shadow"
    assert (rules[SHADOW_RULE]["would_fire"], rules[SHADOW_RULE]["shown"]) == (5, 0)
    empty = rules[VASO]
    assert (empty["shown"], empty["override_rate"], empty["by_day"], empty["issued_mode"]) == (0, None, [], None)
    assert rules["retired-rule"]["in_rulebook"] is False and rules["retired-rule"]["title"] is None


def test_tuning_flag(make_admin_app):
    app = make_admin_app()
    fill_volume(app.extensions["cds"].store)
    html = app.test_client().get("/admin", headers=basic(TOKEN)).get_data(as_text=True)
    assert row_cells(html, TRIPTAN)["tuning"] == "Candidate for tuning"
    assert row_cells(html, TRIPTAN)["override-rate"] == "92% 55 of 60"
    assert 'data-rule="dhe-triptan-ergot-24h" class="tune"' in html
    assert "Candidate for tuning: 55 of 60 cards overridden" in rule_section(html, TRIPTAN)
    assert row_cells(html, VASO)["tuning"] == ""  # 45 of 50 is 90 %, not more
    assert row_cells(html, "small-rule")["tuning"] == ""  # 49 of 49, but fewer than 50 cards
    assert row_cells(html, CONTRA)["tuning"] == ""
    assert html.count('<span class="badge tune">Candidate for tuning</span>') == 2  # the row + the legend


@pytest.mark.parametrize("shown, overridden, flagged", [
    (50, 46, True), (50, 45, False), (49, 49, False), (60, 55, True), (1000, 901, True), (1000, 900, False),
    (0, 0, False)])
def test_tuning_rule(shown, overridden, flagged):
    assert analytics.is_tuning_candidate(shown, overridden) is flagged


def test_wilson_interval():
    lo, hi = analytics.wilson_interval(2, 2)  # a 2-of-2 day says little ...
    assert (round(lo, 3), round(hi, 3)) == (0.342, 1.0)
    lo, hi = analytics.wilson_interval(40, 100)  # ... a 40-of-100 day much more
    assert (round(lo, 3), round(hi, 3)) == (0.309, 0.498)
    assert analytics.wilson_interval(0, 0) is None


def test_chart_shows_volume_beside_rate(make_admin_app):
    """A 2-of-2 day must not look like a 100 % spike beside a 40-of-100 day."""
    app = make_admin_app()
    fill_volume(app.extensions["cds"].store)
    section = rule_section(app.test_client().get("/admin", headers=basic(TOKEN)).get_data(as_text=True), CONTRA)
    days = re.findall(r'<g class="day-rate"><title>(.*?)</title>\s*<line class="ci" x1="[\d.]+" x2="[\d.]+" '
                      r'y1="([\d.]+)" y2="([\d.]+)"></line>\s*<circle class="rate-point( small-n)?" '
                      r'cx="[\d.]+" cy="[\d.]+" r="([\d.]+)"', section)
    assert [d[0] for d in days] == ["2026-02-26: 2 of 2 cards overridden (100%; 95% interval 34%–100%)",
                                    "2026-02-27: 40 of 100 cards overridden (40%; 95% interval 31%–50%)"]
    (_, lo2, hi2, small2, r2), (_, lo100, hi100, small100, r100) = days
    assert small2 and not small100  # the 2-card day is drawn hollow, the 100-card day filled
    assert float(r2) < float(r100)  # and smaller
    assert float(lo2) - float(hi2) > 3 * (float(lo100) - float(hi100))  # its interval is far longer
    bars = re.findall(r'<rect class="bar-shown" x="[\d.]+" y="[\d.]+" width="[\d.]+" height="([\d.]+)">'
                      r'<title>(.*?)</title>', section)
    heights = {title: float(h) for h, title in bars}
    assert heights["2026-02-27: 100 shown, 40 overridden"] > 25 * heights["2026-02-26: 2 shown, 2 overridden"]


# -- drill-down -------------------------------------------------------------
def override_rows(html: str) -> list[dict[str, str]]:
    return [{k: text_of(v) for k, v in re.findall(r'<td[^>]*data-field="([\w-]+)"[^>]*>(.*?)</td>', row, re.S)}
            for row in re.findall(r'<tr class="override">(.*?)</tr>', html, re.S)]


def test_override_drilldown(make_admin_app):
    app = make_admin_app()
    expected = fill(app.extensions["cds"].store)
    client = app.test_client()
    response = client.get(f"/admin/rules/{OPIOID}/overrides", headers=basic(TOKEN))
    assert response.status_code == 200 and response.headers["Cache-Control"] == "no-store"
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    html = response.get_data(as_text=True)
    assert "Overrides: Opioid ordered for migraine or headache" in html
    assert "8 overrides; 7 of 13 cards shown overridden (54%)." in text_of(html)
    rows = override_rows(html)
    assert len(rows) == 8  # one per override message (the card overridden twice appears twice)
    # newest card first
    issued = [r["issued-at"] for r in rows]
    assert issued == sorted(issued, reverse=True)
    by_time = {(r["issued-at"], r["overridden-at"]): r for r in rows}
    first = by_time[("2026-02-23 08:00", "2026-02-23 08:00")]  # opioid[0]
    assert first == {"overridden-at": "2026-02-23 08:00", "issued-at": "2026-02-23 08:00",
                     "reason": "Tolerated before tolerated", "comment": "given", "suggestion": "none",
                     "hook": "order-sign", "indicator": "warning"}
    select_card = by_time[("2026-02-25 08:00", "2026-02-25 08:00")]  # opioid[6], from the order-select service
    assert select_card["hook"] == "order-select" and select_card["reason"] == "Benefit outweighs risk benefit"
    accepted = by_time[("2026-02-24 08:00", "2026-02-24 08:00")]  # opioid[4]: a suggestion taken, no comment
    assert accepted["comment"] == "none"
    assert accepted["suggestion"] == "Replace with metoclopramide 10 mg IV (AHS Level B) (replace-metoclopramide)"
    uncoded = [r for r in rows if r["issued-at"] == "2026-02-25 09:00"]  # opioid[7], overridden twice
    assert len(uncoded) == 2 and all(r["reason"] == "no coded reason" for r in uncoded)
    # nothing that identifies a card, call or patient; never the comment text
    for card in expected["opioid_cards"]:
        assert card.card_uuid not in html and card.hook_instance not in html and card.suppression_key not in html
    assert SECRET_COMMENT not in html
    # a range without overrides
    html = client.get(f"/admin/rules/{OPIOID}/overrides?from=2026-01-01&to=2026-01-02",
                      headers=basic(TOKEN)).get_data(as_text=True)
    assert "No overrides of this rule on cards issued in this range." in html
    # a retired rule (store only) has a drill-down too
    assert client.get("/admin/rules/retired-rule/overrides", headers=basic(TOKEN)).status_code == 200


def test_drilldown_pages_and_bad_input(make_admin_app, monkeypatch):
    from cds_hooks_service import admin

    monkeypatch.setattr(admin, "PAGE_SIZE", 3)
    app = make_admin_app()
    fill(app.extensions["cds"].store)
    client = app.test_client()
    seen = []
    for page in (1, 2, 3):
        html = client.get(f"/admin/rules/{OPIOID}/overrides?page={page}", headers=basic(TOKEN)).get_data(as_text=True)
        assert f"page {page} of 3" in html
        seen += [(r["issued-at"], r["overridden-at"]) for r in override_rows(html)]
        assert ('rel="next"' in html) is (page < 3) and ('rel="prev"' in html) is (page > 1)
    assert len(seen) == 8 and seen == sorted(seen, key=lambda r: r[0], reverse=True)
    for path, status, field in [
        (f"/admin/rules/{OPIOID}/overrides?page=4", 400, "page"),
        (f"/admin/rules/{OPIOID}/overrides?page=0", 400, "page"),
        (f"/admin/rules/{OPIOID}/overrides?page=x", 400, "page"),
        ("/admin/rules/no-such-rule/overrides", 404, None),
        ("/admin/rules/%3Cscript%3E/overrides", 400, "rule_id"),
        ("/admin/overrides.csv?rule=no-such-rule", 404, None),
        ("/admin/overrides.csv?rule=a%20b", 400, "rule"),
    ]:
        response = client.get(path, headers=basic(TOKEN))
        assert response.status_code == status, path
        body = response.get_json()
        assert body["resourceType"] == "OperationOutcome"
        if field:
            assert body["issue"][0]["expression"] == [field]


# -- CSV --------------------------------------------------------------------
def read_csv(response) -> list[dict]:
    assert response.status_code == 200
    assert response.mimetype == "text/csv"
    assert response.headers["Content-Disposition"].startswith("attachment; filename=")
    return list(csv.DictReader(io.StringIO(response.get_data(as_text=True))))


def test_rules_csv(make_admin_app):
    app = make_admin_app()
    fill(app.extensions["cds"].store)
    fill_volume(app.extensions["cds"].store)
    client = app.test_client()
    response = client.get("/admin/rules.csv?from=2026-02-01&to=2026-03-01", headers=basic(TOKEN))
    assert response.headers["Content-Disposition"] == 'attachment; filename="cds-rules_2026-02-01_2026-03-01.csv"'
    rows = {r["rule_id"]: r for r in read_csv(response)}
    data = {r["rule_id"]: r for r in client.get("/admin/stats.json?from=2026-02-01&to=2026-03-01",
                                                   headers=basic(TOKEN)).get_json()["rules"]}
    assert set(rows) == set(data)
    opioid = rows[OPIOID]
    assert {k: opioid[k] for k in ("cards_shown", "would_fire_shadow", "overridden", "override_rate", "accepted",
                                   "suggestion_accepted", "no_feedback", "no_feedback_share", "candidate_for_tuning",
                                   "from", "to", "mode", "in_rulebook")} == {
        "cards_shown": "13", "would_fire_shadow": "0", "overridden": "7", "override_rate": "0.5385", "accepted": "4",
        "suggestion_accepted": "2", "no_feedback": "3", "no_feedback_share": "0.2308", "candidate_for_tuning": "no",
        "from": "2026-02-01", "to": "2026-03-01", "mode": "active", "in_rulebook": "yes"}
    assert rows[TRIPTAN]["candidate_for_tuning"] == "yes" and rows[VASO]["candidate_for_tuning"] == "no"
    assert rows[SHADOW_RULE]["would_fire_shadow"] == "5" and rows[SHADOW_RULE]["override_rate"] == ""
    for rule_id, r in rows.items():
        assert int(r["cards_shown"]) == data[rule_id]["shown"] and int(r["overridden"]) == data[rule_id]["overridden"]


def test_overrides_csv(make_admin_app):
    app = make_admin_app()
    store = app.extensions["cds"].store
    fill(store)
    fill_volume(store)
    # an EHR-supplied display that a spreadsheet would run as a formula
    card = _card(CYP, day(1, 10))
    store.record_cards([card])
    store.record_feedback(SIGN, [_fb(card, "overridden", "x", '=HYPERLINK("http://evil.example","click")')])
    client = app.test_client()
    rows = read_csv(client.get(f"/admin/overrides.csv?rule={OPIOID}", headers=basic(TOKEN)))
    assert len(rows) == 8
    assert list(rows[0]) == ["overridden_at", "card_issued_at", "rule_id", "reason_system", "reason_code",
                             "reason_display", "comment_given", "accepted_suggestions", "hook", "service_id",
                             "indicator"]
    assert {r["rule_id"] for r in rows} == {OPIOID}
    assert rows[0]["card_issued_at"] == "2026-03-01T08:00:00Z"  # newest card first (opioid[11])
    assert sorted(r["comment_given"] for r in rows) == ["no", "no", "no", "yes", "yes", "yes", "yes", "yes"]
    assert [r["accepted_suggestions"] for r in rows if r["accepted_suggestions"]] == [
        "Replace with metoclopramide 10 mg IV (AHS Level B) (replace-metoclopramide)"]
    assert {r["hook"] for r in rows} == {"order-sign", "order-select"}
    body = client.get("/admin/overrides.csv", headers=basic(TOKEN)).get_data(as_text=True)
    everything = list(csv.DictReader(io.StringIO(body)))
    assert len(everything) == 8 + 55 + 45 + 42 + 49 + 1
    evil = next(r for r in everything if r["reason_code"] == "x")
    assert evil["reason_display"] == '\'=HYPERLINK("http://evil.example","click")'
    assert SECRET_COMMENT not in body and card.card_uuid not in body and card.hook_instance not in body


def test_overrides_csv_is_bounded(make_admin_app, monkeypatch):
    from cds_hooks_service import admin

    app = make_admin_app()
    fill(app.extensions["cds"].store)
    monkeypatch.setattr(admin, "MAX_EXPORT_ROWS", 7)
    response = app.test_client().get(f"/admin/overrides.csv?rule={OPIOID}", headers=basic(TOKEN))
    assert response.status_code == 400
    assert "8 overrides in this range, more than the 7" in response.get_json()["issue"][0]["details"]["text"]


def test_override_reason_is_escaped(make_admin_app):
    app = make_admin_app()
    fill(app.extensions["cds"].store, evil_display=True)
    client = app.test_client()
    for path in ("/admin", f"/admin/rules/{OPIOID}/overrides"):
        html = client.get(path, headers=basic(TOKEN)).get_data(as_text=True)
        assert "<script" not in html
        assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; tolerated before" in html
    data = client.get("/admin/stats.json", headers=basic(TOKEN)).get_json()
    opioid = next(r for r in data["rules"] if r["rule_id"] == OPIOID)
    assert opioid["top_override_reasons"][0]["display"] == "<script>alert('x')</script> tolerated before"


# -- the SQL: indexed, aggregated, the same on PostgreSQL -------------------
def test_queries_use_indexes_on_sqlite(make_admin_app):
    """Every statement the views run reads cds_issued_card and cds_feedback through an index, never a full scan."""
    app = make_admin_app()
    store = app.extensions["cds"].store
    fill(store)
    statements = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith(("SELECT", "WITH")):
            statements.append((statement, parameters))

    event.listen(store.engine, "before_cursor_execute", capture)
    try:
        client = app.test_client()
        for path in ("/admin", f"/admin/rules/{OPIOID}/overrides", "/admin/rules.csv", "/admin/overrides.csv"):
            assert client.get(path, headers=basic(TOKEN)).status_code == 200
    finally:
        event.remove(store.engine, "before_cursor_execute", capture)
    assert len(statements) >= 8
    with store.engine.connect() as conn:
        for statement, parameters in statements:
            plan = [row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters)]
            scans = [p for p in plan if re.match(r"SCAN (cds_issued_card|cds_feedback|fb_any)\b", p)
                     and "USING" not in p]
            assert not scans, (statement, plan)
            if "cds_issued_card" in statement:
                assert any("ix_cds_issued_card_rule_issued" in p for p in plan), (statement, plan)


def test_same_figures_on_postgresql(make_admin_app, fresh_postgres_url):
    """The SQL that differs (day bucketing, the loose index scan, window functions, streaming) on PostgreSQL."""
    sqlite_app, pg_app = make_admin_app(), make_admin_app(database_url=fresh_postgres_url)
    assert pg_app.extensions["cds"].store.dialect == "postgresql"
    outputs = []
    for app in (sqlite_app, pg_app):
        store = app.extensions["cds"].store
        fill(store)
        fill_volume(store)
        client = app.test_client()
        stats = client.get("/admin/stats.json?from=2026-01-01&to=2026-03-01", headers=basic(TOKEN)).get_json()
        rules_csv = client.get("/admin/rules.csv", headers=basic(TOKEN)).get_data(as_text=True)
        overrides = client.get("/admin/overrides.csv", headers=basic(TOKEN)).get_data(as_text=True)
        page = client.get(f"/admin/rules/{OPIOID}/overrides", headers=basic(TOKEN))
        assert page.status_code == 200
        # the uuids are random per fill: compare what does not depend on them
        outputs.append((stats, rules_csv, sorted(overrides.splitlines()), len(override_rows(page.get_data(as_text=True)))))
        assert analytics.rule_ids(store) == sorted([OPIOID, CYP, SHADOW_RULE, "retired-rule", TRIPTAN, VASO, CONTRA,
                                                    "small-rule"])
    assert outputs[0] == outputs[1]
    opioid = next(r for r in outputs[1][0]["rules"] if r["rule_id"] == OPIOID)
    assert opioid["shown"] == 14 and opioid["by_day"][0] == {"day": "2026-01-15", "active": 1, "overridden": 1, "shadow": 0}


# -- real browser ---------------------------------------------------------
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _need_browser():
    problem = None
    if not os.access(CHROMIUM, os.X_OK):
        problem = f"{CHROMIUM} not installed (scripts/install-test-deps.sh installs it)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "Python package playwright not installed (pip install -e '.[test]')"
    if problem:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(problem)
        pytest.skip(problem)


@pytest.fixture
def served_admin(make_admin_app):
    """The app with a filled store, served by werkzeug on a free loopback port."""
    from werkzeug.serving import make_server

    app = make_admin_app()
    expected = fill(app.extensions["cds"].store)
    fill_volume(app.extensions["cds"].store)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="admin-test-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", expected
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()


def _keep_screenshot(page, tmp_path, name: str) -> Path:
    """Full-page PNG under the test's tmp dir, copied to test-artifacts/ (ignored by git)."""
    shot = tmp_path / name
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / name)
    return shot


def test_admin_page_in_real_browser(served_admin, tmp_path):
    _need_browser()
    from playwright.sync_api import expect, sync_playwright

    base, expected = served_admin
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        try:
            # no credentials: the Basic challenge (a page navigation would abort with ERR_INVALID_AUTH_CREDENTIALS)
            anonymous = browser.new_context()
            challenge = anonymous.request.get(base + "/admin")
            assert challenge.status == 401
            assert challenge.headers["www-authenticate"].startswith('Basic realm="cds-admin"')
            anonymous.close()

            context = browser.new_context(http_credentials={"username": "pharmacist", "password": TOKEN},
                                          viewport={"width": 1280, "height": 900}, accept_downloads=True)
            page = context.new_page()
            problems, requests = [], []
            page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            response = page.goto(base + "/admin")
            assert response.status == 200
            assert response.headers["cache-control"] == "no-store"
            expect(page).to_have_title(re.compile("CDS rule performance"))
            expect(page.get_by_role("heading", level=1)).to_have_text("CDS rule performance")
            expect(page.get_by_role("heading", level=2, name="Rules side by side")).to_be_visible()

            # the table: rules side by side, the rate with its volume, the flag
            for rule_id, title in ((OPIOID, "Opioid ordered for migraine or headache"),
                                   (CYP, "DHE with a CYP3A4 inhibitor")):
                row = page.locator(f'tr[data-rule="{rule_id}"]')
                expect(row.get_by_role("link", name=title)).to_be_visible()
                want = expected[rule_id]
                expect(row.locator('[data-field="shown"]')).to_have_text(str(want["shown"]))
                expect(row.locator('[data-field="override-rate"] strong')).to_have_text(want["rate"])
                expect(row.locator('[data-field="override-volume"]')).to_have_text(want["volume"])
                expect(row.locator('[data-field="override-volume"]')).to_be_visible()
                expect(row.locator('[data-field="no-feedback"]')).to_contain_text(want["no_feedback_share"])
                expect(page.get_by_role("heading", level=2, name=title)).to_be_visible()
            expect(page.locator(f'tr[data-rule="{SHADOW_RULE}"] [data-field="would-fire"]')).to_have_text("5")
            flag = page.locator(f'tr[data-rule="{TRIPTAN}"] [data-field="tuning"]')
            expect(flag).to_have_text("Candidate for tuning")
            expect(flag).to_be_visible()
            assert flag.locator(".badge").evaluate("e => getComputedStyle(e).color") == "rgb(154, 52, 18)"
            expect(page.locator(f'tr[data-rule="{VASO}"] [data-field="tuning"]')).to_have_text("")

            # the charts: visible, with an accessible name, the rate above the cards per day
            chart = page.get_by_role("img", name=re.compile(r"^Override rate and cards per day for Opioid ordered"))
            expect(chart).to_be_visible()
            box = chart.bounding_box()
            assert box and box["width"] > 400 and box["height"] > 150
            expect(chart.locator("circle.rate-point")).to_have_count(5)
            expect(chart.locator("rect.bar-shown")).to_have_count(5)
            expect(chart.locator("title").first).to_contain_text("2026-01-31 to 2026-03-01")
            expect(chart.get_by_text("Day (UTC)")).to_be_visible()
            contra = page.get_by_role("img", name=re.compile(r"^Override rate and cards per day for Dihydroergotamine"))
            expect(contra.locator("circle.rate-point.small-n")).to_have_count(1)  # the 2-of-2 day: hollow
            expect(contra.locator("g.day-rate title").first).to_have_text(
                "2026-02-26: 2 of 2 cards overridden (100%; 95% interval 34%–100%)")
            expect(page.get_by_role("img", name=re.compile(r"^Would-fire count per day for Ketamine"))).to_be_visible()
            expect(page.locator(f"#rule-{SHADOW_RULE} rect.bar-shadow")).to_have_count(2)
            expect(page.locator(f"#rule-{OPIOID} ol.reasons li").first).to_contain_text("Tolerated before")

            # the inline stylesheet applied under the page's CSP (nonce), nothing fetched from elsewhere
            current = page.locator('nav a[aria-current="page"]')
            expect(current).to_have_text("Last 30 days")
            assert current.evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(11, 92, 173)"
            _keep_screenshot(page, tmp_path, "admin.png")

            # the date range form
            page.get_by_label("From", exact=True).fill("2026-02-23")
            page.get_by_label("To", exact=True).fill("2026-02-24")
            page.get_by_role("button", name="Show").click()
            page.wait_for_url(re.compile(r"/admin\?from=2026-02-23&to=2026-02-24$"))
            expect(page.locator(f'tr[data-rule="{OPIOID}"] [data-field="shown"]')).to_have_text("6")
            expect(page.locator('nav a[aria-current="page"]')).to_have_count(0)

            # CSV export of the table, downloaded by the browser
            with page.expect_download() as download:
                page.get_by_role("link", name="rules table").click()
            rows = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
            assert {r["rule_id"]: r["cards_shown"] for r in rows}[OPIOID] == "6"

            # the drill-down: from the rule's section to its overrides
            page.goto(base + "/admin")
            page.locator(f"#rule-{OPIOID}").get_by_role("link", name="The 7 overrides one by one").click()
            expect(page.get_by_role("heading", level=1)).to_have_text("Overrides: Opioid ordered for migraine or headache")
            table_rows = page.locator("table.overrides tbody tr")
            expect(table_rows).to_have_count(8)
            expect(page.get_by_role("columnheader")).to_have_text(
                ["Overridden (UTC)", "Card issued (UTC)", "Reason", "Comment", "Accepted suggestion", "Hook", "Indicator"])
            expect(table_rows.first.locator('[data-field="hook"]')).to_have_text("order-sign")
            expect(page.locator('[data-field="suggestion"]', has_text="metoclopramide")).to_have_count(1)
            expect(page.get_by_text(SECRET_COMMENT)).to_have_count(0)
            _keep_screenshot(page, tmp_path, "admin-overrides.png")

            assert not [p for p in problems if "Content Security Policy" in p or "Refused" in p], problems
            assert all(u.startswith(base) for u in requests), requests
            context.close()
        finally:
            browser.close()
