"""Render findings into CDS Hooks 2.0 cards.

Card texts come from ``cards/<rule>.yaml`` (a Jinja ``summary`` and a markdown ``detail``), run in a
sandboxed Jinja environment. Everything a template prints from patient data is escaped for
markdown (and HTML, since clients such as the Sandbox render raw HTML in ``detail``). Optional
card fields are omitted rather than sent empty, as the spec requires.

Templates are written by pharmacists, not programmers, and reloaded into running workers: the sandbox
bounds what one can do (:class:`CardEnvironment`). It is immutable (a template cannot change the rule
data it is shown), and every render is limited in time (``RENDER_MAX_SECONDS``), work (loop iterations
plus calls, ``RENDER_MAX_STEPS``) and output (``RENDER_MAX_CHARS``); no operator, filter or method can
build a value larger than ``VALUE_MAX_CHARS``. A render over a limit raises :class:`RenderLimitExceeded`:
at load (``validate``, ``test``, reload) every template is rendered once with example data and such a
template is refused; at request time the card is sent with the rule's plain text instead (logged).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import threading
import time
import uuid
from datetime import datetime, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from jinja2 import ChainableUndefined, Template, nodes
from jinja2.filters import FILTERS
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.visitor import NodeTransformer

from .facts import as_list, order_categories, parse_time

log = logging.getLogger(__name__)
RULE_TOPIC_SYSTEM = "https://migraine-med-safety.example.org/fhir/CodeSystem/rule"
OVERRIDE_REASON_SYSTEM = "https://migraine-med-safety.example.org/fhir/CodeSystem/override-reason"
UCUM = "http://unitsofmeasure.org"
SUMMARY_MAX = 139  # the spec: "<140-character summary"

# markdown_escape's one pass: &, < and > as HTML entities, then each markdown character behind a backslash
# (the entities hold none of them, so one translation table gives the same text as escaping in two steps)
_MD_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", **{c: "\\" + c for c in "\\`*_[]{}#|~!"}})
_SUGGESTION_NS = uuid.UUID("5f0c6d1e-6c53-4b0e-9c2c-3b8f0f1d2a41")


def _plain(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "" if value is None else str(value)


def markdown_escape(value) -> str:
    """Finalizer of detail templates: data cannot add markdown, HTML or new blocks."""
    return " ".join(_plain(value).split()).translate(_MD_ESCAPES)


def plain_text(value) -> str:
    """Finalizer of summary templates: one line of plain text."""
    return " ".join(_plain(value).replace("<", "‹").replace(">", "›").split())


def display_zone() -> ZoneInfo:
    """The zone card times are shown in: CDS_DISPLAY_TIMEZONE (an IANA name such as Europe/Berlin), default UTC.
    Settings.from_env calls this so that an unknown name stops the service at start."""
    name = os.environ.get("CDS_DISPLAY_TIMEZONE", "").strip() or "UTC"
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"CDS_DISPLAY_TIMEZONE must be an IANA time zone such as UTC or America/New_York, "
                         f"got {name!r}") from exc


def _when(value) -> str:
    """A record time in the display zone, with the zone named: 2026-03-01 09:00 UTC, 2026-03-01 04:00 EST."""
    t = parse_time(value) if isinstance(value, str) else value
    if not isinstance(t, datetime):
        return "time not recorded"
    local = t.astimezone(display_zone())
    return local.strftime("%Y-%m-%d %H:%M ") + (local.tzname() or str(local.tzinfo))


def _in(value, now: datetime | None = None) -> str:
    """How long until a time: "in 21 h", "in 40 min", "now" (past)."""
    t = parse_time(value) if isinstance(value, str) else value
    if not isinstance(t, datetime) or now is None:
        return ""
    hours = (t - now).total_seconds() / 3600
    if hours <= 0:
        return "now"
    if hours < 1:
        return f"in {max(1, int(hours * 60))} min"
    if hours < 48:
        return f"in {hours:.0f} h"
    return f"in {hours / 24:.0f} days"


def _ago(value, now: datetime | None = None) -> str:
    t = parse_time(value) if isinstance(value, str) else value
    if not isinstance(t, datetime) or now is None:
        return ""
    hours = (now - t).total_seconds() / 3600
    if hours < 0:
        return "scheduled"
    if hours < 1:
        return f"{int(hours * 60)} min ago"
    if hours < 48:
        return f"{hours:.0f} h ago"
    return f"{hours / 24:.0f} days ago"


def _names(items) -> str:
    return ", ".join(dict.fromkeys(str(i.get("ingredients") or i.get("display")) for i in items or []))


TEMPLATE_FILTERS = {"when": _when, "names": _names}

# -- render limits ---------------------------------------------------------------------------------------
RENDER_MAX_SECONDS = 0.25  # wall clock per template render (the shipped cards: a few ms on a loaded machine)
RENDER_MAX_STEPS = 20_000  # loop iterations + calls (macros, functions, methods) + operators per render
RENDER_MAX_CHARS = 64 * 1024  # output of one template
VALUE_MAX_CHARS = 64 * 1024  # largest string or list an operator, filter or method may build
RANGE_MAX = 10_000  # items of range()
INT_MAX_BITS = 4096  # largest integer ** or * may build


class RenderLimitExceeded(Exception):
    """A card template went over a render limit (time, work, output or value size)."""


class RenderTimeExceeded(RenderLimitExceeded):
    """Over the wall-clock limit (the only limit a stalled machine, not the template, can cause)."""


_state = threading.local()  # .budget: the _Budget of the render running on this thread


class _Budget:
    __slots__ = ("deadline", "steps")

    def __init__(self) -> None:
        self.deadline = time.monotonic() + RENDER_MAX_SECONDS
        self.steps = 0


def _step() -> None:
    budget = getattr(_state, "budget", None)
    if budget is None:
        raise SecurityError("card templates render only through Template.render (with its limits)")
    budget.steps += 1
    if budget.steps > RENDER_MAX_STEPS:
        raise RenderLimitExceeded(f"more than {RENDER_MAX_STEPS} loop iterations and calls")
    if time.monotonic() > budget.deadline:
        raise RenderTimeExceeded(f"took longer than {RENDER_MAX_SECONDS:g} s")


def _value_size(value) -> int:
    return len(value) if isinstance(value, (str, list, tuple)) else 0


def _check_size(size: int, what: str) -> None:
    if size > VALUE_MAX_CHARS:
        raise RenderLimitExceeded(f"{what} would build a value of {size} items (limit {VALUE_MAX_CHARS})")


def _counted(iterable):
    """Every for loop iterates through this (see _Guard): one step per iteration."""
    for item in iterable:
        _step()
        yield item


def _capped(value):
    """Every ``~`` concatenation passes through this (see _Guard)."""
    _check_size(_value_size(value), "~")
    return value


def _range(*args):
    r = range(*args)
    if len(r) > RANGE_MAX:
        raise RenderLimitExceeded(f"range() of {len(r)} items (limit {RANGE_MAX})")
    return r


_PERCENT_WIDTH = re.compile(r"%[-#0 +]*(?:\*|\d{4,})|%[-#0 +]*\d*\.(?:\*|\d{4,})")


def _join(eval_ctx, value, d="", attribute=None):
    items = list(value)
    _check_size(sum(len(str(i)) for i in items) + len(str(d)) * max(len(items) - 1, 0), "join")
    return FILTERS["join"](eval_ctx, items, d, attribute)


def _sum(environment, iterable, attribute=None, start=0):
    items = list(iterable)
    if isinstance(start, (str, list, tuple)):
        _check_size(len(start) + sum(_value_size(i) for i in items), "sum")
    return FILTERS["sum"](environment, items, attribute, start)


def _replace(eval_ctx, s, old, new, count=None):
    s, old, new = str(s), str(old), str(new)
    hits = len(s) + 1 if not old else s.count(old)
    if count is not None and count >= 0:
        hits = min(hits, count)
    _check_size(len(s) + hits * len(new), "replace")
    return FILTERS["replace"](eval_ctx, s, old, new, count)


_join.jinja_pass_arg = FILTERS["join"].jinja_pass_arg  # type: ignore[attr-defined]
_sum.jinja_pass_arg = FILTERS["sum"].jinja_pass_arg  # type: ignore[attr-defined]
_replace.jinja_pass_arg = FILTERS["replace"].jinja_pass_arg  # type: ignore[attr-defined]

# Jinja's filters whose output is bounded by their input; the amplifying ones (center, indent, format,
# batch, slice, wordwrap, ...) are not available, and join/sum/replace check the size first.
_SAFE_FILTERS = ("abs", "attr", "capitalize", "count", "d", "default", "dictsort", "first", "float", "groupby",
                 "int", "items", "last", "length", "list", "lower", "map", "max", "min", "reject", "rejectattr",
                 "reverse", "round", "select", "selectattr", "sort", "string", "striptags", "title", "trim",
                 "truncate", "unique", "upper", "wordcount")
# str methods a template may call (others, e.g. center, ljust, zfill, expandtabs, format, join, can build
# values of any size)
_SAFE_STR_METHODS = frozenset((
    "capitalize", "casefold", "count", "endswith", "find", "index", "isalnum", "isalpha", "isdigit",
    "islower", "isnumeric", "isspace", "istitle", "isupper", "lower", "lstrip", "partition", "removeprefix",
    "removesuffix", "rfind", "rindex", "rpartition", "rsplit", "rstrip", "split", "splitlines", "startswith",
    "strip", "swapcase", "title", "upper"))


def _filter(node, name: str):
    return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)


class _Guard(NodeTransformer):
    """At compile time: every for loop's iterable goes through _counted, every ``~`` through _capped."""

    def visit_For(self, node):
        node = self.generic_visit(node)
        node.iter = _filter(node.iter, "cds_counted")
        return node

    def visit_Concat(self, node):
        return _filter(self.generic_visit(node), "cds_capped")


