"""Real FHIR R4 servers on loopback for integration tests: sekmet-fhir 0.1.1 (FastAPI + SQLite).

Fixtures (session-scoped, started lazily on first use, stopped at session end):
  fhir_server       bearer-token auth (like an EHR that sends fhirAuthorization); `.token` is the valid token
  open_fhir_server  no auth at all (like the CDS Hooks Sandbox's open servers); `.token` is None

Isolation: sekmet has no HTTP reset, and the server is shared by the whole session, so tests must not
assume an empty server. Use `fhir_server.unique_id("pat")` for patient (and other) ids, and search by
patient, never "all Observations".

sekmet runs from its own venv, <repo>/.venv-sekmet (its dependencies clash with ours); create it with
scripts/install-test-deps.sh. Missing venv: skip locally, fail when CI=true.

sekmet behaviour worth knowing: FHIR R4 only; searches page at 20 by default (`_count` honoured up to 1000)
with absolute `next` links built from `base_url`; unknown search parameters are ignored and reported as an
OperationOutcome entry with search.mode=outcome (add Prefer: handling=strict for a 400 instead); inbound
resources are structurally validated (strict) so test data must be valid R4; 404 for an unknown id, 410 for
a deleted one; 401 with an OperationOutcome for a missing/wrong token; /metadata never needs auth.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
SEKMET = REPO / ".venv-sekmet" / "bin" / "sekmet"
START_TIMEOUT = float(os.environ.get("FHIR_SERVER_START_TIMEOUT", "30"))


class FhirTestServer:
    def __init__(self, base_url: str, token: str | None):
        self.base_url = base_url
        self.token = token

    @property
    def headers(self) -> dict[str, str]:
        h = {"Accept": "application/fhir+json", "Content-Type": "application/fhir+json"}
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        return h

    @staticmethod
    def unique_id(prefix: str = "t") -> str:
        """A fresh FHIR id (valid: [A-Za-z0-9-.]{1,64}) so tests never see each other's data."""
        return f"{prefix}-{uuid.uuid4().hex[:16]}"

    def load(self, bundle_or_resources: dict | list[dict]) -> dict:
        """POST a transaction/batch Bundle, or a list of resources (each with an id: PUT Type/id, so the
        ids are deterministic). Returns the response Bundle; raises AssertionError on any failure."""
        body = bundle_or_resources
        if isinstance(body, dict) and body.get("resourceType") != "Bundle":
            body = [body]
        if isinstance(body, list):
            for r in body:
                assert r.get("resourceType") and r.get("id"), f"load() needs resourceType and id: {r!r:.200}"
            body = {"resourceType": "Bundle", "type": "transaction", "entry": [
                {"fullUrl": f"{self.base_url}/{r['resourceType']}/{r['id']}", "resource": r,
                 "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in body]}
        resp = requests.post(self.base_url, data=json.dumps(body), headers=self.headers, timeout=60)
        assert resp.status_code == 200, f"sekmet rejected the Bundle: HTTP {resp.status_code}: {resp.text[:2000]}"
        out = resp.json()
        bad = [e["response"] for e in out.get("entry", []) if not e["response"]["status"].startswith("2")]
        assert not bad, f"sekmet rejected entries: {bad!r:.2000}"
        return out

    def __repr__(self) -> str:
        return f"FhirTestServer({self.base_url!r}, auth={'bearer' if self.token else 'none'})"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no output)"


def _start(tmp_path_factory, name: str, token: str | None):
    if not SEKMET.exists():
        msg = f"{SEKMET} is missing: run scripts/install-test-deps.sh to install the FHIR test server (sekmet-fhir)"
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    work = tmp_path_factory.mktemp(name)
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}/fhir"
    auth = {"types": ["bearer"], "tokens": [token]} if token else {"types": ["none"]}
    settings = {"host": "127.0.0.1", "port": port, "base_url": base_url, "data_dir": str(work / "data"),
                "simulator": {"enabled": False}, "log_inbound": False, "server_auth": auth}
    cfg = work / "settings.yaml"
    cfg.write_text(json.dumps(settings, indent=2))  # JSON is YAML
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEKMET_")}  # no env overrides of settings
    out, err = work / "stdout.log", work / "stderr.log"
    with out.open("wb") as fo, err.open("wb") as fe:
        proc = subprocess.Popen([str(SEKMET), "serve", "--config", str(cfg)], cwd=work, env=env,
                                stdin=subprocess.DEVNULL, stdout=fo, stderr=fe)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            pytest.fail(f"sekmet exited with code {proc.returncode} during startup; stderr:\n{_tail(err)}",
                        pytrace=False)
        try:
            if requests.get(f"{base_url}/metadata", timeout=0.5).status_code == 200:
                break
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            _stop(proc)
            pytest.fail(f"sekmet not ready after {START_TIMEOUT:g}s; stderr:\n{_tail(err)}", pytrace=False)
        time.sleep(0.1)
    return proc, FhirTestServer(base_url, token)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def fhir_server(tmp_path_factory):
    proc, server = _start(tmp_path_factory, "sekmet-bearer", token=f"test-{uuid.uuid4().hex}")
    try:
        yield server
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def open_fhir_server(tmp_path_factory):
    proc, server = _start(tmp_path_factory, "sekmet-open", token=None)
    try:
        yield server
    finally:
        _stop(proc)
