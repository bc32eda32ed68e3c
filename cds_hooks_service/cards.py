"""Render findings into CDS Hooks 2.0 cards.

Card texts come from ``cards/<rule>.yaml`` (a Jinja ``summary`` and a markdown ``detail``), run in a
sandboxed Jinja environment. Everything a template prints from patient data is escaped for
markdown (and HTML, since clients such as the Sandbox render raw HTML in ``detail``). Optional
card fields are omitted rather than sent empty, as the spec requires.
"""
from __future__ import annotations

import logging
import re
import uuid
from datetime import datetime

from jinja2 import ChainableUndefined
from jinja2.sandbox import SandboxedEnvironment

from .facts import as_list, parse_time

log = logging.getLogger(__name__)
RULE_TOPIC_SYSTEM = "https://migraine-med-safety.example.org/fhir/CodeSystem/rule"
OVERRIDE_REASON_SYSTEM = "https://migraine-med-safety.example.org/fhir/CodeSystem/override-reason"
UCUM = "http://unitsofmeasure.org"
SUMMARY_MAX = 139  # the spec: "<140-character summary"

_MD_SPECIAL = re.compile(r"([\\`*_\[\]{}#|~!])")
_SUGGESTION_NS = uuid.UUID("5f0c6d1e-6c53-4b0e-9c2c-3b8f0f1d2a41")


def _plain(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "" if value is None else str(value)


def markdown_escape(value) -> str:
    """Finalizer of detail templates: data cannot add markdown, HTML or new blocks."""
    text = _plain(value)
    text = " ".join(text.split())
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MD_SPECIAL.sub(r"\\\1", text)


def plain_text(value) -> str:
    """Finalizer of summary templates: one line of plain text."""
    return " ".join(_plain(value).replace("<", "‹").replace(">", "›").split())


def _when(value) -> str:
    t = parse_time(value) if isinstance(value, str) else value
    return t.strftime("%Y-%m-%d %H:%M UTC") if isinstance(t, datetime) else "time not recorded"


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


def _environment(finalize) -> SandboxedEnvironment:
    env = SandboxedEnvironment(undefined=ChainableUndefined, autoescape=False, finalize=finalize,
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
        "draft": {"display": draft.display, "route": draft.route or "route not stated",
                  "matched_by": draft.matched_by, "names": list(draft.matched_names)},
        "evidence": [_evidence_dict(e) for e in finding.evidence],
        "cautions": [_evidence_dict(e) for e in finding.cautions],
        "checks": {e.check: _evidence_dict(e) for e in finding.evidence + finding.cautions},
        "now": now,
        "ago": lambda value: _ago(value, now),
    }


def _evidence_dict(e) -> dict:
    return {"check": e.check, "label": e.label, "indicator": e.indicator, "found": e.items}


def render_card(finding, *, now: datetime, patient_id: str | None, encounter_id: str | None, user_id: str | None,
                alternatives: dict, card_uuid: str | None = None) -> dict:
    rule = finding.rule
    ctx = template_context(finding, now)
    try:
        summary_text = plain_text(rule.card.summary.render(ctx))
        detail = rule.card.detail.render(ctx).strip()
    except Exception:  # a template error must not hide the warning: fall back to the rule's own words
        log.exception("card template %s failed; sending the fallback text", rule.card.name)
        summary_text = plain_text(f"{rule.title}: {finding.draft.display}")
        detail = "Reasons: " + markdown_escape("; ".join(e.label for e in finding.evidence)) + "."
    if len(summary_text) > SUMMARY_MAX:
        summary_text = summary_text[: SUMMARY_MAX - 1].rstrip() + "…"
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
    if rule.override_reasons:
        card["overrideReasons"] = [{"system": OVERRIDE_REASON_SYSTEM, "code": r["code"], "display": r["display"]}
                                   for r in rule.override_reasons]
    links = [{"label": ref["label"], "url": ref["url"], "type": "absolute"}
             for ref in [rule.source] + rule.references if ref.get("url")]
    if links:
        card["links"] = links
    if not detail:
        del card["detail"]
    return card


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
            actions.append({"type": "create", "description": alt["description"],
                            "resource": medication_request(alt, finding.draft.resource, patient_id, encounter_id,
                                                           user_id)})
    out = {"label": s.label, "uuid": suggestion_uuid(card_uuid, s.id), "actions": actions}
    if s.is_recommended is not None:
        out["isRecommended"] = s.is_recommended
    return out


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
