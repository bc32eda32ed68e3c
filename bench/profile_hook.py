#!/usr/bin/env python3
"""Where the CPU time of one hook call goes, in-process: parsing, validation, the rules, the store, Flask.

Builds the bench bodies (``bench/common.py``: S = 20, B = 200, X = 2,000 resources as the discovery
templates ask, and DHE = a DHE order against 200 resources with 20 triptan doses) and measures, as the
median CPU time of this thread (``time.thread_time``: what a loaded machine's other processes do not
inflate) over ``--n`` calls each after warm-up:

  C         json.loads of the body (the issue's reference)
  parse     request_body.decode (what the service uses: the record's usual shapes typed, the rest by orjson)
  validate  the request's JSON Schema check and limits
  rules     call_service without a store: decide (index + evaluate) and render
  store     call_service with a SQLite store minus without: recording the issued cards
  app       the whole POST through Flask's test client (WSGI, no socket), and A = GET /cds-services alike

and R = (app - A) / C, the in-process counterpart of bench/hook_latency.py's R_B / R_X.
``--profile B`` adds a cProfile of that case through the app (top functions by own time; ``--sort cumulative``
and ``--top 60`` for the call tree's heavy branches).
It is a measurement, not a test: exit 0.

  .venv/bin/python bench/profile_hook.py                  # S, B, X, DHE
  .venv/bin/python bench/profile_hook.py --profile B      # + cProfile of the 200-resource call
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import FIXED_NOW, REPO_ROOT, dhe_body, sign_body, template_sign_body  # noqa: E402 (puts the repo on sys.path)

import orjson  # noqa: E402

try:  # the body decoded with the record's usual shapes typed (issue 11); older trees parse it with orjson
    from cds_hooks_service.request_body import decode  # noqa: E402
except ImportError:  # pragma: no cover
    decode = orjson.loads

from cds_hooks_service import create_app  # noqa: E402
from cds_hooks_service.config import Settings  # noqa: E402
from cds_hooks_service.facts import parse_time  # noqa: E402
from cds_hooks_service.hook_call import call_service  # noqa: E402
from cds_hooks_service.rulebook import load_rulebook  # noqa: E402
from cds_hooks_service.services import SERVICE_FOR_HOOK  # noqa: E402

try:  # the request validation moved to its own module (issue 11); older trees have it in hook_call
    from cds_hooks_service.request_validation import load_validators, validate_request  # noqa: E402
except ImportError:  # pragma: no cover
    from cds_hooks_service.hook_call import validate_request  # noqa: E402
    from cds_hooks_service.runtime import load_validators  # noqa: E402


def cpu_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return statistics.median(times) * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="calls per case (default 200; X uses n/4)")
    ap.add_argument("--profile", choices=["S", "B", "X", "DHE"], help="cProfile this case")
    ap.add_argument("--sort", default="tottime", choices=["tottime", "cumulative", "ncalls"],
                    help="order of the cProfile listing (default: own time)")
    ap.add_argument("--top", type=int, default=22, help="functions listed (default 22)")
    ap.add_argument("--gc-threshold", type=int, nargs=3, metavar=("G0", "G1", "G2"),
                    help="gc.set_threshold after the app is loaded (default: Python's, 700 10 10)")
    args = ap.parse_args()
    now = parse_time(FIXED_NOW)
    rulebook = load_rulebook(REPO_ROOT / "rules", REPO_ROOT / "cards")
    validators = load_validators()
    tmp = Path(tempfile.mkdtemp(prefix="cds-profile-"))
    settings = Settings(suppression_secret=b"bench", fixed_now=now, database_url=f"sqlite:///{tmp}/store.sqlite3",
                        instance_dir=tmp, listen_hosts=("127.0.0.1",))
    app = create_app(settings, rulebook=rulebook)
    store = app.extensions["cds"].store
    gc.collect()
    gc.freeze()  # as gunicorn.conf.py's post_worker_init does in every worker
    if args.gc_threshold:
        gc.set_threshold(*args.gc_threshold)
    print(f"gc: thresholds {gc.get_threshold()}, {gc.get_freeze_count()} objects frozen after start-up")
    client = app.test_client()
    service = SERVICE_FOR_HOOK["order-sign"]
    path = f"/cds-services/{service.id}"
    cases = {"S": sign_body(20, 1, now), "B": sign_body(200, 2, now), "X": template_sign_body(2000, 3, now),
             "DHE": dhe_body(200, 4, now)}
    for _ in range(50):
        client.get("/cds-services")
    a = cpu_ms(lambda: client.get("/cds-services"), args.n)
    print(f"A (GET /cds-services through the app): {a:.3f} ms CPU")
    print(f"{'case':5} {'KB':>6} {'C':>8} {'parse':>8} {'validate':>9} {'rules':>8} {'store':>8} {'app':>8} "
          f"{'R=(app-A)/C':>12} cards")
    profiled = ""
    for name, body in cases.items():
        raw = json.dumps(body).encode()
        n = max(20, args.n // 4) if name == "X" else args.n

        def post():
            r = client.post(path, data=raw, content_type="application/json")
            assert r.status_code == 200, r.get_data(as_text=True)[:300]
            return r

        cards = len(post().get_json()["cards"])
        for _ in range(10):
            post()
        parsed = decode(raw)
        c = cpu_ms(lambda: json.loads(raw), n)
        parse = cpu_ms(lambda: decode(raw), n)
        validate = cpu_ms(lambda: validate_request(parsed, service, validators), n)
        rules = cpu_ms(lambda: call_service(service, parsed, rulebook=rulebook, store=None, settings=settings), n)
        with_store = cpu_ms(lambda: call_service(service, parsed, rulebook=rulebook, store=store, settings=settings), n)
        whole = cpu_ms(post, n)
        print(f"{name:5} {len(raw) / 1024:6.0f} {c:8.3f} {parse:8.3f} {validate:9.3f} {rules:8.3f} "
              f"{with_store - rules:8.3f} {whole:8.3f} {(whole - a) / c:12.2f} {cards}")
        if args.profile == name:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(n):
                post()
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats(args.sort).print_stats(args.top)
            profiled = out.getvalue()
    if profiled:
        print(f"\ncProfile of {args.profile} through the app ({args.sort}; wall clock, so a loaded machine inflates it):")
        print("\n".join(line for line in profiled.splitlines() if line.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
