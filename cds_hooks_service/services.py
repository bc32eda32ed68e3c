"""The CDS Services this server offers (discovery) and the FHIR queries behind their prefetch keys.

One service per hook, with distinct ids: the CDS Hooks Sandbox keys services by id, so two
entries sharing an id would overwrite each other there. Prefetch templates use only the query
forms CDS Hooks 2.0 allows (type-level search by patient reference, token equality with OR
lists, ``_sort`` and ``_count``) and first-level context tokens.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import yaml

from .facts import IGNORED_MEDICATION_STATUSES
from .rulefiles import load_yaml_text, read_rule_text
from .terminology import Concept, concept

# --- Prefetch templates and FHIR-fallback queries, generated from the loaded rules ---------------------
# The data keys are the engine's (rulebook.DATA_KEYS): which keys a rule needs follows from the kinds
# of its checks (and a medication check's `sources`). Per key the query asks for one resource type of
# the patient, newest first where the type has a date search parameter, without the statuses the
# engine never reads. Only observations are filtered by code: their value sets are short LOINC lists
# (about 35 codes), whereas condition, procedure and medication value sets run to hundreds of codes and
# records carry product codes that only roll up to a value set's ingredients here, so a code filter
# there would lose matches.
#
# Why codes and not `category=laboratory` for observations: blood pressure is `vital-signs`, a
# point-of-care urine hCG is often filed without a category or as `exam`/`survey`, and a category
# query returns every lab of a long record, so the few results a rule needs could fall outside the
# pages read. An explicit code list (OR-joined tokens, allowed by CDS Hooks 2.0) asks for exactly what
# the rules read; `validate` refuses a rule set whose code list would make the query longer than
# MAX_QUERY_CHARS.
#
# Long records (patient_data.py follows next links up to a page/entry/byte cap and the time budget): every
# type with a date search parameter is asked for newest first, so that a record cut short loses its oldest
# part, the part the windowed rules (given within 24 h, inhibitors within 14 days, results within 90 days)
# do not read. Medications sort by the R4 search parameter of their type: MedicationRequest `authoredon`,
# MedicationAdministration `effective-time`, MedicationStatement `effective`. They are NOT filtered by date:
# CDS Hooks 2.0 templates have no date tokens (`{{today() - 14 days}}` is a 3.0 ballot feature), the fallback
# query must equal the template, and an active home medication ordered or listed years ago (ritonavir, a PRN
# triptan) is read by rules without a window; an order's authoredOn also says nothing about a course's end.
# Conditions have no useful date order for these rules (a contraindication diagnosed 10 years ago counts)
# and no filter: `clinical-status` is absent on many encounter diagnoses, which the engine reads.
#
# Page size: conditions and medications are not filtered by code, so a long record of them is read page by page;
# each page costs a round trip and the server's per-request work, so they ask for 1000 (a server that allows
# fewer clamps `_count` to its maximum, which is harmless). Measured on the test FHIR server (sekmet, loopback,
# 2 busy cores): 5,000 conditions in 50 pages of 100: 4.9 s, 10 of 500: 3.5 s, 5 of 1000: 2.9 s.
DATA_QUERIES = {  # key -> (resource type, newest-first sort or None, page size)
    "conditions": ("Condition", None, 1000),
    "medicationRequests": ("MedicationRequest", "-authoredon", 1000),
    "medicationAdministrations": ("MedicationAdministration", "-effective-time", 1000),
    "medicationStatements": ("MedicationStatement", "-effective", 1000),
    "observations": ("Observation", "-date", 100),
    "procedures": ("Procedure", "-date", 100),
}
# FHIR R4 status codes (required bindings) of the filtered types, and those the engine never reads
# (facts.py): cancelled/entered-in-error/draft... orders, not-done procedures, cancelled results.
R4_STATUSES = {
    "MedicationRequest": ("active", "on-hold", "cancelled", "completed", "entered-in-error", "stopped", "draft",
                          "unknown"),
    "MedicationAdministration": ("in-progress", "not-done", "on-hold", "completed", "entered-in-error", "stopped",
                                 "unknown"),
    "MedicationStatement": ("active", "completed", "entered-in-error", "intended", "stopped", "on-hold", "unknown",
                            "not-taken"),
    "Observation": ("registered", "preliminary", "final", "amended", "corrected", "cancelled", "entered-in-error",
                    "unknown"),
    "Procedure": ("preparation", "in-progress", "not-done", "on-hold", "stopped", "completed", "entered-in-error",
                  "unknown"),
}
UNREAD_STATUSES = {
    "MedicationRequest": IGNORED_MEDICATION_STATUSES,
    "MedicationAdministration": IGNORED_MEDICATION_STATUSES,
    "MedicationStatement": IGNORED_MEDICATION_STATUSES,
    "Observation": frozenset({"cancelled", "entered-in-error", "unknown"}),
    "Procedure": frozenset({"entered-in-error", "not-done", "preparation"}),
}
MAX_QUERY_CHARS = 2000  # a rendered query (with a 64-character patient id) must fit in a conservative URL
PANELS_FILE = Path("terminology") / "observation-panels.yaml"
_TOKEN_SPECIAL = re.compile(r"([\\,$|])")


def read_statuses(resource_type: str) -> tuple[str, ...]:
    """The statuses of a resource type that the engine reads (the query's status filter)."""
    return tuple(s for s in R4_STATUSES[resource_type] if s not in UNREAD_STATUSES[resource_type])


def _escape(text: str) -> str:
    return _TOKEN_SPECIAL.sub(lambda m: "\\" + m.group(1), text)


def _token(system: str, code: str) -> str:
    """A FHIR search token system|code, with the search-syntax specials (\\ , $ |) escaped."""
    return f"{_escape(system)}|{_escape(code)}"


def observation_panels(rules_dir: Path) -> dict[Concept, frozenset[Concept]]:
    """Panel concept -> the component concepts it carries (rules/terminology/observation-panels.yaml)."""
    path = Path(rules_dir) / PANELS_FILE
    if not path.exists():
        return {}
    try:
        doc = load_yaml_text(read_rule_text(path)) or {}  # regular file, size cap, no anchors/aliases
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML ({getattr(exc, 'problem', exc)})") from exc
    if not isinstance(doc, dict):
        raise ValueError("must map '<system>|<panel code>' to a list of component codes")
    out: dict[Concept, frozenset[Concept]] = {}
    for panel, components in doc.items():
        system, _, code = str(panel).rpartition("|")
        key = concept(system, code)
        if not key or not system or not isinstance(components, list):
            raise ValueError(f"{panel!r}: write '<system>|<panel code>': [component codes]")
        out[key] = frozenset(c for c in (concept(system, str(x)) for x in components) if c)
    return out


def _observation_valuesets(rule) -> list[str]:
    names = []
    for check in rule.checks.values():
        if check.kind in ("observation", "score"):
            for item in check.spec.get("any") or check.spec.get("items") or []:
                names += [n for n in item.get("valueSets") or item.get("observation") or [] if n not in names]
    return names


def _observation_concepts(rulebook) -> set[Concept]:
    wanted: set[Concept] = set()
    for rule in _live_rules(rulebook):
        for name in _observation_valuesets(rule):
            wanted |= rulebook.terminology.valuesets.get(name, frozenset())
    panels = observation_panels(rulebook.rules_dir)
    wanted |= {panel for panel, components in panels.items() if components & wanted}
    return wanted


def _live_rules(rulebook) -> list:
    return [r for r in rulebook.rules if r.enabled]


def prefetch_templates(rulebook) -> dict[str, str]:
    """Data key -> FHIR query template (prefetch template, and the fallback query) for the loaded rules."""
    keys = set().union(*(r.needs | r.card_needs | r.alternative_needs for r in _live_rules(rulebook))) \
        if rulebook.rules else set()
    out: dict[str, str] = {}
    for key in sorted(keys):
        if key not in DATA_QUERIES:  # a data key without a query: prefetch_problems names it, validate fails
            continue
        rtype, sort, count = DATA_QUERIES[key]
        params = ["patient={{context.patientId}}"]
        if rtype in R4_STATUSES:
            params.append("status=" + ",".join(read_statuses(rtype)))
        if key == "observations":
            codes = sorted(_observation_concepts(rulebook))
            if codes:
                params.append("code=" + ",".join(_token(system, code) for system, code in codes))
        if sort:
            params.append(f"_sort={sort}")
        params.append(f"_count={count}")
        out[key] = f"{rtype}?" + "&".join(params)
    return out


def _split_unescaped(text: str, sep: str) -> list[str]:
    parts, cur, i = [], "", 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            cur += text[i:i + 2]
            i += 2
            continue
        if text[i] == sep:
            parts.append(cur)
            cur = ""
        else:
            cur += text[i]
        i += 1
    return parts + [cur]


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: m.group(1), text)


