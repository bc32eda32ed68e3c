"""How long a card's detail can get: every rule's card rendered with a maximal evidence list (issue 9 §4).

A card's detail is meant to be read at a glance: at most DETAIL_MAX_CHARS characters, the patient's own
evidence first, the basis in one line, long lists behind a link. A template that lists every record entry
it is given, or a pharmacist's longer wording, passes every scenario with a short record and then floods
the clinician with the long record of a real patient. So `test` (and the test suite) renders every card of
the rulebook once per trigger and indicator with every check of the trigger (and every caution) found,
each with the most entries a card is ever given (CDS_MAX_EVIDENCE_ITEMS) and long names, and adds what the
service itself appends to a detail (``appended_reserve``): the detail must still fit.

Nothing here reads patient data or runs per request.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

from .cards import SUMMARY_MAX, alternative_notes_reserve, template_context
from .engine import Evidence

DETAIL_MAX_CHARS = 1200  # issue 9 §4: "details are short (about 1,200 characters at most)"
_NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
_LONG_DRUG = "dihydroergotamine mesylate 1 mg/mL injection solution, 1 mg IV over 3 minutes every 8 hours"
_LONG_CONDITION = "Atherosclerotic heart disease of native coronary artery with unstable angina pectoris"


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _items(check, n: int) -> list[dict]:
    """``n`` record entries of the kind ``check`` finds, with long names and every field a template reads."""
    out = []
    for i in range(n):
        t = _NOW - timedelta(hours=i + 1)
        ref = f"{check.name}/{i}"
        if check.kind == "not":
            return [{"kind": "absent", "display": check.label, "ref": ref}]
        if check.kind == "medication" or check.kind == "medicationClasses":
            how = ("given", "ordered", "taking", "ordered now", "course ended")[i % 5]
            out.append({"kind": "medication", "display": f"{_LONG_DRUG} (entry {i})", "source": "MedicationRequest",
                        "how": how, "ingredients": "nirmatrelvir, ritonavir", "class": "example",
                        "status": "active" if i % 2 else "completed", "active": bool(i % 2), "time": _iso(t),
                        "until": _iso(t + timedelta(days=14)), "ordered": _iso(t), "course_end": None,
                        "asserted": _iso(t - timedelta(days=30)), "route": ("injection", "oral", "nasal", None)[i % 4],
                        "matched_by": "code", "ref": ref})
        elif check.kind == "observation":
            out.append({"kind": "observation", "display": "Choriogonadotropin.beta subunit [Units/volume] in Serum",
                        "value": 1250.5, "unit": "mIU/mL", "result": "Positive", "time": _iso(t), "ref": ref,
                        "code": "21198-7"})
        elif check.kind == "procedure":
            out.append({"kind": "procedure", "display": "Aortocoronary artery bypass graft with saphenous vein graft",
                        "time": _iso(t), "ref": ref})
        elif check.kind == "score":
            parts = [{"label": label, "points": 3, "time": _iso(t), "ref": f"{ref}/{label}",
                      "text": f"{label} 4.1 mg/dL (2026-02-28): 3"} for label in ("Total bilirubin", "Albumin", "INR")]
            return [{"kind": "score", "display": "; ".join(p["text"] for p in parts), "total": 11, "parts": parts,
                     "missing": ["Hepatic encephalopathy (1)", "Ascites (1)"], "ref": ref, "code": check.name}]
        elif check.kind in ("orderReason", "drafted"):
            return [{"kind": "reason" if check.kind == "orderReason" else "drafted", "display": _LONG_CONDITION,
                     "code": "G43.909", "system": "http://hl7.org/fhir/sid/icd-10-cm", "route": "intravenous",
                     "ref": ref}]
        else:  # condition, and any/all of other checks (their entries are conditions, medications ...)
            out.append({"kind": "condition", "display": f"{_LONG_CONDITION} (entry {i})", "code": "I25.110",
                        "system": "http://hl7.org/fhir/sid/icd-10-cm", "status": ("active", "resolved")[i % 2],
                        "time": _iso(t - timedelta(days=30)), "possible": False, "ref": ref})
    return out


def _finding(rule, trigger, indicator: str, n: int):
    def found(name: str) -> Evidence:
        check = rule.checks[name]
        return Evidence(name, check.label, check.indicator, _items(check, n), total=n + 990)

    draft = SimpleNamespace(display=_LONG_DRUG, route="intravenous", matched_by="code", matched_names=[])
    return SimpleNamespace(rule=rule, draft=draft, indicator=indicator, possible=False,
                           evidence=[found(c) for c in trigger.when if c in rule.checks],
                           cautions=[found(c) for c in rule.cautions if c in rule.checks and c not in trigger.when])


def appended_reserve(rule, trigger, rulebook) -> int:
    """The most the service appends to this rule's detail after the template (hook_call.render): the line
    naming the order's other cards (on the lead card) or the pointer to the lead card holding the actions,
    the note of a critical card shown as a warning, "and N more" entries, and the alternatives' notes."""
    others = [r.title for r in rulebook.rules if r is not rule and r.hooks & rule.hooks
              and any(t.drafted & trigger.drafted for t in r.triggers)]
    lead = "\n\n**Also for this order** (separate cards): " + "; ".join(others) + "." if others else ""
    pointer = "\n\n_The actions for this order are on the card \u201c" + "x" * SUMMARY_MAX + "\u201d._"
    downgraded = ("\n\n_A critical finding, shown as a warning only because this response already holds 2 "
                  "critical cards._")
    more = "\n\n_And 999 more matching record entries not listed._"
    return max(len(lead), len(pointer) + len(downgraded)) + len(more) \
        + alternative_notes_reserve(rule, rulebook.alternatives)  # the alternatives' lines (alt-safety)


def longest_details(rulebook, max_items: int, rule_ids=None) -> list[dict]:
    """Per rule (those of ``rule_ids``, or all): the longest detail its template renders with a maximal
    evidence list, with the service's appended lines counted. Each: rule, trigger, indicator, template
    (characters), appended, total."""
    out = []
    for rule in rulebook.rules:
        if rule_ids and rule.id not in rule_ids:
            continue
        worst = None
        for trigger in rule.triggers:
            reserve = appended_reserve(rule, trigger, rulebook)
            for indicator in ("critical", "warning", "info"):
                finding = _finding(rule, trigger, indicator, max_items)
                try:
                    detail = rule.card.detail.render(template_context(finding, _NOW)).strip()
                except Exception:  # noqa: BLE001 - a template that cannot render is reported by `validate` and
                    continue  # the scenarios (sent with the rule's plain text); its length is not the question
                row = {"rule": rule.id, "trigger": trigger.name, "indicator": indicator, "template": len(detail),
                       "appended": reserve, "total": len(detail) + reserve}
                if worst is None or row["total"] > worst["total"]:
                    worst = row
        if worst is not None:
            out.append(worst)
    return out


def length_problems(rulebook, max_items: int, rule_ids=None, limit: int = DETAIL_MAX_CHARS) -> list[str]:
    """One line per card whose detail can exceed ``limit`` characters (``test`` reports them)."""
    return [f"card {r['rule']}.yaml: detail can reach {r['total']} characters with a long record "
            f"(trigger {r['trigger']}, {r['indicator']}: {r['template']} from the template, {r['appended']} kept for "
            f"what the service appends); at most {limit}: list fewer entries per check (count the rest), "
            "state the basis in one line, and put long lists behind a link (rules/sources.yaml)"
            for r in longest_details(rulebook, max_items, rule_ids) if r["total"] > limit]
