"""The admin page (GET /admin, /admin/stats.json): access control, figures, escaping, and a real browser."""
from __future__ import annotations

import base64
import dataclasses
import os
import re
import shutil
import threading
import uuid
from datetime import datetime, time, timedelta, timezone
from html import unescape
from pathlib import Path

import pytest
from markupsafe import escape

from cds_hooks_service.store import IssuedCard

UTC = timezone.utc
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)  # conftest SCENARIO_NOW (settings.fixed_now)
TOKEN = "s3cret-admin-token-for-tests-of-32-chars"  # at least 32 characters (config.MIN_TOKEN_LENGTH)
REASONS = "https://example.org/cds/override-reasons"
SHADOW_RULE = "ketamine-non-refractory-migraine"
OPIOID = "opioid-in-migraine"
CYP = "dhe-cyp3a4-inhibitor"
CHROMIUM = "/usr/bin/chromium"


def basic(password: str, user: str = "pharmacist") -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def admin_rulebook():
    """The real rulebook, with the ketamine rule switched to shadow mode."""
    from cds_hooks_service.rulebook import load_rulebook
    from tests.conftest import REPO

    rb = load_rulebook(REPO / "rules", REPO / "cards")
    rules = [dataclasses.replace(r, mode="shadow") if r.id == SHADOW_RULE else r for r in rb.rules]
    return dataclasses.replace(rb, rules=rules)


@pytest.fixture
def make_admin_app(make_settings, admin_rulebook):
    from cds_hooks_service import create_app

    def make(**overrides):
        overrides.setdefault("admin_token", TOKEN)
        return create_app(make_settings(**overrides), rulebook=admin_rulebook)

    return make


def _card(rule_id, at, mode="active"):
    return IssuedCard(card_uuid=str(uuid.uuid4()), rule_id=rule_id, service_id="migraine-med-safety",
                      hook_instance=str(uuid.uuid4()), indicator="warning", mode=mode,
                      suppression_key=uuid.uuid4().hex, issued_at=at)


def _fb(card, outcome, code=None, display=None):
    at = (card.issued_at + timedelta(seconds=30)).isoformat().replace("+00:00", "Z")
    item = {"card": card.card_uuid, "outcome": outcome, "outcomeTimestamp": at}
    if code:
        item["overrideReason"] = {"reason": {"system": REASONS, "code": code, "display": display},
                                  "userComment": "free text that is never stored"}
    return item


def fill(store, *, evil_display=False):
    """Several days of cards and feedback. Returns the expected per-rule figures for the last 30 days."""
    day = lambda n, h=9: NOW.replace(hour=h) - timedelta(days=n)  # noqa: E731
    # opioid: days -6, -5, -4 (one run), then -1, 0 (a second run after a gap)
    opioid = ([_card(OPIOID, day(6, h)) for h in (8, 9, 10, 11)] + [_card(OPIOID, day(5, h)) for h in (8, 9)]
              + [_card(OPIOID, day(4, h)) for h in (8, 9, 10)] + [_card(OPIOID, day(1, h)) for h in (8, 9)]
              + [_card(OPIOID, day(0, h)) for h in (8, 9)])
    cyp = [_card(CYP, day(3)), _card(CYP, day(1))]
    shadow = [_card(SHADOW_RULE, day(5, h), "shadow") for h in (8, 9, 10)] + \
             [_card(SHADOW_RULE, day(1, h), "shadow") for h in (8, 9)]
    old = [_card(OPIOID, NOW - timedelta(days=45))]  # outside the default window
    retired = [_card("retired-rule", day(2))]  # a rule no longer in the rulebook
    store.record_cards(opioid + cyp + shadow + old + retired)
    tolerated = "<script>alert('x')</script> tolerated before" if evil_display else "Tolerated before"
    items = (
        [_fb(c, "overridden", "tolerated", tolerated) for c in (opioid[0], opioid[1], opioid[4], opioid[9])]
        + [_fb(c, "overridden", "benefit", "Benefit outweighs risk") for c in (opioid[6], opioid[11])]
        + [_fb(opioid[7], "overridden")]  # no coded reason
        + [_fb(c, "accepted") for c in (opioid[2], opioid[3], opioid[12])]
        + [_fb(cyp[0], "accepted"), _fb(old[0], "overridden", "tolerated", tolerated)]
    )
    store.record_feedback("migraine-med-safety", items)
    return {
        OPIOID: {"issued": 13, "accepted": 3, "overridden": 7, "rate": "54%"},
        CYP: {"issued": 2, "accepted": 1, "overridden": 0, "rate": "0%"},
        SHADOW_RULE: {"issued": 5},
    }


