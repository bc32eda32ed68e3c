#!/usr/bin/env python3
"""Write fhir_examples/ from the rules' scenarios (rules/*.tests.yaml).

For every scenario of every rule:
  fhir_examples/<rule>/<scenario>.bundle.json        the patient's record as a FHIR R4 transaction Bundle
                                                     (load it into a FHIR server to test the fallback)
  fhir_examples/<rule>/<scenario>.order-select.json  the CDS Hooks request, record prefetched
  fhir_examples/<rule>/<scenario>.order-sign.json
and one fhir_examples/<rule>/expected.json: what the rule must do in each (fire / no-fire / suppressed).

Every example is its own patient: id ``<rule prefix>-<scenario slug>``, a name, its own encounter, and resource ids prefixed with
the patient id, so all of them can be loaded into one FHIR server. hookInstance is a UUID (fixed per file).
The files are written at the scenario's clock (``now`` in expected.json, e.g. 2026-03-01T12:00:00Z);
`cds-hooks-service examples send` / `examples load` shift every time to the real now (cds_hooks_service/examples.py).
Usage: python tools/build_examples.py [--check]   (--check: exit 1 if the files are out of date)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cds_hooks_service.rulebook import load_rulebook  # noqa: E402
from cds_hooks_service.scenarios import ENCOUNTER_ID, PATIENT_ID, _slug, load_scenarios, scenario_file  # noqa: E402

GIVEN_NAMES = ["Ada", "Bea", "Cleo", "Dana", "Edie", "Faye", "Gina", "Hana", "Iris", "June", "Kira", "Lena",
               "Mara", "Nina", "Olga", "Pia", "Rosa", "Sara", "Tess", "Uma", "Vera", "Wren", "Yara", "Zoe"]
PATIENT_PREFIX = {"opioid-in-migraine": "opioid", "dhe-triptan-ergot-24h": "triptan", "dhe-cyp3a4-inhibitor": "cyp3a4",
                  "dhe-vasopressor": "pressor", "dhe-contraindicated-condition": "contra",
                  "ketamine-non-refractory-migraine": "ketamine"}
FAMILY_NAMES = {"opioid-in-migraine": "Opioidtest", "dhe-triptan-ergot-24h": "Triptantest",
                "dhe-cyp3a4-inhibitor": "Inhibitortest", "dhe-vasopressor": "Pressortest",
                "dhe-contraindicated-condition": "Conditiontest", "ketamine-non-refractory-migraine": "Ketaminetest"}


def _uuid(*parts: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "cds-hooks-service/fhir_examples/" + "/".join(parts)))


class Identity:
    """The ids and name of one example: patient ``<rule prefix>-<scenario slug>`` (stable when scenarios are added;
    at most 50 characters: a longer one is cut and ends with a hash of the name), its encounter, its resources' ids prefixed with it (FHIR ids: at most 64); the
    name (given name by position in the rule's scenarios, family name per rule)."""

    def __init__(self, rule_id: str, number: int, slug: str, ids: set[str]):
        self.patient_id = f"{PATIENT_PREFIX.get(rule_id, rule_id)}-{slug}"
        if len(self.patient_id) > 50:  # shortened, with a hash of the whole name so that it stays unique
            self.patient_id = f"{self.patient_id[:43].rstrip('-')}-{hashlib.sha1(slug.encode()).hexdigest()[:6]}"
        given = GIVEN_NAMES[(number - 1) % len(GIVEN_NAMES)]
        if number > len(GIVEN_NAMES):
            given += f" {number}"
        family = FAMILY_NAMES.get(rule_id) or rule_id.split("-")[0].capitalize() + "test"
        self.name = [{"use": "official", "family": family, "given": [given]}]
        self.ids = {PATIENT_ID: self.patient_id, ENCOUNTER_ID: f"{self.patient_id}-enc"}
        # resource ids: the patient id, shortened where the id would pass FHIR's 64 characters, then the scenario's id
        self.ids.update({i: f"{self.patient_id[:63 - len(i)].rstrip('-')}-{i}" for i in ids})
        too_long = [i for i in self.ids.values() if len(i) > 64]
        if too_long:
            raise SystemExit(f"FHIR ids longer than 64 characters: {too_long}")

    def reference(self, ref: str) -> str:
        kind, _, rid = ref.partition("/")
        return f"{kind}/{self.ids[rid]}" if rid in self.ids else ref

    def apply(self, doc):
        """The document with the example's ids: resource ids, references, selections, context ids."""
        if isinstance(doc, list):
            return [self.apply(v) for v in doc]
        if not isinstance(doc, dict):
            return doc
        out = {}
        for key, value in doc.items():
            if key == "id" and "resourceType" in doc and isinstance(value, str) and value in self.ids:
                out[key] = self.ids[value]
            elif key == "reference" and isinstance(value, str):
                out[key] = self.reference(value)
            elif key == "selections" and isinstance(value, list):
                out[key] = [self.reference(v) for v in value]
            elif key in ("patientId", "encounterId") and isinstance(value, str):
                out[key] = self.ids.get(value, value)
            elif key == "fullUrl" and isinstance(value, str) and value.startswith("urn:uuid:"):
                out[key] = "urn:uuid:" + _uuid(self.patient_id, value[len("urn:uuid:"):])
            else:
                out[key] = self.apply(value)
        if out.get("resourceType") == "Patient" and out.get("id") == self.patient_id:
            out["name"] = self.name
        return out


def transaction_bundle(identity: Identity, resources: list[dict], now: str) -> dict:
    patient = {"resourceType": "Patient", "id": PATIENT_ID, "gender": "female", "birthDate": "1985-04-12"}
    encounter = {"resourceType": "Encounter", "id": ENCOUNTER_ID, "status": "in-progress",
                 "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "EMER",
                           "display": "emergency"},
                 "subject": {"reference": f"Patient/{PATIENT_ID}"}, "period": {"start": now}}
    return identity.apply({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": f"urn:uuid:{r['resourceType']}-{r['id']}", "resource": r,
         "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
        for r in [patient, encounter] + resources]})


