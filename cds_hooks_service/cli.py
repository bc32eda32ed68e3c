"""Command line: `python -m cds_hooks_service <command>` (also installed as `cds-hooks-service`).

  serve     run the service under gunicorn (the production server)
  validate  check rule files, value-set references, card templates and site overrides
  test      run every rule's scenarios and print a pass/fail table
  explain   why each rule fired or not for one hook request (a JSON file)
  replay    how many cards each rule would fire over a folder of recorded hook requests
  stats     cards issued, accepted and overridden per rule, with top override reasons
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from .config import REPO_ROOT, Settings


def _rules_args(p: argparse.ArgumentParser, *, positional: bool = True) -> None:
    help_dir = "rules directory (default: CDS_RULES_DIR or ./rules)"
    if positional:
        p.add_argument("dir", nargs="?", type=Path, help=help_dir)
    else:
        p.add_argument("--rules", dest="dir", type=Path, help=help_dir)
    p.add_argument("--cards", type=Path, help="card templates directory (default: <dir>/../cards)")
    p.add_argument("--local", type=Path, help="site overrides directory (default: CDS_RULES_LOCAL_DIR)")


def _load(args):
    """(rulebook, settings), or None after printing every problem of rules that do not validate."""
    from .rulebook import RulebookError, load_rulebook

    settings = Settings.from_env()
    rules_dir = args.dir or settings.rules_dir
    cards_dir = args.cards or (rules_dir.parent / "cards" if args.dir else settings.cards_dir)
    local = args.local or settings.rules_local_dir
    try:
        return load_rulebook(rules_dir, cards_dir, local), settings
    except RulebookError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        print(f"{len(exc.problems)} problem(s); the rules were NOT accepted.", file=sys.stderr)
        return None


def cmd_serve(args) -> int:
    from gunicorn.app.wsgiapp import WSGIApplication

    os.environ.setdefault("PORT", str(args.port))
    os.environ.setdefault("HOST", args.host)
    sys.argv = ["gunicorn", "--config", str(REPO_ROOT / "gunicorn.conf.py"),
                "--bind", f"{args.host}:{args.port}", "cds_hooks_service:create_app()"]
    if args.workers:
        sys.argv[3:3] = ["--workers", str(args.workers)]
    WSGIApplication("%(prog)s [OPTIONS] [APP_MODULE]").run()
    return 0


def cmd_validate(args) -> int:
    loaded = _load(args)
    if loaded is None:
        return 1
    rulebook, _ = loaded
    for rule in rulebook.rules:
        state = "disabled" if not rule.enabled else rule.mode
        print(f"ok  {rule.id:38} v{rule.version:8} {state:8} {', '.join(sorted(rule.hooks))}")
    print(f"{len(rulebook.rules)} rules valid ({len(rulebook.terminology.valuesets)} value sets).")
    return 0


def cmd_test(args) -> int:
    from .scenarios import run_scenarios

    loaded = _load(args)
    if loaded is None:
        return 1
    rulebook, settings = loaded
    results, problems = run_scenarios(rulebook, settings, args.rule or None)
    width = max((len(r.scenario.name) for r in results), default=10)
    for r in results:
        mark = "PASS" if r.passed else "FAIL"
        print(f"{mark}  {r.scenario.rule_id:34} {r.hook:12} {r.scenario.name:{width}}  {r.outcome}"
              + (f" ({r.indicator})" if r.indicator and r.outcome == "fire" else "") + (f"  <- {r.message}" if r.message else ""))
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    failed = sum(not r.passed for r in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed or problems else 0


def _now(value: str | None):
    from .facts import parse_time

    if not value:
        return None
    now = parse_time(value)
    if now is None:
        raise SystemExit(f"--now is not an ISO date-time: {value!r}")
    return now


def cmd_explain(args) -> int:
    from .errors import ServiceError
    from .explain import format_text, report
    from .hook_call import call_service
    from .request_validation import load_validators, validate_request
    from .services import SERVICE_FOR_HOOK

    loaded = _load(args)
    if loaded is None:
        return 1
    rulebook, settings = loaded
    try:
        body = json.loads(args.request.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"error: cannot read {args.request}: {exc}", file=sys.stderr)
        return 2
    service = SERVICE_FOR_HOOK.get(body.get("hook")) if isinstance(body, dict) else None
    if service is None:
        print("error: the file is not an order-select or order-sign request", file=sys.stderr)
        return 2
    settings.fixed_now = _now(args.now) or settings.fixed_now
    try:
        validate_request(body, service, load_validators(), settings.limits)
        result = call_service(service, body, rulebook=rulebook, store=None, settings=settings, trace=True)
    except ServiceError as exc:
        print(f"the service would answer {exc.status}: {exc.message}")
        return 1
    rep = report(result, rulebook, service.hook)
    print(json.dumps(rep, indent=2, default=str) if args.json else format_text(rep))
    return 0


def cmd_replay(args) -> int:
    from .replay import format_table, replay, request_files
    from .rulebook import RulebookError, load_rulebook

    loaded = _load(args)
    if loaded is None:
        return 1
    rulebook, settings = loaded
    try:
        baseline = load_rulebook(args.baseline, args.baseline.parent / "cards") if args.baseline else None
    except RulebookError as exc:
        print(f"error: the baseline rules do not load:\n{exc}", file=sys.stderr)
        return 1
    settings.fixed_now = _now(args.now) or settings.fixed_now
    paths = request_files(args.requests)
    current = replay(paths, rulebook, settings)
    base = replay(paths, baseline, settings) if baseline else None
    print(format_table(current, base))
    return 0


def cmd_stats(args) -> int:
    from .store import FeedbackStore

    settings = Settings.from_env()
    store = FeedbackStore(settings.database_url)
    since = datetime.now(timezone.utc) - timedelta(days=args.days) if args.days else None
    rows = store.stats(since)
    if args.json:
        print(json.dumps({"since": since.isoformat() if since else None, "rules": rows}, indent=2, default=str))
        return 0
    if not rows:
        print("No cards issued yet.")
        return 0
    print(f"{'rule':36} {'mode':7} {'issued':>7} {'accepted':>9} {'overridden':>11} {'override %':>10}")
    for r in rows:
        rate = f"{100 * r['override_rate']:.0f}%" if r["override_rate"] is not None else "-"
        print(f"{r['rule_id']:36} {r['mode']:7} {r['issued']:>7} {r['accepted']:>9} {r['overridden']:>11} {rate:>10}")
        for reason in r["top_override_reasons"]:
            print(f"    {reason['count']:>5} x {reason.get('display') or reason['code']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cds_hooks_service", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the service (gunicorn)")
    p.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    p.add_argument("--workers", type=int, help="worker processes (default: WEB_CONCURRENCY or 2)")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("validate", help="validate the rule files")
    _rules_args(p)
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("test", help="run the rules' scenarios")
    _rules_args(p)
    p.add_argument("--rule", action="append", help="only this rule (repeatable)")
    p.set_defaults(func=cmd_test)
    p = sub.add_parser("explain", help="why each rule fired or not for one request")
    p.add_argument("request", type=Path, help="a CDS Hooks request JSON file")
    p.add_argument("--now", help="evaluate as of this ISO time (e.g. the examples' 2026-03-01T12:00:00Z)")
    p.add_argument("--json", action="store_true")
    _rules_args(p, positional=False)
    p.set_defaults(func=cmd_explain)
    p = sub.add_parser("replay", help="alert volume over recorded requests")
    p.add_argument("requests", type=Path, help="a folder of recorded hook requests (*.json)")
    p.add_argument("--baseline", type=Path, help="another rules directory to compare with")
    p.add_argument("--now", help="evaluate as of this ISO time")
    _rules_args(p, positional=False)
    p.set_defaults(func=cmd_replay)
    p = sub.add_parser("stats", help="per-rule card and override statistics")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--days", type=int, help="only cards issued in the last N days")
    p.set_defaults(func=cmd_stats)
    args = parser.parse_args(argv)
    return args.func(args)
