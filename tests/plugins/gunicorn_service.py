"""The real service under gunicorn (production config gunicorn.conf.py) for tests; plain helpers, not fixtures.

* ``free_port()``: a loopback port nothing listens on (once the probing socket is closed).
* ``wait_for(predicate, timeout, step)``: poll until the predicate returns something truthy; returns it (or
  the last, falsy, value).
* ``children(pid)``: the pids whose parent is ``pid`` (reads /proc: Linux only), i.e. a master's workers.
* ``GunicornService``: ``python -m gunicorn --config gunicorn.conf.py cds_hooks_service:create_app()`` on a
  free loopback port, with an environment cleaned of the caller's service settings (CDS_*, GUNICORN_*,
  DATABASE_URL, WEB_CONCURRENCY, PORT, HOST) and a SQLite store and instance directory in ``tmp``. ``start()``
  waits until /healthz answers 200 (and, with ``wait_for_workers``, until the master has all its workers);
  it may be called again after a stop, on the same port (the log is appended to, with a line per start).
  ``stop()``: SIGTERM to the master, SIGKILL if it does not exit in time. Usable as a context manager.
"""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[2]
CLEANED_PREFIXES = ("CDS_", "GUNICORN_")
CLEANED_NAMES = ("DATABASE_URL", "WEB_CONCURRENCY", "PORT", "HOST")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 5.0, step: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


def children(pid: int) -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.add(int(entry))
    return out


def cleaned_env(drop: tuple[str, ...] = ()) -> dict[str, str]:
    """This process's environment without the service's settings; ``drop``: more names (any case)."""
    drop = tuple(name.upper() for name in drop)
    return {k: v for k, v in os.environ.items()
            if not k.startswith(CLEANED_PREFIXES) and k not in CLEANED_NAMES and k.upper() not in drop}


class GunicornService:
    """gunicorn with gunicorn.conf.py on ``127.0.0.1:<free port>``; the master is ``proc``.

    ``env``: extra environment (after the defaults: DATABASE_URL and CDS_INSTANCE_DIR in ``tmp``,
    CDS_RULES_POLL_SECONDS=0, HOST/PORT, PYTHONUNBUFFERED=1); ``drop_env``: more variables not to pass on.
    ``workers``/``threads``: WEB_CONCURRENCY/GUNICORN_THREADS (None: gunicorn.conf.py decides).
    ``access_log_format``: write an access log to ``access_path`` in this format. ``args``: more gunicorn
    arguments. ``new_session``: the service in its own process group (``kill()`` then takes master and workers).
    """

    def __init__(self, tmp: Path, env: dict[str, str] | None = None, *, workers: int | None = None,
                 threads: int | None = None, args: tuple[str, ...] = (), access_log_format: str | None = None,
                 drop_env: tuple[str, ...] = (), new_session: bool = False, wait_for_workers: bool = False):
        self.tmp = Path(tmp)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.tmp / "gunicorn.log"
        self.access_path = self.tmp / "access.log"
        self.workers = workers
        self.new_session = new_session
        self.wait_for_workers = wait_for_workers
        self.env = cleaned_env(drop_env)
        self.env.update(DATABASE_URL=f"sqlite:///{self.tmp / 'store.sqlite3'}",
                        CDS_INSTANCE_DIR=str(self.tmp / "instance"), CDS_RULES_POLL_SECONDS="0",
                        HOST="127.0.0.1", PORT=str(self.port), PYTHONUNBUFFERED="1")
        if workers is not None:
            self.env["WEB_CONCURRENCY"] = str(workers)
        if threads is not None:
            self.env["GUNICORN_THREADS"] = str(threads)
        self.env.update(env or {})
        self.cmd = [sys.executable, "-m", "gunicorn", "--config", str(REPO / "gunicorn.conf.py"),
                    "--bind", f"127.0.0.1:{self.port}"]
        if access_log_format is not None:
            self.cmd += ["--access-logfile", str(self.access_path), "--access-logformat", access_log_format]
        self.cmd += [*args, "cds_hooks_service:create_app()"]
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 15.0) -> None:
        """Start gunicorn and wait until it answers; on failure it is stopped and AssertionError says why."""
        with open(self.log_path, "a") as log:
            log.write(f"\n===== start {self.starts + 1} =====\n")
            log.flush()
            self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=self.new_session)
        self.starts += 1

        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"gunicorn exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.base_url}/healthz", timeout=1).status_code != 200:
                    return False
            except requests.RequestException:
                return False
            return not self.wait_for_workers or len(self.worker_pids()) == self.workers

        try:
            assert wait_for(up, timeout=timeout, step=0.05), f"gunicorn did not start:\n{self.log_tail()}"
        except BaseException:
            self.stop()
            raise

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def worker_pids(self) -> set[int]:
        return children(self.proc.pid)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, chars: int = 6000) -> str:
        return self.log()[-chars:]

    def access_log(self) -> str:
        return self.access_path.read_text()

    def terminate(self, timeout: float) -> None:
        """SIGTERM to the master (a graceful shutdown); subprocess.TimeoutExpired if it has not exited in time."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL to the master, or with ``new_session`` to its whole process group (master and workers at once)."""
        if self.proc is None:
            return
        try:
            if self.new_session:
                os.killpg(self.proc.pid, signal.SIGKILL)
            elif self.proc.poll() is None:
                self.proc.kill()
        except ProcessLookupError:
            pass
        self.proc.wait(5)

    def group_gone(self) -> bool:
        """With ``new_session``: no process of the service's group is left."""
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return True
        return False

    def stop(self, timeout: float = 10.0) -> None:
        """terminate(timeout), then kill() if it did not exit; a no-op when it is not running."""
        if not self.running:
            return
        try:
            self.terminate(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self) -> GunicornService:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def procfile_command() -> tuple[dict[str, str], list[str]]:
    """The Procfile's web command: (environment assignments, argv with the program resolved in this venv)."""
    line = next(line for line in (REPO / "Procfile").read_text().splitlines() if line.startswith("web:"))
    tokens = shlex.split(line[len("web:"):])
    env = {}
    while tokens and "=" in tokens[0] and not tokens[0].startswith("-"):
        name, value = tokens.pop(0).split("=", 1)
        env[name] = value
    program = Path(sys.executable).parent / tokens[0]
    return env, [str(program), *tokens[1:]]
