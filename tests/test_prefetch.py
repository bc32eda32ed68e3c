"""Issue 9 §1: the data a rule needs comes from the rule files. Prefetch templates and FHIR-fallback
queries are generated from the loaded rules; `validate` fails when a value set the rules read could not
be fetched by them. End to end against the real FHIR server on loopback (tests/plugins/fhir_server.py)."""
from __future__ import annotations

import json
import shutil

import pytest
import requests

from cds_hooks_service import services
from cds_hooks_service.facts import Normaliser
from cds_hooks_service.rulebook import RulebookError, load_rulebook
from cds_hooks_service.scenarios import expand_draft
from cds_hooks_service.services import (MAX_QUERY_CHARS, R4_STATUSES, parse_template, prefetch_problems,
                                        read_statuses, render_query)
from tests.cds_checks import check_response, topics
from tests.helpers import REPO
from tests.helpers import NOW, SIGN, load_patient, post

# The observations template as it was typed by hand before (3 of the 27 pregnancy-test codes).
OLD_OBSERVATIONS = ("Observation?patient={{context.patientId}}&code=" + ",".join(
    "http://loinc.org|" + c for c in ("8480-6", "8462-4", "85354-9", "62238-1", "98979-8", "48642-3", "48643-1",
                                      "2106-3", "2118-8", "21198-7")) + "&_sort=-date&_count=100")
ALLOWED_PARAMS = {"patient", "status", "code", "_sort", "_count"}  # patient reference, tokens, _sort, _count


# --- generated from the rules ---------------------------------------------------------------------------
def test_templates_cover_what_the_rules_need_and_nothing_hand_typed(rulebook):
    needs = set().union(*(r.needs for r in rulebook.rules if r.enabled))
    assert set(rulebook.prefetch) == needs
    assert not hasattr(services, "PREFETCH")
    obs = rulebook.prefetch["observations"]
    for name in ("obs-pregnancy-test", "obs-egfr", "obs-systolic-bp", "obs-diastolic-bp"):
        for system, code in rulebook.terminology.valuesets[name]:
            assert f"{system}|{code}" in obs, (name, code)
    assert "http://loinc.org|85354-9" in obs  # the BP panel that carries the SBP/DBP components
    assert prefetch_problems(rulebook, rulebook.prefetch) == []


def test_templates_stay_within_the_cds_hooks_2_0_prefetch_subset(rulebook):
    for key, template in rulebook.prefetch.items():
        rtype, params = parse_template(template)
        assert rtype.isalpha() and set(params) <= ALLOWED_PARAMS, template
        assert params["patient"] == "{{context.patientId}}"
        tokens = [t.split("}}")[0] for t in template.split("{{")[1:]]
        assert tokens == ["context.patientId"]
        assert params.get("_sort") in (None, "-date", "-authoredon", "-effective-time", "-effective")
        assert len(render_query(template, {"patientId": "p" * 64})) <= MAX_QUERY_CHARS


def test_discovery_serves_the_generated_templates(client, rulebook):
    for service in client.get("/cds-services").get_json()["services"]:
        assert service["prefetch"] == rulebook.prefetch


def test_a_code_added_to_a_value_set_reaches_the_query(tmp_path):
    shutil.copytree(REPO / "rules", tmp_path / "rules")
    shutil.copytree(REPO / "cards", tmp_path / "cards")
    path = tmp_path / "rules/valuesets/obs-egfr.json"
    vs = json.loads(path.read_text())
    vs["expansion"]["contains"].append({"system": "http://loinc.org", "code": "77147-7", "display": "eGFR (MDRD)"})
    path.write_text(json.dumps(vs))
    assert "http://loinc.org|77147-7" in load_rulebook(tmp_path / "rules", tmp_path / "cards").prefetch["observations"]


