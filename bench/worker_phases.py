#!/usr/bin/env python3
"""Where the CPU time of a hook call goes inside a real gunicorn worker, phase by phase.

``profile_hook.py`` measures in-process through Flask's test client; this one measures what the served
worker does (gunicorn's gevent worker, the production config, logging to a file, prometheus in multiprocess
mode): it starts ``gunicorn --config <a wrapper of gunicorn.conf.py>`` with 1 worker on a free loopback port
(throw-away SQLite store, ``CDS_FIXED_NOW``), times each phase of every request with ``time.thread_time``
(the CPU time of the worker's thread: other processes on a shared machine hardly inflate it), sends ``--n``
rounds of the cases, one call of each per round in turn, over one keep-alive connection after 50 warm-up
rounds (so every case is measured in the same seconds of a machine whose speed drifts), and prints the median
per phase and case, with the worker process's mean CPU time per call (all threads; read from /proc around
each call):

  process    the worker process's CPU time per call (all its threads: what hook_latency.py --cpu reads)
  handle     gunicorn's handling of the request (parse, the app, writing the response)
  app        the Flask app (WSGI call)
  before     each before_request function; after: each after_request function (the log line, CORS, ...)
  view       the hook view: read (the body off the socket), parse (request_body.decode), validate, decide, record, render
  decide     of which: draft facts, gather (the prefetch), the index and the rules' evaluation
  record     of which: the store (issue_cards: the card recorded, the override look-up)

Cases: A = GET /cds-services, S / B = order-sign with 20 / 200 resources (bench/common.py). Not a test: exit 0
(1 if the service fails).

  .venv/bin/python bench/worker_phases.py                 # A, S, B; 600 rounds
  .venv/bin/python bench/worker_phases.py --cases B --n 1000
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from common import FIXED_NOW, REPO_ROOT, SIGN_SERVICE, Service, cpu_ns, sign_body, worker_pids  # noqa: E402 (puts the repo on sys.path)

import requests  # noqa: E402

from cds_hooks_service.facts import parse_time  # noqa: E402

# The wrapper config: the shipped settings and hooks, plus timers around the phases once the app is loaded.
WRAPPER = textwrap.dedent('''
    import json, os, runpy, time
    globals().update({k: v for k, v in runpy.run_path(os.environ["CDS_BENCH_SHIPPED_CONF"]).items()
                      if not k.startswith("__")})
    _shipped_init, _shipped_exit = post_worker_init, worker_exit
    _times = {}  # (case, phase) -> thread CPU seconds per call
    _case = ["?"]  # the case of the request being handled: its method, path and body length

    def _timed(fn, name):
        def timed(*args, **kwargs):
            t0 = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                _times.setdefault(_case[0] + "\t" + name, []).append(time.thread_time() - t0)
        return timed

    def _tagged(handle_request):
        def tagged(listener_name, req, *args, **kwargs):
            length = next((v for k, v in req.headers if k == "CONTENT-LENGTH"), "0")
            _case[0] = f"{req.method} {req.path} {length}"
            return handle_request(listener_name, req, *args, **kwargs)
        return tagged

    def post_worker_init(worker):
        _shipped_init(worker)
        from werkzeug.wrappers import request as wz
        from cds_hooks_service import api, hook_call
        app = worker.wsgi
        worker.handle_request = _tagged(_timed(worker.handle_request, "handle"))
        app.wsgi_app = _timed(app.wsgi_app, "app")
        app.view_functions["cds.hook"] = _timed(app.view_functions["cds.hook"], "view")
        for kind, table in (("before", app.before_request_funcs), ("after", app.after_request_funcs)):
            for funcs in table.values():
                funcs[:] = [_timed(f, f"{kind}: {f.__module__}.{f.__name__}") for f in funcs]
        wz.Request.get_data = _timed(wz.Request.get_data, "view: read (get_data)")
        api.read_json = _timed(api.read_json, "view: read + parse")
        api.validate_request = _timed(api.validate_request, "view: validate")
        api.call_service = _timed(api.call_service, "view: call_service")
        for name in ("decide", "record", "render", "draft_facts", "_gather", "evaluate_rule", "_issue"):
            setattr(hook_call, name, _timed(getattr(hook_call, name), f"call_service: {name}"))

    def worker_exit(server, worker):
        with open(os.environ["CDS_BENCH_PHASES_OUT"], "w") as out:
            json.dump({k: v for k, v in _times.items()}, out)
        _shipped_exit(server, worker)
''')


class PhasedService(Service):
    """The service under gunicorn with the wrapper config (1 worker); the worker writes its timings on exit."""

    def __init__(self, out: Path):
        super().__init__(1)
        self.out = out

    def start(self, timeout: float = 30.0) -> None:
        conf = Path(self.tmp.name) / "phases.conf.py"
        conf.write_text(WRAPPER)
        env = {k: v for k, v in os.environ.items()
               if k not in ("CDS_JWT_ISSUERS", "GUNICORN_CMD_ARGS", "CDS_DEBUG_TRACE", "PORT", "HOST")}
        env.update(CDS_FIXED_NOW=FIXED_NOW, CDS_INSTANCE_DIR=self.tmp.name, PYTHONUNBUFFERED="1",
                   DATABASE_URL=f"sqlite:///{self.tmp.name}/bench.sqlite3", CDS_LISTEN_HOSTS="127.0.0.1",
                   HOST="127.0.0.1", PORT=str(self.port), CDS_BENCH_SHIPPED_CONF=str(REPO_ROOT / "gunicorn.conf.py"),
                   CDS_BENCH_PHASES_OUT=str(self.out))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "--config", str(conf), "--workers", "1",
                 "cds_hooks_service:create_app()"],
                cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        self._wait_healthy("the service", timeout)


def run_cases(cases: str, n: int, bodies: dict[str, bytes | None], tmp: Path) -> dict[str, dict[str, list[float]]]:
    """One service; ``n`` rounds of one call per case in turn (after 50 warm-up rounds). Per case, the phases'
    thread CPU times of its measured calls, and "process": the worker's CPU time per call (/proc, all threads)."""
    out = tmp / "phases.json"
    service = PhasedService(out)
    process = {case: 0 for case in cases}
    tags: dict[str, str] = {}
    try:
        service.start()
        session = requests.Session()
        pids = worker_pids(service.proc.pid)
        for i in range(50 + n):
            for case in cases:
                body = bodies[case]
                before = cpu_ns(pids)
                if body is None:
                    r = session.get(service.url + "/cds-services", timeout=10)
                else:
                    r = session.post(f"{service.url}/cds-services/{SIGN_SERVICE}", data=body, timeout=10,
                                     headers={"Content-Type": "application/json"})
                if i >= 50:
                    process[case] += cpu_ns(pids) - before
                if r.status_code != 200:
                    raise SystemExit(f"{case}: HTTP {r.status_code}: {r.text[:300]}")
                tags[case] = ("GET /cds-services 0" if body is None
                              else f"POST /cds-services/{SIGN_SERVICE} {len(body)}")
    finally:
        service.stop()  # SIGTERM: the worker writes its timings as it exits
    times = json.loads(out.read_text())
    results: dict[str, dict[str, list[float]]] = {}
    for case in cases:
        phases = {key.split("\t", 1)[1]: values[50:] for key, values in times.items()  # without the warm-up
                  if key.split("\t", 1)[0] == tags[case]}
        phases["process (all threads, mean)"] = [process[case] / 1e9 / n]
        results[case] = phases
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=600, help="measured rounds (default 600; max 5000)")
    ap.add_argument("--cases", default="ASB", help="any of A, S, B (default ASB)")
    args = ap.parse_args()
    if not 1 <= args.n <= 5000:
        ap.error("--n must be 1..5000")
    now = parse_time(FIXED_NOW)
    bodies = {"A": None, "S": json.dumps(sign_body(20, 1, now)).encode(),
              "B": json.dumps(sign_body(200, 2, now)).encode()}
    with tempfile.TemporaryDirectory(prefix="cds-phases-") as tmp:
        results = run_cases(args.cases, args.n, bodies, Path(tmp))
    order = ("process", "handle", "app", "before:", "view", "view:", "call_service:", "after:")
    names = sorted(dict.fromkeys(k for r in results.values() for k in r),
                   key=lambda k: next(i for i, p in reversed(list(enumerate(order))) if k.startswith(p)))
    print(f"median CPU ms of the worker's thread per call, {args.n} rounds of the cases in turn "
          f"(gunicorn gevent worker, 1 process, production config)")
    print(f"{'phase':58}" + "".join(f"{c:>9}" for c in results))
    for name in names:
        cells = []
        for case in results:
            values = sorted(results[case].get(name, []))
            cells.append(f"{values[len(values) // 2] * 1000:9.3f}" if values else f"{'':9}")
        print(f"{name[:58]:58}" + "".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