class LimitedTemplate(Template):
    def render(self, *args, **kwargs) -> str:
        """Render with the limits: output streamed and counted, the clock checked on every chunk."""
        ctx = self.new_context(dict(*args, **kwargs))
        previous = getattr(_state, "budget", None)
        budget = _state.budget = _Budget()
        try:
            out, size = [], 0
            append, clock, deadline = out.append, time.monotonic, budget.deadline
            for chunk in self.root_render_func(ctx):
                size += len(chunk)
                if size > RENDER_MAX_CHARS:
                    raise RenderLimitExceeded(f"output longer than {RENDER_MAX_CHARS} characters")
                if clock() > deadline:
                    raise RenderTimeExceeded(f"took longer than {RENDER_MAX_SECONDS:g} s")
                append(chunk)
            return self.environment.concat(out)  # type: ignore[attr-defined]
        except Exception:
            self.environment.handle_exception()
        finally:
            _state.budget = previous


_DICT_ATTRIBUTES = frozenset(dir(dict))  # a dict instance has no other attributes (no __dict__)


class CardEnvironment(ImmutableSandboxedEnvironment):
    """Immutable sandbox with the render limits (module docstring)."""

    template_class = LimitedTemplate
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, **options):
        super().__init__(**options)
        self.globals = {"range": _range, "dict": dict, "namespace": self.globals["namespace"],
                        "cycler": self.globals["cycler"], "joiner": self.globals["joiner"]}  # no lipsum
        self.filters = {name: FILTERS[name] for name in _SAFE_FILTERS}
        self.filters.update({"join": _join, "sum": _sum, "replace": _replace,
                             "cds_counted": _counted, "cds_capped": _capped})

    def _parse(self, source, name, filename):
        return _Guard().visit(super()._parse(source, name, filename))

    def make_globals(self, d):
        """A template's globals as one dict (Jinja's default is a ChainMap over the environment's, which each
        render walks key by key, missing in the first map): the same names and values, since the card
        environments' globals are set once, here, before any template is compiled."""
        return {**self.globals, **(d or {})}

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805,B902 (Jinja's signature)
        _step()
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context, operator, left, right):
        _step()
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and \
                right * math.log2(abs(left)) > INT_MAX_BITS:
            raise RenderLimitExceeded(f"** would build an integer over {INT_MAX_BITS} bits")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    _check_size(len(seq) * n, "*")
            if isinstance(left, int) and isinstance(right, int) and \
                    left.bit_length() + right.bit_length() > INT_MAX_BITS:
                raise RenderLimitExceeded(f"* would build an integer over {INT_MAX_BITS} bits")
        if operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            _check_size(len(left) + len(right), "+")
        if operator == "%" and isinstance(left, str) and _PERCENT_WIDTH.search(left):
            raise SecurityError("% format widths and precisions over 999 are not allowed in card templates")
        return super().call_binop(context, operator, left, right)

    def getitem(self, obj, argument):
        """``obj[key]`` on a plain dict: its item; a missing string key that names no attribute of dict is
        undefined at once (Jinja's sandbox tries the attribute first, catching the AttributeError). Anything
        else, as Jinja does it."""
        if type(obj) is dict and type(argument) is str:
            try:
                return obj[argument]
            except KeyError:
                if argument not in _DICT_ATTRIBUTES:
                    return self.undefined(obj=obj, name=argument)
        return super().getitem(obj, argument)

    def getattr(self, obj, attribute):
        """``obj.name`` on a plain dict (an evidence item, the draft, ...) whose type has no attribute of that
        name is its item, or undefined: what Jinja's sandbox gives after trying the attribute and catching the
        AttributeError, without raising one per look-up. Anything else, as Jinja does it."""
        if type(obj) is dict and attribute not in _DICT_ATTRIBUTES:
            try:
                return obj[attribute]
            except KeyError:
                return self.undefined(obj=obj, name=attribute)
        return super().getattr(obj, attribute)

    def is_safe_attribute(self, obj, attr, value) -> bool:
        if isinstance(obj, str) and attr not in _SAFE_STR_METHODS:
            return False
        return super().is_safe_attribute(obj, attr, value)


