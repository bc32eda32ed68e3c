"""The HTTP contract: discovery, hook calls, feedback, errors, CORS, JWT, suppression, shadow mode."""
from __future__ import annotations

import json
import logging

import pytest

from tests import sandbox_client as sandbox
from tests.cds_checks import check_response, topics
# MIGRAINE, NOW, SCENARIO_NOW: also for test modules of other branches that still import them from here
from tests.helpers import (HYDROMORPHONE, MIGRAINE, NOW, REPO, SCENARIO_NOW, SELECT, SIGN,  # noqa: F401
                           assert_error, post, request_body)

# -- discovery ---------------------------------------------------------------------------------------
def test_discovery_lists_one_service_per_hook_with_allowed_prefetch(client):
    r = client.get("/cds-services")
    assert r.status_code == 200
    services = r.get_json()["services"]
    assert sorted(s["hook"] for s in services) == ["order-select", "order-sign"]
    assert len({s["id"] for s in services}) == 2
    for s in services:
        assert s["title"] and s["description"]
        for template in s["prefetch"].values():
            tokens = [t.split("}}")[0] for t in template.split("{{")[1:]]
            assert set(tokens) <= {"context.patientId", "context.userId", "context.encounterId"}
            assert ":" not in template.split("?")[-1].replace("http://loinc.org|", "").split("=")[0]


def test_cors_preflight_needs_no_jwt(make_app):
    app = make_app(jwt_issuers_file=REPO / "tests/fixtures/sandbox/issuers-sandbox.json")
    client = app.test_client()
    for url in ("/cds-services", SIGN, SIGN + "/feedback"):
        r = client.options(url, headers={"Origin": "https://sandbox.cds-hooks.org",
                                         "Access-Control-Request-Method": "POST",
                                         "Access-Control-Request-Headers": "authorization,content-type"})
        assert r.status_code == 200
        assert r.headers["Access-Control-Allow-Origin"] in ("*", "https://sandbox.cds-hooks.org")
        assert "authorization" in r.headers["Access-Control-Allow-Headers"].lower()


# -- hook calls --------------------------------------------------------------------------------------
def test_order_sign_opioid_card_is_spec_exact(client):
    r = post(client, SIGN, request_body())
    assert r.status_code == 200
    cards = check_response(r.get_json())
    assert topics(r.get_json()) == ["opioid-in-migraine"]
    card = cards[0]
    assert card["indicator"] == "warning"
    deletes = [a for s in card["suggestions"] for a in s["actions"] if a["type"] == "delete"]
    assert deletes and all(a["resourceId"] == "MedicationRequest/draft-1" for a in deletes)


def test_order_select_judges_only_the_selected_orders(client):
    drafts = ({"drug": "860092", "id": "ketorolac", "route": "IV"}, {**HYDROMORPHONE, "id": "opioid"})
    r = post(client, SELECT, request_body("order-select", drafts, selections=["MedicationRequest/ketorolac"]))
    assert r.status_code == 200 and r.get_json() == {"cards": []}
    r = post(client, SELECT, request_body("order-select", drafts, selections=["MedicationRequest/opioid"]))
    assert topics(r.get_json()) == ["opioid-in-migraine"]


def test_irrelevant_order_needs_no_patient_data(client):
    body = request_body(drafts=({"drug": "617993", "text": "amoxicillin suspension"},))
    del body["prefetch"]
    r = post(client, SIGN, body)
    assert r.status_code == 200 and r.get_json() == {"cards": []}


def test_missing_prefetch_without_fhir_server_is_412(client):
    body = request_body()
    del body["prefetch"]
    issue = assert_error(post(client, SIGN, body), 412)
    assert "conditions" in issue["details"]["text"]


def test_operation_outcome_in_prefetch_counts_as_missing(client):
    body = request_body()
    body["prefetch"]["conditions"] = {"resourceType": "OperationOutcome",
                                      "issue": [{"severity": "error", "code": "exception"}]}
    assert_error(post(client, SIGN, body), 412)


def test_null_prefetch_means_no_data_and_is_not_refetched(client):
    body = request_body(drafts=({**HYDROMORPHONE, "reason": "G43.909"},))
    for key in body["prefetch"]:
        body["prefetch"][key] = None
    r = post(client, SIGN, body)  # no fhirServer: a re-query would have been a 412
    assert r.status_code == 200 and topics(r.get_json()) == ["opioid-in-migraine"]


