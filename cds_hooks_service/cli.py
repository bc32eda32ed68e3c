"""Command line: `python -m cds_hooks_service <command>` (also installed as `cds-hooks-service`).

  serve     run the service under gunicorn (the production server)
  validate  check rule files, shared definitions, value-set references, card templates, scenario files,
            alternatives (as FHIR MedicationRequests) and site overrides
  test      run every rule's scenarios and print a pass/fail table
  explain   why each rule fired or not for one hook request (a JSON file)
  replay    how many cards each rule would fire over a folder of recorded hook requests
  stats     cards issued, accepted and overridden per rule, with top override reasons
  init      copy the shipped rules and cards to a folder for a site to edit
  db        `db upgrade`: bring the database to this version's schema; `db current`
  examples  `examples send FILE`: post an example to the service; `examples load`: examples into a FHIR server

Commands that read rules take the same options: --rules DIR, --cards DIR, --local DIR (defaults:
CDS_RULES_DIR, CDS_CARDS_DIR, CDS_RULES_LOCAL_DIR). Commands whose output a script may read take --json.
Exit status: 0 done, 1 the rules or a scenario failed, 2 the command could not run as asked (unknown rule id,
missing file or folder, no input).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from .config import Settings, shipped_dir

EXIT_FAILED = 1  # rules do not validate, a scenario failed
EXIT_USAGE = 2  # unknown rule id, missing path, empty input (argparse uses 2 for bad options too)


class CommandError(Exception):
    """The command cannot run as asked: printed as one `error:` line, exit status 2."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cds-hooks-service")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _rules_args(p: argparse.ArgumentParser, *, positional: bool = True) -> None:
    p.add_argument("--rules", dest="rules", type=Path, metavar="DIR",
                   help="rules directory (default: CDS_RULES_DIR or ./rules)")
    p.add_argument("--cards", type=Path, metavar="DIR",
                   help="card templates directory (default: CDS_CARDS_DIR, or cards/ beside --rules)")
    p.add_argument("--local", type=Path, metavar="DIR", help="site overrides directory (default: CDS_RULES_LOCAL_DIR)")
    if positional:  # the old `validate DIR` / `test DIR` form still works, with a deprecation note
        p.add_argument("old_dir", nargs="?", type=Path, help=argparse.SUPPRESS)


def _guarded(command):
    """A command's way out for a user's mistake or a closed pipe: one `error:` line (exit 2), or a quiet end."""
    import functools

    @functools.wraps(command)
    def run(args) -> int:
        try:
            return command(args)
        except CommandError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except BrokenPipeError:  # `explain ... | head`: the reader left; stop quietly
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout at exit
            except (OSError, ValueError, AttributeError):
                pass
            return 141  # as a shell reports a process ended by SIGPIPE
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
    return run


def _progress(iterable, *, desc: str, unit: str, total: int | None = None):
    """A progress bar on stderr once the work has taken 2 s; none when stderr is not a terminal."""
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, unit=unit, total=total, delay=2.0, leave=False, file=sys.stderr,
                disable=not sys.stderr.isatty())


def _print_problems(problems) -> None:
    for p in problems:
        print(f"{p.severity}: {_relative(p)}", file=sys.stderr)


def _relative(problem) -> str:
    """The problem with its file relative to the current folder when it is inside it (shorter to read)."""
    try:
        rel = Path(problem.file).resolve().relative_to(Path.cwd())
    except (ValueError, OSError):
        return str(problem)
    return str(problem).replace(problem.file, str(rel), 1)


def _rule_dirs(args, settings: Settings) -> tuple[Path, Path, Path | None]:
    rules_dir = getattr(args, "rules", None)
    old = getattr(args, "old_dir", None)
    if old is not None:
        if rules_dir is not None:
            raise CommandError(f"give the rules folder once: --rules {rules_dir} (not also {old})")
        print(f"note: `{args.command} DIR` is deprecated; use `{args.command} --rules DIR`", file=sys.stderr)
        rules_dir = old
    cards_dir = args.cards or (rules_dir.parent / "cards" if rules_dir else settings.cards_dir)
    return rules_dir or settings.rules_dir, cards_dir, args.local or settings.rules_local_dir