def _environment(finalize) -> CardEnvironment:
    env = CardEnvironment(undefined=ChainableUndefined, autoescape=False, finalize=finalize,
                          trim_blocks=True, lstrip_blocks=True)
    env.filters.update(TEMPLATE_FILTERS)
    return env


SUMMARY_ENV = _environment(plain_text)
DETAIL_ENV = _environment(markdown_escape)


def template_context(finding, now: datetime) -> dict:
    draft = finding.draft
    return {
        "rule": {"id": finding.rule.id, "title": finding.rule.title, "source": finding.rule.source},
        # the local-policy numbers the rule and its card use (rules/shared.yaml, the rule's policies:)
        "policy": {name: _plain(p.value) for name, p in (getattr(finding.rule, "policies", None) or {}).items()},
        "indicator": finding.indicator,
        "possible": getattr(finding, "possible", False),
        "draft": {"display": draft.display, "route": draft.route or "route not stated",
                  "matched_by": draft.matched_by, "names": list(draft.matched_names),
                  # MedicationRequest.category: inpatient, outpatient, community, discharge (None: not stated)
                  "category": ", ".join(sorted(order_categories(getattr(draft, "resource", None) or {}))) or None},
        "evidence": [_evidence_dict(e) for e in finding.evidence],
        "cautions": [_evidence_dict(e) for e in finding.cautions],
        "checks": {e.check: _evidence_dict(e) for e in finding.evidence + finding.cautions},
        "now": now,
        "ago": lambda value: _ago(value, now),
        "from_now": lambda value: _in(value, now),
    }