@pytest.mark.parametrize("rtype", sorted(R4_STATUSES))
def test_status_filters_are_exactly_the_statuses_the_engine_reads(rulebook, rtype):
    normaliser = Normaliser(rulebook.terminology)
    for status in R4_STATUSES[rtype]:
        if rtype == "Observation":
            read = bool(normaliser.observations({"resourceType": "Observation", "status": status, "code": {}}))
        elif rtype == "Procedure":
            read = normaliser.procedure({"resourceType": "Procedure", "status": status, "code": {}}) is not None
        else:
            from cds_hooks_service.facts import IGNORED_MEDICATION_STATUSES
            read = status not in IGNORED_MEDICATION_STATUSES
        assert read == (status in read_statuses(rtype)), (rtype, status)


# --- validate refuses queries that would not fetch a value set ---------------------------------------------
def test_the_old_hand_typed_query_is_refused_naming_the_missed_codes(rulebook):
    problems = prefetch_problems(rulebook, {**rulebook.prefetch, "observations": OLD_OBSERVATIONS})
    text = "\n".join(m for _, _, m in problems)
    assert "value set 'obs-pregnancy-test': 24 code(s)" in text
    assert {rule for rule, _, m in problems if "obs-pregnancy-test" in m} == {  # ketorolac: every rule offering it
        "dhe-contraindicated-condition", "ketamine-non-refractory-migraine", "opioid-in-migraine",
        "dhe-cyp3a4-inhibitor", "dhe-triptan-ergot-24h", "dhe-vasopressor"}


def test_validate_fails_when_the_observation_codes_no_longer_fit_a_query(tmp_path):
    shutil.copytree(REPO / "rules", tmp_path / "rules")
    shutil.copytree(REPO / "cards", tmp_path / "cards")
    path = tmp_path / "rules/valuesets/obs-pregnancy-test.json"
    vs = json.loads(path.read_text())
    vs["expansion"]["contains"] += [{"system": "http://loinc.org", "code": f"9{i:04d}-1"} for i in range(60)]
    path.write_text(json.dumps(vs))
    with pytest.raises(RulebookError) as exc:
        load_rulebook(tmp_path / "rules", tmp_path / "cards")
    assert f"limit {MAX_QUERY_CHARS}" in str(exc.value) and "observations query" in str(exc.value)


def test_validate_fails_when_a_rule_reads_statuses_the_query_leaves_out(rulebook):
    template = rulebook.prefetch["medicationRequests"].replace("status=active,", "status=")
    problems = prefetch_problems(rulebook, {**rulebook.prefetch, "medicationRequests": template})
    assert any("leaves out statuses the rule reads: active" in m for _, _, m in problems)


# --- end to end: prefetch absent -> fallback on the real FHIR server -> card ------------------------------
def _load(server, record):
    return load_patient(server, record)


def _dhe_body(server, patient):
    draft = expand_draft({"drug": "3418", "text": "dihydroergotamine 1 mg IV", "route": "IV"}, 0, NOW)
    draft["subject"] = {"reference": f"Patient/{patient}"}
    return {"hook": "order-sign", "hookInstance": "b7e1", "fhirServer": server.base_url,
            "fhirAuthorization": {"access_token": server.token, "token_type": "Bearer", "expires_in": 300,
                                  "scope": "user/*.read", "subject": "cds-service"},
            "context": {"userId": "Practitioner/x", "patientId": patient,
                        "draftOrders": {"resourceType": "Bundle", "entry": [{"resource": draft}]}}}


POC_HCG = {"observation": "80384-1", "result": "Positive", "at": "-3d",
           "display": "Choriogonadotropin (pregnancy test) [Presence] in Urine by Rapid immunoassay"}


def test_positive_point_of_care_urine_hcg_read_from_fhir_server_gives_the_pregnancy_card(client, fhir_server):
    patient = _load(fhir_server, [POC_HCG])
    r = post(client, SIGN, _dhe_body(fhir_server, patient))  # no prefetch at all
    assert r.status_code == 200, r.get_data(as_text=True)
    cards = check_response(r.get_json())
    assert topics(r.get_json()) == ["dhe-contraindicated-condition"]
    assert cards[0]["indicator"] == "critical"


