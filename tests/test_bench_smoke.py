"""Smoke tests of bench/hook_latency.py (the benchmark behind the README's performance figures still runs: it
starts the service and the bare Flask floor app, builds every body, measures every case) and of
bench/instructions.py (its callgrind counts are per measured call). The figures themselves are not asserted:
speed is measured in bench/, not in timed tests."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow


def test_hook_latency_bench_runs_every_case():
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "hook_latency.py"), "--n", "5", "--warmup", "1", "--xlarge", "100",
         "--json"], cwd=REPO, capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.dumps(json.loads(proc.stdout))
    for case in ("discovery", "bare", "small", "large", "xlarge"):
        assert case in figures, f"{case!r} missing from the bench output"
    bodies = json.loads(proc.stdout)["bodies"]
    # C is sampled in the rounds (one block in 5 rounds) and, for comparison, after them
    assert bodies["large"]["json_loads_iterations"] == 5, bodies["large"]
    assert bodies["large"]["json_loads_after_rounds_iterations"] >= 50, bodies["large"]


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="bench/instructions.py needs valgrind")
def test_instructions_bench_counts_the_measured_calls():
    """bench/instructions.py counts only the calls between its marker calls: 4 calls count about twice 2."""
    counts = {}
    for n in (2, 4):
        proc = subprocess.run([sys.executable, str(REPO / "bench" / "instructions.py"), "--cases", "CS", "--n", str(n)],
                              cwd=REPO, capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stderr[-3000:]
        counts[n] = float(re.search(r"^CS\s+([\d.]+) M instructions per call", proc.stdout, re.M).group(1))
    assert 0.1 < counts[2] < 10, counts  # json.loads of a 13 KB body: about a million instructions
    assert abs(counts[4] - counts[2]) / counts[2] < 0.02, counts  # per call: start-up and warm-up not counted


def test_worker_phases_times_the_cases_interleaved_each_phase_under_its_case():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "worker_phases.py"), "--cases", "AS", "--n", "5"],
                          cwd=REPO, capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line[:58].strip(): line[58:].split() for line in proc.stdout.splitlines()[2:]}
    assert len(rows["process (all threads, mean)"]) == 2 and len(rows["handle"]) == 2, proc.stdout
    assert len(rows["view"]) == 1 and len(rows["call_service: decide"]) == 1, proc.stdout  # the hook's phases: S only


def test_compare_versions_serves_two_checkouts_side_by_side():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "compare_versions.py"), str(REPO), str(REPO),
                           "--rounds", "3"], cwd=REPO, capture_output=True, text=True, timeout=240,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "S: the same answer" in proc.stdout and "B: the same answer" in proc.stdout, proc.stdout
    assert len(re.findall(r"wall A [\d.]+ S [\d.]+ B [\d.]+", proc.stdout)) == 2, proc.stdout