_recording = threading.local()  # .failures: list of (card name, reason) while template_failures() is active


@contextlib.contextmanager
def template_failures():
    """Collect, on this thread, the (card name, reason) of renders sent with the rule's plain text instead
    (``cli test`` reports them as errors)."""
    previous = getattr(_recording, "failures", None)
    _recording.failures = found = []
    try:
        yield found
    finally:
        _recording.failures = previous


_EXAMPLE_NOW = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)


def _example_source(value) -> dict:
    """A rule's source as templates see it (a dict: the rule file may name it by id from sources.yaml)."""
    return dict(value) if isinstance(value, dict) else {"id": value, "label": "Example source",
                                                         "url": "https://example.org/source"}


def load_time_problems(template, rule_doc: dict) -> list[str]:
    """Render ``template`` once with example data made from the rule (every check found, with three items):
    what went over a render limit or did what the sandbox forbids. Other errors depend on real data and are
    left to request time (where they fall back to the rule's plain text)."""
    example = {"display": "Example medication 10 mg", "ingredients": "example", "how": "given",
               "time": "2026-01-01T00:00:00Z", "until": "2026-01-02T00:00:00Z", "status": "active",
               "active": True, "route": "oral", "ref": "MedicationRequest/example", "kind": "medication",
               "code": "0", "system": "http://example.org", "class": "example", "source": "MedicationRequest"}
    found = [dict(example, ref=f"MedicationRequest/example-{i}") for i in range(3)]
    checks = {name: {"check": name, "label": (spec or {}).get("label") or name, "indicator": None, "found": found}
              for name, spec in (rule_doc.get("checks") or {}).items()}
    context = {
        "rule": {"id": rule_doc.get("id"), "title": rule_doc.get("title"), "source": _example_source(rule_doc.get("source"))},
        "indicator": rule_doc.get("indicator", "warning"),
        "draft": {"display": "Example medication 10 mg", "route": "oral", "matched_by": "code", "names": ["example"],
                  "category": "discharge"},
        "evidence": list(checks.values()), "cautions": [], "checks": checks,
        "now": _EXAMPLE_NOW, "ago": lambda value: _ago(value, _EXAMPLE_NOW),
        "from_now": lambda value: _in(value, _EXAMPLE_NOW), "possible": False,
    }
    for attempt in (1, 2):  # over the time limit twice: not a pause of a loaded machine
        try:
            template.render(context)
        except RenderTimeExceeded as exc:
            if attempt == 2:
                return [f"{exc} (rendered with example data)"]
        except (RenderLimitExceeded, SecurityError) as exc:
            return [f"{exc} (rendered with example data)"]
        except Exception:  # noqa: BLE001 - see the docstring
            return []
        else:
            return []
    return []


