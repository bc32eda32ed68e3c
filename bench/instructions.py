#!/usr/bin/env python3
"""Instructions per hook call, counted by valgrind: the bench's ratios without the machine's noise.

The speed of the bench machines changes by up to 2x from one second to the next, so two wall-clock or CPU-time
runs of ``hook_latency.py`` on the same code give R_B from 2.7 to 3.4. Instruction counts do not move: valgrind's
callgrind counts the instructions a process executes, whatever else the machine does. For each case this runs
the case's calls in-process (the app through Flask's test client with a SQLite store, as ``profile_hook.py``;
no gunicorn, no socket) under callgrind, and counts only the measured calls, after the warm-up: the counters are
zeroed when the child calls ``os.getppid()`` right before them and dumped when it calls ``os.getsid(0)`` right
after (callgrind's ``--zero-before`` / ``--dump-before``; nothing else in the process calls either). While
measuring, the start-up heap is frozen and the collector off (a young collection would fall in one run and not
another), the rule files are not polled (a timer fires more often under valgrind's slowness), and address
randomisation is off: runs with 20 and 40 calls agreed within 0.3 % per call for A and 0.05 % for B.

  A, S, B, X   GET /cds-services; order-sign with about 20, 200 and 2,000 prefetched resources (bench/common.py)
  CS, CB, CX   json.loads of the S, B and X bodies (the issue's reference C)

and prints R_B = (B - A) / CB, R_X = (X - A) / CX and S / A in instructions. An instruction count is work, not
time: code that misses the caches or mispredicts runs fewer instructions per second than json.loads' tight loop,
so these ratios are lower than the wall-clock ones; the gap is how much slower per instruction the service's
code runs. It is a measurement for comparing two versions of the code exactly (a 1 % change shows), not a
target. Needs valgrind (Debian: valgrind); a few minutes for the default cases.

  .venv/bin/python bench/instructions.py                    # A S B CS CB
  .venv/bin/python bench/instructions.py --cases A B CB --n 10
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import FIXED_NOW, REPO_ROOT, sign_body, template_sign_body  # noqa: E402 (puts the repo on sys.path)

BODIES = {"S": lambda now: sign_body(20, 1, now), "B": lambda now: sign_body(200, 2, now),
          "X": lambda now: template_sign_body(2000, 3, now)}
WARMUP = 20
SUMMARY = re.compile(r"^summary: (\d+)$", re.M)


def measured(call, n: int) -> None:
    """The warm-up, then ``n`` calls between the two marker calls that zero and dump callgrind's counters."""
    import gc

    for _ in range(WARMUP):
        call()
    gc.collect()
    gc.freeze()  # as the workers do after start-up (serving.py)
    gc.disable()  # a collection falls in one run and not in another (at the workers' threshold a hook call sets
    os.getppid()  # off none: bench/README.md; json.loads of B counts about 4 % more with it on); zero the counters
    for _ in range(n):
        call()
    os.getsid(0)  # dump them


def child(case: str, n: int) -> None:
    """Run ``n`` calls of ``case`` after the warm-up (under valgrind, started by :func:`count`)."""
    from cds_hooks_service.facts import parse_time

    now = parse_time(FIXED_NOW)
    if case.startswith("C"):
        raw = json.dumps(BODIES[case[1:]](now)).encode()
        measured(lambda: json.loads(raw), n)
        return

    from cds_hooks_service import create_app
    from cds_hooks_service.config import Settings
    from cds_hooks_service.rulebook import load_rulebook
    from cds_hooks_service.services import SERVICE_FOR_HOOK

    tmp = Path(tempfile.mkdtemp(prefix="cds-instructions-"))
    try:
        settings = Settings(suppression_secret=b"bench", fixed_now=now, database_url=f"sqlite:///{tmp}/store.sqlite3",
                            instance_dir=tmp, listen_hosts=("127.0.0.1",), rules_poll_seconds=0)
        app = create_app(settings, rulebook=load_rulebook(REPO_ROOT / "rules", REPO_ROOT / "cards"))
        client = app.test_client()
        if case == "A":
            def call():
                return client.get("/cds-services")
        else:
            raw = json.dumps(BODIES[case](now)).encode()
            path = f"/cds-services/{SERVICE_FOR_HOOK['order-sign'].id}"

            def call():
                return client.post(path, data=raw, content_type="application/json")
        assert call().status_code == 200
        measured(call, n)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def count(case: str, n: int) -> int:
    """Instructions of ``n`` measured calls of ``case`` (one child process under callgrind)."""
    env = dict(os.environ, PYTHONHASHSEED="0")  # the same string hashes, so the same work, in every run
    no_aslr = ["setarch", platform.machine(), "-R"] if shutil.which("setarch") else []  # same addresses each run
    with tempfile.TemporaryDirectory(prefix="cds-callgrind-") as out:
        proc = subprocess.run([*no_aslr, "valgrind", "--tool=callgrind", "--zero-before=getppid", "--dump-before=getsid",
                               f"--callgrind-out-file={out}/callgrind.out", sys.executable, __file__, "--child", case,
                               str(n)], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        dump = Path(out, "callgrind.out.1")  # the first dump: from the zeroing to getsid
        found = SUMMARY.findall(dump.read_text()) if dump.exists() else []
        if Path(out, "callgrind.out.2").exists():  # something else called getsid: the count would be wrong
            raise SystemExit(f"{case}: more than one callgrind dump; a marker call is made elsewhere too")
    if proc.returncode != 0 or not found:
        raise SystemExit(f"valgrind run of {case} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return int(found[0])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=["A", "S", "B", "CS", "CB"],
                   choices=["A", "S", "B", "X", "CS", "CB", "CX"])
    p.add_argument("--n", type=int, default=20, help="measured calls per run (default 20; X and CX use n/4)")
    p.add_argument("--child", nargs=2, metavar=("CASE", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]))
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    started = time.time()
    per_call: dict[str, float] = {}
    for case in args.cases:
        n = max(2, args.n // 4) if case.endswith("X") else args.n
        per_call[case] = count(case, n) / n
        print(f"{case:3} {per_call[case] / 1e6:9.3f} M instructions per call", flush=True)
    print(f"({time.time() - started:.0f} s; in-process through Flask's test client, SQLite store, gc frozen and off)")
    a = per_call.get("A")
    for name, big, ref in (("R_B", "B", "CB"), ("R_X", "X", "CX")):
        if a is not None and big in per_call and ref in per_call:
            print(f"{name} in instructions = ({big} - A) / {ref} = {(per_call[big] - a) / per_call[ref]:.2f}")
    if a is not None and "S" in per_call:
        print(f"S / A in instructions = {per_call['S'] / a:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
