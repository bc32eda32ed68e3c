"""The pharmacists' commands: validate, test, explain, replay, stats."""
from __future__ import annotations

import json
import shutil

import pytest

from cds_hooks_service.cli import main
from tests.conftest import REPO, SCENARIO_NOW

EXAMPLE = REPO / "fhir_examples/opioid-in-migraine/text-only-tall-man-name.order-sign.json"


@pytest.fixture
def rules_copy(tmp_path):
    shutil.copytree(REPO / "rules", tmp_path / "rules")
    shutil.copytree(REPO / "cards", tmp_path / "cards")
    return tmp_path / "rules"


def edit(path, old, new):
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_validate_accepts_the_shipped_rules(capsys):
    assert main(["validate", str(REPO / "rules")]) == 0
    out = capsys.readouterr().out
    assert "6 rules valid" in out and "opioid-in-migraine" in out


@pytest.mark.parametrize("change, expected", [
    (("indicator: warning", "indicator: severe"), ["opioid-in-migraine.yaml:", "indicator", "'severe' is not allowed",
                                                   "'critical'"]),
    (("valueSets: [cond-migraine, cond-headache], status: active}", "valueSets: [cond-migrane], status: active}"),
     ["unknown value set 'cond-migrane'"]),
    (("when: [headache-diagnosis, headache-order-reason]", "when: [headache-diagnosis, no-such-check]"),
     ["unknown check 'no-such-check'"]),
    (("title: Opioid ordered", "titel: Opioid ordered"), ["titel", "allowed fields"]),
    (("id: opioid-in-migraine", "id: opioid-in-migraine-2"), ["must equal the file name"]),
    (("actions: [{create: dexamethasone-iv}]", "actions: [{create: dexamethasone-po}]"),
     ["unknown alternative 'dexamethasone-po'"]),
])
def test_validate_names_file_line_field_and_what_is_allowed(rules_copy, capsys, change, expected):
    edit(rules_copy / "opioid-in-migraine.yaml", *change)
    assert main(["validate", str(rules_copy)]) == 1
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, err
    assert "were NOT accepted" in err


def test_validate_reports_yaml_and_template_errors_with_lines(rules_copy, capsys):
    (rules_copy / "opioid-in-migraine.yaml").write_text("id: opioid-in-migraine\ntitle: [unclosed\n")
    edit(rules_copy.parent / "cards/dhe-vasopressor.yaml", "detail: |", "detail: |\n  {% if %}")
    assert main(["validate", str(rules_copy)]) == 1
    err = capsys.readouterr().err
    assert "opioid-in-migraine.yaml:" in err and "not valid YAML" in err
    assert "dhe-vasopressor.yaml" in err and "template syntax error" in err


def test_validate_checks_site_overrides(rules_copy, tmp_path, capsys):
    local = tmp_path / "local"
    local.mkdir()
    (local / "x.yaml").write_text("id: no-such-rule\nenabled: false\n")
    (local / "y.yaml").write_text("id: dhe-vasopressor\nindicator: loud\n")
    assert main(["validate", str(rules_copy), "--local", str(local)]) == 1
    err = capsys.readouterr().err
    assert "overrides unknown rule 'no-such-rule'" in err and "'loud' is not allowed" in err


def test_test_command_passes_and_fails(rules_copy, capsys):
    assert main(["test", str(rules_copy), "--rule", "opioid-in-migraine"]) == 0
    assert "0 failed" in capsys.readouterr().out
    edit(rules_copy / "opioid-in-migraine.tests.yaml", "expect: no-fire\n    drafts:\n      - {drug: \"860092\"",
         "expect: fire\n    drafts:\n      - {drug: \"860092\"")
    assert main(["test", str(rules_copy), "--rule", "opioid-in-migraine"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "expected fire, got no-fire" in out


def test_a_rule_without_a_quiet_scenario_is_an_error(rules_copy, capsys):
    path = rules_copy / "opioid-in-migraine.tests.yaml"
    text = path.read_text()
    path.write_text(text[: text.index("  - name: Opioid for a fracture")])
    assert main(["test", str(rules_copy), "--rule", "opioid-in-migraine"]) == 1
    assert "needs at least one scenario that fires and one that does not" in capsys.readouterr().err


def test_explain_shows_the_drug_chain_and_each_check(capsys):
    assert main(["explain", str(EXAMPLE), "--now", SCENARIO_NOW]) == 0
    out = capsys.readouterr().out
    assert "named in the order text (hydromorphone" in out  # text-only draft: recognised by name
    assert "in value sets rx-opioids" in out
    draft_id = json.loads(EXAMPLE.read_text())["context"]["draftOrders"]["entry"][0]["resource"]["id"]
    assert f"opioid-in-migraine on MedicationRequest/{draft_id}: FIRED [warning]" in out
    assert "+ headache-diagnosis" in out and "- other-order-reason" in out
    assert "not triggered" in out  # e.g. the ketamine rule


def test_explain_json_and_bad_input(tmp_path, capsys):
    assert main(["explain", str(EXAMPLE), "--now", SCENARIO_NOW, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert any(r["rule"] == "opioid-in-migraine" and r["outcome"].startswith("FIRED") for r in rep["rules"])
    bad = tmp_path / "bad.json"
    bad.write_text('{"hook": "patient-view"}')
    assert main(["explain", str(bad)]) == 2


def test_replay_counts_and_compares_with_a_baseline(rules_copy, capsys):
    edit(rules_copy / "opioid-in-migraine.yaml", "mode: active", "mode: shadow")
    assert main(["replay", str(REPO / "fhir_examples/opioid-in-migraine"), "--now", SCENARIO_NOW,
                 "--rules", str(rules_copy), "--baseline", str(REPO / "rules")]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("opioid-in-migraine"))
    shown, shadow, suppressed, baseline, change = row.split()[1:]
    assert shown == "0" and int(shadow) == int(baseline) > 0 and change == "+0"


def test_stats_prints_text_and_json(tmp_path, monkeypatch, capsys):
    from datetime import datetime, timezone
    from cds_hooks_service.store import FeedbackStore, IssuedCard

    url = f"sqlite:///{tmp_path / 's.sqlite3'}"
    store = FeedbackStore(url)
    now = datetime.now(timezone.utc)
    store.record_cards([IssuedCard("c1", "opioid-in-migraine", "svc", "h1", "warning", "active", "k1", now),
                        IssuedCard("c2", "opioid-in-migraine", "svc", "h2", "warning", "active", "k2", now)])
    store.record_feedback("svc", [{"card": "c1", "outcome": "overridden", "outcomeTimestamp": now.isoformat(),
                                   "overrideReason": {"reason": {"system": "s", "code": "refractory-first-line",
                                                                 "display": "Refractory"}}}])
    monkeypatch.setenv("DATABASE_URL", url)
    assert main(["stats"]) == 0
    out = capsys.readouterr().out
    assert "opioid-in-migraine" in out and "50%" in out and "Refractory" in out
    assert main(["stats", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rules"]
    assert rows[0]["issued"] == 2 and rows[0]["overridden"] == 1