def _evidence_dict(e) -> dict:
    return {"check": e.check, "label": e.label, "indicator": e.indicator, "found": e.items}


def render_card(finding, *, now: datetime, patient_id: str | None, encounter_id: str | None, user_id: str | None,
                alternatives: dict, card_uuid: str | None = None, safety_lines: list[str] | None = None) -> dict:
    """The finding's card. ``safety_lines``: its :func:`alternative_lines`, when the caller has them already."""
    rule = finding.rule
    ctx = template_context(finding, now)
    try:
        summary_text = plain_text(rule.card.summary.render(ctx))
        detail = rule.card.detail.render(ctx).strip()
    except Exception as exc:  # a template error must not hide the warning: fall back to the rule's own words
        if isinstance(exc, (RenderLimitExceeded, SecurityError)):
            log.warning("card template %s refused at render (%s); sending the rule's plain text",
                        rule.card.name, exc)
        else:
            log.exception("card template %s failed; sending the fallback text", rule.card.name)
        from . import metrics  # here, not at the top: the gunicorn master imports this module, not metrics

        metrics.template_fallback(rule.id)
        if getattr(_recording, "failures", None) is not None:
            _recording.failures.append((rule.card.name, f"{type(exc).__name__}: {exc}"))
        summary_text = plain_text(f"{rule.title}: {finding.draft.display}")
        detail = "Reasons: " + markdown_escape("; ".join(e.label for e in finding.evidence)) + "."
    if getattr(finding, "possible", False) and "possible" not in summary_text.lower():
        summary_text = "Possible (unconfirmed diagnosis): " + summary_text  # clinical.md §4.0: one level lower
    if len(summary_text) > SUMMARY_MAX:
        summary_text = summary_text[: SUMMARY_MAX - 1].rstrip() + "…"
    safety = alternative_lines(finding, alternatives, now) if safety_lines is None else safety_lines
    if safety:
        detail = (detail + "\n\n" if detail else "") + "\n\n".join(safety)
    if finding.draft.matched_by == "name":
        detail += ("\n\n_Recognised from the order's name ("
                   + markdown_escape(", ".join(finding.draft.matched_names)) + "), not from a code: please check._")
    card_uuid = card_uuid or str(uuid.uuid4())
    card: dict = {
        "uuid": card_uuid,
        "summary": summary_text,
        "indicator": finding.indicator,
        "detail": detail,
        "source": _source(rule),
    }
    suggestions = [_suggestion(s, finding, card_uuid, patient_id, encounter_id, user_id, alternatives)
                   for s in rule.suggestions if s.id not in finding.excluded_suggestions]
    if suggestions:
        card["selectionBehavior"] = rule.selection_behavior
        card["suggestions"] = suggestions
    excluded_reasons = getattr(finding, "excluded_override_reasons", frozenset())  # reasons that do not fit
    reasons = [{"system": OVERRIDE_REASON_SYSTEM, "code": r["code"], "display": r["display"]}
               for r in rule.override_reasons if r["code"] not in excluded_reasons]
    if reasons:
        card["overrideReasons"] = reasons
    links = [{"label": ref["label"], "url": ref["url"], "type": "absolute"}
             for ref in [rule.source] + rule.references if ref.get("url")]
    if links:
        card["links"] = links
    if not detail:
        del card["detail"]
    return card


