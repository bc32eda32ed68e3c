"""Test helpers shared by the test modules: request bodies, posting, error assertions, large bodies, the calls
of the FHIR-server tests, TLS for the fault server, the Procfile command.

Test modules import these from here (never from another test module).
"""
from __future__ import annotations

import functools
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from cds_hooks_service.facts import parse_time
from cds_hooks_service.scenarios import ENCOUNTER_ID, PATIENT_ID, USER_ID, expand_draft, expand_record, prefetch_for
from tests.cds_checks import check_response

REPO = Path(__file__).resolve().parent.parent
SCENARIO_NOW = "2026-03-01T12:00:00Z"
NOW = parse_time(SCENARIO_NOW)
SIGN = "/cds-services/migraine-med-safety-sign"
SELECT = "/cds-services/migraine-med-safety-select"
MIGRAINE = {"condition": "G43.909", "display": "Migraine, unspecified"}
HYDROMORPHONE = {"drug": "897745", "text": "hydromorphone 2 MG/ML Injectable Solution", "route": "IV"}
DHE = {"drug": "3418", "text": "dihydroergotamine 1 mg IV", "route": "IV"}
SUMATRIPTAN_GIVEN = {"given": "37418", "text": "sumatriptan 6 mg SC", "route": "SC"}


@functools.cache
def shipped_rulebook():
    """The shipped rules and cards, loaded once per process (the ``rulebook`` fixture, and the tests that list
    the shipped rules at collection). Read-only: a test that changes rules loads an edited copy."""
    from cds_hooks_service.rulebook import load_rulebook

    return load_rulebook(REPO / "rules", REPO / "cards")


def app_settings(folder: Path, **overrides):
    """The settings of a test's app: its store ``folder/store.sqlite3`` (not created here), the scenarios' clock,
    a loopback service (open mode allowed), the test client's root as public URL (the JWT aud of the tests)."""
    from cds_hooks_service.config import Settings

    base = dict(database_url=f"sqlite:///{folder / 'store.sqlite3'}", instance_dir=folder,
                suppression_secret=b"test-secret", fixed_now=NOW, public_url="http://localhost",
                listen_hosts=("127.0.0.1",))
    return Settings(**(base | overrides))


def load_yaml(text: str):
    """``yaml.safe_load`` with libyaml's parser when PyYAML has it: the same document, about 10 times faster on
    the large rule files tests edit (the drug names, ~100 KB)."""
    import yaml

    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506 - a safe loader


def dump_yaml(doc, **options) -> str:
    """``yaml.safe_dump`` with libyaml's emitter when PyYAML has it."""
    import yaml

    return yaml.dump(doc, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), **options)


def request_body(hook="order-sign", drafts=(HYDROMORPHONE,), record=(MIGRAINE,), patient="example-patient",
                 selections=None):
    draft_resources = [expand_draft(dict(d), i, NOW) for i, d in enumerate(drafts)]
    context = {"userId": "Practitioner/example", "patientId": patient,
               "draftOrders": {"resourceType": "Bundle", "entry": [{"resource": r} for r in draft_resources]}}
    if hook == "order-select":
        context["selections"] = selections or [f"MedicationRequest/{draft_resources[0]['id']}"]
    return {"hook": hook, "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea", "context": context,
            "prefetch": prefetch_for([expand_record(dict(r), i, NOW) for i, r in enumerate(record)])}


def post(client, url, body, **kw):
    return client.post(url, data=json.dumps(body), content_type="application/json", **kw)


def assert_error(response, status, field=None):
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert body["resourceType"] == "OperationOutcome"
    issue = body["issue"][0]
    assert issue["severity"] == "error" and issue["details"]["text"]
    if field:
        assert field in issue.get("expression", [""])[0] or field in issue["details"]["text"], body
    return issue


# -- large bodies (scaling and hostile-input tests) -----------------------------------------------------
_FILLER = [  # record entries no rule looks at, and some that rules do (a mix as in a real record)
    {"condition": "E11.9", "display": "Type 2 diabetes mellitus"},
    {"condition": "I10", "display": "Essential hypertension"},
    {"ordered": "314076", "text": "lisinopril 10 MG Oral Tablet", "route": "PO"},
    {"ordered": "313160", "text": "sumatriptan 100 MG Oral Tablet", "route": "PO", "status": "completed"},
    {"given": "26225", "text": "ondansetron 4 mg IV", "route": "IV"},
    {"given": "35827", "text": "ketorolac 15 mg IV", "route": "IV"},
    {"taking": "8787", "text": "propranolol"},
    {"bp": [132, 84]},
    {"observation": "62238-1", "value": 88, "unit": "mL/min/{1.73_m2}"},
    {"observation": "718-7", "value": 13.2, "unit": "g/dL"},
    {"procedure": "80146002", "display": "Appendectomy"},
]


def record_items(n: int, *, triptans: int = 0) -> list[dict]:
    """``n`` shorthand record items: a migraine diagnosis, ``triptans`` sumatriptan doses in the past day
    and the rest a realistic mix, each dated in the past."""
    items: list[dict] = [dict(MIGRAINE)]
    items += [dict(SUMATRIPTAN_GIVEN, at=f"-{1 + i % 20}h") for i in range(triptans)]
    i = 0
    while len(items) < n:
        items.append(dict(_FILLER[i % len(_FILLER)], at=f"-{2 + i % 900}h"))
        i += 1
    return items[:n]