def row_cells(html: str, rule_id: str) -> dict[str, str]:
    m = re.search(rf'<tr data-rule="{re.escape(rule_id)}">(.*?)</tr>', html, re.S)
    assert m, f"no summary row for {rule_id}"
    return {k: " ".join(unescape(re.sub(r"<[^>]+>", "", v)).split())
            for k, v in re.findall(r'data-field="([\w-]+)">(.*?)</td>', m.group(1), re.S)}


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


@pytest.mark.parametrize("days", ["0", "-1", "+7", " 7", "abc", "1.5", "367", "99999"])
def test_bad_days(make_admin_app, days):
    response = make_admin_app().test_client().get(f"/admin?days={days}", headers=basic(TOKEN))
    assert response.status_code == 400
    assert response.get_json()["issue"][0]["expression"] == ["days"]


# -- content --------------------------------------------------------------
def test_page_numbers_match_store(make_admin_app, admin_rulebook):
    app = make_admin_app()
    store = app.extensions["cds"].store
    expected = fill(store)
    html = app.test_client().get("/admin", headers=basic(TOKEN)).get_data(as_text=True)

    since = datetime.combine(NOW.date() - timedelta(days=29), time(0), tzinfo=UTC)
    from_store = {r["rule_id"]: r for r in store.stats(since)}
    for rule_id in (OPIOID, CYP):
        cells, s = row_cells(html, rule_id), from_store[rule_id]
        assert cells["issued"] == str(s["issued"]) == str(expected[rule_id]["issued"])
        assert cells["accepted"] == str(s["accepted"]) == str(expected[rule_id]["accepted"])
        assert cells["overridden"] == str(s["overridden"]) == str(expected[rule_id]["overridden"])
        assert cells["override-rate"] == f"{s['override_rate']:.0%}" == expected[rule_id]["rate"]

    # every rule of the rulebook is listed, with its title, also those without cards
    for rule in admin_rulebook.rules:
        assert f'data-rule="{rule.id}"' in html
        assert str(escape(rule.title)) in html
    assert row_cells(html, "dhe-vasopressor")["issued"] == "0"
    assert row_cells(html, "dhe-vasopressor")["override-rate"] == "–"
    # shadow rule: would-fire count, clearly labelled, no accept/override figures
    assert row_cells(html, SHADOW_RULE)["issued"] == "shadow: would have fired 5 times, not shown"
    assert "Would-fire count per day (shadow)" in html
    # a rule known only to the store is still shown
    assert 'data-rule="retired-rule"' in html and "not in the current rulebook" in html
    # top override reasons, most frequent first
    section = html[html.index(f'id="rule-{OPIOID}"'):]
    section = section[:section.index("</section>")]
    assert section.index("Tolerated before") < section.index("Benefit outweighs risk")
    assert re.search(r"Tolerated before <code>tolerated</code> – <strong>4</strong>", section)
    # one chart per rule with cards, with accessible name and axis titles
    assert html.count('<svg class="chart"') == 4  # opioid, cyp, shadow ketamine, retired
    assert section.count('<circle class="rate-point"') == 5  # 5 days with opioid cards
    assert section.count('<polyline class="rate-line"') == 2  # two runs of consecutive days
    assert "Override rate per day for Opioid ordered for migraine or headache" in section
    assert "Day (UTC)" in section and ">Override rate</text>" in section
    assert "free text that is never stored" not in html


def test_days_window(make_admin_app):
    app = make_admin_app()
    fill(app.extensions["cds"].store)
    client = app.test_client()
    html = client.get("/admin?days=90", headers=bearer(TOKEN)).get_data(as_text=True)
    assert row_cells(html, OPIOID)["issued"] == "14"  # includes the 45-day-old card
    assert row_cells(html, OPIOID)["overridden"] == "8"
    assert 'aria-current="page">Last 90 days' in html
    html = client.get("/admin?days=1", headers=bearer(TOKEN)).get_data(as_text=True)
    assert row_cells(html, OPIOID)["issued"] == "2"  # today only
    assert row_cells(html, CYP)["issued"] == "0"


def test_override_reason_is_escaped(make_admin_app):
    app = make_admin_app()
    fill(app.extensions["cds"].store, evil_display=True)
    client = app.test_client()
    html = client.get("/admin", headers=basic(TOKEN)).get_data(as_text=True)
    assert "<script" not in html
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; tolerated before" in html
    data = client.get("/admin/stats.json", headers=basic(TOKEN)).get_json()
    opioid = next(r for r in data["rules"] if r["rule_id"] == OPIOID)
    assert opioid["top_override_reasons"][0]["display"] == "<script>alert('x')</script> tolerated before"


