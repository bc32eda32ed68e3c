"""Prefetch missing -> the service reads the EHR's FHIR server itself (a real FHIR server on loopback)."""
from __future__ import annotations

import json

from cds_hooks_service.scenarios import expand_draft
from tests.cds_checks import check_response, topics
from tests.helpers import NOW, SIGN, SELECT, load_patient, post

RECORD = [
    {"condition": "G43.909", "display": "Migraine"},
    {"bp": [150, 90], "at": "-2h"},
    {"given": "860092", "text": "ketorolac 15 mg IV", "route": "IV", "at": "-3h"},
]


def _load_patient(server, record=RECORD, extra=0):
    return load_patient(server, record, extra_conditions=extra)  # the server pages at 20


def _body(server, patient, hook="order-sign", token=None, prefetch=None):
    draft = expand_draft({"drug": "897745", "text": "hydromorphone 2 mg/mL injection", "route": "IV"}, 0, NOW)
    draft["subject"] = {"reference": f"Patient/{patient}"}
    context = {"userId": "Practitioner/x", "patientId": patient,
               "draftOrders": {"resourceType": "Bundle", "entry": [{"resource": draft}]}}
    if hook == "order-select":
        context["selections"] = ["MedicationRequest/draft-1"]
    body = {"hook": hook, "hookInstance": "c2a4", "fhirServer": server.base_url, "context": context}
    if token:
        body["fhirAuthorization"] = {"access_token": token, "token_type": "Bearer", "expires_in": 300,
                                     "scope": "user/*.read", "subject": "cds-service"}
    if prefetch:
        body["prefetch"] = prefetch
    return body


def test_fallback_with_bearer_token_reads_all_pages(client, fhir_server):
    patient = _load_patient(fhir_server, extra=45)
    r = post(client, SIGN, _body(fhir_server, patient, token=fhir_server.token))
    assert r.status_code == 200, r.get_data(as_text=True)
    check_response(r.get_json())
    assert topics(r.get_json()) == ["opioid-in-migraine"]


def test_fallback_on_an_open_server_like_the_sandbox(client, open_fhir_server):
    patient = _load_patient(open_fhir_server)
    r = post(client, SELECT, _body(open_fhir_server, patient, hook="order-select"))
    assert r.status_code == 200 and topics(r.get_json()) == ["opioid-in-migraine"]


def test_partial_prefetch_is_completed_from_the_server(client, fhir_server):
    patient = _load_patient(fhir_server)
    empty = {"resourceType": "Bundle", "type": "searchset", "entry": []}
    prefetch = {"medicationRequests": empty, "medicationStatements": empty}  # conditions etc. absent
    r = post(client, SIGN, _body(fhir_server, patient, token=fhir_server.token, prefetch=prefetch))
    assert topics(r.get_json()) == ["opioid-in-migraine"]


def test_unreadable_server_names_the_check_not_completed(client, fhir_server):
    patient = _load_patient(fhir_server)
    r = post(client, SIGN, _body(fhir_server, patient, token="wrong-token"))
    assert r.status_code == 200
    cards = check_response(r.get_json())
    assert cards, "a check that could not run must never pass for an empty answer"
    assert all(c["indicator"] == "info" for c in cards)
    assert "Check not completed" in cards[0]["summary"]
    assert "could not be read" in cards[0]["detail"]
    assert "wrong-token" not in json.dumps(r.get_json())
