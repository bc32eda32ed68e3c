"""The OpenAPI document (GET /openapi.json) and schemathesis runs against it, in-process (WSGI).

Schemathesis generates requests from the served document, valid (positive) and schema-violating
(negative), and checks every answer: no 5xx, a documented status code, the documented content type and
a body conforming to the documented schema for that status. Cases are drawn from schemathesis'
Hypothesis strategies inside an ordinary ``@given`` test, so the app comes from the ``make_app`` fixture
(schemathesis' own ``from_fixture`` loader does not work with this pytest version). Runs are
derandomized: the same cases on every run.
"""
from __future__ import annotations

import json

import jsonschema
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from cds_hooks_service.openapi import document
from cds_hooks_service.services import SERVICE_FOR_HOOK, SERVICES
from tests.helpers import REPO
from tests.helpers import HYDROMORPHONE, request_body

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
HTTP_METHODS = {"get", "post", "put", "patch", "delete"}
OPERATIONS = [(method.upper(), path, op) for path, item in document()["paths"].items()
              for method, op in item.items() if method in HTTP_METHODS]
# Negative data needs something to violate: a path parameter or a body (the GETs take no input).
RUNS = [(method, path, mode) for method, path, op in OPERATIONS
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        if mode == GenerationMode.POSITIVE or "requestBody" in op or document()["paths"][path].get("parameters")]
SECURED = [(method, path) for method, path, op in OPERATIONS if {"cdsClientJwt": []} in op.get("security", [])]
SANDBOX_ISSUERS = REPO / "tests/fixtures/sandbox/issuers-sandbox.json"
HOOK_URL = "/cds-services/{id}"


def _settings(max_examples: int):
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.filter_too_much, HealthCheck.data_too_large])


@pytest.fixture
def api(make_app):
    """The schema as the app serves it; calls go to the same app in-process."""
    return schemathesis.openapi.from_wsgi("/openapi.json", make_app())


# --- the document itself --------------------------------------------------------------------------------

