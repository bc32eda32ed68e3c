"""The example patients and hook requests of fhir_examples/, usable on any day.

Each example was written at its scenario's clock (``now`` in ``fhir_examples/<rule>/expected.json``, e.g.
2026-03-01T12:00:00Z) and is shifted when it is sent or loaded: every FHIR date and date-time in it moves by
(the real now - that clock), so "sumatriptan given 3 h ago" is 3 h before the moment it is sent.

  cds-hooks-service examples send FILE [--url URL] [--fhir-server BASE]   post one request, print the cards
  cds-hooks-service examples load --fhir-server BASE [--rule ID]         PUT every example patient's record
  cds-hooks-service examples list [--rule ID]                             rule, patient id and name, expectation
"""
from __future__ import annotations

import json
import re
import sys
import uuid
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path

from .config import shipped_dir
from .facts import parse_time

UTC = timezone.utc
# FHIR date / dateTime / instant: YYYY, YYYY-MM, YYYY-MM-DD, or a date-time with seconds and a zone
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
_REQUEST_TIMEOUT = 30


def shift_times(doc, delta: timedelta):
    """A copy of ``doc`` with every FHIR date-time moved by ``delta`` (dates by the same amount, to the day)."""
    if isinstance(doc, dict):
        return {k: shift_times(v, delta) for k, v in doc.items()}
    if isinstance(doc, list):
        return [shift_times(v, delta) for v in doc]
    if isinstance(doc, str):
        if _DATETIME.match(doc):
            moved = datetime.fromisoformat(doc.replace("Z", "+00:00")) + delta
            text = moved.isoformat(timespec="milliseconds" if "." in doc else "seconds")
            return text.replace("+00:00", "Z") if doc.endswith("Z") else text
        if _DATE.match(doc):
            return (datetime.combine(date.fromisoformat(doc), time(12), UTC) + delta).date().isoformat()
    return doc


@dataclass(frozen=True)
class Example:
    rule_id: str
    name: str
    expect: str
    indicator: str | None
    now: datetime  # the clock the files were written at
    files: dict[str, Path]  # "bundle", "order-select", "order-sign" -> path

    def load(self, kind: str, at: datetime | None = None) -> dict:
        """The file of this kind, its times shifted so that the example's clock is ``at`` (default: now)."""
        doc = json.loads(self.files[kind].read_text(encoding="utf-8"))
        return shift_times(doc, (at or datetime.now(UTC)) - self.now)


def default_dir() -> Path:
    """./fhir_examples when there is one (a checkout), else the examples shipped in the package."""
    here = Path("fhir_examples")
    return here if here.is_dir() else shipped_dir("fhir_examples")


def examples(root: Path | None = None) -> list[Example]:
    root = Path(root or default_dir())
    out = []
    for expected_path in sorted(root.glob("*/expected.json")):
        expected = json.loads(expected_path.read_text(encoding="utf-8"))
        for e in expected["examples"]:
            out.append(Example(expected["rule"], e["name"], e["expect"], e.get("indicator"), parse_time(e["now"]),
                               {k: expected_path.parent / v for k, v in e["files"].items()}))
    return out


def example_of(path: Path) -> tuple[Example, str]:
    """The example a request or bundle file belongs to, and which of its files it is."""
    path = Path(path).resolve()
    for ex in examples(path.parent.parent):
        for kind, p in ex.files.items():
            if p.resolve() == path:
                return ex, kind
    raise LookupError(f"{path} is not listed in {path.parent / 'expected.json'}")


def format_cards(response: dict) -> str:
    cards = response.get("cards") or []
    if not cards:
        return "no cards"
    lines = []
    for c in cards:
        topic = (c.get("source") or {}).get("topic", {}).get("code", "?")
        lines.append(f"[{c.get('indicator', '?')}] {c.get('summary', '')}  ({topic})")
        for s in c.get("suggestions") or []:
            lines.append(f"    suggestion: {s.get('label', '')}")
    return "\n".join(lines)


