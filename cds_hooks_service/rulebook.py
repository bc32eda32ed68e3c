"""Load, validate and compile the rule files.

A rule directory holds ``<id>.yaml`` rule files, ``rule.schema.json``, ``alternatives.yaml``,
``valuesets/`` and ``terminology/``; card templates live in ``cards/`` beside it. Compiling turns
every value-set reference into one frozenset, so evaluating a rule is set look-ups.

Every problem found is reported as a :class:`RuleProblem` naming the file, the line where known,
the field and what is allowed; :func:`load_rulebook` raises :class:`RulebookError` carrying all of
them, so a broken edit never replaces rules that work.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import jsonschema
import yaml
from jinja2 import TemplateSyntaxError

from .cards import DETAIL_ENV, SUMMARY_ENV
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
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(m|h|d)$")
_SECONDS = {"m": 60, "h": 3600, "d": 86400}


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

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.field}: {self.message}"


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
    spec: dict  # the check's parameters as written
    valueset: frozenset[Concept] = frozenset()  # union of its value sets, when it has them
    classes: dict[str, frozenset[Concept]] = field(default_factory=dict)
    observations: list[tuple[frozenset[Concept], str, float | None]] = field(default_factory=list)
    within: float | None = None  # seconds
    children: tuple[str, ...] = ()
    needs: frozenset[str] = frozenset()
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


@dataclass
class CardTemplate:
    name: str
    summary: object  # jinja2 Template
    detail: object


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


@dataclass
class Rulebook:
    rules: list[Rule]
    terminology: Terminology
    alternatives: dict[str, dict]
    rules_dir: Path
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


def _line_of(text: str, key: str) -> int | None:
    """Best-effort line number of a top-level or nested key in a YAML text."""
    m = re.search(rf"^\s*{re.escape(key)}\s*:", text, re.MULTILINE)
    return text.count("\n", 0, m.start()) + 1 if m else None


def _field_path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(top level)"


def _schema_message(error: jsonschema.ValidationError) -> str:
    if error.validator == "enum":
        return f"{error.instance!r} is not allowed; allowed: {', '.join(map(repr, error.validator_value))}"
    if error.validator == "additionalProperties":
        allowed = sorted((error.schema.get("properties") or {}).keys())
        return f"{error.message}; allowed fields: {', '.join(allowed)}"
    return error.message


def load_yaml_file(path: Path) -> tuple[object, str]:
    text = path.read_text(encoding="utf-8")
    return yaml.safe_load(text), text


def _apply_overrides(doc: dict, override: dict) -> dict:
    """Site overrides replace top-level fields, and individual checks by name."""
    merged = dict(doc)
    for key, value in override.items():
        if key == "checks" and isinstance(value, dict):
            checks = dict(merged.get("checks") or {})
            for name, spec in value.items():
                base = dict(checks.get(name) or {})
                base.update(spec or {})
                checks[name] = base
            merged["checks"] = checks
        elif key != "id":
            merged[key] = value
    return merged


def load_rulebook(rules_dir: Path, cards_dir: Path | None = None, local_dir: Path | None = None) -> Rulebook:
    rules_dir = Path(rules_dir)
    cards_dir = Path(cards_dir) if cards_dir else rules_dir.parent / "cards"
    problems: list[RuleProblem] = []
    try:
        terminology = Terminology.load(rules_dir)
    except TerminologyError as exc:
        raise RulebookError([RuleProblem(str(rules_dir / "valuesets"), "valuesets", str(exc))]) from exc

    schema = json.loads((rules_dir / "rule.schema.json").read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    alternatives = _load_alternatives(rules_dir / "alternatives.yaml", problems)
    sources, source_problems = load_sources(rules_dir)
    problems += [RuleProblem(str(rules_dir / SOURCES_FILE), f, m) for f, m in source_problems]
    overrides = _load_overrides(local_dir, problems) if local_dir else {}

    rules: list[Rule] = []
    seen: dict[str, Path] = {}
    for path in sorted(rules_dir.glob("*.yaml")):
        if path.name in ("alternatives.yaml", SOURCES_FILE) or path.name.endswith(".tests.yaml"):
            continue
        try:
            doc, text = load_yaml_file(path)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            problems.append(RuleProblem(str(path), "(yaml)", f"not valid YAML: {getattr(exc, 'problem', exc)}",
                                        mark.line + 1 if mark else None))
            continue
        if not isinstance(doc, dict):
            problems.append(RuleProblem(str(path), "(top level)", "a rule file must be a YAML mapping"))
            continue
        if isinstance(doc.get("id"), str) and doc["id"] in overrides:
            doc = _apply_overrides(doc, overrides.pop(doc["id"])[0])
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        for error in errors:
            key = next((str(p) for p in reversed(error.absolute_path) if isinstance(p, str)), None)
            problems.append(RuleProblem(str(path), _field_path(error), _schema_message(error),
                                        _line_of(text, key) if key else None))
        if errors:
            continue
        if doc["id"] != path.stem:
            problems.append(RuleProblem(str(path), "id", f"must equal the file name ({path.stem!r})",
                                        _line_of(text, "id")))
            continue
        if doc["id"] in seen:
            problems.append(RuleProblem(str(path), "id", f"duplicate id, also in {seen[doc['id']]}"))
            continue
        seen[doc["id"]] = path
        rule = _compile_rule(doc, text, path, terminology, alternatives, cards_dir, problems, sources)
        if rule:
            rules.append(rule)
    for rule_id, (_, override_path) in overrides.items():
        problems.append(RuleProblem(str(override_path), "id", f"overrides unknown rule {rule_id!r}"))
    if problems:
        raise RulebookError(problems)
    rulebook = Rulebook(rules, terminology, alternatives, rules_dir, sources)
    from .services import PANELS_FILE, prefetch_problems  # the generated queries must fetch what the rules read
    try:
        data_problems = prefetch_problems(rulebook, rulebook.prefetch)
    except ValueError as exc:
        raise RulebookError([RuleProblem(str(rules_dir / PANELS_FILE), "(file)", str(exc))]) from exc
    if data_problems:
        raise RulebookError([RuleProblem(str(next(r.path for r in rules if r.id == rule_id)), where, message)
                             for rule_id, where, message in data_problems])
    return rulebook


def _load_alternatives(path: Path, problems: list[RuleProblem]) -> dict[str, dict]:
    if not path.exists():
        return {}
    doc, _ = load_yaml_file(path)
    if not isinstance(doc, dict):
        problems.append(RuleProblem(str(path), "(top level)", "must map alternative ids to orders"))
        return {}
    for name, alt in doc.items():
        if not isinstance(alt, dict) or not {"description", "medication", "text"} <= set(alt):
            problems.append(RuleProblem(str(path), str(name), "needs description, medication and text"))
    return doc


def _load_overrides(local_dir: Path, problems: list[RuleProblem]) -> dict[str, tuple[dict, Path]]:
    out: dict[str, tuple[dict, Path]] = {}
    for path in sorted(Path(local_dir).glob("*.yaml")):
        try:
            doc, _ = load_yaml_file(path)
        except yaml.YAMLError as exc:
            problems.append(RuleProblem(str(path), "(yaml)", f"not valid YAML: {exc}"))
            continue
        if not isinstance(doc, dict) or not isinstance(doc.get("id"), str):
            problems.append(RuleProblem(str(path), "id", "a site override names the rule it changes with id"))
            continue
        out[doc["id"]] = (doc, path)
    return out


def _compile_rule(doc: dict, text: str, path: Path, terminology: Terminology, alternatives: dict,
                  cards_dir: Path, problems: list[RuleProblem], library: Sources) -> Rule | None:
    before = len(problems)
    file = str(path)

    def problem(field_name: str, message: str, key: str | None = None) -> None:
        problems.append(RuleProblem(file, field_name, message, _line_of(text, key or field_name.split(".")[-1])))

    def valueset_union(names: list[str], where: str) -> frozenset[Concept]:
        out: set[Concept] = set()
        for name in names:
            if name not in terminology.valuesets:
                problem(where, f"unknown value set {name!r} (no rules/valuesets/{name}.json)", name)
            else:
                out |= terminology.valuesets[name]
        return frozenset(out)

    checks: dict[str, Check] = {}
    for name, spec in doc["checks"].items():
        kinds = [k for k in CHECK_KINDS if k in spec]
        if len(kinds) != 1:
            problem(f"checks.{name}", f"needs exactly one of {', '.join(CHECK_KINDS)} (found {kinds or 'none'})", name)
            continue
        kind = kinds[0]
        body = spec[kind]
        check = Check(name=name, kind=kind, label=spec.get("label") or name.replace("-", " "),
                      indicator=spec.get("indicator"), spec=body if isinstance(body, dict) else {})
        where = f"checks.{name}.{kind}"
        if kind in ("condition", "medication", "procedure", "orderReason") or (kind == "drafted" and "valueSets" in body):
            check.valueset = valueset_union(body["valueSets"], where)
        if kind == "medicationClasses":
            check.classes = {cls: valueset_union(vs, where) for cls, vs in body["classes"].items()}
        if kind == "observation":
            check.observations = [(valueset_union(o["valueSets"], where), o["op"], o.get("value"))
                                  for o in body["any"]]
            for o in body["any"]:
                if o["op"] != "positive" and "value" not in o:
                    problem(where, f"op {o['op']!r} needs a value")
        if kind == "score":
            for i, item in enumerate(body["items"]):
                at = f"{where}.items.{i}"
                if "observation" in item:
                    units = item.get("units")
                    check.score_items.append(ScoreItem(
                        item["label"], "observation", valueset_union(item["observation"], at),
                        [(b["op"], float(b["value"]), int(b["points"])) for b in item.get("bands") or []],
                        {normalise_unit(u): float(f) for u, f in units.items()} if units else None,
                        otherwise=int(item.get("otherwise", 0))))
                elif "condition" in item:
                    check.score_items.append(ScoreItem(item["label"], "condition", valueset_union(item["condition"], at),
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

    def known_checks(names, where):
        for n in names:
            if n not in checks and n not in doc["checks"]:
                problem(where, f"unknown check {n!r}; defined checks: {', '.join(sorted(doc['checks']))}", n)
        return tuple(names)

    for check in list(checks.values()):
        known_checks(check.children, f"checks.{check.name}.{check.kind}")
    _find_cycles(checks, lambda n, m: problem(f"checks.{n}", m, n))
    # A combinator needs what its children need.
    for check in checks.values():
        check.needs = _needs(check, checks, set())

    triggers = []
    for i, t in enumerate(doc["triggers"]):
        triggers.append(Trigger(
            name=t.get("name") or f"trigger-{i + 1}",
            drafted=valueset_union(t["drafted"], f"triggers.{i}.drafted"),
            route=frozenset(t["route"]) if t.get("route") else None,
            when=known_checks(t["when"], f"triggers.{i}.when"),
            valuesets=tuple(t["drafted"]),
        ))
    exceptions = known_checks(doc.get("exceptions") or [], "exceptions")
    cautions = known_checks(doc.get("cautions") or [], "cautions")
    adjust = [(known_checks(a["when"], f"adjust.{i}.when"), a["indicator"]) for i, a in enumerate(doc.get("adjust") or [])]

    suggestions = []
    for i, s in enumerate(doc.get("suggestions") or []):
        for action in s["actions"]:
            if "create" in action and action["create"] not in alternatives:
                problem(f"suggestions.{i}.actions", f"unknown alternative {action['create']!r}; "
                        f"defined in alternatives.yaml: {', '.join(sorted(alternatives))}", "create")
        suggestions.append(Suggestion(s["id"], s["label"], s.get("isRecommended"),
                                      known_checks(s.get("unless") or [], f"suggestions.{i}.unless"), s["actions"]))
    if len({s.id for s in suggestions}) != len(suggestions):
        problem("suggestions", "suggestion ids must be unique within a rule")

    cited = {}
    for where, source_id in [("source", doc["source"])] + [(f"references.{i}", r)
                                                           for i, r in enumerate(doc.get("references") or [])]:
        found = library.get(source_id)
        if found is None:
            problem(where, f"unknown source id {source_id!r}; sources are listed in rules/{SOURCES_FILE}: "
                    f"{', '.join(sorted(library.by_id)) or 'none loaded'}", where.split(".")[0])
        else:
            cited[where] = {"id": found.id, "label": found.title, "url": found.url}
    card = _load_card(cards_dir, doc.get("card") or doc["id"], problems)
    if len(problems) > before or card is None:
        return None
    needs = frozenset().union(*(c.needs for c in checks.values())) if checks else frozenset()
    return Rule(
        id=doc["id"], title=doc["title"], version=doc["version"], enabled=doc.get("enabled", True),
        mode=doc.get("mode", "active"), hooks=frozenset(doc["hooks"]), indicator=doc["indicator"],
        source=cited["source"], references=[v for k, v in cited.items() if k != "source"],
        triggers=triggers, checks=checks, exceptions=exceptions, cautions=cautions, adjust=adjust, card=card,
        selection_behavior=doc.get("selectionBehavior", "at-most-one"), suggestions=suggestions,
        override_reasons=doc.get("overrideReasons") or [], path=path, needs=needs, raw=doc,
    )


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


def _load_card(cards_dir: Path, name: str, problems: list[RuleProblem]) -> CardTemplate | None:
    path = cards_dir / f"{name}.yaml"
    if not path.exists():
        problems.append(RuleProblem(str(path), "card", f"card template {name!r} not found"))
        return None
    try:
        doc, text = load_yaml_file(path)
    except yaml.YAMLError as exc:
        problems.append(RuleProblem(str(path), "(yaml)", f"not valid YAML: {exc}"))
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("summary"), str) or not isinstance(doc.get("detail"), str):
        problems.append(RuleProblem(str(path), "(top level)", "a card template needs summary and detail strings"))
        return None
    for key in ("summary", "detail"):
        for url in URL_IN_TEXT.findall(doc[key]):
            problems.append(RuleProblem(str(path), key, f"a card template may not contain a link ({url}); cite a "
                                        f"source id in the rule's source/references (rules/{SOURCES_FILE})",
                                        _line_of(text, key)))
    compiled = {}
    for key, env in (("summary", SUMMARY_ENV), ("detail", DETAIL_ENV)):
        try:
            compiled[key] = env.from_string(doc[key])
        except TemplateSyntaxError as exc:
            problems.append(RuleProblem(str(path), key, f"template syntax error: {exc.message}",
                                        (_line_of(text, key) or 0) + (exc.lineno or 1) - 1 or None))
    if len(compiled) != 2:
        return None
    return CardTemplate(name, compiled["summary"], compiled["detail"])