def large_body(n_drafts: int, n_record: int, *, triptans: int = 0, draft=DHE) -> dict:
    """An order-sign with ``n_drafts`` copies of ``draft`` (own ids) and a record of ``n_record`` resources."""
    drafts = [expand_draft(dict(draft, id=f"d{i}"), i, NOW) for i in range(n_drafts)]
    record = [expand_record(item, i, NOW) for i, item in enumerate(record_items(n_record, triptans=triptans))]
    return {"hook": "order-sign", "hookInstance": f"large-{n_drafts}-{n_record}-{triptans}",
            "context": {"userId": USER_ID, "patientId": PATIENT_ID, "encounterId": ENCOUNTER_ID,
                        "draftOrders": {"resourceType": "Bundle", "type": "collection",
                                        "entry": [{"resource": d} for d in drafts]}},
            "prefetch": prefetch_for(record)}


def rule_errors(rules_dir, **load) -> list[str]:
    """The error lines of loading an edited rules folder (its cards beside it); the test fails if it loads."""
    import pytest

    from cds_hooks_service.rulebook import RulebookError, load_rulebook

    with pytest.raises(RulebookError) as exc:
        load_rulebook(rules_dir, rules_dir.parent / "cards", **load)
    return [str(p) for p in exc.value.problems if p.severity == "error"]


def edit(path, old, new):
    """Replace the first `old` in a file by `new`; the test fails if `old` is not there."""
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def load_patient(server, record, extra_conditions: int = 0) -> str:
    """Load a new patient with the scenario-style `record` (times relative to NOW) into a FHIR test server,
    plus `extra_conditions` unrelated ones (history that makes the search page); returns the patient id."""
    patient = server.unique_id("pat")
    resources = [{"resourceType": "Patient", "id": patient}]
    for i, item in enumerate(record):
        r = expand_record(dict(item), i, NOW)
        r["id"] = server.unique_id(r["resourceType"][:4].lower())
        r["subject"] = {"reference": f"Patient/{patient}"}
        resources.append(r)
    for _ in range(extra_conditions):
        resources.append({"resourceType": "Condition", "id": server.unique_id("c"), "subject": {"reference": f"Patient/{patient}"},
                          "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "J06.9"}]}})
    server.load(resources)
    return patient


# -- FHIR-server tests (tests/plugins/fault_server.py, the real FHIR server): a call that reads the record --------
PATIENT = "pat-0a7f3c9e-do-not-show"
TOKEN = "tok-Zq81xY-never-show-this"
OPIOID = {"drug": "897745", "text": "hydromorphone 2 mg/mL injection", "route": "IV"}
OPIOID_FOR_MIGRAINE = {**OPIOID, "reason": "G43.909"}  # fires on the draft alone
OPIOID_RULE = "opioid-in-migraine"


def hook_body(server_url: str, drafts=(OPIOID,), hook: str = "order-sign", token: str | None = TOKEN,
              prefetch: dict | None = None) -> dict:
    resources = [expand_draft(dict(d), i, NOW) for i, d in enumerate(drafts)]
    for r in resources:
        r["subject"] = {"reference": f"Patient/{PATIENT}"}
    context = {"userId": "Practitioner/example", "patientId": PATIENT,
               "draftOrders": {"resourceType": "Bundle", "type": "collection",
                               "entry": [{"resource": r} for r in resources]}}
    if hook == "order-select":
        context["selections"] = [f"MedicationRequest/{resources[0]['id']}"]
    body = {"hook": hook, "hookInstance": str(uuid.uuid4()), "fhirServer": server_url, "context": context}
    if token:
        body["fhirAuthorization"] = {"access_token": token, "token_type": "Bearer", "expires_in": 300,
                                     "scope": "patient/*.read", "subject": "cds-service"}
    if prefetch is not None:
        body["prefetch"] = prefetch
    return body


@dataclass
class Answer:
    status: int
    body: dict
    elapsed: float

    @property
    def cards(self) -> list[dict]:
        return self.body["cards"]

    def not_completed(self) -> dict[str, dict]:
        """check title -> the one "Check not completed" card (issue 9 §4: at most one per response, listing
        every check it could not complete as "- <title>" lines)."""
        cards = [c for c in self.cards if c["summary"].startswith("Check not completed: ")]
        assert len(cards) <= 1, [c["summary"] for c in cards]
        out = {}
        for c in cards:
            assert c["indicator"] == "info"
            for line in c["detail"].split("\n"):
                if line.startswith("- "):
                    out[line[2:]] = c
        return out


def call(app, body: dict, url: str = SIGN) -> Answer:
    client = app.test_client()
    t0 = time.monotonic()
    r = client.post(url, data=json.dumps(body), content_type="application/json")
    elapsed = time.monotonic() - t0
    assert r.status_code == 200, r.get_data(as_text=True)
    answer = Answer(r.status_code, r.get_json(), elapsed)
    check_response(answer.body)
    return answer


def assert_shows_nothing_secret(text: str, *servers) -> None:
    assert TOKEN not in text
    assert PATIENT not in text
    assert "http://" not in text and "https://" not in text.replace("https://migraine-med-safety.example.org", "")
    for server in servers:
        assert f":{server.port}" not in text and "127.0.0.1" not in text


def assert_token_not_logged(caplog) -> None:
    assert TOKEN not in caplog.text
    for record in caplog.records:
        assert TOKEN not in record.getMessage() and TOKEN not in repr(record.args)


def patient_record(*items) -> list[dict]:
    """Scenario-style record items (times relative to NOW) as resources of the fault tests' PATIENT."""
    out = []
    for i, item in enumerate(items):
        r = expand_record(dict(item), i, NOW)
        r["subject"] = {"reference": f"Patient/{PATIENT}"}
        out.append(r)
    return out
