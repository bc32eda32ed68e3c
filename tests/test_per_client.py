"""Issue 10.2: per-client state. The calling client (JWT iss, or "open") is part of the suppression key and of
every issued card and feedback item; feedback is taken only for cards issued to that client, with that card's
override reasons; a batch with a bad item is refused whole (nothing stored) and says which items."""
from __future__ import annotations

import json
import uuid

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import func, select

from cds_hooks_service.cards import OVERRIDE_REASON_SYSTEM
from cds_hooks_service.store import feedback as feedback_table
from cds_hooks_service.store import issued_card
from tests import sandbox_client as sandbox
from tests.cds_checks import topics
from tests.helpers import SELECT, SIGN, post, request_body

PUBLIC = "https://cds.example.org"
ISS_B = "https://ehr-b.example.org"


@pytest.fixture(scope="module")
def key_b():
    return ec.generate_private_key(ec.SECP384R1())


@pytest.fixture
def two_issuers(make_app, tmp_path, key_b):
    """A JWT-mode service trusting the Sandbox's key and a second issuer (B); ``call(issuer, path, body)``."""
    jwk = {**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key_b.public_key())), "kid": "b", "use": "sig",
           "alg": "ES384"}
    issuers = json.loads((sandbox.FIXTURES / "issuers-sandbox.json").read_text())
    issuers.append({"iss": ISS_B, "jwks": {"keys": [jwk]}})
    path = tmp_path / "issuers.json"
    path.write_text(json.dumps(issuers))
    app = make_app(jwt_issuers_file=path, public_url=PUBLIC)
    client = app.test_client()

    def call(issuer: str, url: str, body: dict):
        if issuer == "A":
            token = sandbox.sandbox_jwt(PUBLIC + url)
        else:
            claims = {**sandbox.sandbox_claims(PUBLIC + url), "iss": ISS_B}
            token = sandbox.mint_jwt(key_b, "ES384", "b", claims)
        return post(client, url, body, headers={"Authorization": f"Bearer {token}"})

    call.app = app
    return call


def _override(card: dict) -> dict:
    return sandbox.feedback_request(card["uuid"], "overridden", override_reason=card["overrideReasons"][0])


def test_one_clients_override_never_suppresses_another_clients_card(two_issuers):
    """The issue's reproduction: A overrides at order-select; B's order-sign card for the same FHIR server,
    patient and draft order used to be dropped for 24 h."""
    [card_a] = two_issuers("A", SELECT, request_body("order-select")).get_json()["cards"]
    assert two_issuers("A", SELECT + "/feedback", _override(card_a)).status_code == 200
    assert topics(two_issuers("B", SIGN, request_body()).get_json()) == ["opioid-in-migraine"]
    assert two_issuers("A", SIGN, request_body()).get_json() == {"cards": []}  # A's own override holds for A


def test_feedback_on_another_clients_card_is_refused(two_issuers):
    [card_a] = two_issuers("A", SIGN, request_body()).get_json()["cards"]
    r = two_issuers("B", SIGN + "/feedback", _override(card_a))
    assert r.status_code == 400, r.get_data(as_text=True)
    issue = r.get_json()["issue"][0]
    assert issue["code"] == "not-found" and issue["expression"] == ["feedback.0.card"]
    assert "this client" in issue["details"]["text"]
    store = two_issuers.app.extensions["cds"].store
    with store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(feedback_table)).scalar_one() == 0
        clients = set(conn.execute(select(issued_card.c.client_id)).scalars())
    assert clients == {sandbox.SANDBOX_ISS}
    # and A's own feedback on it is stored, with A as the client
    assert two_issuers("A", SIGN + "/feedback", _override(card_a)).get_json() == {"stored": 1}
    with store.engine.connect() as conn:
        assert list(conn.execute(select(feedback_table.c.client_id)).scalars()) == [sandbox.SANDBOX_ISS]


def _card(client, url=SIGN, body=None):
    return post(client, url, body or request_body()).get_json()["cards"][0]