def test_sandbox_shaped_requests(client):
    reason = {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "G43.909"}], "text": "Migraine"}
    for path, body in ((SELECT, sandbox.order_select_request("smart-1", "897745", "hydromorphone 2 MG/ML inj", reason)),
                       (SIGN, sandbox.order_sign_request("smart-1", "897745", "hydromorphone 2 MG/ML inj", reason))):
        body["prefetch"] = {k: None for k in ("conditions", "medicationRequests", "medicationAdministrations",
                                              "medicationStatements", "observations", "procedures")}
        r = post(client, path, body)
        assert r.status_code == 200, r.get_data(as_text=True)
        check_response(r.get_json())
        assert topics(r.get_json()) == ["opioid-in-migraine"]
    # before a drug is chosen: a bare draft (no medication, no intent): nothing to say
    r = post(client, SELECT, sandbox.bare_order_select_request("smart-1"))
    assert r.status_code == 200 and r.get_json() == {"cards": []}
    # clicking the active tab again: no draftOrders -> a clear 400, never a 500
    assert_error(post(client, SIGN, sandbox.reclick_request("order-sign", "smart-1")), 400, "draftOrders")


# -- errors ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mutate, field", [
    (lambda b: b.pop("hook"), "hook"),
    (lambda b: b.pop("hookInstance"), "hookInstance"),
    (lambda b: b.pop("context"), "context"),
    (lambda b: b.update(hook="order-select"), "hook"),
    (lambda b: b["context"].pop("patientId"), "patientId"),
    (lambda b: b["context"].pop("userId"), "userId"),
    (lambda b: b["context"]["draftOrders"].update(resourceType="List"), "draftOrders"),
    (lambda b: b["context"].update(patientId=""), "patientId"),
    (lambda b: b.update(fhirAuthorization={"access_token": "t", "token_type": "Bearer", "expires_in": 300,
                                           "scope": "x", "subject": "y"}), "fhirServer"),
    (lambda b: b.update(fhirServer="ftp://example.org"), "fhirServer"),
    (lambda b: b["prefetch"].update(conditions="not a resource"), "prefetch"),
    (lambda b: b.update(context=[]), "context"),
])
def test_invalid_requests_are_400_naming_the_field(client, mutate, field):
    body = request_body()
    mutate(body)
    assert_error(post(client, SIGN, body), 400, field)


def test_order_select_without_selections_is_400(client):
    body = request_body("order-select")
    body["context"].pop("selections")
    assert_error(post(client, SELECT, body), 400, "selections")


@pytest.mark.parametrize("data", [b"{not json", b"", b"[1, 2]", b"\xff\xfe\x00garbage", b'{"hook": NaN}',
                                  b"[" * 100_000 + b"]" * 100_000, b'"just a string"'])
def test_malformed_bodies_are_400(client, data):
    r = client.post(SIGN, data=data, content_type="application/json")
    assert_error(r, 400)


def test_wrong_content_type_is_415(client):
    r = client.post(SIGN, data=json.dumps(request_body()), content_type="text/plain")
    assert_error(r, 415)


def test_unknown_service_and_path_are_404(client):
    assert_error(post(client, "/cds-services/nope", request_body()), 404, "id")
    assert_error(post(client, "/cds-services/nope/feedback", {"feedback": []}), 404)
    assert_error(client.get("/nothing-here"), 404)


def test_wrong_method_is_405(client):
    r = client.get(SIGN)
    assert_error(r, 405)
    assert "POST" in r.headers["Allow"]
    assert_error(client.put("/cds-services"), 405)


def test_oversize_body_is_413(make_app):
    client = make_app(max_body_bytes=2000).test_client()
    r = post(client, SIGN, {**request_body(), "extension": {"pad": "x" * 5000}})
    assert_error(r, 413)


# -- feedback ----------------------------------------------------------------------------------------
def _card(client, body=None, url=SIGN):
    r = post(client, url, body or request_body())
    return r.get_json()["cards"][0]


def test_feedback_accepted_and_overridden_are_stored(app, client):
    card = _card(client)
    fb = sandbox.feedback_request(card["uuid"], "accepted", card["suggestions"][0]["uuid"])
    assert post(client, SIGN + "/feedback", fb).status_code == 200
    card2 = _card(client)
    reason = card2["overrideReasons"][0]
    fb = sandbox.feedback_request(card2["uuid"], "overridden", override_reason=reason)
    fb["feedback"][0]["overrideReason"]["userComment"] = "free text the clinician typed"
    r = post(client, SIGN + "/feedback", fb)
    assert r.status_code == 200 and r.get_json() == {"stored": 1}
    stats = {s["rule_id"]: s for s in app.extensions["cds"].store.stats()}
    row = stats["opioid-in-migraine"]
    assert (row["issued"], row["accepted"], row["overridden"]) == (2, 1, 1)
    assert row["top_override_reasons"][0]["code"] == reason["code"]


