"""Load, validate and compile the rule files.

A rule directory holds ``<id>.yaml`` rule files (each with ``<id>.tests.yaml`` beside it),
``rule.schema.json``, ``shared.yaml`` (policy numbers and checks several rules use),
``alternatives.yaml``, ``valuesets/`` and ``terminology/``; card templates live in ``cards/`` beside it.
Compiling turns every value-set reference into one frozenset, every policy reference into its number
and every suggestion's ``only_if``/``unless`` into one predicate, so evaluating a rule is set look-ups.

Every problem found is reported as a :class:`RuleProblem` naming the file, line and column, the field
path, what was found and what is allowed; :func:`load_rulebook` collects all of them (files are not
given up on at the first problem) and raises :class:`RulebookError` carrying them, so a broken edit never
replaces rules that work. Warnings (an unused value set, policy or alternative) do not stop loading;
they are on :attr:`Rulebook.warnings`.
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import json
import pickle
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path

import jsonschema
import yaml
from jinja2 import TemplateSyntaxError, nodes

from . import rulefiles
from .cards import DETAIL_ENV, SUMMARY_ENV, load_time_problems
from .facts import MEDICATION_TYPES
from .sources import SOURCES_FILE, URL_IN_TEXT, Sources, load_sources

from .terminology import Concept, Terminology, TerminologyError

INDICATOR_RANK = {"info": 0, "warning": 1, "critical": 2}
CHECK_KINDS = ("condition", "medication", "medicationClasses", "observation", "procedure", "orderReason",
               "drafted", "all", "any", "not", "score")
# The patient-data keys (prefetch keys) each kind of check reads.
DATA_KEYS = {
    "condition": ("conditions",),
    "observation": ("observations",),
    "procedure": ("procedures",),
    "MedicationRequest": ("medicationRequests",),
    "MedicationAdministration": ("medicationAdministrations",),
    "MedicationStatement": ("medicationStatements",),
}
# Files of the rules directory that are not rules.
NOT_RULES = {"alternatives.yaml", "shared.yaml", SOURCES_FILE}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(m|h|d)$")
_SECONDS = {"m": 60, "h": 3600, "d": 86400}
# Policy units that make a policy usable as a time window, and the duration letter they become.
TIME_UNITS = {"minutes": "m", "hours": "h", "days": "d"}
_TIME_WORDS = {"m", "min", "mins", "minute", "h", "hr", "hrs", "hour", "d", "day", "week", "weeks", "w", "month",
               "months"}
_LABEL_POLICY = re.compile(r"\{([a-z0-9][a-z0-9-]*)\}")


def duration_seconds(text: str | None) -> float | None:
    if text is None:
        return None
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"not a duration: {text!r}")
    return float(m.group(1)) * _SECONDS[m.group(2)]


@dataclass(frozen=True)
class RuleProblem:
    file: str
    field: str
    message: str
    line: int | None = None
    column: int | None = None
    severity: str = "error"  # or "warning": reported, does not stop the rules from loading
    path: tuple | None = field(default=None, compare=False, repr=False)  # the field path as keys and indexes

    def __str__(self) -> str:
        where = self.file
        if self.line:
            where += f":{self.line}" + (f":{self.column}" if self.column else "")
        return f"{where}: {self.field}: {self.message}"

    def as_dict(self) -> dict:
        return {"file": self.file, "line": self.line, "column": self.column, "field": self.field,
                "message": self.message, "severity": self.severity}


class RulebookError(Exception):
    def __init__(self, problems: list[RuleProblem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@dataclass
class Check:
    name: str
    kind: str
    label: str
    indicator: str | None
    spec: dict  # the check's parameters, policy references replaced by their values
    valueset: frozenset[Concept] = frozenset()  # union of its value sets, when it has them
    classes: dict[str, frozenset[Concept]] = field(default_factory=dict)
    observations: list[tuple[frozenset[Concept], str, float | None]] = field(default_factory=list)
    within: float | None = None  # seconds
    children: tuple[str, ...] = ()
    needs: frozenset[str] = frozenset()
    basis: str | None = None
    shared: bool = False  # defined in shared.yaml
    finding: str | None = None  # a few words for the "X not offered: <finding> ..." line (default: the label)
    score_items: list["ScoreItem"] = field(default_factory=list)  # kind "score" only


@dataclass
class ScoreItem:
    """One item of a points score (kind "score"): the newest reading of an observation value set, scored
    by the first band it meets; or a condition, scored ``present`` when found; or a constant (``otherwise``
    alone). ``otherwise`` is what the item scores when the record lacks it (so the total is a lower bound)."""

    label: str
    kind: str  # observation | condition | constant
    valueset: frozenset[Concept] = frozenset()
    bands: list[tuple[str, float, int]] = field(default_factory=list)  # (op, value, points), first match wins
    units: dict[str, float] | None = None  # accepted unit (normalised) -> factor to the bands' unit; None: any
    present: int = 0
    otherwise: int = 0


def normalise_unit(unit: str | None) -> str:
    """'umol/L', 'µmol/L' and 'μmol/l' compare equal; UCUM brackets and spaces are ignored."""
    text = (unit or "").replace("[", "").replace("]", "").replace(" ", "").lower()
    return text.replace("µ", "u").replace("μ", "u")


@dataclass
class Trigger:
    name: str
    drafted: frozenset[Concept]
    route: frozenset[str] | None
    when: tuple[str, ...]
    valuesets: tuple[str, ...] = ()


@dataclass
class Suggestion:
    id: str
    label: str
    is_recommended: bool | None
    unless: tuple[str, ...]
    actions: list[dict]
    only_if: tuple[str, ...] = ()
    alternatives: tuple[str, ...] = ()  # the alternatives (alternatives.yaml) its create actions order

    def offered(self, found: Callable[[str], object]) -> bool:
        """Whether the card offers this suggestion: every ``only_if`` check and no ``unless`` check found
        evidence. ``found(name)`` is the engine's (cached) check evaluation."""
        return all(found(n) for n in self.only_if) and not any(found(n) for n in self.unless)


@dataclass
class CardTemplate:
    name: str
    summary: object  # jinja2 Template
    detail: object
    source: object = field(default=None, repr=False)  # the file and parsed templates, for validation only


@dataclass(frozen=True)
class Policy:
    """A local-policy number (a cut-off or a time window), defined once and referred to by name."""
    name: str
    value: float
    unit: str
    meaning: str
    basis: str
    sign_off: dict
    file: str

    @property
    def duration(self) -> str | None:
        """The policy as a rule duration (``14d``) when its unit is a time unit."""
        letter = TIME_UNITS.get(self.unit)
        return f"{_number(self.value)}{letter}" if letter else None


@dataclass
class Rule:
    id: str
    title: str
    version: str
    enabled: bool
    mode: str
    hooks: frozenset[str]
    indicator: str
    source: dict
    references: list[dict]
    triggers: list[Trigger]
    checks: dict[str, Check]
    exceptions: tuple[str, ...]
    cautions: tuple[str, ...]
    adjust: list[tuple[tuple[str, ...], str]]
    card: CardTemplate
    selection_behavior: str
    suggestions: list[Suggestion]
    override_reasons: list[dict]
    path: Path
    needs: frozenset[str] = frozenset()
    raw: dict = field(default_factory=dict, repr=False)
    basis: str | None = None
    policies: dict[str, Policy] = field(default_factory=dict)  # the policies this rule uses
    alternative_needs: frozenset[str] = frozenset()  # data keys only its alternatives' contraindications read
    card_needs: frozenset[str] = frozenset()  # data keys only the card's shape reads (cautions, adjust, ...)


