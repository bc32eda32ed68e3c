"""fhir_examples/: generated from the rule scenarios; every request answers as its expected.json says with
today's clock (its times shifted to now, as `examples send` does); every example is its own patient; every file
is valid FHIR R4; `examples load` puts every patient into a real FHIR server, from which the service reads
them; `examples send` posts to a running service and prints the cards."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.medicationrequest import MedicationRequest

from cds_hooks_service.cli import main as cli
from cds_hooks_service.examples import examples, shift_times
from tests.cds_checks import check_response, topics
from tests.helpers import REPO
from tests.plugins.gunicorn_service import GunicornService

EXAMPLES = REPO / "fhir_examples"
ALL = examples(EXAMPLES)
CASES = [(ex, hook) for ex in ALL for hook in ("order-select", "order-sign") if hook in ex.files]
URL = {"order-select": "/cds-services/migraine-med-safety-select", "order-sign": "/cds-services/migraine-med-safety-sign"}
UTC = timezone.utc


def test_examples_are_generated_from_the_current_scenarios():
    r = subprocess.run([sys.executable, str(REPO / "tools/build_examples.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, "run tools/build_examples.py:\n" + r.stdout


def test_every_rule_has_two_firing_and_two_quiet_examples(rulebook):
    for rule in rulebook.rules:
        kinds = [e.expect for e in ALL if e.rule_id == rule.id]
        assert kinds.count("fire") >= 2 and len(kinds) - kinds.count("fire") >= 2, rule.id


def test_every_example_is_its_own_patient_with_a_name_and_unique_resource_ids():
    patients, names, resource_ids = Counter(), Counter(), Counter()
    for ex in ALL:
        bundle = json.loads(ex.files["bundle"].read_text())
        ids = [f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle["entry"]]
        patient = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
        patients[patient["id"]] += 1
        names[(patient["name"][0]["family"], tuple(patient["name"][0]["given"]))] += 1
        resource_ids.update(ids)
        for hook in ("order-select", "order-sign"):
            if hook in ex.files:
                request = json.loads(ex.files[hook].read_text())
                assert request["context"]["patientId"] == patient["id"]
                assert request["prefetch"]["patient"]["name"] == patient["name"]
                refs = {e["resource"]["subject"]["reference"] for e in request["context"]["draftOrders"]["entry"]}
                assert refs == {f"Patient/{patient['id']}"}
                resource_ids.update(f"{e['resource']['resourceType']}/{e['resource']['id']}"
                                    for e in request["context"]["draftOrders"]["entry"] if hook == "order-sign")
        assert all(ref.startswith(f"Patient/{patient['id']}") for ref in _references(bundle) if ref.startswith("Patient/"))
    assert max(patients.values()) == 1 and max(names.values()) == 1, (patients.most_common(2), names.most_common(2))
    assert max(resource_ids.values()) == 1, resource_ids.most_common(3)
    assert len(patients) == len(ALL) > 100


def _references(doc):
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k == "reference" and isinstance(v, str):
                yield v
            else:
                yield from _references(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from _references(v)


def test_shift_times_moves_date_times_and_dates_and_nothing_else():
    doc = {"a": "2026-03-01T12:00:00Z", "b": ["2026-03-01T09:30:00.250+02:00", "2026-02-28"], "code": "20260301",
           "text": "given 2026-03-01T12:00:00Z", "n": 3}
    out = shift_times(doc, timedelta(days=1, hours=13))
    assert out == {"a": "2026-03-03T01:00:00Z", "b": ["2026-03-02T22:30:00.250+02:00", "2026-03-02"],
                   "code": "20260301", "text": "given 2026-03-01T12:00:00Z", "n": 3}


@pytest.mark.parametrize("example, hook", CASES, ids=[f"{e.rule_id}:{e.name}:{h}" for e, h in CASES])
def test_example_request_answers_as_expected_with_todays_clock(example_answer, example, hook):
    r = example_answer(example.files[hook])  # posted once per run with the real clock, as in production
    body = r.request  # as sent: example.load(hook), its times shifted to now
    for entry in body["context"]["draftOrders"]["entry"]:  # the drafts (and a Condition they cite) are strict R4 too
        resource = entry["resource"]
        model = MedicationRequest if resource["resourceType"] == "MedicationRequest" \
            else get_fhir_model_class(resource["resourceType"])
        model.model_validate(resource)
    assert r.status == 200, r.text
    response = r.json()
    check_response(response)
    fired = example.rule_id in topics(response)
    assert fired == (example.expect == "fire"), (example.name, topics(response))
    if fired and example.indicator:
        card = next(c for c in response["cards"] if c["source"]["topic"]["code"] == example.rule_id)
        assert card["indicator"] == example.indicator


def test_an_unshifted_example_would_not_fire_today(make_app):
    """What the shift is for: the file as written, sent with today's clock, misses the 24 h window."""
    ex = next(e for e in ALL if e.rule_id == "dhe-triptan-ergot-24h" and e.expect == "fire" and "3 h ago" in e.name)
    body = json.loads(ex.files["order-sign"].read_text())
    assert datetime.now(UTC) - ex.now > timedelta(days=1)
    response = make_app(fixed_now=None).test_client().post(URL["order-sign"], json=body).get_json()
    assert ex.rule_id not in topics(response)