def parse_template(template: str) -> tuple[str, dict[str, str]]:
    """(resource type, {parameter: value}) of a search template (read templates: no parameters)."""
    path, _, query = template.partition("?")
    params = {}
    for part in query.split("&") if query else []:
        name, _, value = part.partition("=")
        params[name] = value
    return path, params


def fetched_concepts(template: str) -> set[Concept] | None:
    """The codes a template's `code` parameter asks for; None when it does not filter by code."""
    _, params = parse_template(template)
    if "code" not in params:
        return None
    out = set()
    for token in _split_unescaped(params["code"], ","):
        pieces = _split_unescaped(token, "|")
        if len(pieces) == 2:
            c = concept(_unescape(pieces[0]), _unescape(pieces[1]))
            if c:
                out.add(c)
    return out


def prefetch_problems(rulebook, templates: dict[str, str]) -> list[tuple[str, str, str]]:
    """Why a value set the rules use would not be fetched by ``templates``: (rule id, field, message)."""
    problems: list[tuple[str, str, str]] = []
    panels = observation_panels(rulebook.rules_dir)
    observations_asked: list = []  # fetched_concepts of the observations template, worked out once
    for rule in _live_rules(rulebook):
        for check in rule.checks.values():
            for key in sorted(check.needs):
                template = templates.get(key)
                if template is None:
                    problems.append((rule.id, f"checks.{check.name}", f"needs {key}, which no prefetch template asks for"))
                    continue
                rtype, params = parse_template(template)
                if key in DATA_QUERIES and rtype != DATA_QUERIES[key][0]:
                    problems.append((rule.id, f"checks.{check.name}", f"{key} must be a {DATA_QUERIES[key][0]} search"))
                if "status" in params and rtype in R4_STATUSES:
                    missing = set(read_statuses(rtype)) - set(params["status"].split(","))
                    if missing:
                        problems.append((rule.id, f"checks.{check.name}",
                                         f"the {key} query leaves out statuses the rule reads: {', '.join(sorted(missing))}"))
                length = len(render_query(template, {"patientId": "x" * 64}) or template)
                if length > MAX_QUERY_CHARS:
                    problems.append((rule.id, f"checks.{check.name}",
                                     f"the {key} query would be {length} characters (limit {MAX_QUERY_CHARS}): "
                                     "use fewer codes in the value sets it reads"))
            if check.kind != "observation" or "observations" not in templates:
                continue
            if not observations_asked:
                observations_asked.append(fetched_concepts(templates["observations"]))
            asked = observations_asked[0]
            if asked is None:
                continue
            reachable = asked | {c for panel in asked for c in panels.get(panel, ())}
            for i, item in enumerate(check.spec.get("any") or []):
                for name in item.get("valueSets") or []:
                    missed = sorted(rulebook.terminology.valuesets.get(name, frozenset()) - reachable)
                    if missed:
                        shown = ", ".join(code for _, code in missed[:5]) + (" ..." if len(missed) > 5 else "")
                        problems.append((rule.id, f"checks.{check.name}.observation.any.{i}",
                                         f"value set {name!r}: {len(missed)} code(s) the observations query would "
                                         f"not fetch ({shown})"))
    return problems