@dataclass
class Rulebook:
    rules: list[Rule]
    terminology: Terminology
    alternatives: dict[str, dict]
    rules_dir: Path
    warnings: list[RuleProblem] = field(default_factory=list)
    policies: dict[str, Policy] = field(default_factory=dict)  # shared.yaml's
    sources: Sources = field(default_factory=lambda: Sources(frozenset(), {}))

    @cached_property
    def condition_concepts(self) -> frozenset[Concept]:
        """Every concept a condition check of any rule can match: other conditions need no facts."""
        return frozenset().union(*(c.valueset for r in self.rules for c in r.checks.values()
                                   if c.kind in ("condition", "score")))

    @cached_property
    def prefetch(self) -> dict[str, str]:
        """Data key -> FHIR query template, generated from these rules: the discovery prefetch templates
        and the queries run on fhirServer when a key was not prefetched (services.prefetch_templates)."""
        from .services import prefetch_templates
        return prefetch_templates(self)

    def for_hook(self, hook: str) -> list[Rule]:
        return [r for r in self.rules if r.enabled and hook in r.hooks]

    def get(self, rule_id: str) -> Rule | None:
        return next((r for r in self.rules if r.id == rule_id), None)


# --- reading files and locating fields -----------------------------------------------------------------

def load_yaml_file(path: Path) -> tuple[object, str]:
    """The one place rule files are read: (parsed document, text). Raises yaml.YAMLError, OSError."""
    return rulefiles.load_yaml_file(path)  # regular files only, size cap, no anchors/aliases (libyaml when built)