@pytest.mark.parametrize("body, field", [
    ({}, "feedback"),
    ({"feedback": []}, "feedback"),
    ({"feedback": [{"card": "x", "outcome": "ignored", "outcomeTimestamp": "2026-01-01T00:00:00Z"}]}, "outcome"),
    ({"feedback": [{"card": "x", "outcome": "accepted", "outcomeTimestamp": "2026-01-01T00:00:00Z"}]},
     "acceptedSuggestions"),
    ({"feedback": [{"card": "x", "outcome": "overridden", "outcomeTimestamp": "yesterday"}]}, "outcomeTimestamp"),
])
def test_invalid_feedback_is_400(client, body, field):
    assert_error(post(client, SIGN + "/feedback", body), 400, field)


def test_override_at_select_is_not_raised_again_at_sign(client):
    select_body = request_body("order-select")
    card = _card(client, select_body, SELECT)
    fb = sandbox.feedback_request(card["uuid"], "overridden", override_reason=card["overrideReasons"][0])
    assert post(client, SELECT + "/feedback", fb).status_code == 200
    assert post(client, SIGN, request_body()).get_json() == {"cards": []}
    # another patient with the same draft id still gets the card
    assert topics(post(client, SIGN, request_body(patient="other-patient")).get_json()) == ["opioid-in-migraine"]


ORAL_OXYCODONE = {"drug": "7804", "text": "oxycodone 5 mg tablet", "route": "PO", "category": "discharge"}
MOH = {"condition": "G44.41", "display": "Drug-induced headache, not elsewhere classified, intractable"}


def test_an_override_holds_only_for_a_card_no_more_severe_than_the_one_overridden(client):
    """The same drafted order overridden at order-select as info comes back at order-sign as a warning (the
    record now shows medication-overuse headache): the more severe card is shown, not silenced by the override.
    An override of the more severe card holds for the less severe one."""
    def sign_card(record):
        r = post(client, SIGN, request_body(drafts=(ORAL_OXYCODONE,), record=record)).get_json()
        return [c for c in r["cards"] if c["source"]["topic"]["code"] == "opioid-in-migraine"]

    card = _card(client, request_body("order-select", drafts=(ORAL_OXYCODONE,)), SELECT)
    assert card["indicator"] == "info"
    fb = sandbox.feedback_request(card["uuid"], "overridden", override_reason=card["overrideReasons"][0])
    assert post(client, SELECT + "/feedback", fb).status_code == 200
    assert sign_card((MIGRAINE,)) == []  # the same level: suppressed as before
    [raised] = sign_card((MIGRAINE, MOH))
    assert raised["indicator"] == "warning"

    # another patient: the warning overridden at order-select, the info card at order-sign stays suppressed
    card = _card(client, request_body("order-select", drafts=(ORAL_OXYCODONE,), record=(MIGRAINE, MOH),
                                      patient="patient-2"), SELECT)
    assert card["indicator"] == "warning"
    fb = sandbox.feedback_request(card["uuid"], "overridden", override_reason=card["overrideReasons"][0])
    assert post(client, SELECT + "/feedback", fb).status_code == 200
    r = post(client, SIGN, request_body(drafts=(ORAL_OXYCODONE,), record=(MIGRAINE,), patient="patient-2"))
    assert r.get_json() == {"cards": []}