@dataclass(frozen=True)
class CdsService:
    id: str
    hook: str
    title: str
    description: str

    def discovery(self, prefetch: dict[str, str]) -> dict:
        """The discovery entry; ``prefetch`` is the loaded rules' templates (Rulebook.prefetch)."""
        return {"hook": self.hook, "id": self.id, "title": self.title, "description": self.description,
                "prefetch": dict(prefetch),
                "usageRequirements": "Needs the patient's conditions, medications (ordered, given, taken), "
                                     "blood pressure, eGFR and pregnancy tests and procedures: prefetched, or "
                                     "readable on fhirServer. Without them the service answers 412."}


_DESCRIPTION = ("Warns about unsafe medication orders in headache care: opioids for migraine (AHS 2025), "
                "dihydroergotamine with triptans or ergots within 24 h, strong CYP3A4 inhibitors, vasopressors "
                "or contraindicated conditions (FDA labeling), and ketamine for non-refractory migraine "
                "(VA/DoD 2023).")
SERVICES = {
    s.id: s for s in (
        CdsService("migraine-med-safety-select", "order-select", "Migraine medication safety (order select)",
                   _DESCRIPTION + " Judges the selected orders."),
        CdsService("migraine-med-safety-sign", "order-sign", "Migraine medication safety (order sign)",
                   _DESCRIPTION + " Judges every order about to be signed."),
    )
}

SERVICE_FOR_HOOK = {s.hook: s for s in SERVICES.values()}


def render_query(template: str, context: dict) -> str | None:
    """Fill a prefetch template's tokens from the hook context; None if a token has no value."""
    out = template
    for token, value in (("{{context.patientId}}", context.get("patientId")),
                         ("{{context.userId}}", context.get("userId")),
                         ("{{context.encounterId}}", context.get("encounterId"))):
        if token in out:
            if not isinstance(value, str) or not value:
                return None
            out = out.replace(token, quote(value, safe="/"))
    return out