_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass
class Located:
    """A YAML file's text with the line and column of every value and key, by field path. The positions
    are worked out on first use, i.e. only when there is a problem to report (loading stays fast)."""
    file: str
    source: str = field(default="", repr=False)
    broken: set[str] = field(default_factory=set)  # top-level entries with schema errors
    _maps: tuple | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, file: str, text: str) -> "Located":
        return cls(file, text)

    @property
    def values(self) -> dict[tuple, tuple[int, int]]:
        return self._positions()[0]

    @property
    def keys(self) -> dict[tuple, tuple[int, int]]:
        return self._positions()[1]

    @property
    def styles(self) -> dict[tuple, str | None]:
        return self._positions()[2]

    @property
    def texts(self) -> dict[tuple, str]:  # scalars as written (1.0, yes), by path
        return self._positions()[3]

    def _positions(self) -> tuple:
        if self._maps is not None:
            return self._maps
        values, keys, styles, texts = {}, {}, {}, {}
        self._maps = (values, keys, styles, texts)
        try:
            root = yaml.compose(self.source, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        except yaml.YAMLError:
            return self._maps
        seen: set[int] = set()

        def walk(node, path: tuple) -> None:
            values[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
            styles[path] = getattr(node, "style", None)
            if isinstance(node, yaml.ScalarNode):
                texts[path] = node.value
            if id(node) in seen:  # an alias: already walked
                return
            seen.add(id(node))
            if isinstance(node, yaml.MappingNode):
                for key, value in node.value:
                    name = key.value if isinstance(key, yaml.ScalarNode) else str(key.start_mark)
                    keys[path + (name,)] = (key.start_mark.line + 1, key.start_mark.column + 1)
                    walk(value, path + (name,))
            elif isinstance(node, yaml.SequenceNode):
                for i, value in enumerate(node.value):
                    walk(value, path + (i,))

        if root is not None:
            walk(root, ())
        return self._maps

    def at(self, path: tuple, *, key: bool = False) -> tuple[int | None, int | None]:
        """(line, column) of the value at ``path`` (of its key with ``key``), else of its nearest parent."""
        path = tuple(str(p) if not isinstance(p, int) else p for p in path)
        if key and path in self.keys:
            return self.keys[path]
        while path:
            if path in self.values:
                return self.values[path]
            path = path[:-1]
        return self.values.get((), (None, None))

    def text(self, path: tuple) -> str | None:
        return self.texts.get(tuple(str(p) if not isinstance(p, int) else p for p in path))


class Locator:
    """Where each field of a (merged) rule document was written: the rule file, a site override or
    shared.yaml. ``routes`` map a path prefix of the merged document to (file, prefix in that file)."""

    def __init__(self, base: Located):
        self.base = base
        self.routes: list[tuple[tuple, Located, tuple]] = []

    def route(self, prefix: tuple, located: Located, target: tuple) -> None:
        self.routes.append((prefix, located, target))

    def find(self, path: tuple, *, key: bool = False) -> tuple[str, int | None, int | None]:
        best = None
        for prefix, located, target in self.routes:
            if path[: len(prefix)] == prefix and (best is None or len(prefix) > len(best[0])):
                best = (prefix, located, target)
        if best:
            prefix, located, target = best
            return (located.file, *located.at(target + tuple(path[len(prefix):]), key=key))
        return (self.base.file, *self.base.at(tuple(path), key=key))

    def text(self, path: tuple) -> str | None:
        for prefix, located, target in sorted(self.routes, key=lambda r: -len(r[0])):
            if path[: len(prefix)] == prefix:
                return located.text(target + tuple(path[len(prefix):]))
        return self.base.text(tuple(path))


class Problems:
    """Collects problems with their file, line and column."""

    def __init__(self):
        self.items: list[RuleProblem] = []

    def add(self, where: Locator | Located | str, path: tuple, message: str, *, key: bool = False,
            severity: str = "error", line: int | None = None, column: int | None = None) -> None:
        field_name = _path_text(path)
        if isinstance(where, Locator):
            file, ln, col = where.find(path, key=key)
        elif isinstance(where, Located):
            file, (ln, col) = where.file, where.at(path, key=key)
        else:
            file, ln, col = where, None, None
        if line is not None:
            ln, col = line, column
        self.items.append(RuleProblem(file, field_name, message, ln, col, severity, tuple(path)))

    @property
    def errors(self) -> list[RuleProblem]:
        return [p for p in self.items if p.severity == "error"]

    @property
    def warnings(self) -> list[RuleProblem]:
        return [p for p in self.items if p.severity == "warning"]

    def __len__(self) -> int:
        return len(self.errors)


def _path_text(path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


# --- schema errors in words ------------------------------------------------------------------------------

_TYPE_WORDS = {"string": "text", "number": "a number", "integer": "a whole number", "object": "a mapping (field: value)",
               "array": "a list", "boolean": "true or false", "null": "nothing"}


def describe_value(value) -> str:
    """A found value as a pharmacist reads it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "nothing (empty)"
    if isinstance(value, str):
        return repr(value) if len(value) <= 60 else repr(value[:57] + "...")
    if isinstance(value, (int, float)):
        return _number(value)
    text = json.dumps(value, default=str)
    kind = "a list" if isinstance(value, list) else "a mapping"
    return f"{kind} {text if len(text) <= 60 else text[:57] + '...'}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _allowed_words(schema: dict) -> str | None:
    return schema.get("x-allowed") if isinstance(schema, dict) else None


def schema_problem(error: jsonschema.ValidationError, written: str | None = None) -> tuple[tuple, str, bool]:
    """(field path, message in words, whether the line is the key's) for one schema error. ``written`` is
    the value as written in the file, shown for numbers and true/false (YAML reads 1.0 as the number 1)."""
    path = tuple(error.absolute_path)
    v, schema, inst = error.validator, error.schema, error.instance
    words = _allowed_words(schema)

    def describe(value) -> str:
        if written is not None and value is inst and not isinstance(value, (str, list, dict)):
            return f"{written} ({'true/false' if isinstance(value, bool) else 'a number' if value is not None else 'nothing'})"
        return describe_value(value)

    if v == "additionalProperties":
        allowed = sorted((schema.get("properties") or {}).keys())
        extras = [k for k in inst if k not in allowed] if isinstance(inst, dict) else []
        name = extras[0] if extras else "?"
        close = difflib.get_close_matches(str(name), allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return path + (name,), f"unknown field {name!r}{hint}; allowed fields: {', '.join(allowed)}", True
    if v == "required":
        missing = re.match(r"'([^']+)'", error.message)
        name = missing.group(1) if missing else error.message
        return path, f"missing field {name!r} (required here)", False
    if v == "propertyNames":
        bad = error.instance
        sub = schema.get("propertyNames") if isinstance(schema, dict) else None
        return path + (str(bad),), (f"found the name {describe(bad)}; allowed: "
                                   f"{_allowed_words(sub) or 'a name in the expected form'}"), True
    if v == "pattern":
        return path, f"found {describe(inst)}; allowed: {words or 'text in the documented form'}", False
    if v == "enum":
        return path, (f"found {describe(inst)}; allowed: " + ", ".join(repr(x) for x in error.validator_value)), False
    if v == "const":
        return path, f"found {describe(inst)}; allowed: {error.validator_value!r}", False
    if v == "type":
        expected = error.validator_value
        expected = [expected] if isinstance(expected, str) else expected
        return path, (f"found {describe(inst)}; allowed: " + (words or " or ".join(_TYPE_WORDS.get(t, t) for t in expected))), False
    if v in ("anyOf", "oneOf"):
        return path, f"found {describe(inst)}; allowed: {words or 'one of the documented forms'}", False
    if v == "minItems":
        return path, f"found {describe(inst)}; allowed: a list of at least {error.validator_value} entr{'y' if error.validator_value == 1 else 'ies'}", False
    if v == "uniqueItems":
        return path, f"found {describe(inst)}; allowed: a list without repeated entries", False
    if v == "minLength":
        return path, f"found {describe(inst)}; allowed: text of at least {error.validator_value} characters", False
    if v == "maxLength":
        return path, f"found text of {len(inst)} characters; allowed: at most {error.validator_value}", False
    if v in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        rel = {"minimum": "at least", "exclusiveMinimum": "more than", "maximum": "at most",
               "exclusiveMaximum": "less than"}[v]
        return path, f"found {describe(inst)}; allowed: {rel} {error.validator_value}", False
    if v in ("minProperties", "maxProperties"):
        return path, f"found {describe(inst)}; allowed: {words or ('at least' if v == 'minProperties' else 'at most') + f' {error.validator_value} field(s)'}", False
    return path, f"found {describe(inst)}; {words or error.message}", False


def _schema_errors(validator: jsonschema.Validator, doc, where, problems: Problems) -> bool:
    key = _validity_key(validator, doc)
    if key is not None and _valid.seen(key):
        return False
    errors = list(validator.iter_errors(doc))
    if not errors and key is not None:
        _valid.add(key)
    for error in errors:
        path, message, key = schema_problem(error, where.text(tuple(error.absolute_path)))
        problems.add(where, path, message, key=key)
    return bool(errors)


class _Seen:
    """A bounded set of keys, least recently used dropped first (thread-safe: reloads run on threads)."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._keys: OrderedDict[object, None] = OrderedDict()
        self._lock = threading.Lock()

    def seen(self, key) -> bool:
        with self._lock:
            if key in self._keys:
                self._keys.move_to_end(key)
                return True
            return False

    def add(self, key) -> None:
        with self._lock:
            self._keys[key] = None
            while len(self._keys) > self.max_entries:
                self._keys.popitem(last=False)


# (schema, document) pairs that validated: checking a rule file against its JSON Schema is the largest part
# of a load, and a reload or `validate` checks mostly unchanged files. Only a pass is kept (a digest, 32
# bytes each): a document with errors is checked again every time, so its problems are worded as before.
_valid = _Seen(1024)


# (card template, the rule fields its example data is made of, the render limits) that rendered within the
# limits: a reload, `validate` or `test` renders only the cards or rules that changed. Only a pass is kept: a
# template over a limit is rendered (and refused) again every time. The template objects are those kept by
# _compile_template (one per text), so holding them here adds little.
_rendered_ok = _Seen(1024)


def _load_time_problems(template, doc: dict) -> list[str]:
    """cards.load_time_problems, answered from _rendered_ok for a pass seen before."""
    from . import cards

    limits = (cards.RENDER_MAX_SECONDS, cards.RENDER_MAX_STEPS, cards.RENDER_MAX_CHARS, cards.VALUE_MAX_CHARS,
              cards.RANGE_MAX, cards.INT_MAX_BITS)
    try:
        data = pickle.dumps((limits, doc.get("id"), doc.get("title"), doc.get("source"), doc.get("indicator", "warning"),
                             doc.get("checks")), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - not kept
        return load_time_problems(template, doc)
    key = (template, hashlib.sha256(data).digest())
    if _rendered_ok.seen(key):
        return []
    found = load_time_problems(template, doc)
    if not found:
        _rendered_ok.add(key)
    return found


def _validity_key(validator: jsonschema.Validator, doc) -> bytes | None:
    """A digest of the validator's kind and schema and of the document (pickle keeps every type apart:
    1, 1.0, True and "1" differ), or None for what does not pickle or a validator that checks formats."""
    if getattr(validator, "format_checker", None) is not None:
        return None
    try:
        data = pickle.dumps((type(validator).__qualname__, validator.schema, doc), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - anything unpicklable is simply not kept
        return None
    return hashlib.sha256(data).digest()


# --- loading ---------------------------------------------------------------------------------------------

def _read(path: Path, problems: Problems) -> tuple[object, Located] | None:
    """A YAML file and its field locations, or None after noting why it cannot be read."""
    try:
        doc, text = load_yaml_file(path)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problems.add(str(path), ("(yaml)",), f"not valid YAML: {getattr(exc, 'problem', None) or exc}",
                     line=mark.line + 1 if mark else None, column=mark.column + 1 if mark else None)
        return None
    except (OSError, UnicodeDecodeError) as exc:
        problems.add(str(path), ("(file)",), f"cannot be read: {exc}")
        return None
    return doc, Located.parse(str(path), text)


def load_rulebook(rules_dir: Path, cards_dir: Path | None = None, local_dir: Path | None = None, *,
                  scenarios: bool = False) -> Rulebook:
    """The compiled rules, or RulebookError with every problem. ``scenarios``: also read every scenario file
    (what `validate` does; the service does not need them)."""
    rules_dir = Path(rules_dir)
    cards_dir = Path(cards_dir) if cards_dir else rules_dir.parent / "cards"
    if not rules_dir.is_dir():
        raise RulebookError([RuleProblem(str(rules_dir), "(folder)", "the rules folder does not exist")])
    if not cards_dir.is_dir():
        raise RulebookError([RuleProblem(str(cards_dir), "(folder)", "the card templates folder does not exist")])
    if local_dir is not None and not Path(local_dir).is_dir():
        raise RulebookError([RuleProblem(str(local_dir), "(folder)", "the site overrides folder does not exist")])
    problems = Problems()
    try:
        terminology = Terminology.load(rules_dir)
    except TerminologyError as exc:
        raise RulebookError([RuleProblem(str(rules_dir / "valuesets"), "valuesets", str(exc))]) from exc
    schema_path = rules_dir / "rule.schema.json"
    try:
        schema = json.loads(rulefiles.read_rule_text(schema_path))  # a regular file of bounded size
    except (OSError, ValueError, rulefiles.RuleFileError) as exc:
        raise RulebookError([RuleProblem(str(schema_path), "(file)", f"the rule schema cannot be read: {exc}")]) from exc
    validator = jsonschema.Draft202012Validator(schema)
    sub = lambda name: jsonschema.Draft202012Validator({"$ref": f"#/$defs/{name}", "$defs": schema["$defs"]})  # noqa: E731

    alternatives, alt_loc = _load_alternatives(rules_dir / "alternatives.yaml", sub("alternativesFile"), problems)
    shared = _load_shared(rules_dir / "shared.yaml", sub("sharedFile"), problems)
    sources, source_problems = load_sources(rules_dir)
    for field_name, message in source_problems:
        problems.add(str(rules_dir / SOURCES_FILE), (field_name,), message)
    overrides = _load_overrides(Path(local_dir), problems) if local_dir else {}

    rules: list[Rule] = []
    seen: dict[str, Path] = {}
    tests_of: dict[str, str] = {}  # scenario file name -> rule id
    used = Usage()
    for path in sorted(rules_dir.glob("*.yaml")):
        if path.name in NOT_RULES or path.name.endswith(".tests.yaml"):
            continue
        tests_of.setdefault(f"{path.stem}.tests.yaml", path.stem)
        read = _read(path, problems)
        if read is None:
            continue
        doc, located = read
        if not isinstance(doc, dict):
            problems.add(located, (), "a rule file must be a YAML mapping (field: value)")
            continue
        locator = Locator(located)
        if isinstance(doc.get("id"), str) and doc["id"] in overrides:
            override, override_loc = overrides.pop(doc["id"])
            doc = _apply_overrides(doc, override, locator, override_loc)
        before = len(problems.items)
        if _schema_errors(validator, doc, locator, problems):
            # Still look for the problems the schema cannot see (unknown value sets, checks, card references),
            # on a copy without the broken parts, so that one run reports everything.
            problems.items += _problems_beside_schema_errors(
                doc, problems.items[before:], lambda d, extra: _compile_rule(
                    d, locator, path, terminology, alternatives, shared, cards_dir, extra, Usage(), sources), path.stem)
            continue
        if doc["id"] != path.stem:
            problems.add(locator, ("id",), f"found {doc['id']!r}; allowed: the file name without .yaml ({path.stem!r})")
            continue
        if doc["id"] in seen:
            problems.add(locator, ("id",), f"duplicate id, also in {seen[doc['id']]}")
            continue
        seen[doc["id"]] = path
        if doc.get("tests"):
            tests_of[doc["tests"]] = doc["id"]
        rule = _compile_rule(doc, locator, path, terminology, alternatives, shared, cards_dir, problems, used, sources)
        if rule:
            rules.append(rule)
    for rule_id, (_, override_loc) in overrides.items():
        problems.add(override_loc, ("id",), f"overrides unknown rule {rule_id!r}; allowed: the id of a rule in "
                                            f"{rules_dir} ({', '.join(sorted(seen))})")

    _check_tests(rules_dir, tests_of, problems, read=scenarios)
    _check_alternative_resources(alternatives, alt_loc, problems)
    used.shared_checks |= _check_alternative_contraindications(alternatives, alt_loc, shared, problems)
    if not problems.errors:  # with broken rules, "unused" would be noise
        _unused(rules_dir, terminology, alternatives, alt_loc, shared, used, problems)
    if problems.errors:
        raise RulebookError(sorted(problems.errors, key=_order) + sorted(problems.warnings, key=_order))
    rulebook = Rulebook(rules, terminology, alternatives, rules_dir, sorted(problems.warnings, key=_order),
                        dict(shared.policies), sources)
    from .services import PANELS_FILE, prefetch_problems  # the generated queries must fetch what the rules read
    try:
        data_problems = prefetch_problems(rulebook, rulebook.prefetch)
    except ValueError as exc:
        raise RulebookError([RuleProblem(str(rules_dir / PANELS_FILE), "(file)", str(exc))]) from exc
    if data_problems:
        raise RulebookError([RuleProblem(str(next(r.path for r in rules if r.id == rule_id)), where, message)
                             for rule_id, where, message in data_problems])
    return rulebook


_STAND_INS = {"id": None, "title": "title", "version": "0.0.0", "hooks": ["order-sign"], "indicator": "warning",
              "source": "source", "mode": "active", "enabled": True, "selectionBehavior": "at-most-one"}


def _problems_beside_schema_errors(doc: dict, schema_problems: list[RuleProblem], compile_rule, stem: str):
    """Compile problems of a rule with schema errors: broken checks, triggers and suggestions are left out of a
    copy (and references to them are not reported again); broken top-level values get a stand-in."""
    paths = [p.path for p in schema_problems if getattr(p, "path", None) is not None]
    copy_doc = copy.deepcopy(doc)
    removed_checks: set[str] = set()
    stood_in: set[str] = set()
    drop: dict[str, set[int]] = {}
    for path in paths:
        if not path:
            continue
        top = path[0]
        if top in ("checks", "policies") and len(path) >= 2:
            if top == "checks":
                removed_checks.add(str(path[1]))
            (copy_doc.get(top) or {}).pop(path[1], None)
        elif top in ("triggers", "suggestions", "adjust") and len(path) >= 2 and isinstance(path[1], int):
            drop.setdefault(top, set()).add(path[1])
        elif top in _STAND_INS or top == "shared":
            copy_doc[top] = _STAND_INS.get(top)
            stood_in.add(top)
        else:
            copy_doc.pop(top, None)
    for key, indexes in drop.items():
        if isinstance(copy_doc.get(key), list):
            copy_doc[key] = [x for i, x in enumerate(copy_doc[key]) if i not in indexes]
    for key, value in _STAND_INS.items():
        if not isinstance(copy_doc.get(key), type(value)) and value is not None:
            copy_doc[key] = value
            stood_in.add(key)
    copy_doc["id"] = stem
    for key in ("checks", "triggers"):
        if not isinstance(copy_doc.get(key), (dict if key == "checks" else list)):
            copy_doc[key] = {} if key == "checks" else []
    extra = Problems()
    try:
        compile_rule(copy_doc, extra)
    except Exception:  # noqa: BLE001 - too broken to look further; the schema errors say why
        return []
    bad = {p.field for p in schema_problems}
    out = []
    for p in extra.items:
        if p.severity != "error" or any(p.field == b or p.field.startswith((b + ".", b + "[")) for b in bad):
            continue
        if p.path and p.path[0] in stood_in:
            continue
        if any(f"unknown check {name!r}" in p.message or f"has no check {name!r}" in p.message
               for name in removed_checks):
            continue
        out.append(p)
    return out


def _order(p: RuleProblem):
    return (p.file, p.line or 0, p.column or 0)


@dataclass
class Usage:
    valuesets: set[str] = field(default_factory=set)
    alternatives: set[str] = field(default_factory=set)
    policies: set[str] = field(default_factory=set)
    shared_checks: set[str] = field(default_factory=set)


@dataclass
class Shared:
    policies: dict[str, Policy] = field(default_factory=dict)
    checks: dict[str, dict] = field(default_factory=dict)
    located: Located | None = None


def _load_shared(path: Path, validator, problems: Problems) -> Shared:
    out = Shared()
    if not path.exists():
        return out
    read = _read(path, problems)
    if read is None:
        return out
    doc, located = read
    out.located = located
    if doc is None:
        return out
    if _schema_errors(validator, doc, located, problems):
        return out
    out.policies = _policies(doc.get("policies") or {}, located, ("policies",), problems)
    out.checks = dict(doc.get("checks") or {})
    return out


def _policies(raw: dict, where, prefix: tuple, problems: Problems) -> dict[str, Policy]:
    out = {}
    for name, p in raw.items():
        if p["unit"].strip().lower() in _TIME_WORDS:
            problems.add(where, prefix + (name, "unit"), f"found {p['unit']!r}; allowed for a time window: "
                         f"{', '.join(TIME_UNITS)} (any other unit makes the policy a cut-off)")
        sign_off = p["signOff"]
        if sign_off["status"] == "approved" and not (sign_off.get("by") and sign_off.get("on")):
            problems.add(where, prefix + (name, "signOff"), "an approved policy names who signed it off (by) and when (on)")
        out[name] = Policy(name, p["value"], p["unit"], p["meaning"], p["basis"], sign_off,
                           where.file if isinstance(where, Located) else where.base.file)
    return out


def _load_alternatives(path: Path, validator, problems: Problems) -> tuple[dict[str, dict], Located | None]:
    if not path.exists():
        return {}, None
    read = _read(path, problems)
    if read is None:
        return {}, None
    doc, located = read
    before = len(problems.items)
    if _schema_errors(validator, doc, located, problems):
        # Rules may still refer to the broken entries (no second error for that); they are not built as FHIR.
        broken = {p.field.split(".")[0] for p in problems.items[before:]}
        located.broken = broken
        return ({k: v for k, v in doc.items() if isinstance(v, dict)} if isinstance(doc, dict) else {}), located
    return doc or {}, located


def contraindications(alt) -> tuple[str, ...]:
    """The check names an alternative lists under ``contraindications`` (a broken entry: the names it has)."""
    names = alt.get("contraindications") if isinstance(alt, dict) else None
    return tuple(n for n in names if isinstance(n, str)) if isinstance(names, list) else ()


def _check_alternative_contraindications(alternatives: dict, located: Located | None, shared: Shared,
                                       problems: Problems) -> set[str]:
    """Every name in an alternative's ``contraindications`` is a check of shared.yaml. Returns the names used."""
    used: set[str] = set()
    for name, alt in alternatives.items():
        if not isinstance(alt, dict) or (located is not None and name in located.broken):
            continue
        for i, check in enumerate(contraindications(alt)):
            if check in shared.checks:
                used.add(check)
                continue
            close = difflib.get_close_matches(str(check), list(shared.checks), n=1)
            problems.add(located or "alternatives.yaml", (name, "contraindications", i),
                         f"alternative {name!r}: unknown check {check!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                         + "; an alternative's contraindications are checks of rules/shared.yaml: "
                         + (", ".join(sorted(shared.checks)) or "none defined"))
    return used


def _check_alternative_resources(alternatives: dict, located: Located | None, problems: Problems) -> None:
    """Every MedicationRequest a suggestion can create, checked against the FHIR R4 model once, here."""
    if not alternatives:
        return
    from fhir.resources.R4B.medicationrequest import MedicationRequest
    from pydantic import ValidationError

    from .cards import medication_request

    draft = {"reasonCode": [{"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "G43.909"}],
                             "text": "migraine"}]}
    for name, alt in alternatives.items():
        if located is not None and name in located.broken:
            continue
        try:
            resource = medication_request(alt, draft, "example-patient", "example-encounter",
                                          "Practitioner/example-practitioner")
            MedicationRequest.model_validate(resource)
        except ValidationError as exc:
            for err in exc.errors():
                loc = ".".join(str(p) for p in err["loc"])
                problems.add(located or "alternatives.yaml", (name,),
                             f"the MedicationRequest this alternative creates is not valid FHIR R4: {loc}: {err['msg']} "
                             f"(found {describe_value(err.get('input'))})")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            problems.add(located or "alternatives.yaml", (name,),
                         f"a MedicationRequest cannot be built from this alternative ({type(exc).__name__}: {exc})")


def _load_overrides(local_dir: Path, problems: Problems) -> dict[str, tuple[dict, Located]]:
    out: dict[str, tuple[dict, Located]] = {}
    for path in sorted(Path(local_dir).glob("*.yaml")):
        read = _read(path, problems)
        if read is None:
            continue
        doc, located = read
        if not isinstance(doc, dict) or not isinstance(doc.get("id"), str):
            problems.add(located, ("id",), "a site override names the rule it changes with id")
            continue
        out[doc["id"]] = (doc, located)
    return out


def _apply_overrides(doc: dict, override: dict, locator: Locator, located: Located) -> dict:
    """Site overrides replace top-level fields, and individual checks by name."""
    merged = dict(doc)
    for key, value in override.items():
        if key == "checks" and isinstance(value, dict):
            checks = dict(merged.get("checks") or {})
            for name, spec in value.items():
                base = dict(checks.get(name) or {})
                base.update(spec or {})
                checks[name] = base
                locator.route(("checks", name), located, ("checks", name))
            merged["checks"] = checks
        elif key != "id":
            merged[key] = value
            locator.route((key,), located, (key,))
    return merged


# --- compiling one rule ----------------------------------------------------------------------------------

def _compile_rule(doc: dict, locator: Locator, path: Path, terminology: Terminology, alternatives: dict,
                  shared: Shared, cards_dir: Path, problems: Problems, used: Usage, library: Sources) -> Rule | None:
    before = len(problems)

    def problem(where: tuple, message: str, *, key: bool = False) -> None:
        problems.add(locator, where, message, key=key)

    # Policies: the rule's own, then shared.yaml's.
    own_policies = _policies(doc.get("policies") or {}, locator, ("policies",), problems)
    for name in own_policies:
        if name in shared.policies:
            problem(("policies", name), f"policy {name!r} is already defined in shared.yaml; use that one", key=True)
    policies = {**shared.policies, **own_policies}
    rule_policies: dict[str, Policy] = {}

    def policy(ref: dict, where: tuple, *, time: bool) -> object:
        name = ref["policy"]
        p = policies.get(name)
        if p is None:
            problem(where, f"found the policy name {name!r}; allowed: a policy of this rule or of shared.yaml "
                           f"({', '.join(sorted(policies)) or 'none defined'})")
            return None
        rule_policies[name] = p
        if name in shared.policies:
            used.policies.add(name)
        if time and p.duration is None:
            problem(where, f"policy {name!r} is {_number(p.value)} {p.unit}; allowed here: a time window "
                           f"(a policy in {', '.join(TIME_UNITS)})")
            return None
        if not time and p.unit in TIME_UNITS:
            problem(where, f"policy {name!r} is a time window ({_number(p.value)} {p.unit}); allowed here: a number")
            return None
        return p.duration if time else p.value

    def label_text(text: str, where: tuple) -> str:
        def sub(m):
            p = policies.get(m.group(1))
            if p is None:
                problem(where, f"the label refers to {{{m.group(1)}}}, which is not a policy of this rule or of "
                               f"shared.yaml ({', '.join(sorted(policies)) or 'none defined'})")
                return m.group(0)
            rule_policies[p.name] = p
            if p.name in shared.policies:
                used.policies.add(p.name)
            return _number(p.value)
        return _LABEL_POLICY.sub(sub, text)

    # Checks: the rule's own, plus the shared ones it lists (and the shared checks those combine).
    specs: dict[str, tuple[dict, bool]] = {name: (spec, False) for name, spec in doc["checks"].items()}
    pending = list(doc.get("shared") or [])
    for i, name in enumerate(doc.get("shared") or []):
        if name in doc["checks"]:
            problem(("shared", i), f"check {name!r} is both defined in this rule and taken from shared.yaml; keep one")
        elif name not in shared.checks:
            problem(("shared", i), f"found {name!r}; allowed: a check of shared.yaml "
                                   f"({', '.join(sorted(shared.checks)) or 'none defined'})")
    # The contraindications of every alternative this rule's suggestions order (alternatives.yaml) are shared
    # checks too, taken automatically: one list per alternative, applied on every card that offers it.
    for i, s in enumerate(doc.get("suggestions") or []):
        for action in s.get("actions") or [] if isinstance(s, dict) else []:
            alt_name = action.get("create") if isinstance(action, dict) else None
            alt = alternatives.get(alt_name) if isinstance(alt_name, str) else None
            for name in contraindications(alt):
                if name not in shared.checks:
                    continue  # reported once, on alternatives.yaml
                if name in doc["checks"]:
                    problem(("checks", name), f"check {name!r} is defined in this rule, but it is also a contraindication "
                            f"of alternative {alt_name!r} (alternatives.yaml), which suggestion "
                            f"{s.get('id', i)!r} offers; contraindications are the checks of shared.yaml: remove this "
                            "rule's own check (the shared one is used) or rename it", key=True)
                elif name not in pending:
                    pending.append(name)
    while pending:
        name = pending.pop()
        if name in specs or name not in shared.checks:
            continue
        spec = shared.checks[name]
        specs[name] = (spec, True)
        used.shared_checks.add(name)
        if shared.located:
            locator.route(("checks", name), shared.located, ("checks", name))
        for kind in ("all", "any"):
            pending.extend(c for c in spec.get(kind) or [] if isinstance(c, str))
        if isinstance(spec.get("not"), str):
            pending.append(spec["not"])

    def valueset_union(names: list[str], where: tuple) -> frozenset[Concept]:
        out: set[Concept] = set()
        for i, name in enumerate(names):
            if name not in terminology.valuesets:
                close = difflib.get_close_matches(name, list(terminology.valuesets), n=1)
                problem(where + (i,), f"unknown value set {name!r} (no rules/valuesets/{name}.json)"
                        + (f"; did you mean {close[0]!r}?" if close else ""))
            else:
                used.valuesets.add(name)
                out |= terminology.valuesets[name]
        return frozenset(out)

    checks: dict[str, Check] = {}
    for name, (raw_spec, is_shared) in specs.items():
        spec = rulefiles.copy_document(raw_spec)  # a deep copy (rule files hold plain YAML values)
        base = ("checks", name)
        kinds = [k for k in CHECK_KINDS if k in spec]
        if len(kinds) != 1:
            problem(base, f"found {', '.join(kinds) if kinds else 'no kind'}; allowed: exactly one of "
                          f"{', '.join(CHECK_KINDS)}", key=True)
            continue
        kind = kinds[0]
        body = spec[kind]
        where = base + (kind,)
        if isinstance(body, dict):
            if isinstance(body.get("within"), dict):
                body["within"] = policy(body["within"], where + ("within",), time=True)
            for j, o in enumerate(body.get("any") or [] if kind == "observation" else []):
                if isinstance(o.get("value"), dict):
                    o["value"] = policy(o["value"], where + ("any", j, "value"), time=False)
            if kind == "medication" and "atLeast" in body:
                body["atLeast"] = _at_least(body["atLeast"], where + ("atLeast",), policy, problem)
        check = Check(name=name, kind=kind,
                      label=label_text(spec.get("label") or name.replace("-", " "), base + ("label",)),
                      indicator=spec.get("indicator"), spec=body if isinstance(body, dict) else {},
                      basis=spec.get("basis"), shared=is_shared,
                      finding=label_text(spec["finding"], base + ("finding",)) if spec.get("finding") else None)
        if kind in ("condition", "medication", "procedure", "orderReason") or (kind == "drafted" and "valueSets" in body):
            check.valueset = valueset_union(body["valueSets"], where + ("valueSets",))
        if kind == "medicationClasses":
            check.classes = {cls: valueset_union(vs, where + ("classes", cls)) for cls, vs in body["classes"].items()}
        if kind == "observation":
            check.observations = [(valueset_union(o["valueSets"], where + ("any", j, "valueSets")), o["op"], o.get("value"))
                                  for j, o in enumerate(body["any"])]
            for j, o in enumerate(body["any"]):
                if o["op"] != "positive" and "value" not in o:
                    problem(where + ("any", j), f"op {o['op']!r} needs a value to compare with")
        if kind == "score":
            for i, item in enumerate(body["items"]):
                at = where + ("items", i)
                if "observation" in item:
                    units = item.get("units")
                    check.score_items.append(ScoreItem(
                        item["label"], "observation", valueset_union(item["observation"], at + ("observation",)),
                        [(b["op"], float(b["value"]), int(b["points"])) for b in item.get("bands") or []],
                        {normalise_unit(u): float(f) for u, f in units.items()} if units else None,
                        otherwise=int(item.get("otherwise", 0))))
                elif "condition" in item:
                    check.score_items.append(ScoreItem(item["label"], "condition", valueset_union(item["condition"], at + ("condition",)),
                                                       present=int(item.get("present", 0)),
                                                       otherwise=int(item.get("otherwise", 0))))
                else:
                    check.score_items.append(ScoreItem(item["label"], "constant", otherwise=int(item.get("otherwise", 0))))
            check.observations = [(i.valueset, "score", None) for i in check.score_items if i.kind == "observation"]
            check.valueset = frozenset().union(*(i.valueset for i in check.score_items if i.kind == "condition"))
            check.needs = frozenset(DATA_KEYS["observation"] + DATA_KEYS["condition"])
        if isinstance(body, dict) and body.get("within"):
            check.within = duration_seconds(body["within"])
        if kind in ("all", "any"):
            check.children = tuple(body)
        elif kind == "not":
            check.children = (body,)
        if kind in ("condition", "observation", "procedure"):
            check.needs = frozenset(DATA_KEYS[kind])
        elif kind == "orderReason":  # a reasonReference may point at a Condition of the record
            check.needs = frozenset(DATA_KEYS["condition"])
        elif kind in ("medication", "medicationClasses"):
            sources = body.get("sources") or MEDICATION_TYPES
            check.needs = frozenset(k for s in sources for k in DATA_KEYS[s])
        checks[name] = check

    def known_checks(names, where: tuple) -> tuple[str, ...]:
        names = [names] if isinstance(names, str) else list(names)
        for i, n in enumerate(names):
            if n not in checks and n not in specs:
                close = difflib.get_close_matches(n, list(specs), n=1)
                problem(where + (i,) if len(where) and where[-1] != "not" else where,
                        f"unknown check {n!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                        + f"; defined checks: {', '.join(sorted(specs))}")
        return tuple(names)

    for check in list(checks.values()):
        known_checks(list(check.children), ("checks", check.name, check.kind))
    _find_cycles(checks, lambda n, m: problem(("checks", n), m, key=True))
    # A combinator needs what its children need.
    for check in checks.values():
        check.needs = _needs(check, checks, set())

    triggers = []
    for i, t in enumerate(doc["triggers"]):
        triggers.append(Trigger(
            name=t.get("name") or f"trigger-{i + 1}",
            drafted=valueset_union(t["drafted"], ("triggers", i, "drafted")),
            route=frozenset(t["route"]) if t.get("route") else None,
            when=known_checks(t["when"], ("triggers", i, "when")),
            valuesets=tuple(t["drafted"]),
        ))
    exceptions = known_checks(doc.get("exceptions") or [], ("exceptions",))
    cautions = known_checks(doc.get("cautions") or [], ("cautions",))
    adjust = [(known_checks(a["when"], ("adjust", i, "when")), a["indicator"]) for i, a in enumerate(doc.get("adjust") or [])]

    suggestions = []
    for i, s in enumerate(doc.get("suggestions") or []):
        for j, action in enumerate(s["actions"]):
            if "create" not in action:
                continue
            alt_name = action["create"]
            if alt_name not in alternatives:
                close = difflib.get_close_matches(alt_name, list(alternatives), n=1)
                problem(("suggestions", i, "actions", j, "create"),
                        f"unknown alternative {alt_name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                        + f"; defined in alternatives.yaml: {', '.join(sorted(alternatives))}")
                continue
            used.alternatives.add(alt_name)
            drug = _drug_word(alternatives[alt_name])
            if drug and drug.lower() not in s["label"].lower():
                problem(("suggestions", i, "label"),
                        f"the label {s['label']!r} does not name {drug!r}, the drug its create action "
                        f"{alt_name!r} orders (alternatives.yaml); allowed: a label naming the drug ordered")
        only_if = known_checks(s.get("only_if") or [], ("suggestions", i, "only_if"))
        unless = known_checks(s.get("unless") or [], ("suggestions", i, "unless"))
        for n in set(only_if) & set(unless):
            problem(("suggestions", i), f"check {n!r} is in both only_if and unless: the suggestion could never be offered")
        suggestions.append(Suggestion(s["id"], label_text(s["label"], ("suggestions", i, "label")), s.get("isRecommended"),
                                      unless, s["actions"], only_if,
                                      tuple(a["create"] for a in s["actions"] if a.get("create") in alternatives)))
    ids = [s.id for s in suggestions]
    for i, sid in enumerate(ids):
        if sid in ids[:i]:
            problem(("suggestions", i, "id"), f"found {sid!r} a second time; allowed: suggestion ids unique within a rule")

    # Override reasons: each shown only on a card whose finding it fits (its only_if/unless checks).
    override_reasons = []
    for i, r in enumerate(doc.get("overrideReasons") or []):
        if r["code"] in [o["code"] for o in override_reasons]:
            problem(("overrideReasons", i, "code"), f"found {r['code']!r} a second time; allowed: override reason "
                    "codes unique within a rule")
        only_if = known_checks(r.get("only_if") or [], ("overrideReasons", i, "only_if"))
        unless = known_checks(r.get("unless") or [], ("overrideReasons", i, "unless"))
        for n in set(only_if) & set(unless):
            problem(("overrideReasons", i), f"check {n!r} is in both only_if and unless: the reason could never be shown")
        override_reasons.append({"code": r["code"], "display": label_text(r["display"], ("overrideReasons", i, "display")),
                                 "only_if": only_if, "unless": unless})

    cited = {}
    for where, source_id in [(("source",), doc["source"])] + [(("references", i), r)
                                                               for i, r in enumerate(doc.get("references") or [])]:
        found = library.get(source_id)
        if found is None:
            problem(where, f"unknown source id {source_id!r}; sources are listed in rules/{SOURCES_FILE}: "
                    f"{', '.join(sorted(library.by_id)) or 'none loaded'}")
        else:
            cited[where] = {"id": found.id, "label": found.title, "url": found.url}
    card_name = doc.get("card") or doc["id"]
    card = _load_card(cards_dir, card_name, problems)
    in_card: set[str] = set()
    if card is not None:
        in_card = _check_card_references(card, doc["id"], checks, triggers, cautions, problems)
        for key, ast in card.source.asts.items():  # policy['name'] in the card text: that policy's number
            for name, lineno in dict(template_check_names(ast, "policy")).items():
                p = policies.get(name)
                if p is None:
                    problems.add(card.source.located, (key,), f"refers to policy[{name!r}], which is not a policy of "
                                 f"rule {doc['id']!r} or of shared.yaml ({', '.join(sorted(policies)) or 'none defined'})",
                                 line=_template_line(card.source.located, key, lineno))
                    continue
                rule_policies[name] = p
                if name in shared.policies:
                    used.policies.add(name)
    for key in ("summary", "detail") if card is not None else ():  # render limits, sandbox: tried with example data
        for message in _load_time_problems(getattr(card, key), doc):
            problems.add(card.source.located if card.source is not None else str(cards_dir / f"{card_name}.yaml"),
                         (key,), message)
    if len(problems) > before or card is None:
        return None
    referenced = in_card | {n for t in triggers for n in t.when} | set(exceptions) | set(cautions) \
        | {n for names, _ in adjust for n in names} | {n for s in suggestions for n in s.only_if + s.unless} \
        | {n for s in suggestions for a in s.alternatives for n in contraindications(alternatives[a])} \
        | {n for c in checks.values() for n in c.children}
    referenced |= {n for r in override_reasons for n in r["only_if"] + r["unless"]}
    for name in checks:
        if name not in referenced and not checks[name].shared:
            problems.add(locator, ("checks", name), f"check {name!r} is not used (no trigger, exception, caution, "
                         "adjust, suggestion, other check or card refers to it)", key=True, severity="warning")
    # The data that decides whether the rule fires (its triggers' `when` and its exceptions; needs are
    # transitive), and the data of what could make the card less safe when read as "nothing found" (an adjust
    # that lowers the level, the only_if/unless of suggestions) is required: unreadable, the call is answered 412
    # (nowhere to read it from) or with "Check not completed". The data only the rest of the card reads
    # (cautions, adjust entries that raise the level, which override reasons show) is read when available;
    # unreadable, the card still fires at its own level and names what was not checked. The data only the
    # alternatives' contraindications read leaves an alternative out ("not offered: ... could not be read").
    lowering = [n for names, level in adjust if INDICATOR_RANK[level] < INDICATOR_RANK[doc["indicator"]]
                for n in names]
    deciding = [n for n in [n for t in triggers for n in t.when] + list(exceptions) + lowering
                + [n for sg in suggestions for n in sg.only_if + sg.unless] if n in checks]
    needs = frozenset().union(*(checks[n].needs for n in deciding))
    roots = [n for n in list(doc["checks"]) + list(doc.get("shared") or []) if n in checks]
    card_needs = frozenset().union(*(checks[n].needs for n in roots)) - needs
    alternative_needs = frozenset().union(*(checks[n].needs for s in suggestions for a in s.alternatives
                                            for n in contraindications(alternatives[a]) if n in checks)) \
        - needs - card_needs
    return Rule(
        id=doc["id"], title=doc["title"], version=doc["version"], enabled=doc.get("enabled", True),
        mode=doc.get("mode", "active"), hooks=frozenset(doc["hooks"]), indicator=doc["indicator"],
        source=cited[("source",)], references=[v for k, v in cited.items() if k != ("source",)],
        triggers=triggers, checks=checks,
        exceptions=exceptions, cautions=cautions, adjust=adjust, card=card,
        selection_behavior=doc.get("selectionBehavior", "at-most-one"), suggestions=suggestions,
        override_reasons=override_reasons, path=path, needs=needs, raw=doc,
        alternative_needs=alternative_needs, card_needs=card_needs,
        basis=doc.get("basis"), policies=rule_policies,
    )


def _at_least(value, where: tuple, policy, problem) -> int | None:
    """A medication check's ``atLeast``: a whole number of at least 1, written or taken from a policy
    ({policy: name}, a number that is not a time window). None when it is not one (a problem is reported)."""
    if isinstance(value, dict):
        name = value.get("policy")
        value = policy(value, where, time=False)
        if value is None:
            return None
        if value != int(value) or value < 1:
            problem(where, f"policy {name!r} is {_number(value)}; allowed here: a whole number of at least 1")
            return None
    return int(value)  # a written number: the schema allows only a whole number of at least 1


def _drug_word(alt: dict) -> str | None:
    """The drug an alternative orders, as its order text starts (``ketorolac 15 mg IV once`` -> ketorolac)."""
    text = alt.get("text")
    return text.split()[0] if isinstance(text, str) and text.split() else None


def _needs(check: Check, checks: dict[str, Check], seen: set[str]) -> frozenset[str]:
    if check.name in seen:
        return frozenset()
    seen.add(check.name)
    out = set(check.needs)
    for child in check.children:
        if child in checks:
            out |= _needs(checks[child], checks, seen)
    return frozenset(out)


def _find_cycles(checks: dict[str, Check], report) -> None:
    state: dict[str, int] = {}

    def visit(name: str) -> bool:
        if state.get(name) == 1:
            return True
        if state.get(name) == 2 or name not in checks:
            return False
        state[name] = 1
        cyclic = any(visit(c) for c in checks[name].children)
        state[name] = 2
        return cyclic

    for name in checks:
        if visit(name):
            report(name, "checks refer to each other in a cycle")
            return


# --- card templates --------------------------------------------------------------------------------------

@dataclass
class _CardSource:
    located: Located
    texts: dict[str, str]
    asts: dict[str, nodes.Template]


def _load_card(cards_dir: Path, name: str, problems: Problems) -> CardTemplate | None:
    path = cards_dir / f"{name}.yaml"
    if not path.exists():
        problems.add(str(path), ("card",), f"card template {name!r} not found (no {path})")
        return None
    read = _read(path, problems)
    if read is None:
        return None
    doc, located = read
    if not isinstance(doc, dict) or not isinstance(doc.get("summary"), str) or not isinstance(doc.get("detail"), str):
        problems.add(located, (), "a card template needs summary and detail, each text")
        return None
    for key in ("summary", "detail"):
        for url in URL_IN_TEXT.findall(doc[key]):
            problems.add(located, (key,), f"a card template may not contain a link ({url}); cite a source id in the "
                         f"rule's source/references (rules/{SOURCES_FILE})")
    compiled, asts = {}, {}
    for key, env in (("summary", SUMMARY_ENV), ("detail", DETAIL_ENV)):
        try:
            asts[key], compiled[key] = _compile_template(env, doc[key])
        except TemplateSyntaxError as exc:
            problems.add(located, (key,), f"template syntax error: {exc.message}",
                         line=_template_line(located, key, exc.lineno or 1))
    if len(compiled) != 2:
        return None
    return CardTemplate(name, compiled["summary"], compiled["detail"], _CardSource(located, doc, asts))


@lru_cache(maxsize=256)
def _compile_template(env, source: str):
    """(parse tree, template) of a card text, compiled from the same parse. Kept per process by text: a reload,
    `validate` or `test` compiles only the texts that changed (both are read-only once made; a syntax error is
    raised again each time)."""
    ast = env.parse(source)
    return ast, env.from_string(ast)


def _template_line(located: Located, key: str, lineno: int) -> int | None:
    line, _ = located.at((key,))
    if line is None:
        return None
    block = located.styles.get((key,)) in ("|", ">")
    return line + lineno - (0 if block else 1)


def _uncounted(node: nodes.Node) -> nodes.Node:
    """The loop's own iterable, without the loop counter the card sandbox wraps around it (cards.py)."""
    return node.node if isinstance(node, nodes.Filter) and node.name == "cds_counted" else node


def template_check_names(ast: nodes.Template, var: str = "checks") -> list[tuple[str, int]]:
    """(name, template line) for every ``checks['name']``, ``checks.get('name')`` and ``checks[v]`` where v
    runs over (or is set to) a literal list of names; ``var="policy"`` finds ``policy['name']`` the same way."""
    return list(_template_names(ast, var))


@lru_cache(maxsize=512)  # by parse tree (identity): the trees of unchanged texts are shared (_compile_template)
def _template_names(ast: nodes.Template, var: str) -> tuple[tuple[str, int], ...]:
    literal_lists: dict[str, list[str]] = {}
    for node in ast.find_all((nodes.For, nodes.Assign)):
        target, value = (node.target, node.iter) if isinstance(node, nodes.For) else (node.target, node.node)
        value = _uncounted(value)
        if isinstance(target, nodes.Name) and isinstance(value, (nodes.List, nodes.Tuple)):
            names = [item.value for item in value.items if isinstance(item, nodes.Const) and isinstance(item.value, str)]
            literal_lists.setdefault(target.name, []).extend(names)
        elif isinstance(target, nodes.Name) and isinstance(value, nodes.Const) and isinstance(value.value, (list, tuple)):
            literal_lists.setdefault(target.name, []).extend(v for v in value.value if isinstance(v, str))
    # A name set to a list and then looped over: for name in given (given = ['a', 'b']).
    for node in ast.find_all(nodes.For):
        iterable = _uncounted(node.iter)
        if isinstance(node.target, nodes.Name) and isinstance(iterable, nodes.Name) and iterable.name in literal_lists:
            literal_lists.setdefault(node.target.name, []).extend(literal_lists[iterable.name])
    out = []
    for node in ast.find_all(nodes.Getitem):
        if isinstance(node.node, nodes.Name) and node.node.name == var:
            if isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
                out.append((node.arg.value, node.lineno))
            elif isinstance(node.arg, nodes.Name):
                out.extend((n, node.lineno) for n in literal_lists.get(node.arg.name, []))
    for node in ast.find_all(nodes.Call):
        f = node.node
        if isinstance(f, nodes.Getattr) and f.attr == "get" and isinstance(f.node, nodes.Name) \
                and f.node.name == var and node.args and isinstance(node.args[0], nodes.Const):
            out.append((node.args[0].value, node.lineno))
    for node in ast.find_all(nodes.Getattr):
        if isinstance(node.node, nodes.Name) and node.node.name == var and node.attr != "get":
            out.append((node.attr, node.lineno))
    return tuple(out)


def _check_card_references(card: CardTemplate, rule_id: str, checks: dict[str, Check], triggers: list[Trigger],
                           cautions: tuple[str, ...], problems: Problems) -> set[str]:
    """A card may only refer to checks the rule has and passes to the card (trigger `when` and cautions).
    Returns the check names the card refers to."""
    source: _CardSource | None = card.source
    if source is None:
        return set()
    seen_names: set[str] = set()
    visible = {n for t in triggers for n in t.when} | set(cautions)
    for key, ast in source.asts.items():
        reported = set()
        for name, lineno in template_check_names(ast):
            if name in reported:
                continue
            reported.add(name)
            seen_names.add(name)
            line = _template_line(source.located, key, lineno)
            if name not in checks:
                close = difflib.get_close_matches(name, list(checks), n=1)
                problems.add(source.located, (key,), f"refers to checks[{name!r}], but rule {rule_id!r} has no check "
                             f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                             + f"; checks the card can use: {', '.join(sorted(visible))}", line=line)
            elif name not in visible:
                problems.add(source.located, (key,), f"refers to checks[{name!r}], which rule {rule_id!r} never passes "
                             "to the card (only checks in a trigger's `when` or in `cautions` are); it would always "
                             "be empty", line=line)
    return seen_names


# --- cross-checks over the whole folder ------------------------------------------------------------------

def _check_tests(rules_dir: Path, claimed: dict[str, str], problems: Problems, *, read: bool) -> None:
    """Every scenario file belongs to a rule, and (``read``) every rule's scenario file reads."""
    from .scenarios import ScenarioError, load_scenarios

    rules = sorted(set(claimed.values()))
    for path in sorted(rules_dir.glob("*.tests.yaml")):
        rule_id = claimed.get(path.name)
        if rule_id is None:
            stem = path.name[: -len(".tests.yaml")]
            close = difflib.get_close_matches(stem, rules, n=1)
            problems.add(str(path), ("(file)",), f"scenarios for an unknown rule {stem!r}"
                         + (f" (did you mean {close[0]}.tests.yaml?)" if close else "")
                         + f"; rules: {', '.join(rules)}")
            continue
        if not read:
            continue
        try:
            _read_scenarios(path, rule_id, load_scenarios)
        except ScenarioError as exc:
            problems.add(str(path), ("scenarios",), str(exc).replace(f"{path}: ", ""))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            problems.add(str(path), ("(yaml)",), f"not valid YAML: {getattr(exc, 'problem', None) or exc}",
                         line=mark.line + 1 if mark else None)


# (scenario file text, rule id) that read without a problem: `validate` reads every scenario file only to
# report its problems, and a text that read before reads the same (a broken one is read again each time).
_scenarios_ok = _Seen(256)


def _read_scenarios(path: Path, rule_id: str, load_scenarios) -> None:
    """Raise what load_scenarios(path, rule_id) raises; skipped for a text that read before for this rule."""
    text = rulefiles.read_rule_text(path)
    key = (hashlib.sha256(text.encode("utf-8")).digest(), rule_id)
    if _scenarios_ok.seen(key):
        return
    load_scenarios(path, rule_id)
    if rulefiles.read_rule_text(path) == text:  # not edited while it was read: that text reads
        _scenarios_ok.add(key)


def _unused(rules_dir: Path, terminology: Terminology, alternatives: dict, alt_loc: Located | None, shared: Shared,
            used: Usage, problems: Problems) -> None:
    for name in sorted(set(terminology.valuesets) - used.valuesets):
        problems.add(str(rules_dir / "valuesets" / f"{name}.json"), ("id",),
                     f"value set {name!r} is not used by any rule", severity="warning")
    for name in sorted(set(alternatives) - used.alternatives):
        problems.add(alt_loc or "alternatives.yaml", (name,), f"alternative {name!r} is not offered by any suggestion",
                     key=True, severity="warning")
    if shared.located:
        for name in sorted(set(shared.policies) - used.policies):
            problems.add(shared.located, ("policies", name), f"policy {name!r} is not used by any rule", key=True,
                         severity="warning")
        for name in sorted(set(shared.checks) - used.shared_checks):
            problems.add(shared.located, ("checks", name), f"shared check {name!r} is not used by any rule", key=True,
                         severity="warning")