def test_openapi_json_is_served_as_json(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert response.get_json() == json.loads(json.dumps(document()))
    assert response.get_json()["openapi"].startswith("3.1")
    assert client.get("/openapi.json").get_data() == response.get_data()  # built once, same bytes


def test_mounted_under_a_prefix_the_document_names_it(client):
    response = client.get("/openapi.json", base_url="http://localhost/cds/")
    assert response.get_json()["servers"] == [{"url": "/cds"}]
    assert "servers" not in client.get("/openapi.json").get_json()


def test_document_is_valid_openapi():
    from openapi_spec_validator import validate as validate_openapi  # 0.2 s to import: only where used

    validate_openapi(document())


def test_every_route_is_documented_and_every_documented_path_exists(app):
    routes = {(rule.rule.replace("<service_id>", "{id}"), method.lower())
              for rule in app.url_map.iter_rules()
              for method in rule.methods - {"HEAD", "OPTIONS"}}
    documented = {(path, method.lower()) for method, path, _ in OPERATIONS}
    cds_routes = {r for r in routes if r[0].startswith("/cds-services")}
    assert cds_routes == {d for d in documented if d[0].startswith("/cds-services")}, \
        "a route under /cds-services is missing from cds_hooks_service/openapi.yaml (or the reverse)"
    assert documented <= routes


def test_service_ids_are_the_services():
    components = document()["components"]["schemas"]
    assert components["ServiceId"]["enum"] == list(SERVICES)
    hooks = [branch["properties"]["hook"]["const"] for branch in components["HookRequest"]["oneOf"]]
    assert sorted(hooks) == sorted(SERVICE_FOR_HOOK)


def test_request_schemas_are_the_files_the_service_validates_with():
    components = document()["components"]["schemas"]
    files = {name: json.loads((REPO / "cds_hooks_service/schemas" / name).read_text())
             for name in ("cds-request.json", "feedback.json")}
    assert components["Feedback"]["properties"] == files["feedback.json"]["properties"]
    assert components["CdsRequest"]["properties"] == files["cds-request.json"]["properties"]
    for name, schema in files["cds-request.json"]["$defs"].items():
        expected = json.loads(json.dumps(schema).replace('"#/$defs/', '"#/components/schemas/CdsRequest.'))
        assert components[f"CdsRequest.{name}"] == expected


# --- schemathesis: generated requests --------------------------------------------------------------------

@pytest.mark.parametrize(("method", "path", "mode"), RUNS, ids=[f"{m} {p} {g.value}" for m, p, g in RUNS])
@_settings(max_examples=100)
@given(data=st.data())
def test_generated_requests_get_documented_answers(api, method, path, mode, data):
    case = data.draw(api[path][method].as_strategy(generation_mode=mode), label="case")
    # negative data: what the document calls invalid must be refused with a 4xx
    case.call_and_validate(checks=CHECKS + [negative_data_rejection] * (mode == GenerationMode.NEGATIVE))


@pytest.fixture
def jwt_api(make_app):
    return schemathesis.openapi.from_wsgi("/openapi.json", make_app(jwt_issuers_file=SANDBOX_ISSUERS))


@pytest.mark.parametrize(("method", "path"), SECURED, ids=[f"{m} {p}" for m, p in SECURED])
@_settings(max_examples=10)
@given(data=st.data())
def test_jwt_mode_unauthenticated_calls_are_401_as_documented(jwt_api, method, path, data):
    case = data.draw(jwt_api[path][method].as_strategy(), label="case")  # any Authorization sent is no valid JWT
    response = case.call_and_validate(checks=CHECKS)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == ["Bearer"]
    assert response.json()["issue"][0]["code"] == "login"


def test_jwt_mode_leaves_health_and_this_document_open(make_app):
    client = make_app(jwt_issuers_file=SANDBOX_ISSUERS).test_client()
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/healthz").status_code == 200


# --- schemathesis checks on answers random data does not reach -------------------------------------------

EXAMPLES = sorted((REPO / "fhir_examples").glob("*/*.order-*.json"))


def test_every_example_request_and_its_cards_conform(api):
    """Real cards (random requests never trigger a rule), then feedback on them."""
    operation = api[HOOK_URL]["POST"]
    cards, service_of = [], {}
    for path in EXAMPLES:
        body = json.loads(path.read_text())
        case = operation.Case(path_parameters={"id": SERVICE_FOR_HOOK[body["hook"]].id}, body=body)
        response = case.call_and_validate(checks=CHECKS)
        assert response.status_code == 200, (path, response.text[:300])
        cards += response.json()["cards"]
        service_of.update((c["uuid"], SERVICE_FOR_HOOK[body["hook"]].id) for c in response.json()["cards"])
    assert {card["indicator"] for card in cards} == {"info", "warning", "critical"}
    assert any("suggestions" in card for card in cards) and any("links" in card for card in cards)
    card = next(c for c in cards if "suggestions" in c)
    feedback = {"feedback": [
        {"card": card["uuid"], "outcome": "accepted", "outcomeTimestamp": "2026-03-01T12:00:00Z",
         "acceptedSuggestions": [{"id": card["suggestions"][0]["uuid"]}]},
        {"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-03-01T12:01:00.5+01:00",
         "overrideReason": {"reason": card["overrideReasons"][0], "userComment": "no"}},
    ]}
    case = api[HOOK_URL + "/feedback"]["POST"].Case(path_parameters={"id": service_of[card["uuid"]]},
                                                    body=feedback)  # feedback goes to the card's service
    assert case.call_and_validate(checks=CHECKS).json() == {"stored": 2}


def _case(api, service_id="migraine-med-safety-sign", **kw):
    return api[HOOK_URL]["POST"].Case(path_parameters={"id": service_id}, **kw)


def _validated(case, response):
    case.validate_response(response, checks=CHECKS)
    return response


@pytest.mark.parametrize("status", [404, 412, 413, 415])
def test_documented_error_answers_conform(make_app, status):
    app = make_app(max_body_bytes=20_000)
    api = schemathesis.openapi.from_wsgi("/openapi.json", app)
    client = app.test_client()
    body = request_body(drafts=(HYDROMORPHONE,))
    if status == 404:
        case = _case(api, "no-such-service", body=body)
        response = case.call_and_validate(checks=CHECKS)
    elif status == 412:  # a rule triggers, its data is not prefetched, and there is no fhirServer to read
        del body["prefetch"]
        case = _case(api, body=body)
        response = case.call_and_validate(checks=CHECKS)
        assert response.json()["issue"][0]["expression"] == ["prefetch"]
    elif status == 413:
        body["extension"] = {"padding": "x" * 30_000}
        case = _case(api, body=body)
        response = _validated(case, client.post("/cds-services/migraine-med-safety-sign", json=body))
    else:
        case = _case(api, body=body)
        response = _validated(case, client.post("/cds-services/migraine-med-safety-sign", data=json.dumps(body),
                                                content_type="text/plain"))
    assert response.status_code == status


def test_unsupported_method_is_405_with_an_operation_outcome(client):
    response = client.get("/cds-services/migraine-med-safety-sign")
    assert response.status_code == 405 and response.headers["Allow"]
    outcome = document()["components"]["schemas"]["OperationOutcome"]  # the body of every error answer
    jsonschema.Draft202012Validator(outcome).validate(response.get_json())


def test_invalid_outcome_timestamp_is_400_not_500(client):
    """Found by schemathesis: the pattern admits 0000-00-00T00:00:00Z, which is no instant (was a 500)."""
    for stamp in ("0000-00-00T00:00:00Z", "2026-13-01T00:00:00Z", "0001-01-01T00:00:00+01:00"):
        response = client.post("/cds-services/migraine-med-safety-sign/feedback", json={"feedback": [
            {"card": "c", "outcome": "overridden", "outcomeTimestamp": stamp}]})
        assert response.status_code == 400, stamp
        assert response.get_json()["issue"][0]["expression"] == ["feedback.0.outcomeTimestamp"]


@pytest.mark.parametrize("stamp", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_date_times_beyond_the_utc_range_are_no_time_not_a_500(client, stamp):
    """A draft or a record date that cannot be expressed in UTC was an OverflowError (500)."""
    body = request_body()
    body["context"]["draftOrders"]["entry"][0]["resource"]["authoredOn"] = stamp
    for entry in body["prefetch"]["conditions"]["entry"]:
        entry["resource"]["onsetDateTime"] = stamp
    response = client.post("/cds-services/migraine-med-safety-sign", json=body)
    assert response.status_code == 200, response.get_data(as_text=True)[:300]