def test_stats_json_shape(make_admin_app, admin_rulebook):
    app = make_admin_app()
    fill(app.extensions["cds"].store)
    response = app.test_client().get("/admin/stats.json?days=30", headers=bearer(TOKEN))
    assert response.mimetype == "application/json"
    data = response.get_json()
    assert set(data) == {"since", "until", "days", "rules"}
    assert data["days"] == 30 and data["since"] == "2026-01-31T00:00:00Z" and data["until"] == "2026-03-01"
    ids = [r["rule_id"] for r in data["rules"]]
    assert ids == [r.id for r in admin_rulebook.rules] + ["retired-rule"]
    keys = {"rule_id", "title", "mode", "enabled", "in_rulebook", "issued_mode", "issued", "accepted",
            "overridden", "override_rate", "top_override_reasons", "by_day"}
    for r in data["rules"]:
        assert set(r) == keys
    rules = {r["rule_id"]: r for r in data["rules"]}
    opioid = rules[OPIOID]
    assert (opioid["issued"], opioid["accepted"], opioid["overridden"]) == (13, 3, 7)
    assert opioid["override_rate"] == pytest.approx(7 / 13)
    assert opioid["top_override_reasons"] == [
        {"system": REASONS, "code": "tolerated", "display": "Tolerated before", "count": 4},
        {"system": REASONS, "code": "benefit", "display": "Benefit outweighs risk", "count": 2}]
    assert opioid["by_day"] == [
        {"day": "2026-02-23", "issued": 4, "overridden": 2}, {"day": "2026-02-24", "issued": 2, "overridden": 1},
        {"day": "2026-02-25", "issued": 3, "overridden": 2}, {"day": "2026-02-28", "issued": 2, "overridden": 1},
        {"day": "2026-03-01", "issued": 2, "overridden": 1}]
    assert rules[SHADOW_RULE]["mode"] == rules[SHADOW_RULE]["issued_mode"] == "shadow"
    assert rules[SHADOW_RULE]["issued"] == 5
    empty = rules["dhe-vasopressor"]
    assert (empty["issued"], empty["override_rate"], empty["by_day"], empty["issued_mode"]) == (0, None, [], None)
    assert rules["retired-rule"]["in_rulebook"] is False and rules["retired-rule"]["title"] is None


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
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="admin-test-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", expected
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()


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
                                          viewport={"width": 1200, "height": 900})
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

            for rule_id, title in ((OPIOID, "Opioid ordered for migraine or headache"),
                                   (CYP, "DHE with a CYP3A4 inhibitor")):
                row = page.locator(f'tr[data-rule="{rule_id}"]')
                expect(row.get_by_role("link", name=title)).to_be_visible()
                want = expected[rule_id]
                expect(row.locator('[data-field="issued"]')).to_have_text(str(want["issued"]))
                expect(row.locator('[data-field="accepted"]')).to_have_text(str(want["accepted"]))
                expect(row.locator('[data-field="overridden"]')).to_have_text(str(want["overridden"]))
                expect(row.locator('[data-field="override-rate"]')).to_have_text(want["rate"])
                expect(page.get_by_role("heading", level=2, name=title)).to_be_visible()

            shadow_row = page.locator(f'tr[data-rule="{SHADOW_RULE}"]')
            expect(shadow_row.locator('[data-field="issued"]')).to_have_text(
                "shadow: would have fired 5 times, not shown")
            expect(page.locator(f'#rule-{SHADOW_RULE} [data-field="shadow-label"]')).to_be_visible()

            # the charts: present, visible, with an accessible name and drawn data
            chart = page.get_by_role("img", name=re.compile(r"^Override rate per day for Opioid ordered"))
            expect(chart).to_be_visible()
            box = chart.bounding_box()
            assert box and box["width"] > 300 and box["height"] > 80
            expect(chart.locator("circle.rate-point")).to_have_count(5)
            expect(chart.locator("polyline.rate-line")).to_have_count(2)
            expect(chart.locator("title").first).to_contain_text("2026-01-31 to 2026-03-01")
            expect(chart.get_by_text("Day (UTC)")).to_be_visible()
            expect(page.get_by_role("img", name=re.compile(r"^Would-fire count per day for Ketamine"))).to_be_visible()
            expect(page.locator(f"#rule-{SHADOW_RULE} rect.shadow-bar")).to_have_count(2)
            expect(page.locator(f"#rule-{OPIOID} ol.reasons li").first).to_contain_text("Tolerated before")

            # the inline stylesheet applied under the page's CSP (nonce), nothing fetched from elsewhere
            current = page.locator('nav a[aria-current="page"]')
            expect(current).to_have_text("Last 30 days")
            assert current.evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(11, 92, 173)"
            assert not [p for p in problems if "Content Security Policy" in p or "Refused" in p], problems
            assert all(u.startswith(base) for u in requests), requests

            shot = tmp_path / "admin.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            shutil.copy(shot, Path(os.environ.get("ADMIN_SCREENSHOT", "/tmp/admin.png")))
            context.close()
        finally:
            browser.close()