def test_examples_list_names_every_patient(capsys):
    assert cli(["examples", "list", "--dir", str(EXAMPLES)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(ALL)
    assert any(line.split()[:2] == ["opioid-in-migraine", "opioid-iv-hydromorphone-active-migraine-diagnosis"] for line in lines)


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*/*.bundle.json")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_example_bundles_are_valid_fhir_r4(path):
    Bundle.model_validate(json.loads(path.read_text()))


@pytest.mark.slow
def test_examples_load_puts_every_patient_in_a_fhir_server_and_the_service_reads_them_today(
        open_fhir_server, make_app, capsys):
    assert cli(["examples", "load", "--fhir-server", open_fhir_server.base_url, "--dir", str(EXAMPLES)]) == 0
    assert f"loaded {len(ALL)} example patients" in capsys.readouterr().out
    client = make_app(fixed_now=None).test_client()
    chosen = {}  # per rule: one example that fires and one that does not
    for ex in ALL:
        chosen.setdefault((ex.rule_id, ex.expect == "fire"), ex)
    for ex in chosen.values():
        body = ex.load("order-sign")
        del body["prefetch"]  # the service reads the record from the FHIR server
        body["fhirServer"] = open_fhir_server.base_url
        response = client.post(URL["order-sign"], json=body).get_json()
        assert "data-unavailable" not in topics(response), response
        assert (ex.rule_id in topics(response)) == (ex.expect == "fire"), (ex.name, topics(response))


# The README's "Which examples the Sandbox can reach" table: the patient, and a product of the Sandbox's drug list
SANDBOX_ORDERS = {
    "opioid-iv-hydromorphone-active-migraine-diagnosis": ("1049502", "12 HR Oxycodone Hydrochloride 10 MG Extended Release Oral Tablet"),
    "triptan-reverse-sumatriptan-sc-drafted-5-h-28dbf6": ("1163613", "Sumatriptan Pill"),
    "cyp3a4-reverse-fluconazole-drafted-2-h-afte-620335": ("201896", "Ketoconazole 200 MG Oral Tablet [Nizoral]"),
    "pressor-reverse-norepinephrine-infusion-dra-b698f7": ("996721", "Pseudoephedrine Hydrochloride 60 MG"),
}


def _readme_sandbox_rows() -> dict[str, str]:
    readme = (REPO / "README.md").read_text()
    table = readme.split("**Which examples the Sandbox can reach.**", 1)[1].split("\n\n", 2)[1]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].split("`")[1]] = cells[2].split("`")[1]
    return rows


@pytest.mark.slow
def test_the_readmes_sandbox_examples_fire_from_a_sandbox_shaped_order(open_fhir_server, make_app, capsys):
    """After `examples load`, ordering the listed product from the Sandbox's list for the listed patient (a
    Sandbox-shaped order-select: no prefetch, the record read from the FHIR server) gives the listed card."""
    from tests.sandbox_client import order_select_request

    rows = _readme_sandbox_rows()
    assert set(rows) == set(SANDBOX_ORDERS)
    rules = sorted({ex.rule_id for ex in ALL if ex.files["bundle"] and any(p.startswith(ex.rule_id) for p in rows)})
    assert cli(["examples", "load", "--fhir-server", open_fhir_server.base_url, "--dir", str(EXAMPLES),
                *[arg for rule in rules for arg in ("--rule", rule)]]) == 0
    capsys.readouterr()
    client = make_app(fixed_now=None).test_client()
    for patient, rule in rows.items():
        code, display = SANDBOX_ORDERS[patient]
        body = order_select_request(patient, code, display, fhir_server=open_fhir_server.base_url)
        response = client.post(URL["order-select"], json=body).get_json()
        assert rule in topics(response), (patient, response)


@pytest.mark.slow
def test_examples_send_posts_to_the_running_service_and_prints_the_cards(tmp_path, capsys):
    ex = next(e for e in ALL if e.rule_id == "opioid-in-migraine" and e.expect == "fire")
    quiet = next(e for e in ALL if e.rule_id == "opioid-in-migraine" and e.expect != "fire")
    with GunicornService(tmp_path, workers=1) as service:  # no CDS_FIXED_NOW: today's clock
        assert cli(["examples", "send", str(ex.files["order-sign"]), "--url", service.base_url]) == 0
        out = capsys.readouterr().out
        assert ex.name in out and "(opioid-in-migraine)" in out and ("[warning]" in out or "[info]" in out)
        assert cli(["examples", "send", str(quiet.files["order-sign"]), "--url", service.base_url]) == 0
        assert "(opioid-in-migraine)" not in capsys.readouterr().out
    assert cli(["examples", "send", str(ex.files["order-sign"]), "--url", service.base_url]) == 1
    assert "is the service running?" in capsys.readouterr().err
