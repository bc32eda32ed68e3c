"""Issue 10.9: no client input makes the store fail (PostgreSQL answered 500 and the warning was lost), and a
store failure on the hook path never loses the cards. Each test runs on a real SQLite file and a real
PostgreSQL server."""
from __future__ import annotations

import json
import logging
import uuid

import pytest
from sqlalchemy import select

from cds_hooks_service.store import issued_card
from tests import sandbox_client as sandbox
from tests.cds_checks import topics
from tests.helpers import SIGN, post, request_body

PUBLIC = "https://cds.example.org"
METRICS_TOKEN = "m" * 40


@pytest.fixture
def app(make_app, store_url):
    return make_app(database_url=store_url, metrics_token=METRICS_TOKEN)


@pytest.fixture
def client(app):
    return app.test_client()


def _body(hook_instance: str) -> dict:
    body = request_body()
    body["hookInstance"] = hook_instance
    return body


def test_the_longest_hook_instance_the_schema_allows_is_answered_and_stored(app, client):
    hook_instance = "h" * 200  # the schema's maxLength; the column was varchar(64)
    r = post(client, SIGN, _body(hook_instance))
    assert r.status_code == 200, r.get_data(as_text=True)
    assert topics(r.get_json()) == ["opioid-in-migraine"]
    with app.extensions["cds"].store.engine.connect() as conn:
        assert list(conn.execute(select(issued_card.c.hook_instance)).scalars()) == [hook_instance]
    assert post(client, SIGN, _body("h" * 201)).status_code == 400


def test_nul_in_hook_instance_is_400(client):
    r = post(client, SIGN, _body("abc\x00def"))
    assert r.status_code == 400
    issue = r.get_json()["issue"][0]
    assert issue["expression"] == ["hookInstance"] and "NUL" in issue["details"]["text"]


@pytest.mark.parametrize("card", ["c" * 65, "c" * 200, "abc\x00def"])
def test_feedback_card_too_long_or_with_nul_is_400(client, card):
    fb = sandbox.feedback_request(card, "overridden")
    r = post(client, SIGN + "/feedback", fb)
    assert r.status_code == 400, r.get_data(as_text=True)
    assert r.get_json()["issue"][0]["expression"] == ["feedback.0.card"]


def test_nul_in_override_reason_is_400(client):
    card = post(client, SIGN, request_body()).get_json()["cards"][0]
    reason = dict(card["overrideReasons"][0], code=card["overrideReasons"][0]["code"] + "\x00")
    r = post(client, SIGN + "/feedback", sandbox.feedback_request(card["uuid"], "overridden", override_reason=reason))
    assert r.status_code == 400 and r.get_json()["issue"][0]["code"] == "code-invalid"


@pytest.mark.parametrize("jti", ["j" * 300, "jti-with-\x00-nul"])
def test_any_jti_is_a_replay_check_not_a_500(make_app, store_url, jti):
    app = make_app(database_url=store_url, jwt_issuers_file=sandbox.FIXTURES / "issuers-sandbox.json",
                   public_url=PUBLIC)
    client = app.test_client()
    header = {"Authorization": "Bearer " + sandbox.sandbox_jwt(PUBLIC + SIGN, jti=jti)}
    r = post(client, SIGN, request_body(), headers=header)
    assert r.status_code == 200 and topics(r.get_json()) == ["opioid-in-migraine"]
    assert post(client, SIGN, request_body(), headers=header).status_code == 401  # the replay


def _store_errors(client) -> float:
    text = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).get_data(as_text=True)
    for line in text.splitlines():
        if line.startswith('cds_store_errors_total{operation="issue_cards"}'):
            return float(line.split()[-1])
    return 0.0


def test_a_store_failure_on_the_hook_path_still_answers_the_cards(app, client, caplog):
    """The store loses its table (a failed migration, a dropped database): the cards still go out; the failure
    is logged without patient data or statement parameters, and counted in /metrics."""
    store = app.extensions["cds"].store
    with store.engine.begin() as conn:
        issued_card.drop(conn)
    before = _store_errors(client)
    hook_instance = str(uuid.uuid4())
    with caplog.at_level(logging.INFO):
        r = post(client, SIGN, _body(hook_instance))
    assert r.status_code == 200, r.get_data(as_text=True)
    assert topics(r.get_json()) == ["opioid-in-migraine"]
    assert _store_errors(client) == before + 1
    [line] = [rec for rec in caplog.records if "feedback store failed on the hook path" in rec.getMessage()]
    assert line.levelno == logging.ERROR
    text = caplog.text
    assert "example-patient" not in text and hook_instance not in text and "INSERT" not in text
    assert json.dumps(r.get_json())  # answered in full


def test_a_nul_card_in_a_batch_is_named_and_the_good_items_are_not_called_unknown(client):
    card = post(client, SIGN, request_body()).get_json()["cards"][0]
    good = sandbox.feedback_request(card["uuid"], "overridden")["feedback"][0]
    bad = sandbox.feedback_request("abc\x00", "overridden")["feedback"][0]
    r = post(client, SIGN + "/feedback", {"feedback": [good, bad]})
    assert r.status_code == 400
    issues = r.get_json()["issue"]
    assert [(i["expression"], i["code"]) for i in issues[:-1]] == [(["feedback.1.card"], "invalid")]
    assert post(client, SIGN + "/feedback", {"feedback": [good]}).get_json() == {"stored": 1}