def _count(app) -> int:
    with app.extensions["cds"].store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(feedback_table)).scalar_one()


def test_feedback_for_a_card_never_issued_is_refused_and_stores_nothing(app, client):
    """The issue: 20,000 rows of feedback for invented card ids were stored and counted in the statistics."""
    fb = sandbox.feedback_request(str(uuid.uuid4()), "overridden")
    r = post(client, SIGN + "/feedback", fb)
    assert r.status_code == 400 and r.get_json()["issue"][0]["code"] == "not-found"
    assert _count(app) == 0


def test_a_batch_with_one_bad_item_is_refused_whole_and_names_it(app, client):
    good, other = _card(client), _card(client)
    batch = {"feedback": [_override(good)["feedback"][0],
                          sandbox.feedback_request(str(uuid.uuid4()), "overridden")["feedback"][0],
                          _override(other)["feedback"][0]]}
    batch["feedback"][2]["overrideReason"]["reason"]["code"] = "not-a-reason-of-this-rule"
    r = post(client, SIGN + "/feedback", batch)
    assert r.status_code == 400
    issues = r.get_json()["issue"]
    assert [i["expression"] for i in issues[:-1]] == [["feedback.1.card"], ["feedback.2.overrideReason.reason"]]
    assert "nothing in this request was stored: 2 item(s) refused" in issues[-1]["details"]["text"]
    assert _count(app) == 0  # nothing of a refused batch is stored
    # the client sends the good items again: stored (and again: kept once)
    good_only = {"feedback": [batch["feedback"][0]]}
    assert post(client, SIGN + "/feedback", good_only).get_json() == {"stored": 1}
    assert post(client, SIGN + "/feedback", good_only).get_json() == {"stored": 1}
    assert _count(app) == 1


def test_override_reason_must_be_one_the_card_offered(app, client):
    card = _card(client)
    for reason in ({"system": OVERRIDE_REASON_SYSTEM, "code": "made-up"},
                   {"system": "urn:other", "code": card["overrideReasons"][0]["code"]}):
        fb = sandbox.feedback_request(card["uuid"], "overridden", override_reason=reason)
        r = post(client, SIGN + "/feedback", fb)
        assert r.status_code == 400 and r.get_json()["issue"][0]["code"] == "code-invalid", r.get_json()
        assert card["overrideReasons"][0]["code"] in r.get_json()["issue"][0]["details"]["text"]
    # the display stored is the rule's, not what the client sent
    reason = dict(card["overrideReasons"][1], display="\x1b[31mclient text")
    fb = sandbox.feedback_request(card["uuid"], "overridden", override_reason=reason)
    fb["feedback"][0]["overrideReason"]["reason"]["display"] = reason["display"]
    assert post(client, SIGN + "/feedback", fb).status_code == 200
    [row] = app.extensions["cds"].store.stats()
    assert row["top_override_reasons"][0]["display"] == card["overrideReasons"][1]["display"]


def test_accepted_suggestions_must_be_the_cards(app, client):
    card = _card(client)
    fb = sandbox.feedback_request(card["uuid"], "accepted", str(uuid.uuid4()))
    r = post(client, SIGN + "/feedback", fb)
    assert r.status_code == 400 and r.get_json()["issue"][0]["expression"] == ["feedback.0.acceptedSuggestions"]
    fb = sandbox.feedback_request(card["uuid"], "accepted", card["suggestions"][0]["uuid"])
    assert post(client, SIGN + "/feedback", fb).status_code == 200


def test_feedback_for_a_card_of_the_other_service_is_refused(client):
    card = _card(client)  # issued by the order-sign service
    r = post(client, SELECT + "/feedback", _override(card))
    assert r.status_code == 400 and r.get_json()["issue"][0]["code"] == "not-found"


def test_duplicate_items_in_one_batch_are_stored_once(app, client):
    card = _card(client)
    item = _override(card)["feedback"][0]
    assert post(client, SIGN + "/feedback", {"feedback": [item, item]}).status_code == 200
    assert _count(app) == 1
