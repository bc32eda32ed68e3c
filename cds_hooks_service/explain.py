"""Why each rule fired or not for one hook request: `python -m cds_hooks_service explain REQUEST.json`.

For every drafted order it shows how the drug was recognised (code -> ingredient -> value set), and for
every rule: not triggered (and why), or each check with what it found or missed, the exception that
suppressed the card, the override that hid it, or the card it was merged into (one card for a conflict
between two drafted orders). The same report is logged for live calls when
CDS_DEBUG_TRACE is on; it holds clinical codes and resource ids, never patient names.
"""
from __future__ import annotations

from .facts import MedicationFact, codeable_concepts
from .hook_call import EXCEPTED, MERGED, NOT_FIRED, SHADOW, SUPPRESSED, HookResult
from .rulebook import Rulebook
from .terminology import RXNORM


def drug_chain(draft: MedicationFact, rulebook: Rulebook) -> list[str]:
    """How each tracked ingredient of a draft was found: coded directly, via a product code, or by name."""
    terminology = rulebook.terminology
    coded, _ = codeable_concepts(draft.resource.get("medicationCodeableConcept"))
    lines = []
    for system, code in sorted(draft.concepts):
        if system != RXNORM or code not in terminology.ingredient_names:
            continue
        name = terminology.ingredient_names[code]
        if (system, code) in coded:
            how = "coded as the ingredient"
        elif draft.matched_by == "name":
            how = f"named in the order text ({', '.join(draft.matched_names)})"
        else:
            via = [c for s, c in coded if s == RXNORM and c != code]
            how = f"rolled up from product code {', '.join(via)}" if via else "from the referenced Medication"
        sets = [vs for vs, members in terminology.valuesets.items() if (system, code) in members]
        lines.append(f"RxNorm {code} {name}: {how}; in value sets {', '.join(sets) or '(none)'}")
    return lines


def report(result: HookResult, rulebook: Rulebook, hook: str) -> dict:
    drafts = {}
    rules = []
    for f in result.findings:
        drafts.setdefault(f.draft.ref, {"ref": f.draft.ref, "display": f.draft.display, "route": f.draft.route,
                                        "recognised_by": f.draft.matched_by, "ingredients": drug_chain(f.draft, rulebook)})
        if f.outcome in (EXCEPTED, SUPPRESSED):
            outcome = "suppressed: " + f.reason
        elif f.outcome == MERGED:  # no card of its own: the other drafted order's card stands for it
            outcome = f"{f.reason} (one card for a conflict between two drafted orders) [{f.indicator}]"
        elif f.outcome != NOT_FIRED:
            outcome = "FIRED" + (" (shadow: counted, not shown)" if f.outcome == SHADOW else "") + f" [{f.indicator}]"
        elif f.trace:
            outcome = "not fired: no check of the trigger found evidence"
        else:
            names = ", ".join(vs for t in f.rule.triggers for vs in t.valuesets)
            outcome = f"not triggered: the drafted drug is in none of {names}"
        rules.append({"rule": f.rule.id, "draft": f.draft.ref, "outcome": outcome, "checks": [
            {"check": t["check"], "label": t["label"], "matched": t["matched"], "why": t["why"],
             "found": [_item(i) for i in t["evidence"]]} for t in f.trace]})
    return {"hook": hook, "drafts": list(drafts.values()), "rules": rules,
            "data": {"unavailable": result.data.unavailable if result.data else {},
                     "read_from_fhir_server": result.data.fetched if result.data else []},
            "cards": [c["summary"] for c in result.response["cards"]]}


def _item(item: dict) -> str:
    parts = [str(item.get("display"))]
    for key in ("code", "value", "unit", "result", "how", "time", "status"):
        if item.get(key) not in (None, ""):
            parts.append(f"{key}={item[key]}")
    return " ".join(parts)


def format_text(rep: dict) -> str:
    out = [f"hook: {rep['hook']}"]
    for d in rep["drafts"]:
        out.append(f"\ndraft {d['ref']}: {d['display']} (route: {d['route'] or 'unknown'}; recognised by {d['recognised_by']})")
        out += [f"  {line}" for line in d["ingredients"]] or ["  no tracked ingredient"]
    for r in rep["rules"]:
        out.append(f"\n{r['rule']} on {r['draft']}: {r['outcome']}")
        for c in r["checks"]:
            mark = "+" if c["matched"] else "-"
            out.append(f"  {mark} {c['check']} ({c['label']}): {c['why']}")
            out += [f"      {i}" for i in c["found"]]
    if rep["data"]["unavailable"]:
        out.append("\ndata not available: " + "; ".join(f"{k}: {v}" for k, v in rep["data"]["unavailable"].items()))
    out.append("\ncards: " + ("; ".join(rep["cards"]) if rep["cards"] else "none"))
    return "\n".join(out)
