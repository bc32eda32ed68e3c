"""Card details stay short with a long record (issue 9 §4: about 1,200 characters at most).

Every shipped card is rendered with a maximal evidence list (every check of a trigger found, each with
CDS_MAX_EVIDENCE_ITEMS entries and long names) plus what the service appends to a detail; a template that
lists everything it is given fails here (and `test` names it)."""
from __future__ import annotations

import json

import pytest

from cds_hooks_service.card_length import DETAIL_MAX_CHARS, length_problems, longest_details
from cds_hooks_service.cli import main
from cds_hooks_service.limits import Limits
from cds_hooks_service.rulebook import load_rulebook

from .helpers import edit, shipped_rulebook

RULEBOOK = shipped_rulebook()  # the same load as the rulebook fixture's (one per process)


@pytest.mark.parametrize("rule_id", sorted(r.id for r in RULEBOOK.rules))
def test_every_shipped_card_fits_with_a_maximal_evidence_list(rule_id):
    (row,) = longest_details(RULEBOOK, Limits().max_evidence_items, [rule_id])
    assert row["total"] <= DETAIL_MAX_CHARS, row


def test_the_dhe_cards_fit_whatever_the_evidence_cap():
    """The templates list a fixed number of entries and count the rest, so a site raising
    CDS_MAX_EVIDENCE_ITEMS does not lengthen the detail."""
    dhe = [r.id for r in RULEBOOK.rules if r.id.startswith("dhe-")]
    assert len(dhe) == 4
    for cap in (1, 10, 25):
        assert length_problems(RULEBOOK, cap, dhe) == []


def test_the_service_appendix_is_counted():
    """The check keeps room for the lines the service appends (the lead card's "Also for this order", the
    pointer to the lead card with the lead's summary, the downgraded-critical note, "and N more", and ~100
    characters for the notes of alternatives not offered)."""
    (row,) = longest_details(RULEBOOK, 10, ["dhe-triptan-ergot-24h"])
    assert row["appended"] >= 100 + len("_A critical finding, shown as a warning only because this response "
                                        "already holds 2 critical cards._")
    assert row["total"] == row["template"] + row["appended"]


def test_a_longer_template_fails_test(rules_copy, capsys):
    """A pharmacist's edit that lists every entry again fails `test`, which names the card and the characters it
    reaches, and fails the rule's worst-case scenarios (`max_detail: 1200`)."""
    card = rules_copy.parent / "cards" / "dhe-triptan-ergot-24h.yaml"
    edit(card, "{% for item in recent.found[:2] %}", "{% for item in recent.found %}")
    edit(card, "item.display|truncate(25)", "item.display")
    rulebook = load_rulebook(rules_copy, rules_copy.parent / "cards", None)
    (problem,) = length_problems(rulebook, 10, ["dhe-triptan-ergot-24h"])
    assert problem.startswith("card dhe-triptan-ergot-24h.yaml: detail can reach ") and "at most 1200" in problem

    assert main(["test", "--rules", str(rules_copy), "--rule", "dhe-triptan-ergot-24h", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["problems"] == [problem] and doc["warnings"] == []
    too_long = [r["scenario"] for r in doc["results"] if not r["passed"]]
    assert too_long and all(name.startswith("§4 worst case") for name in too_long)
    assert all("characters (at most 1200)" in r["message"] for r in doc["results"] if not r["passed"])
    main(["test", "--rules", str(rules_copy), "--rule", "dhe-triptan-ergot-24h"])
    assert f"error: {problem}" in capsys.readouterr().err


def test_the_shipped_cards_pass(capsys):
    assert main(["test", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["problems"] == [] and doc["warnings"] == [] and doc["failed"] == 0