def _load(args):
    """(rulebook, settings), or None after printing every problem of rules that do not validate."""
    from .rulebook import RulebookError, load_rulebook

    settings = Settings.from_env()
    rules_dir, cards_dir, local = _rule_dirs(args, settings)
    for what, path in (("rules", rules_dir), ("card templates", cards_dir), ("site overrides", local)):
        if path is not None and not path.is_dir():
            raise CommandError(f"{path}: no such {what} folder" if not path.exists() else f"{path}: not a folder")
    try:
        rulebook = load_rulebook(rules_dir, cards_dir, local, scenarios=args.command == "validate")
    except RulebookError as exc:
        errors = [p for p in exc.problems if p.severity == "error"]
        if getattr(args, "json", False) and args.command == "validate":
            print(json.dumps({"valid": False, "rules": [], "errors": [p.as_dict() for p in errors],
                              "warnings": [p.as_dict() for p in exc.problems if p.severity != "error"]}, indent=2))
        else:
            _print_problems(exc.problems)
        print(f"{len(errors)} error(s); the rules were NOT accepted.", file=sys.stderr)
        return None
    return rulebook, settings


def cmd_serve(args) -> int:
    from .serving import StartupError, startup_check

    os.environ["PORT"] = str(args.port)
    os.environ["HOST"] = args.host
    if args.reuse_port:
        os.environ["GUNICORN_REUSE_PORT"] = "1"
    try:  # the same check runs again in gunicorn's master; here it is one plain line and exit status 2
        startup_check([(args.host, args.port)], reuse_port=os.environ.get("GUNICORN_REUSE_PORT") == "1")
    except StartupError as exc:
        print(f"error: cannot start: {exc}", file=sys.stderr)
        return 2
    # gunicorn in a fresh interpreter (this process, replaced): its config patches gevent in before anything
    # imports urllib3, which this process already has (see serving.patch_for_gevent)
    argv = [sys.executable, "-m", "gunicorn", "--config", str(shipped_dir("gunicorn.conf.py")),
            "--bind", f"{args.host}:{args.port}"]
    if args.workers:
        argv += ["--workers", str(args.workers)]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [*argv, "cds_hooks_service:create_app()"])
    return 0  # not reached


@_guarded
def cmd_validate(args) -> int:
    loaded = _load(args)
    if loaded is None:
        return EXIT_FAILED
    rulebook, _ = loaded
    if not rulebook.rules:
        raise CommandError(f"{rulebook.rules_dir}: no rule files (<id>.yaml) in this folder")
    if args.json:
        print(json.dumps({"valid": True, "rules": [
            {"id": r.id, "version": r.version, "enabled": r.enabled, "mode": r.mode, "hooks": sorted(r.hooks),
             "policies": {name: {"value": p.value, "unit": p.unit, "signOff": p.sign_off}
                          for name, p in sorted(r.policies.items())}} for r in rulebook.rules],
            "errors": [], "warnings": [w.as_dict() for w in rulebook.warnings]}, indent=2))
        return 0
    _print_problems(rulebook.warnings)
    for rule in rulebook.rules:
        state = "disabled" if not rule.enabled else rule.mode
        print(f"ok  {rule.id:38} v{rule.version:8} {state:8} {', '.join(sorted(rule.hooks))}")
    pending = sorted({p.name for r in rulebook.rules for p in r.policies.values() if p.sign_off.get("status") != "approved"})
    print(f"{len(rulebook.rules)} rules valid ({len(rulebook.terminology.valuesets)} value sets"
          + (f", {len(rulebook.warnings)} warning(s)" if rulebook.warnings else "") + ").")
    if pending:
        print(f"{len(pending)} policy number(s) not yet signed off: {', '.join(pending)}")
    return 0


