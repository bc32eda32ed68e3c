#!/usr/bin/env python3
"""Write fhir_examples/ from the rules' scenarios (rules/*.tests.yaml).

For every scenario of every rule:
  fhir_examples/<rule>/<scenario>.bundle.json        the patient's record as a FHIR R4 transaction Bundle
                                                     (load it into a FHIR server to test the fallback)
  fhir_examples/<rule>/<scenario>.order-select.json  the CDS Hooks request, record prefetched
  fhir_examples/<rule>/<scenario>.order-sign.json
and one fhir_examples/<rule>/expected.json: what the rule must do in each (fire / no-fire / suppressed).

The examples use the scenarios' clock (e.g. 2026-03-01T12:00:00Z): run the service with
CDS_FIXED_NOW set to it when you post them, or the time windows will have passed.
Usage: python tools/build_examples.py [--check]   (--check: exit 1 if the files are out of date)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cds_hooks_service.rulebook import load_rulebook  # noqa: E402
from cds_hooks_service.scenarios import PATIENT_ID, _slug, load_scenarios, scenario_file  # noqa: E402


def transaction_bundle(resources: list[dict]) -> dict:
    patient = {"resourceType": "Patient", "id": PATIENT_ID, "gender": "female", "birthDate": "1985-04-12"}
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": f"urn:uuid:{r['resourceType']}-{r['id']}", "resource": r,
         "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
        for r in [patient] + resources]}


def build() -> dict[Path, str]:
    rulebook = load_rulebook(REPO / "rules", REPO / "cards")
    files: dict[Path, str] = {}
    for rule in rulebook.rules:
        path = scenario_file(rule)
        if not path.exists():
            continue
        expected = {"rule": rule.id, "now": None, "examples": []}
        for sc in load_scenarios(path, rule.id):
            slug = _slug(sc.name)
            expected["now"] = expected["now"] or sc.now.isoformat().replace("+00:00", "Z")
            entry = {"name": sc.name, "files": {}, "expect": sc.expect,
                     "now": sc.now.isoformat().replace("+00:00", "Z")}
            if sc.indicator:
                entry["indicator"] = sc.indicator
            base = REPO / "fhir_examples" / rule.id
            files[base / f"{slug}.bundle.json"] = _dump(transaction_bundle(sc.record))
            entry["files"]["bundle"] = f"{slug}.bundle.json"
            for hook in ([sc.hook] if sc.hook else sorted(rule.hooks)):
                files[base / f"{slug}.{hook}.json"] = _dump(sc.request(hook))
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