def drug_name(alt: dict) -> str:
    """The drug an alternative orders, as its order text starts: ``ketorolac 15 mg IV once`` -> Ketorolac."""
    words = str(alt.get("text") or "").split()
    return words[0][:1].upper() + words[0][1:] if words else "This alternative"


def _short(text, limit: int = 60) -> str:
    text = " ".join(_plain(text).split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _number_text(value) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else _plain(value)


def finding_phrase(name: str, item: dict, now: datetime) -> str:
    """The patient's own finding behind a left-out alternative, in a few words: ``latest eGFR 22 mL/min/1.73m2
    (3 days ago)``, ``Chronic kidney disease, stage 4 (severe)`` (a diagnosis names itself; `` (resolved)`` when
    not active), ``NSAID on board: ibuprofen 400 mg, given 5 h ago``, ``<procedure> (10 days ago)``."""
    ago = _ago(item.get("time"), now) or "date not recorded"
    kind = item.get("kind")
    if kind == "observation":
        value = item.get("value")
        shown = f" {_number_text(value)} {_plain(item.get('unit'))}".rstrip() if value is not None else ""
        return f"{name}{shown} ({ago})"
    if kind == "condition":
        status = _plain(item.get("status"))
        shown = _short(item["display"], 80) if item.get("display") else f"{name}: {_plain(item.get('code'))}"
        return shown + ("" if status in ("active", "recurrence", "relapse") else f" ({status or 'status unknown'})")
    if kind == "medication":
        how = _plain(item.get("how"))
        when = "" if how == "ordered now" or not item.get("time") else f" {ago}"
        return f"{name}: {_short(item.get('display'))}, {how}{when}"
    if kind == "procedure":
        return f"{_short(item.get('display') or name)} ({ago})"
    return name


ALTERNATIVE_LINE_MAX = 98  # characters of one alternative's line (with its blank line before it: 100)
# The data an alternative's contraindications read, in the fewest words (for the "could not read" line).
_SHORT_DATA = {"conditions": "diagnoses", "medicationRequests": "medications", "medicationAdministrations": "medications",
               "medicationStatements": "medications", "observations": "lab results", "procedures": "procedures"}


def _capped_line(start: str, text: str, end: str) -> str:
    """``start`` + ``text`` (escaped, shortened with "…" when needed) + ``end`` in ALTERNATIVE_LINE_MAX characters."""
    room = ALTERNATIVE_LINE_MAX - len(start) - len(end)
    line = start + markdown_escape(text) + end
    while len(line) > ALTERNATIVE_LINE_MAX and room > 1:
        room -= max(1, len(line) - ALTERNATIVE_LINE_MAX)
        line = start + markdown_escape(_short(text, room)) + end
    return line


def alternative_lines(finding, alternatives: dict, now: datetime) -> list[str]:
    """One line per alternative the card leaves out for this patient (its contraindications in
    alternatives.yaml), then one line per offered alternative naming what the service could not check; each
    at most ALTERNATIVE_LINE_MAX characters."""
    lines = []
    checks = getattr(finding.rule, "checks", {}) or {}
    for left in getattr(finding, "left_out", ()):
        e = left.evidence
        start = f"**{markdown_escape(drug_name(alternatives.get(left.alternative) or {}))} not offered:** "
        if e is None:  # its contraindications could not be checked: the data they read was not read
            lines.append(_capped_line(start, "not checked, could not read: " + ", ".join(
                dict.fromkeys(_SHORT_DATA.get(k, k) for k in left.unread)), "."))
            continue
        check = checks.get(e.check)
        name = (getattr(check, "finding", None) or e.label) if check is not None else e.label
        lines.append(_capped_line(start, finding_phrase(name, e.items[0], now) if e.items else name, "."))
    offered = dict.fromkeys(a for s in finding.rule.suggestions if s.id not in finding.excluded_suggestions
                            for a in getattr(s, "alternatives", ()))
    for name in offered:
        alt = alternatives.get(name) or {}
        if alt.get("notChecked"):
            lines.append(_capped_line(f"_{markdown_escape(drug_name(alt))}: not checked here: ",
                                      ", ".join(alt["notChecked"]), "._"))
    return lines


def alternative_notes_reserve(rule, alternatives: dict) -> int:
    """The most characters :func:`alternative_lines` adds to this rule's detail: one line (and its blank line)
    per alternative it offers that has contraindications or a notChecked list."""
    with_lines = {a for s in rule.suggestions for a in getattr(s, "alternatives", ())
                  if (alternatives.get(a) or {}).get("contraindications") or (alternatives.get(a) or {}).get("notChecked")}
    return len(with_lines) * (ALTERNATIVE_LINE_MAX + 2)


def drop_repeated_lines(card: dict, lines: list[str], seen: set[str]) -> None:
    """The lines of :func:`alternative_lines` once per response: a line an earlier card already shows (the same
    alternative left out, or not checked, for another rule's card of the same patient) is not repeated.
    ``lines``: the card's own alternative lines."""
    paragraphs = (card.get("detail") or "").split("\n\n")
    for line in lines:
        if line in seen and line in paragraphs:
            paragraphs.remove(line)
        seen.add(line)
    detail = "\n\n".join(paragraphs)
    if detail:
        card["detail"] = detail
    else:
        card.pop("detail", None)


def _source(rule) -> dict:
    source = {"label": rule.source["label"],
              "topic": {"system": RULE_TOPIC_SYSTEM, "code": rule.id, "display": rule.title}}
    if rule.source.get("url"):
        source["url"] = rule.source["url"]
    return source


def suggestion_uuid(card_uuid: str, suggestion_id: str) -> str:
    """Deterministic, so feedback's acceptedSuggestions can be traced back to the suggestion id."""
    return str(uuid.uuid5(_SUGGESTION_NS, f"{card_uuid}/{suggestion_id}"))


def _suggestion(s, finding, card_uuid, patient_id, encounter_id, user_id, alternatives) -> dict:
    actions = []
    for action in s.actions:
        if "delete" in action:
            actions.append({"type": "delete", "description": f"Remove the draft order: {finding.draft.display}",
                            "resourceId": finding.draft.ref})
        else:
            alt = alternatives[action["create"]]
            description = alt["description"]
            if alt.get("notChecked"):
                description += f" (not checked here: {', '.join(alt['notChecked'])})"
            actions.append({"type": "create", "description": description,
                            "resource": medication_request(alt, finding.draft.resource, patient_id, encounter_id,
                                                           user_id)})
    out = {"label": s.label, "uuid": suggestion_uuid(card_uuid, s.id), "actions": actions}
    if s.is_recommended is not None:
        out["isRecommended"] = s.is_recommended
    if finding.indicator != "critical":
        unrecommend_cancellation(out)
    return out


def unrecommend_cancellation(suggestion: dict) -> None:
    """Cancelling the order (a suggestion that deletes it, alone or to replace it) is recommended on critical
    cards only (issue 9 §3): on a warning or info card the clinician's order is not the service's to undo."""
    if suggestion.get("isRecommended") and any(a["type"] == "delete" for a in suggestion["actions"]):
        del suggestion["isRecommended"]


def medication_request(alt: dict, draft: dict, patient_id, encounter_id, user_id) -> dict:
    """A new draft MedicationRequest (strict FHIR R4) for an alternative from rules/alternatives.yaml."""
    med = alt["medication"]
    resource: dict = {
        "resourceType": "MedicationRequest",
        "status": "draft",
        "intent": "order",
        "medicationCodeableConcept": {
            "coding": [{"system": med["system"], "code": str(med["code"]), "display": med["display"]}],
            "text": alt["text"],
        },
        "subject": {"reference": f"Patient/{patient_id}"},
    }
    if encounter_id:
        resource["encounter"] = {"reference": f"Encounter/{encounter_id}"}
    if isinstance(user_id, str) and "/" in user_id:
        resource["requester"] = {"reference": user_id}
    reasons = [r for r in as_list(draft.get("reasonCode")) if isinstance(r, dict) and (r.get("coding") or r.get("text"))]
    if reasons:
        resource["reasonCode"] = [_clean_codeable_concept(r) for r in reasons]
    dosage: dict = {"text": alt["text"]}
    if alt.get("route"):
        dosage["route"] = {"text": alt["route"]}
    if alt.get("dose"):
        dosage["doseAndRate"] = [{"doseQuantity": {"value": alt["dose"]["value"], "unit": alt["dose"]["unit"],
                                                   "system": UCUM, "code": alt["dose"]["unit"]}}]
    resource["dosageInstruction"] = [dosage]
    return resource


def _clean_codeable_concept(cc: dict) -> dict:
    out: dict = {}
    codings = [{k: v for k, v in c.items() if k in ("system", "code", "display") and isinstance(v, str) and v}
               for c in as_list(cc.get("coding")) if isinstance(c, dict)]
    codings = [c for c in codings if c.get("code")]
    if codings:
        out["coding"] = codings
    if isinstance(cc.get("text"), str) and cc["text"]:
        out["text"] = cc["text"]
    return out


def info_card(summary: str, detail: str, *, label: str = "Migraine medication-order safety service",
              topic: str = "data-unavailable") -> dict:
    """A card of the service itself, e.g. naming a check that could not be completed."""
    return {"uuid": str(uuid.uuid4()), "summary": plain_text(summary)[:SUMMARY_MAX], "indicator": "info",
            "detail": detail, "source": {"label": label, "topic": {"system": RULE_TOPIC_SYSTEM, "code": topic,
                                                                   "display": "Service status"}}}