def _known_rule_ids(requested: list[str] | None, rulebook) -> None:
    import difflib

    ids = [r.id for r in rulebook.rules]
    for rule_id in requested or []:
        if rule_id not in ids:
            close = difflib.get_close_matches(rule_id, ids, n=1)
            raise CommandError(f"unknown rule {rule_id!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                               + f"; rules: {', '.join(ids)}")


@_guarded
def cmd_test(args) -> int:
    from .scenarios import run_scenarios

    loaded = _load(args)
    if loaded is None:
        return EXIT_FAILED
    rulebook, settings = loaded
    _known_rule_ids(args.rule, rulebook)
    from .cards import template_failures

    with template_failures() as failures:  # a card sent with its rule's plain text is a failed test
        results, problems = run_scenarios(rulebook, settings, args.rule or None,
                                          progress=lambda it, n: _progress(it, desc="scenarios", unit="rule", total=n))
    problems += [f"card {name}.yaml: {why} (scenario data); the card was sent with the rule's plain text"
                 for name, why in dict.fromkeys(failures)]
    if not results and not problems:
        raise CommandError(f"{rulebook.rules_dir}: no rules with scenarios to run")
    from .card_length import length_problems

    # issue 9 §4: a card whose detail can pass 1,200 characters with a long record fails the run
    problems += length_problems(rulebook, settings.limits.max_evidence_items, args.rule or None)
    failed = sum(not r.passed for r in results)
    if args.json:
        print(json.dumps({"passed": len(results) - failed, "failed": failed, "problems": problems,
                          "warnings": [], "results": [
            {"rule": r.scenario.rule_id, "scenario": r.scenario.name, "hook": r.hook, "expect": r.scenario.expect,
             "outcome": r.outcome, "indicator": r.indicator, "passed": r.passed, "message": r.message or None}
            for r in results]}, indent=2))
        return EXIT_FAILED if failed or problems else 0
    width = max((len(r.scenario.name) for r in results), default=10)
    for r in results:
        mark = "PASS" if r.passed else "FAIL"
        print(f"{mark}  {r.scenario.rule_id:34} {r.hook:12} {r.scenario.name:{width}}  {r.outcome}"
              + (f" ({r.indicator})" if r.indicator and r.outcome == "fire" else "") + (f"  <- {r.message}" if r.message else ""))
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    print(f"{len(results) - failed} passed, {failed} failed")
    return EXIT_FAILED if failed or problems else 0


def _now(value: str | None):
    from .facts import parse_time

    if not value:
        return None
    now = parse_time(value)
    if now is None:
        raise CommandError(f"--now is not an ISO date-time: {value!r}")
    return now


def _read_request(path: Path) -> dict:
    if not path.exists():
        raise CommandError(f"{path}: no such file")
    if path.is_dir():
        raise CommandError(f"{path}: is a folder; explain reads one request file (replay reads folders)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"{path}: cannot be read ({exc})") from exc
    if not text.strip():
        raise CommandError(f"{path}: the file is empty")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise CommandError(f"{path}: not JSON ({exc})") from exc


@_guarded
def cmd_explain(args) -> int:
    from .errors import ServiceError
    from .explain import format_text, report
    from .hook_call import call_service
    from .request_validation import load_validators, validate_request
    from .services import SERVICE_FOR_HOOK

    body = _read_request(args.request)
    service = SERVICE_FOR_HOOK.get(body.get("hook")) if isinstance(body, dict) else None
    if service is None:
        raise CommandError(f"{args.request}: not an order-select or order-sign request")
    now = _now(args.now)
    loaded = _load(args)
    if loaded is None:
        return EXIT_FAILED
    rulebook, settings = loaded
    settings.fixed_now = now or settings.fixed_now
    try:
        validate_request(body, service, load_validators(), settings.limits)
        result = call_service(service, body, rulebook=rulebook, store=None, settings=settings, trace=True)
    except ServiceError as exc:
        if args.json:
            print(json.dumps({"status": exc.status, "error": exc.message}, indent=2))
        else:
            print(f"the service would answer {exc.status}: {exc.message}")
        return EXIT_FAILED
    rep = report(result, rulebook, service.hook)
    print(json.dumps(rep, indent=2, default=str) if args.json else format_text(rep))
    return 0


@_guarded
def cmd_replay(args) -> int:
    from .replay import format_table, replay, request_files
    from .rulebook import RulebookError, load_rulebook

    if not args.requests.exists():
        raise CommandError(f"{args.requests}: no such file or folder")
    paths = request_files(args.requests)
    if not paths:
        raise CommandError(f"{args.requests}: no *.json request files in this folder")
    if args.baseline is not None and not args.baseline.is_dir():
        raise CommandError(f"--baseline {args.baseline}: no such folder")
    now = _now(args.now)
    loaded = _load(args)
    if loaded is None:
        return EXIT_FAILED
    rulebook, settings = loaded
    try:
        baseline = load_rulebook(args.baseline, args.baseline.parent / "cards") if args.baseline else None
    except RulebookError as exc:
        print("error: the baseline rules do not load:", file=sys.stderr)
        _print_problems(exc.problems)
        return EXIT_FAILED
    settings.fixed_now = now or settings.fixed_now
    current = replay(paths, rulebook, settings, progress=lambda it: _progress(it, desc="replay", unit="request",
                                                                             total=len(paths)))
    base = replay(paths, baseline, settings, progress=lambda it: _progress(it, desc="baseline", unit="request",
                                                                          total=len(paths))) if baseline else None
    if current.requests == 0:
        raise CommandError(f"{args.requests}: none of the {len(paths)} JSON file(s) is an order-select or "
                           "order-sign request")
    if args.json:
        print(json.dumps(_replay_json(current, base), indent=2))
    else:
        print(format_table(current, base))
    return 0


def _replay_json(current, baseline) -> dict:
    rules = sorted(set(current.shown) | set(current.shadow) | set(current.suppressed)
                   | (set(baseline.shown) | set(baseline.shadow) if baseline else set()))
    out = {"requests": current.requests, "rejected": {str(k): v for k, v in sorted(current.rejected.items())},
           "check_not_completed_cards": current.info_cards, "rules": {}}
    for rule in rules:
        row = {"shown": current.shown[rule], "shadow": current.shadow[rule], "suppressed": current.suppressed[rule]}
        if baseline:
            row["baseline"] = baseline.shown[rule] + baseline.shadow[rule]
            row["change"] = row["shown"] + row["shadow"] - row["baseline"]
        out["rules"][rule] = row
    return out


@_guarded
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
        print(f"{_printable(r['rule_id']):36} {_printable(r['mode']):7} {r['issued']:>7} {r['accepted']:>9} "
              f"{r['overridden']:>11} {rate:>10}")
        for reason in r["top_override_reasons"]:
            print(f"    {reason['count']:>5} x {_printable(reason.get('display') or reason['code'])}")
    return 0


def _printable(value: object) -> str:
    """Stored text (clients send it) made safe for a terminal: control and format characters (ESC, CR,
    bidi overrides, ...) shown as Python escapes, e.g. \\x1b, instead of acting on the terminal."""
    import unicodedata

    return "".join(ch if unicodedata.category(ch)[0] not in "CZ" or ch == " " else ascii(ch)[1:-1]
                   for ch in str(value))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cds_hooks_service", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the service (gunicorn)")
    p.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    p.add_argument("--workers", type=int, help="worker processes (default: WEB_CONCURRENCY or 2)")
    p.add_argument("--reuse-port", action="store_true",
                   help="SO_REUSEPORT: let several servers share the port on purpose (default: refuse a port in use)")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("validate", help="validate the rule files")
    _rules_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output (errors and warnings with file, line, column)")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("test", help="run the rules' scenarios")
    _rules_args(p)
    p.add_argument("--rule", action="append", metavar="ID", help="only this rule (repeatable)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_test)
    p = sub.add_parser("explain", help="why each rule fired or not for one request")
    p.add_argument("request", type=Path, help="a CDS Hooks request JSON file")
    p.add_argument("--now", help="evaluate as of this ISO time (e.g. the examples' 2026-03-01T12:00:00Z)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _rules_args(p, positional=False)
    p.set_defaults(func=cmd_explain)
    p = sub.add_parser("replay", help="alert volume over recorded requests")
    p.add_argument("requests", type=Path, help="a folder of recorded hook requests (*.json), or one file")
    p.add_argument("--baseline", type=Path, metavar="DIR", help="another rules directory to compare with")
    p.add_argument("--now", help="evaluate as of this ISO time")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _rules_args(p, positional=False)
    p.set_defaults(func=cmd_replay)
    p = sub.add_parser("stats", help="per-rule card and override statistics")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--days", type=int, help="only cards issued in the last N days")
    p.set_defaults(func=cmd_stats)
    from . import examples, migrations, site_init  # commands defined in their own modules
    for module in (site_init, migrations, examples):
        module.register(sub)
    args = parser.parse_args(argv)
    return args.func(args)
