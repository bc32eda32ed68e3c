"""Load smoke test: bench/load.py (wrk) against the real gunicorn service with the production config.

Short steps (connections 1, 4, 16 for 2 s each, small and large order-sign bodies, 1 s warm-up per
body): every request answers 2xx, every step serves requests, every worker stays under 150 MiB.
Skips without wrk (scripts/install-test-deps.sh installs it), fails without it when CI=true.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RSS_LIMIT_MIB = 150.0
CONNECTIONS = [1, 4, 16]
CASES = ["small", "large"]


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


@pytest.fixture(scope="module")
def load_result(tmp_path_factory):
    if shutil.which("wrk") is None:
        msg = "wrk is not installed (scripts/install-test-deps.sh installs it)"
        if _ci():
            pytest.fail(f"{msg}; CI must provide it.")
        pytest.skip(msg)
    out = tmp_path_factory.mktemp("load") / "load.json"
    env = {k: v for k, v in os.environ.items() if k not in ("WEB_CONCURRENCY", "GUNICORN_THREADS")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "load.py"), "--connections", ",".join(map(str, CONNECTIONS)),
         "--cases", ",".join(CASES), "--duration", "2", "--warmup", "1", "--quiet", "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    report = f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-3000:]}"
    assert out.exists(), report
    return proc.returncode, json.loads(out.read_text()), report


def test_no_errors_under_load(load_result):
    rc, res, report = load_result
    assert res["errors_total"] == 0, report
    assert res["problems"] == [], report
    assert rc == 0, report


def test_every_step_served_requests(load_result):
    _, res, report = load_result
    steps = {(s["case"], s["connections"]): s for s in res["steps"]}
    assert sorted(steps) == sorted((c, n) for c in CASES for n in CONNECTIONS), report
    for (case, conns), step in steps.items():
        assert step["requests"] > 0, f"{case} c={conns} served no request\n{report}"
        assert step["errors_total"] == 0, f"{case} c={conns}: {step['errors']}\n{report}"
    assert set(res["checks"]) == set(CASES), report  # each body got 200 with the opioid card first


def test_worker_memory_under_limit(load_result):
    _, res, report = load_result
    mem = res["memory"]
    for when in ("after_warmup", "after_load"):
        workers = mem[when]["workers"]
        assert len(workers) == res["service"]["workers"], report
        for w in workers:
            assert w["rss_mib"] < RSS_LIMIT_MIB, f"{when}: worker {w['pid']} RSS {w['rss_mib']} MiB\n{report}"
            assert w["hwm_mib"] < RSS_LIMIT_MIB, f"{when}: worker {w['pid']} peak {w['hwm_mib']} MiB\n{report}"