def cmd_send(args) -> int:
    import requests

    from .services import SERVICE_FOR_HOOK

    try:
        example, kind = example_of(args.file)
        body = example.load(kind)
    except (LookupError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    service = SERVICE_FOR_HOOK.get(kind)
    if service is None:
        print(f"error: {args.file} is a {kind}, not a hook request", file=sys.stderr)
        return 2
    body["hookInstance"] = str(uuid.uuid4())
    if args.fhir_server:  # let the service read the record from a FHIR server (loaded with `examples load`)
        body.pop("prefetch", None)
        body["fhirServer"] = args.fhir_server.rstrip("/")
    url = f"{args.url.rstrip('/')}/cds-services/{service.id}"
    headers = {"Authorization": args.authorization} if args.authorization else {}
    try:
        r = requests.post(url, json=body, headers=headers, timeout=_REQUEST_TIMEOUT)
    except requests.RequestException as exc:
        print(f"error: {url}: {type(exc).__name__} (is the service running?)", file=sys.stderr)
        return 1
    if r.status_code != 200:
        print(f"error: {url} answered {r.status_code}: {r.text[:500]}", file=sys.stderr)
        return 1
    response = r.json()
    if args.json:
        print(json.dumps(response, indent=2))
    else:
        print(f"{example.rule_id}: {example.name} ({kind}; expected: {example.expect})")
        print(format_cards(response))
    return 0


def cmd_load(args) -> int:
    import requests

    chosen = [e for e in examples(args.dir) if "bundle" in e.files and (not args.rule or e.rule_id in args.rule)]
    if not chosen:
        print(f"error: no example bundles under {args.dir or default_dir()}", file=sys.stderr)
        return 2
    base = args.fhir_server.rstrip("/")
    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    if args.token:
        headers["Authorization"] = f"Bearer {args.token}"
    now = datetime.now(UTC)
    resources = 0
    with requests.Session() as session:
        for ex in chosen:
            bundle = ex.load("bundle", now)
            try:
                r = session.post(base, data=json.dumps(bundle), headers=headers, timeout=_REQUEST_TIMEOUT)
            except requests.RequestException as exc:
                print(f"error: {base}: {type(exc).__name__}", file=sys.stderr)
                return 1
            if r.status_code >= 300:
                print(f"error: {ex.files['bundle'].name}: {base} answered {r.status_code}: {r.text[:300]}", file=sys.stderr)
                return 1
            resources += len(bundle["entry"])
    print(f"loaded {len(chosen)} example patients ({resources} resources) into {base}, times shifted to now")
    return 0


def cmd_list(args) -> int:
    rows = [e for e in examples(args.dir) if not args.rule or e.rule_id in args.rule]
    if not rows:
        print(f"error: no examples under {args.dir or default_dir()}", file=sys.stderr)
        return 2
    for e in rows:
        bundle = json.loads(e.files["bundle"].read_text(encoding="utf-8")) if "bundle" in e.files else {"entry": []}
        patient = next((x["resource"] for x in bundle["entry"] if x["resource"]["resourceType"] == "Patient"), {})
        name = " ".join([*(patient.get("name") or [{}])[0].get("given", []), (patient.get("name") or [{}])[0].get("family", "")])
        print(f"{e.rule_id:34} {patient.get('id', '?'):50} {name:22} {e.expect:10} {e.name}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("examples", help="send an example request, or load the example patients into a FHIR server")
    examples_sub = p.add_subparsers(dest="examples_command", required=True)
    s = examples_sub.add_parser("send", help="post one fhir_examples request (times shifted to now), print the cards")
    s.add_argument("file", type=Path, help="fhir_examples/<rule>/<example>.order-select.json or .order-sign.json")
    s.add_argument("--url", default="http://127.0.0.1:8000", help="the service's base URL (default: %(default)s)")
    s.add_argument("--fhir-server", help="send no prefetch: the service reads the record from this FHIR server")
    s.add_argument("--authorization", help="Authorization header value, e.g. 'Bearer <JWT>' (JWT mode)")
    s.add_argument("--json", action="store_true", help="print the service's JSON answer")
    s.set_defaults(func=cmd_send)
    s = examples_sub.add_parser("load", help="PUT every example patient's record into a FHIR R4 server")
    s.add_argument("--fhir-server", required=True, help="FHIR R4 base URL (it must accept transaction Bundles)")
    s.add_argument("--dir", type=Path, help="the examples folder (default: ./fhir_examples, else the shipped ones)")
    s.add_argument("--rule", action="append", help="only this rule's examples (repeatable)")
    s.add_argument("--token", help="bearer token for the FHIR server")
    s.set_defaults(func=cmd_load)
    s = examples_sub.add_parser("list", help="every example: rule, patient id and name, expected outcome")
    s.add_argument("--dir", type=Path, help="the examples folder (default: ./fhir_examples, else the shipped ones)")
    s.add_argument("--rule", action="append", help="only this rule's examples (repeatable)")
    s.set_defaults(func=cmd_list)