# -- site overrides and shadow mode --------------------------------------------------------------------
def test_shadow_rule_is_counted_not_shown(make_app, tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    (local / "opioid.yaml").write_text("id: opioid-in-migraine\nmode: shadow\n")
    app = make_app(rules_local_dir=local)
    r = post(app.test_client(), SIGN, request_body())
    assert r.get_json() == {"cards": []}
    [row] = app.extensions["cds"].store.stats()
    assert (row["rule_id"], row["mode"], row["issued"]) == ("opioid-in-migraine", "shadow", 1)


def test_site_override_disables_a_rule(make_app, tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    (local / "opioid.yaml").write_text("id: opioid-in-migraine\nenabled: false\n")
    r = post(make_app(rules_local_dir=local).test_client(), SIGN, request_body())
    assert "opioid-in-migraine" not in topics(r.get_json())


# -- JWT -----------------------------------------------------------------------------------------------
@pytest.fixture
def secured(make_app):
    return make_app(jwt_issuers_file=REPO / "tests/fixtures/sandbox/issuers-sandbox.json").test_client()


def test_jwt_required_on_every_call_when_configured(secured):
    assert_error(secured.get("/cds-services"), 401)
    assert_error(post(secured, SIGN, request_body()), 401)
    assert_error(post(secured, SIGN + "/feedback", {"feedback": []}), 401)


def test_sandbox_jwt_accepted_and_replay_refused(secured):
    header = sandbox.sandbox_auth_header("http://localhost" + SIGN)
    r = post(secured, SIGN, request_body(), headers={"Authorization": header})
    assert r.status_code == 200 and topics(r.get_json()) == ["opioid-in-migraine"]
    r = post(secured, SIGN, request_body(), headers={"Authorization": header})  # same jti
    issue = assert_error(r, 401)
    assert issue["details"]["text"] == "Unauthorized"  # no detail on why
    disc = secured.get("/cds-services", headers={"Authorization": sandbox.sandbox_auth_header(
        "http://localhost/cds-services")})
    assert disc.status_code == 200


def test_jwt_for_another_endpoint_is_refused(secured):
    header = sandbox.sandbox_auth_header("http://localhost" + SELECT)
    assert_error(post(secured, SIGN, request_body(), headers={"Authorization": header}), 401)


def test_logs_hold_no_token_or_patient_id(secured, caplog):
    caplog.set_level(logging.DEBUG)
    header = sandbox.sandbox_auth_header("http://localhost" + SIGN)
    body = request_body(patient="patient-secret-4711")
    post(secured, SIGN, body, headers={"Authorization": header})
    post(secured, SIGN, body, headers={"Authorization": header})  # replay -> logged rejection
    post(secured, SIGN, body, headers={"Authorization": "Bearer garbage.token.value"})
    text = caplog.text
    assert "patient-secret-4711" not in text
    assert header.split()[1] not in text and "garbage.token.value" not in text


def test_bundled_medication_reference_and_non_medication_entries(client):
    body = request_body()
    draft = body["context"]["draftOrders"]["entry"][0]["resource"]
    draft.pop("medicationCodeableConcept")
    draft["medicationReference"] = {"reference": "Medication/hm2"}
    body["context"]["draftOrders"]["entry"] += [
        {"resource": {"resourceType": "Medication", "id": "hm2",
                      "code": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "897745"}]}}},
        {"resource": {"resourceType": "ServiceRequest", "id": "sr1", "status": "draft", "intent": "plan"}},
        {"resource": {"resourceType": "NutritionOrder", "id": "n1", "status": "draft"}},
    ]
    r = post(client, SIGN, body)
    assert r.status_code == 200 and topics(r.get_json()) == ["opioid-in-migraine"]
    card = r.get_json()["cards"][0]
    assert "hydromorphone" in card["detail"]  # named from the RxNorm product, though sent without a display


def test_card_text_from_patient_data_cannot_inject_markup(client):
    record = ({"condition": "G43.909", "display": "<img src=x onerror=alert(1)> **bold** [link](javascript:x)"},)
    r = post(client, SIGN, request_body(record=record))
    detail = r.get_json()["cards"][0]["detail"]
    assert "<img" not in detail and "&lt;img" in detail
    assert "\\*\\*bold\\*\\*" in detail and "\\[link\\]" in detail


def test_debug_trace_logs_the_explain_report_without_patient_id(make_app, caplog):
    caplog.set_level(logging.INFO)
    client = make_app(debug_trace=True).test_client()
    r = post(client, SIGN, request_body(patient="patient-secret-4711"))
    assert topics(r.get_json()) == ["opioid-in-migraine"]
    explain = [rec.getMessage() for rec in caplog.records if rec.getMessage().startswith("explain ")]
    assert explain and '"outcome": "FIRED [warning]"' in explain[0] and "headache-diagnosis" in explain[0]
    assert "patient-secret-4711" not in caplog.text


def test_a_card_template_failing_at_render_time_still_warns(make_app, tmp_path, caplog):
    import shutil

    shutil.copytree(REPO / "rules", tmp_path / "rules")
    shutil.copytree(REPO / "cards", tmp_path / "cards")
    card = tmp_path / "cards/opioid-in-migraine.yaml"
    card.write_text(card.read_text().replace("detail: |\n", "detail: |\n  {{ 1 // 0 }}\n", 1))  # valid syntax, fails
    app = make_app(shared_rules=False, rules_dir=tmp_path / "rules", cards_dir=tmp_path / "cards")
    r = post(app.test_client(), SIGN, request_body())
    assert r.status_code == 200
    [card_json] = check_response(r.get_json())
    assert card_json["source"]["topic"]["code"] == "opioid-in-migraine" and card_json["indicator"] == "warning"
    assert card_json["summary"].startswith("Opioid ordered for migraine or headache")
    assert "Migraine or headache diagnosis" in card_json["detail"]
    assert "card template opioid-in-migraine failed" in caplog.text