def test_the_old_query_never_read_the_point_of_care_hcg(fhir_server):
    """Guards the test above: the server does filter by code, so the old 3-code query missed 80384-1."""
    patient = _load(fhir_server, [POC_HCG])
    url = f"{fhir_server.base_url}/{render_query(OLD_OBSERVATIONS, {'patientId': patient})}"
    bundle = requests.get(url, headers=fhir_server.headers, timeout=10).json()
    assert not [e for e in bundle.get("entry", []) if e["resource"]["resourceType"] == "Observation"]


def test_blood_pressure_panel_read_from_fhir_server_gives_the_hypertension_card(client, fhir_server):
    patient = _load(fhir_server, [{"bp": [186, 104], "at": "-1h"}])
    r = post(client, SIGN, _dhe_body(fhir_server, patient))
    assert r.status_code == 200
    check_response(r.get_json())
    assert topics(r.get_json()) == ["dhe-contraindicated-condition"]


def test_every_generated_query_is_accepted_by_a_strict_fhir_server(rulebook, fhir_server):
    patient = _load(fhir_server, [POC_HCG, {"bp": [120, 80]}, {"given": "3418", "text": "DHE", "route": "IV"}])
    for key, template in rulebook.prefetch.items():
        url = f"{fhir_server.base_url}/{render_query(template, {'patientId': patient})}"
        r = requests.get(url, headers={**fhir_server.headers, "Prefer": "handling=strict"}, timeout=10)
        assert r.status_code == 200, (key, r.text[:500])
        bundle = r.json()
        assert not [e for e in bundle.get("entry", []) if e.get("search", {}).get("mode") == "outcome"], key


# --- every rule scenario, with its record read through the generated queries ------------------------------
def _served_by(resource: dict, templates: dict[str, str]) -> bool:
    """Would a FHIR server return ``resource`` for the generated query of its data key?"""
    from cds_hooks_service.scenarios import _KEY_OF_TYPE
    from cds_hooks_service.services import fetched_concepts
    from cds_hooks_service.terminology import concept

    template = templates.get(_KEY_OF_TYPE.get(resource["resourceType"], ""))
    if template is None:
        return False
    _, params = parse_template(template)
    if "status" in params and resource.get("status") not in params["status"].split(","):
        return False
    asked = fetched_concepts(template)
    if asked is None:
        return True
    codes = {concept(c.get("system"), c.get("code")) for c in (resource.get("code") or {}).get("coding") or []}
    return bool(codes & asked)


def _outcome(response: dict) -> list[tuple[str, str]]:
    return sorted((c["source"]["topic"]["code"], c["indicator"]) for c in response["cards"])


def test_every_scenario_answers_the_same_when_its_record_is_read_through_the_generated_queries(
        rulebook, make_settings, scenario_answers):
    """A scenario prefetches its whole record; an EHR prefetches what the templates ask for. The two must
    agree, or a value set the rules read is not fetched (as 80384-1 was not, by the old query)."""
    from cds_hooks_service.hook_call import call_service
    from cds_hooks_service.scenarios import prefetch_for
    from cds_hooks_service.services import SERVICE_FOR_HOOK

    settings = make_settings()
    compared = 0
    for rule, sc, hook, full_response in scenario_answers():  # with the whole record (computed once per run)
        settings.fixed_now = sc.now
        served = sc.request(hook)
        served["prefetch"] = prefetch_for([r for r in sc.record if _served_by(r, rulebook.prefetch)])
        b = call_service(SERVICE_FOR_HOOK[hook], served, rulebook=rulebook, store=None, settings=settings)
        assert _outcome(full_response) == _outcome(b.response), (rule.id, sc.name, hook)
        compared += 1
    assert compared > 250


def test_validate_names_a_data_key_no_query_is_generated_for(rulebook):
    rule = rulebook.rules[0]
    check = next(iter(rule.checks.values()))
    old = check.needs
    try:
        check.needs = frozenset({"encounters"})  # a kind of data the query table does not know
        assert "encounters" not in services.prefetch_templates(rulebook)
        problems = prefetch_problems(rulebook, services.prefetch_templates(rulebook))
        assert any("needs encounters, which no prefetch template asks for" in m for _, _, m in problems)
    finally:
        check.needs = old
