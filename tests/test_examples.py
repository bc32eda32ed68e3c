"""fhir_examples/: every request answers as its expected.json says, and every file is valid FHIR R4."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.medicationrequest import MedicationRequest

from cds_hooks_service.facts import parse_time
from tests.cds_checks import check_response, topics
from tests.conftest import REPO

EXAMPLES = REPO / "fhir_examples"
CASES = [(exp_path.parent.name, ex, hook) for exp_path in sorted(EXAMPLES.glob("*/expected.json"))
         for ex in json.loads(exp_path.read_text())["examples"] for hook in ("order-select", "order-sign")
         if hook in ex["files"]]
URL = {"order-select": "/cds-services/migraine-med-safety-select", "order-sign": "/cds-services/migraine-med-safety-sign"}


def test_examples_are_generated_from_the_current_scenarios():
    r = subprocess.run([sys.executable, str(REPO / "tools/build_examples.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, "run tools/build_examples.py:\n" + r.stdout


def test_every_rule_has_two_firing_and_two_quiet_examples(rulebook):
    for rule in rulebook.rules:
        expected = json.loads((EXAMPLES / rule.id / "expected.json").read_text())
        kinds = [e["expect"] for e in expected["examples"]]
        assert kinds.count("fire") >= 2 and len(kinds) - kinds.count("fire") >= 2, rule.id


@pytest.mark.parametrize("rule_id, example, hook", CASES, ids=[f"{r}:{e['name']}:{h}" for r, e, h in CASES])
def test_example_request_answers_as_expected(make_app, rule_id, example, hook):
    client = make_app(fixed_now=parse_time(example["now"])).test_client()
    body = json.loads((EXAMPLES / rule_id / example["files"][hook]).read_text())
    for entry in body["context"]["draftOrders"]["entry"]:  # the drafts (and a Condition they cite) are strict R4 too
        resource = entry["resource"]
        model = MedicationRequest if resource["resourceType"] == "MedicationRequest" \
            else get_fhir_model_class(resource["resourceType"])
        model.model_validate(resource)
    r = client.post(URL[hook], json=body)
    assert r.status_code == 200, r.get_data(as_text=True)
    response = r.get_json()
    check_response(response)
    fired = rule_id in topics(response)
    assert fired == (example["expect"] == "fire"), (example["name"], topics(response))
    if fired and example.get("indicator"):
        card = next(c for c in response["cards"] if c["source"]["topic"]["code"] == rule_id)
        assert card["indicator"] == example["indicator"]


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*/*.bundle.json")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_example_bundles_are_valid_fhir_r4(path):
    Bundle.model_validate(json.loads(path.read_text()))
