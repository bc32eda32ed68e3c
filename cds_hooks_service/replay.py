"""Alert volume of recorded hook requests under the current rules (and, optionally, a baseline).

`python -m cds_hooks_service replay DIR [--baseline RULES_DIR] [--now ISO]` reads every *.json under
DIR that is an order-select or order-sign request, evaluates it without a store (nothing is recorded,
no FHIR server is contacted: requests are evaluated on their prefetch), and counts per rule how many
cards would be shown, counted in shadow, or suppressed by an exception.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ServiceError
from .hook_call import EXCEPTED, FIRED, SHADOW, SUPPRESSED, call_service
from .request_validation import load_validators, validate_request
from .services import SERVICE_FOR_HOOK


@dataclass
class ReplayCounts:
    requests: int = 0
    rejected: Counter = field(default_factory=Counter)  # status -> count
    shown: Counter = field(default_factory=Counter)  # rule -> cards shown
    shadow: Counter = field(default_factory=Counter)
    suppressed: Counter = field(default_factory=Counter)
    info_cards: int = 0


def replay(paths: list[Path], rulebook, settings, progress=None) -> ReplayCounts:
    """``progress`` optionally wraps the list of paths (e.g. in a progress bar)."""
    validators = load_validators()
    counts = ReplayCounts()
    for path in (progress(paths) if progress else paths):
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(body, dict) or body.get("hook") not in SERVICE_FOR_HOOK:
            continue
        counts.requests += 1
        service = SERVICE_FOR_HOOK[body["hook"]]
        body.pop("fhirServer", None)  # replay never reads a live FHIR server
        body.pop("fhirAuthorization", None)
        try:
            validate_request(body, service, validators, settings.limits)
            result = call_service(service, body, rulebook=rulebook, store=None, settings=settings)
        except ServiceError as exc:
            counts.rejected[exc.status] += 1
            continue
        for f in result.findings:
            if f.outcome in (EXCEPTED, SUPPRESSED):
                counts.suppressed[f.rule.id] += 1
            elif f.outcome == SHADOW:
                counts.shadow[f.rule.id] += 1
            elif f.outcome == FIRED:
                counts.shown[f.rule.id] += 1
        counts.info_cards += sum(1 for c in result.response["cards"]
                                 if c["source"].get("topic", {}).get("code") == "data-unavailable")
    return counts


def request_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.json")) if root.is_dir() else [root]


def format_table(current: ReplayCounts, baseline: ReplayCounts | None = None) -> str:
    rules = sorted(set(current.shown) | set(current.shadow) | set(current.suppressed)
                   | (set(baseline.shown) | set(baseline.shadow) if baseline else set()))
    head = f"{'rule':36} {'shown':>7} {'shadow':>7} {'suppressed':>10}"
    if baseline:
        head += f" {'baseline shown':>15} {'change':>7}"
    lines = [f"{current.requests} requests replayed", head]
    for rule in rules:
        line = f"{rule:36} {current.shown[rule]:>7} {current.shadow[rule]:>7} {current.suppressed[rule]:>10}"
        if baseline:
            delta = current.shown[rule] + current.shadow[rule] - baseline.shown[rule] - baseline.shadow[rule]
            line += f" {baseline.shown[rule] + baseline.shadow[rule]:>15} {delta:>+7}"
        lines.append(line)
    total = sum(current.shown.values())
    lines.append(f"{'total cards shown':36} {total:>7}")
    if current.info_cards:
        lines.append(f"'check not completed' cards: {current.info_cards}")
    if current.rejected:
        lines.append("rejected requests: " + ", ".join(f"{n} x {s}" for s, n in sorted(current.rejected.items())))
    return "\n".join(lines)