def _request_url_ids(bundle: dict) -> dict:
    for entry in bundle["entry"]:  # the PUT url names the resource's (new) id
        entry["request"]["url"] = f"{entry['resource']['resourceType']}/{entry['resource']['id']}"
    return bundle


def build() -> dict[Path, str]:
    rulebook = load_rulebook(REPO / "rules", REPO / "cards")
    files: dict[Path, str] = {}
    for rule in rulebook.rules:
        path = scenario_file(rule)
        if not path.exists():
            continue
        expected = {"rule": rule.id, "now": None, "examples": []}
        for number, sc in enumerate(load_scenarios(path, rule.id), start=1):
            slug = _slug(sc.name)
            now = sc.now.isoformat().replace("+00:00", "Z")
            expected["now"] = expected["now"] or now
            identity = Identity(rule.id, number, slug, {r["id"] for r in sc.record + sc.drafts})
            entry = {"name": sc.name, "patient": identity.patient_id,
                     "patientName": f"{identity.name[0]['given'][0]} {identity.name[0]['family']}",
                     "files": {}, "expect": sc.expect, "now": now}
            if sc.indicator:
                entry["indicator"] = sc.indicator
            base = REPO / "fhir_examples" / rule.id
            files[base / f"{slug}.bundle.json"] = _dump(_request_url_ids(transaction_bundle(identity, sc.record, now)))
            entry["files"]["bundle"] = f"{slug}.bundle.json"
            for hook in ([sc.hook] if sc.hook else sorted(rule.hooks)):
                request = identity.apply(sc.request(hook))
                request["hookInstance"] = _uuid(rule.id, slug, hook)
                request["prefetch"]["patient"]["name"] = identity.name
                files[base / f"{slug}.{hook}.json"] = _dump(request)
                entry["files"][hook] = f"{slug}.{hook}.json"
            expected["examples"].append(entry)
        files[REPO / "fhir_examples" / rule.id / "expected.json"] = _dump(expected)
    return files


def _dump(doc: dict) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    files = build()
    root = REPO / "fhir_examples"
    existing = {p for p in root.glob("*/*.json")}
    stale = [p for p, text in files.items() if not p.exists() or p.read_text() != text] + sorted(existing - set(files))
    if args.check:
        for p in stale:
            print(f"out of date: {p.relative_to(REPO)}")
        return 1 if stale else 0
    for p in sorted(existing - set(files)):
        p.unlink()
    for p, text in files.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    print(f"wrote {len(files)} files under fhir_examples/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
