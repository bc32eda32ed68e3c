"""Time a hook call over a long record read from a real FHIR server (sekmet on loopback, as the tests use).

    python bench/long_record.py [--size 5000] [--runs 5] [--budget 1.5] [--count 1000 200]

Loads one patient with SIZE conditions into a fresh sekmet: SIZE - 1 unrelated ones first, the migraine diagnosis
last (sekmet pages in insertion order, so it is on the last page). Then posts an order-sign call for IV
hydromorphone with nothing prefetched RUNS times per page size (`_count` of the conditions query) through the
Flask app (no HTTP server in front of the service) with CDS_TIME_BUDGET = BUDGET, and prints for each call the
wall-clock time and whether the opioid card fired or the answer said the conditions were only partly read (and
how many were read). Needs <repo>/.venv-sekmet (scripts/install-test-deps.sh).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from cds_hooks_service import create_app  # noqa: E402
from cds_hooks_service.config import Settings  # noqa: E402
from cds_hooks_service.facts import parse_time  # noqa: E402
from cds_hooks_service.rulebook import load_rulebook  # noqa: E402
from cds_hooks_service.scenarios import expand_draft, expand_record  # noqa: E402
from tests.plugins.fhir_server import _start, _stop  # noqa: E402

NOW = "2026-03-01T12:00:00Z"


class _Tmp:  # what tests.plugins.fhir_server._start needs of pytest's tmp_path_factory
    def __init__(self, root: Path):
        self.root = root

    def mktemp(self, name: str) -> Path:
        path = self.root / f"{name}-{uuid.uuid4().hex[:6]}"
        path.mkdir()
        return path


def load_record(server, size: int) -> str:
    patient = server.unique_id("pat")
    subject = {"reference": f"Patient/{patient}"}
    server.load([{"resourceType": "Patient", "id": patient}])
    filler = [{"resourceType": "Condition", "id": server.unique_id("c"), "subject": subject,
               "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "J06.9"}]}}
              for _ in range(size - 1)]
    for i in range(0, len(filler), 1000):
        server.load(filler[i:i + 1000])
    migraine = expand_record({"condition": "G43.909", "display": "Migraine, unspecified"}, 0, parse_time(NOW))
    migraine.update(id=server.unique_id("mig"), subject=subject)
    server.load([migraine])
    return patient


def body(server, patient: str) -> dict:
    draft = expand_draft({"drug": "897745", "text": "hydromorphone 2 mg/mL injection", "route": "IV"}, 0,
                         parse_time(NOW))
    draft["subject"] = {"reference": f"Patient/{patient}"}
    return {"hook": "order-sign", "hookInstance": str(uuid.uuid4()), "fhirServer": server.base_url,
            "fhirAuthorization": {"access_token": server.token, "token_type": "Bearer", "expires_in": 300,
                                  "scope": "patient/*.read", "subject": "bench"},
            "context": {"userId": "Practitioner/bench", "patientId": patient,
                        "draftOrders": {"resourceType": "Bundle", "entry": [{"resource": draft}]}}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--budget", type=float, default=1.5)
    ap.add_argument("--count", type=int, nargs="+", default=[1000, 200])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc, server = _start(_Tmp(Path(tmp)), "sekmet-bench", token=f"bench-{uuid.uuid4().hex}")
        try:
            t0 = time.monotonic()
            patient = load_record(server, args.size)
            print(f"loaded {args.size} conditions in {time.monotonic() - t0:.1f}s")
            rulebook = load_rulebook(REPO_ROOT / "rules", REPO_ROOT / "cards")
            template = rulebook.prefetch["conditions"]
            for count in args.count:
                rulebook.prefetch["conditions"] = re.sub(r"_count=\d+", f"_count={count}", template)
                settings = Settings(database_url=f"sqlite:///{tmp}/store.sqlite3", instance_dir=Path(tmp),
                                    suppression_secret=b"bench", fixed_now=parse_time(NOW), time_budget=args.budget,
                                    fhir_servers=(server.base_url,))
                client = create_app(settings, rulebook=rulebook).test_client()
                for _ in range(args.runs):
                    t = time.monotonic()
                    r = client.post("/cds-services/migraine-med-safety-sign", data=json.dumps(body(server, patient)),
                                    content_type="application/json")
                    elapsed = time.monotonic() - t
                    cards = r.get_json()["cards"]
                    fired = any(c["source"].get("topic", {}).get("code") == "opioid-in-migraine" for c in cards)
                    partly = re.search(r"only partly read \(([\d,]+) read", json.dumps(cards))
                    what = "card fired" if fired else f"partly read: {partly.group(1)} of {args.size}" if partly \
                        else "other: " + "; ".join(c["summary"] for c in cards)
                    print(f"_count={count:5d} budget={args.budget}s: {elapsed:.2f}s  {what}")
        finally:
            _stop(proc)


if __name__ == "__main__":
    main()
