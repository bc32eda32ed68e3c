#!/usr/bin/env python3
"""Where the time of one hook call goes, in-process (no HTTP): validation, evaluation, rendering.

Builds the bench bodies (``bench/common.py``: S = 20, B = 200, X = 2,000 resources, and a
triptan-heavy DHE body), times ``orjson.loads`` + request validation + ``call_service`` (store
None, so no database) over ``--n`` calls each after warm-up, and prints p50 per part and the ratio
to a ``json.loads`` of the same body. ``--profile B`` adds a cProfile of that case (top functions by
own time). It is a measurement, not a test: exit 0.

  .venv/bin/python bench/profile_hook.py                  # S, B, X, DHE: medians
  .venv/bin/python bench/profile_hook.py --profile B      # + cProfile of the 200-resource call
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time

from common import FIXED_NOW, REPO_ROOT, dhe_body, sign_body  # noqa: E402  (common puts the repo on sys.path)

import orjson  # noqa: E402

from cds_hooks_service.config import Settings  # noqa: E402
from cds_hooks_service.facts import parse_time  # noqa: E402
from cds_hooks_service.hook_call import call_service, validate_request  # noqa: E402
from cds_hooks_service.rulebook import load_rulebook  # noqa: E402
from cds_hooks_service.runtime import load_validators  # noqa: E402
from cds_hooks_service.services import SERVICE_FOR_HOOK  # noqa: E402


def median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="calls per case (default 200; X uses n/5)")
    ap.add_argument("--profile", choices=["S", "B", "X", "DHE"], help="cProfile this case")
    args = ap.parse_args()
    now = parse_time(FIXED_NOW)
    rulebook = load_rulebook(REPO_ROOT / "rules", REPO_ROOT / "cards")
    validators = load_validators()
    settings = Settings(suppression_secret=b"bench", fixed_now=now)
    service = SERVICE_FOR_HOOK["order-sign"]
    cases = {"S": sign_body(20, 1, now), "B": sign_body(200, 2, now), "X": sign_body(2000, 3, now),
             "DHE": dhe_body(200, 4, now)}
    print(f"{'case':5} {'KB':>6} {'loads':>8} {'validate':>9} {'call':>8} {'total':>8} {'R=total/loads':>14} cards")
    for name, body in cases.items():
        raw = json.dumps(body).encode()
        n = max(20, args.n // 5) if name == "X" else args.n

        def call():
            b = orjson.loads(raw)
            validate_request(b, service, validators)
            return call_service(service, b, rulebook=rulebook, store=None, settings=settings)

        cards = len(call().response["cards"])
        for _ in range(10):
            call()
        loads = median_ms(lambda: json.loads(raw), n)
        parsed = orjson.loads(raw)
        validate = median_ms(lambda: validate_request(parsed, service, validators), n)
        evaluate = median_ms(lambda: call_service(service, parsed, rulebook=rulebook, store=None, settings=settings), n)
        total = median_ms(call, n)
        print(f"{name:5} {len(raw) / 1024:6.0f} {loads:8.3f} {validate:9.3f} {evaluate:8.3f} {total:8.3f} "
              f"{total / loads:14.2f} {cards}")
        if args.profile == name:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(n):
                call()
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(18)
            profiled = out.getvalue()
    if args.profile:
        print(f"\ncProfile of {args.profile} (tottime):")
        print("\n".join(line for line in profiled.splitlines() if line.strip())[:6000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
