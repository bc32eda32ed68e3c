#!/usr/bin/env python3
"""Two checkouts of the service served side by side, calls alternating between them: before/after in the same seconds.

The machine's speed changes by up to 2x from one second to the next, so two runs of ``hook_latency.py`` one
after the other can differ by more than the change being measured. This starts the service of each checkout
(``python -m cds_hooks_service serve``, 1 gevent worker each, its own throw-away SQLite store, ``CDS_FIXED_NOW``)
on free loopback ports, checks that both give the same answer to S and B (card and suggestion uuids aside), and
then sends ``--rounds`` rounds of A (discovery), S and B (order-sign with 20 and 200 prefetched resources,
bench/common.py) to each, the two checkouts taking turns call by call (who goes first alternates by round). It
prints per checkout the p50 wall time per case over one keep-alive connection each, the worker's CPU time per
call (/proc), and S / A, S − A, B − A. A measurement, not a test: exit 0 (1 if a service fails).

Both checkouts run with this repository's virtualenv (the checkout's own code comes first on ``sys.path``):

  git worktree add /tmp/before <rev> --detach
  .venv/bin/python bench/compare_versions.py /tmp/before .            # 300 rounds (~1.5 min)
  .venv/bin/python bench/compare_versions.py /tmp/before . --rounds 600
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import FIXED_NOW, SIGN_SERVICE, Service, ServiceFailure, cpu_ns, run_guarded, sign_body, worker_pids

import requests  # noqa: E402

from cds_hooks_service.facts import parse_time  # noqa: E402

CASES = ("A", "S", "B")


class CheckoutService(Service):
    """The service of another checkout (its directory first on sys.path), 1 worker."""

    def __init__(self, root: Path):
        super().__init__(1)
        self.root = root

    def start(self, timeout: float = 30.0) -> None:
        env = {k: v for k, v in os.environ.items()
               if k not in ("CDS_JWT_ISSUERS", "GUNICORN_CMD_ARGS", "CDS_DEBUG_TRACE", "PORT", "HOST")}
        env.update(CDS_FIXED_NOW=FIXED_NOW, CDS_INSTANCE_DIR=self.tmp.name, PYTHONPATH=str(self.root),
                   DATABASE_URL=f"sqlite:///{self.tmp.name}/bench.sqlite3", PYTHONUNBUFFERED="1")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cds_hooks_service", "serve", "--host", "127.0.0.1", "--port",
                 str(self.port), "--workers", "1"],
                cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        self._wait_healthy(f"the service of {self.root}", timeout)


def _without_uuids(answer: dict) -> str:
    for card in answer.get("cards", []):
        card.pop("uuid", None)
        for s in card.get("suggestions", []):
            s.pop("uuid", None)
    return json.dumps(answer, sort_keys=True)


def run(roots: list[Path], rounds: int) -> int:
    now = parse_time(FIXED_NOW)
    bodies = {"S": json.dumps(sign_body(20, 1, now)).encode(), "B": json.dumps(sign_body(200, 2, now)).encode()}
    services = [CheckoutService(r) for r in roots]
    wall = {(i, c): [] for i in (0, 1) for c in CASES}
    cpu = {(i, c): 0 for i in (0, 1) for c in CASES}
    try:
        for s in services:
            s.start()
        sessions = [requests.Session() for _ in services]
        pids = [worker_pids(s.proc.pid) for s in services]

        def call(i: int, case: str) -> requests.Response:
            if case == "A":
                r = sessions[i].get(services[i].url + "/cds-services", timeout=10)
            else:
                r = sessions[i].post(f"{services[i].url}/cds-services/{SIGN_SERVICE}", data=bodies[case],
                                     headers={"Content-Type": "application/json"}, timeout=10)
            if r.status_code != 200:
                raise ServiceFailure(f"{roots[i]}: {case} answered HTTP {r.status_code}: {r.text[:300]}")
            return r

        for _ in range(30):  # warm-up
            for i in (0, 1):
                for case in CASES:
                    call(i, case)
        for case in ("S", "B"):
            same = _without_uuids(call(0, case).json()) == _without_uuids(call(1, case).json())
            print(f"{case}: {'the same answer' if same else 'DIFFERENT ANSWERS'} from both checkouts")
        for n in range(rounds):
            for case in CASES:
                for i in ((0, 1) if n % 2 == 0 else (1, 0)):
                    before = cpu_ns(pids[i])
                    t0 = time.perf_counter()
                    call(i, case)
                    wall[(i, case)].append(time.perf_counter() - t0)
                    cpu[(i, case)] += cpu_ns(pids[i]) - before
    finally:
        for s in services:
            s.stop()
    print(f"{rounds} rounds, calls alternating between the checkouts; ms per call (p50 wall; worker CPU, mean)")
    for i, root in enumerate(roots):
        p50 = {c: statistics.median(wall[(i, c)]) * 1000 for c in CASES}
        cp = {c: cpu[(i, c)] / rounds / 1e6 for c in CASES}
        print(f"{str(root)[-28:]:>28}  wall A {p50['A']:.3f} S {p50['S']:.3f} B {p50['B']:.3f}"
              f"  S/A {p50['S'] / p50['A']:.2f}  S-A {p50['S'] - p50['A']:.3f}  B-A {p50['B'] - p50['A']:.3f}"
              f"  |  CPU A {cp['A']:.3f} S {cp['S']:.3f} B {cp['B']:.3f}  S-A {cp['S'] - cp['A']:.3f}"
              f"  B-A {cp['B'] - cp['A']:.3f}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path, help="a checkout of the service (e.g. a git worktree)")
    ap.add_argument("after", type=Path, help="another checkout")
    ap.add_argument("--rounds", type=int, default=300, help="measured rounds (default 300; max 5000)")
    args = ap.parse_args()
    if not 1 <= args.rounds <= 5000:
        ap.error("--rounds must be 1..5000")
    roots = [args.before.resolve(), args.after.resolve()]
    for root in roots:
        if not (root / "cds_hooks_service" / "__init__.py").is_file():
            ap.error(f"{root} is not a checkout of the service (no cds_hooks_service/__init__.py)")
    result, code = run_guarded(run, roots, args.rounds)
    return code if result is None else result


if __name__ == "__main__":
    sys.exit(main())
