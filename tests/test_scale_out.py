"""Several instances on one PostgreSQL (the compose.yaml deployment): two separate gunicorn services share the
database and the suppression secret. An override at order-select on one suppresses the card at order-sign on the
other (same client), a JWT used on one is refused by the other, and `stats` and /admin count both."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import requests

from cds_hooks_service.examples import examples
from tests.helpers import REPO
from tests.plugins.gunicorn_service import GunicornService, cleaned_env
from tests.sandbox_client import feedback_request, sandbox_auth_header

pytestmark = pytest.mark.slow

PUBLIC_URL = "https://cds.example.test"  # what the EHR calls: the load balancer (the JWT aud), not an instance
SELECT, SIGN = "migraine-med-safety-select", "migraine-med-safety-sign"
RULE = "dhe-triptan-ergot-24h"
ADMIN_TOKEN = "admin-token-for-the-scale-out-test-0123456789"


EXAMPLE = next(e for e in examples(REPO / "fhir_examples") if e.rule_id == RULE and e.expect == "fire")


@pytest.fixture
def two_instances(tmp_path, fresh_postgres_url):
    env = {"DATABASE_URL": fresh_postgres_url, "CDS_SUPPRESSION_SECRET": "shared-secret-of-all-instances-0123456789",
           "CDS_PUBLIC_URL": PUBLIC_URL, "CDS_JWT_ISSUERS": str(REPO / "tests/fixtures/sandbox/issuers-sandbox.json"),
           "CDS_ADMIN_TOKEN": ADMIN_TOKEN}  # today's clock: the example's times are shifted to now
    services = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            service = GunicornService(tmp_path / name, env, workers=1)
            service.start(timeout=60)
            services.append(service)
        yield services
    finally:
        for service in services:
            service.stop()


def call(service: GunicornService, service_id: str, body: dict, suffix: str = "", token: str | None = None):
    path = f"/cds-services/{service_id}{suffix}"
    auth = token or sandbox_auth_header(PUBLIC_URL + path)
    return requests.post(service.base_url + path, json=body, headers={"Authorization": auth}, timeout=20)


def rule_cards(response) -> list[dict]:
    assert response.status_code == 200, response.text
    return [c for c in response.json()["cards"] if c["source"]["topic"]["code"] == RULE]


def test_two_instances_on_one_postgresql_share_overrides_replays_and_statistics(two_instances, fresh_postgres_url):
    a, b = two_instances
    select_body, sign_body = EXAMPLE.load("order-select"), EXAMPLE.load("order-sign")

    assert len(rule_cards(call(b, SIGN, sign_body))) == 1  # before any override, B warns at order-sign
    shown = rule_cards(call(a, SELECT, select_body))
    assert len(shown) == 1
    card = shown[0]
    reason = card["overrideReasons"][0]
    r = call(a, SELECT, feedback_request(card["uuid"], "overridden", override_reason=reason), suffix="/feedback")
    assert r.status_code == 200, r.text
    assert rule_cards(call(b, SIGN, sign_body)) == []  # overridden on A at order-select: B does not repeat it

    # one JWT, used on A, is refused by B (the used jti is in the shared database)
    token = sandbox_auth_header(f"{PUBLIC_URL}/cds-services/{SIGN}")
    assert call(a, SIGN, sign_body, token=token).status_code == 200
    assert call(b, SIGN, sign_body, token=token).status_code == 401

    # `stats` (any host with DATABASE_URL) and /admin on either instance count the cards of both
    env = {**cleaned_env(), "DATABASE_URL": fresh_postgres_url}
    out = subprocess.run([sys.executable, "-m", "cds_hooks_service", "stats", "--json"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    stats = {r["rule_id"]: r for r in json.loads(out)["rules"]}[RULE]
    # issued: B's sign before the override and A's select; the suppressed signs after it record no card
    assert (stats["issued"], stats["overridden"]) == (2, 1)
    for service in (a, b):
        r = requests.get(service.base_url + "/admin/stats.json", auth=("admin", ADMIN_TOKEN), timeout=20)
        assert r.status_code == 200, r.text
        figures = next(rule for rule in r.json()["rules"] if rule["rule_id"] == RULE)
        assert (figures["shown"], figures["overridden"]) == (2, 1), figures
