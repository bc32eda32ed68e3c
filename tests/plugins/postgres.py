"""pytest plugin: a throwaway PostgreSQL cluster for the test session.

Fixtures
--------
``postgres_url`` (session)
    ``postgresql://postgres@127.0.0.1:<port>/<db>`` of a database in a private
    cluster (temp dir, loopback only, trust auth, unix socket in the temp dir).
``fresh_postgres_url`` (function)
    Same server, but a newly CREATEd database per test (dropped afterwards).

PostgreSQL refuses to run as root, so when euid is 0 the server binaries run
as the ``postgres`` OS user via ``runuser``.  Missing binaries: the tests are
skipped locally (run ``scripts/install-test-deps.sh``) and fail when CI=true.
"""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid

import pytest

_RUN_AS = "postgres"


def _find_bin_dir() -> str | None:
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return os.path.dirname(os.path.realpath(initdb))
    def version(d: str) -> tuple:
        v = d.split("/")[-2]
        return tuple(int(x) for x in v.split(".") if x.isdigit())
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if os.access(os.path.join(d, "initdb"), os.X_OK) and os.access(os.path.join(d, "pg_ctl"), os.X_OK):
            return d
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


class _Cluster:
    def __init__(self, bin_dir: str):
        self.bin_dir = bin_dir
        self.as_root = os.geteuid() == 0
        self.tmp = tempfile.mkdtemp(prefix="pytest-pg-")
        if self.as_root:
            shutil.chown(self.tmp, user=_RUN_AS, group=_RUN_AS)
        self.data = os.path.join(self.tmp, "data")
        self.log = os.path.join(self.tmp, "server.log")
        self.port = 0

    def _run(self, tool: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        cmd = [os.path.join(self.bin_dir, tool), *args]
        if self.as_root:
            cmd = ["runuser", "-u", _RUN_AS, "--", *cmd]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = env["LANG"] = "C.UTF-8"
        return subprocess.run(cmd, cwd=self.tmp, env=env, capture_output=True, text=True,
                              timeout=timeout)

    def _fail(self, what: str, proc: subprocess.CompletedProcess) -> None:
        log = ""
        if os.path.exists(self.log):
            with open(self.log, errors="replace") as f:
                log = f.read()[-4000:]
        pytest.fail(f"PostgreSQL test cluster: {what} failed (rc={proc.returncode})\n"
                    f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}\nserver log:\n{log}",
                    pytrace=False)

    def start(self) -> None:
        p = self._run("initdb", "-D", self.data, "-U", "postgres", "-A", "trust",
                      "-E", "UTF8", "--no-sync")
        if p.returncode:
            self._fail("initdb", p)
        for _attempt in range(3):  # the free port can be taken in between: retry
            self.port = _free_port()
            opts = (f"-h 127.0.0.1 -p {self.port} -k {self.tmp} -F "
                    "-c synchronous_commit=off -c full_page_writes=off "
                    "-c max_connections=300")
            p = self._run("pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "30",
                          "-o", opts, "start")
            if p.returncode == 0:
                return
        self._fail("pg_ctl start", p)

    def stop(self) -> None:
        try:
            if os.path.exists(os.path.join(self.data, "postmaster.pid")):
                self._run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def admin_url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def execute(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.admin_url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql)

    def create_database(self, prefix: str) -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        self.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def _postgres_cluster():
    bin_dir = _find_bin_dir()
    if bin_dir is None:
        msg = ("PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in "
               "/usr/lib/postgresql/*/bin")
        if _ci():
            pytest.fail(f"{msg}; CI must provide them (scripts/install-test-deps.sh).",
                        pytrace=False)
        pytest.skip(f"{msg}; run scripts/install-test-deps.sh to install them.")
    if os.geteuid() == 0 and not shutil.which("runuser"):
        pytest.fail("running as root but `runuser` is missing: cannot start PostgreSQL "
                    f"as the {_RUN_AS!r} user", pytrace=False)
    cluster = _Cluster(bin_dir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def postgres_url(_postgres_cluster) -> str:
    """Session-wide database on the test cluster."""
    return _postgres_cluster.admin_url(_postgres_cluster.create_database("session"))


@pytest.fixture
def fresh_postgres_url(_postgres_cluster):
    """A brand-new, empty database for this test only."""
    name = _postgres_cluster.create_database("test")
    yield _postgres_cluster.admin_url(name)
    _postgres_cluster.drop_database(name)
