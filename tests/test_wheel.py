"""The built wheel, installed the way the Dockerfile installs it (scripts/install-service.sh: a fresh venv, the
locked runtime dependencies), works outside the checkout: the shipped rules and cards are package data,
`validate`, `test`, `init` and `serve` run from another folder, the instance folder is the user's data
directory."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import requests

from tests.helpers import REPO
from tests.plugins.gunicorn_service import cleaned_env, free_port, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel, venv bin dir, a working folder outside the checkout, environment)."""
    tmp = tmp_path_factory.mktemp("wheel")
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(["bash", str(REPO / "scripts/build-wheel.sh"), str(tmp / "dist")], env=env, check=True,
                   capture_output=True, timeout=300)
    wheel, = (tmp / "dist").glob("cds_hooks_service-*.whl")
    subprocess.run(["bash", str(REPO / "scripts/install-service.sh"), str(tmp / "venv"), str(wheel)], env=env,
                   check=True, capture_output=True, timeout=600)
    work = tmp / "elsewhere"
    work.mkdir()
    run_env = cleaned_env(drop=("PYTHONPATH", "VIRTUAL_ENV"))
    run_env.update(XDG_DATA_HOME=str(tmp / "xdg"), PATH=f"{tmp / 'venv/bin'}:{run_env.get('PATH', '')}")
    return wheel, tmp / "venv" / "bin", work, run_env


def run(installed, *args, extra_env=None, timeout=120):
    _, bin_dir, work, env = installed
    return subprocess.run([str(bin_dir / "cds-hooks-service"), *args], cwd=work, env={**env, **(extra_env or {})},
                          capture_output=True, text=True, timeout=timeout)


def test_the_wheel_holds_every_module_and_every_shipped_rule_and_card(installed):
    names = set(zipfile.ZipFile(installed[0]).namelist())
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "cds_hooks_service").rglob("*.py")}
    assert modules - names == set()
    for folder in ("rules", "cards"):
        shipped = {f"cds_hooks_service/{p.relative_to(REPO).as_posix()}" for p in (REPO / folder).rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts}
        assert shipped - names == set(), folder
    assert "cds_hooks_service/server_config/gunicorn.conf.py" in names
    examples = {f"cds_hooks_service/{p.relative_to(REPO).as_posix()}" for p in (REPO / "fhir_examples").glob("*/*.json")}
    assert examples and examples - names == set()
    assert not any(n.startswith(("rules/", "cards/", "tests/", "fhir_examples/")) for n in names)  # nothing outside the package


def test_the_installed_package_is_used_not_the_checkout(installed):
    _, bin_dir, work, env = installed
    out = subprocess.run([str(bin_dir / "python"), "-c", "import cds_hooks_service as m; print(m.__file__)"],
                         cwd=work, env=env, capture_output=True, text=True, check=True).stdout
    assert Path(out.strip()).is_relative_to(bin_dir.parent) and not Path(out.strip()).is_relative_to(REPO)


def test_validate_and_test_use_the_shipped_rules(installed):
    r = run(installed, "validate")
    assert r.returncode == 0, r.stderr
    assert "6 rules valid" in r.stdout
    assert not [line for line in r.stderr.splitlines() if line.startswith("error")], r.stderr
    r = run(installed, "test")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    assert r.stdout.rstrip().endswith(" 0 failed")


def test_the_shipped_examples_are_listed(installed):
    r = run(installed, "examples", "list", "--rule", "opioid-in-migraine")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].split()[0] == "opioid-in-migraine"
    assert "opioid-iv-hydromorphone-active-migraine-diagnosis" in r.stdout


def test_init_copies_the_rules_out_for_a_site_to_edit(installed):
    _, _, work, _ = installed
    r = run(installed, "init", "site")
    assert r.returncode == 0, r.stderr
    assert (work / "site/rules/rule.schema.json").is_file() and (work / "site/cards/opioid-in-migraine.yaml").is_file()
    assert not list((work / "site").rglob("__init__.py"))
    rule = work / "site/rules/opioid-in-migraine.yaml"
    rule.write_text(rule.read_text().replace("\nmode: active\n", "\nmode: shadow\n", 1))
    r = run(installed, "validate", extra_env={"CDS_RULES_DIR": str(work / "site/rules")})
    assert r.returncode == 0, r.stderr
    assert [line for line in r.stdout.splitlines() if "opioid-in-migraine" in line and "shadow" in line]
    r = run(installed, "init", "site")  # never overwrites
    assert r.returncode == 1 and "already exists" in r.stderr


def test_serve_answers_discovery_and_hooks_from_the_installed_package(installed, tmp_path):
    _, bin_dir, work, env = installed
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(bin_dir / "cds-hooks-service"), "serve", "--host", "127.0.0.1", "--port", str(port),
                                 "--workers", "1"], cwd=work, env={**env, "CDS_FIXED_NOW": "2026-03-01T12:00:00Z"},
                                stdout=fh, stderr=subprocess.STDOUT)
    try:
        def discovery():
            assert proc.poll() is None, log.read_text()
            try:
                return requests.get(f"http://127.0.0.1:{port}/cds-services", timeout=2)
            except requests.RequestException:
                return None
        r = wait_for(discovery, timeout=60, step=0.2)
        assert r is not None and r.status_code == 200, log.read_text()
        assert {s["id"] for s in r.json()["services"]} == {"migraine-med-safety-select", "migraine-med-safety-sign"}
        example = REPO / "fhir_examples/opioid-in-migraine/iv-hydromorphone-active-migraine-diagnosis.order-sign.json"
        r = requests.post(f"http://127.0.0.1:{port}/cds-services/migraine-med-safety-sign",
                          json=json.loads(example.read_text()), timeout=10)
        assert r.status_code == 200, r.text
        assert [c["source"]["topic"]["code"] for c in r.json()["cards"]] == ["opioid-in-migraine"]
        # the instance folder defaults to the user's data directory (XDG_DATA_HOME here)
        assert (Path(env["XDG_DATA_HOME"]) / "cds-hooks-service" / "cds-hooks.sqlite3").is_file()
    finally:
        proc.terminate()
        proc.wait(30)
