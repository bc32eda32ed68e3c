"""The pharmacists' commands: validate, test, explain, replay, stats (exit codes, messages, --json)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from cds_hooks_service.cli import main
from tests.helpers import REPO, SCENARIO_NOW
from tests.helpers import edit

EXAMPLE = REPO / "fhir_examples/opioid-in-migraine/text-only-tall-man-name.order-sign.json"


def where(path, new_text, value):
    """'file:line:column' of `value` inside the first line containing `new_text` (1-based, as validate prints)."""
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if new_text in line:
            return f"{path}:{i}:{line.index(value, line.index(new_text)) + 1}"
    raise AssertionError(f"{new_text!r} not in {path}")


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


def test_validate_accepts_the_shipped_rules(capsys):
    assert main(["validate", "--rules", str(REPO / "rules")]) == 0
    captured = capsys.readouterr()
    assert "6 rules valid" in captured.out and "opioid-in-migraine" in captured.out
    assert "error:" not in captured.err


def test_validate_json(capsys):
    assert main(["validate", "--rules", str(REPO / "rules"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["valid"] is True and doc["errors"] == []
    assert {r["id"] for r in doc["rules"]} >= {"opioid-in-migraine", "dhe-cyp3a4-inhibitor"}
    cyp = next(r for r in doc["rules"] if r["id"] == "dhe-cyp3a4-inhibitor")
    assert cyp["policies"]["cyp3a4-inhibitor-washout"] == {"value": 14, "unit": "days", "signOff": {
        "status": "pending", "note": "needs clinical-governance sign-off (clinical.md §5 item 8)"}}


# (file, old text, new text, the value whose position is reported, expected words in the message)
NESTED_CASES = [
    # A nested field deep in a check: reported at its own line and column, not at the check's first line.
    ("dhe-triptan-ergot-24h.yaml", "medication: {valueSets: [rx-dihydroergotamine], within: 24h}",
     "medication: {valueSets: [rx-dihydroergotamine], within: 24hours}", "24hours",
     ["checks.dhe-within-24h.medication.within: found '24hours'; allowed: a duration (a number then m, h or d"]),
    ("dhe-vasopressor.yaml", "      valueSets: [rx-epinephrine]\n      route: [intramuscular, subcutaneous]",
     "      valueSets: [rx-epinephrine]\n      route: [intramuscular, subcutanous]",
     "subcutanous", ["checks.epinephrine-im-sc.medication.route[1]: found 'subcutanous'; allowed: 'parenteral', 'injection'"]),
    ("dhe-contraindicated-condition.yaml", "        - {valueSets: [obs-systolic-bp], op: \">=\", value: {policy: bp-raised-systolic}}",
     "        - {valueSets: [obs-systolic-bp], op: \"=>\", value: {policy: bp-raised-systolic}}", '"=>"',
     ["checks.bp-at-or-over-160-100.observation.any[0].op: found '=>'; allowed: '>=', '>', '<=', '<', 'positive'"]),
    ("opioid-in-migraine.yaml", "indicator: warning\nsource", "indicator: severe\nsource", "severe",
     ["indicator: found 'severe'; allowed: 'info', 'warning', 'critical'"]),
    ("opioid-in-migraine.yaml", "version: 1.2.0", "version: 1.0", "1.0",
     ["version: found 1.0 (a number); allowed: a version of three numbers such as 1.0.0"]),
    ("opioid-in-migraine.yaml", "title: Opioid ordered", "titel: Opioid ordered", "titel",
     ["titel: unknown field 'titel' (did you mean 'title'?); allowed fields:",
      "(top level): missing field 'title' (required here)"]),
    ("opioid-in-migraine.yaml", "valueSets: [cond-migraine, cond-headache], status: active}",
     "valueSets: [cond-migrane, cond-headache], status: active}", "cond-migrane",
     ["checks.headache-diagnosis.condition.valueSets[0]: unknown value set 'cond-migrane'", "did you mean 'cond-migraine'?"]),
    ("opioid-in-migraine.yaml", "when: [headache-order-reason, headache-diagnosis]",
     "when: [headache-order-reason, no-such-check]", "no-such-check",
     ["triggers[0].when[1]: unknown check 'no-such-check'"]),
    ("opioid-in-migraine.yaml", "actions: [{create: dexamethasone-iv}]", "actions: [{create: dexamethasone-po}]",
     "dexamethasone-po", ["unknown alternative 'dexamethasone-po' (did you mean 'dexamethasone-iv'?)"]),
    ("dhe-cyp3a4-inhibitor.yaml", "      within: {policy: cyp3a4-inhibitor-washout}\n      route",
     "      within: {policy: cyp3a4-washout}\n      route", "{policy",
     ["within: found the policy name 'cyp3a4-washout'; allowed: a policy of this rule or of shared.yaml"]),
]


@pytest.mark.parametrize("file, old, new, value, expected", NESTED_CASES, ids=[c[3] for c in NESTED_CASES])
def test_validate_points_at_line_and_column_of_nested_fields(rules_copy, capsys, file, old, new, value, expected):
    path = rules_copy / file
    edit(path, old, new)
    assert main(["validate", "--rules", str(rules_copy)]) == 1
    err = capsys.readouterr().err
    errors = error_lines(err)
    first_new_line = next(line for line in new.splitlines() if value in line)
    error = next((e for e in errors if expected[0] in e), None)
    assert error, err
    assert error.startswith(f"error: {where(path, first_new_line, value)}: "), (error, where(path, first_new_line, value))
    for text in expected[1:]:
        assert text in err, err
    assert len(errors) == len(expected) if "missing field" in str(expected) else len(errors) == 1, err
    assert "were NOT accepted" in err


def test_validate_never_prints_raw_regular_expressions(rules_copy, capsys):
    edit(rules_copy / "opioid-in-migraine.yaml", "id: opioid-in-migraine", "id: Opioid_In_Migraine")
    edit(rules_copy / "opioid-in-migraine.yaml", "  - id: replace-prochlorperazine", "  - id: Replace Prochlorperazine")
    source = next(line for line in (rules_copy / "dhe-vasopressor.yaml").read_text().splitlines() if line.startswith("source: "))
    edit(rules_copy / "dhe-vasopressor.yaml", source, "source: https://www.rxlist.com/dhe")
    assert main(["validate", "--rules", str(rules_copy)]) == 1
    err = capsys.readouterr().err
    assert "found 'Opioid_In_Migraine'; allowed: 3 to 63 lower-case letters" in err
    assert "found 'Replace Prochlorperazine'; allowed: a name of lower-case letters" in err
    assert "found 'https://www.rxlist.com/dhe'; allowed: a source id listed in rules/sources.yaml" in err
    assert not re.search(r"\^|\$'|\\d|\[a-z", err), err


def test_validate_reports_every_problem_at_once(rules_copy, capsys):
    """Problems in several files (and several in one file) are reported in one run, sorted by file and line."""
    edit(rules_copy / "opioid-in-migraine.yaml", "indicator: warning\nsource", "indicator: severe\nsource")
    edit(rules_copy / "opioid-in-migraine.yaml", "mode: active", "mode: loud")
    edit(rules_copy / "dhe-triptan-ergot-24h.yaml", "within: 24h}", "within: 24hours}")
    edit(rules_copy.parent / "cards/dhe-vasopressor.yaml", "detail: |", "detail: |\n  {% if %}")
    edit(rules_copy / "alternatives.yaml", "dose: {value: 6, unit: mg}", "dose: {value: -6, unit: mg}")
    assert main(["validate", "--rules", str(rules_copy)]) == 1
    errors = error_lines(capsys.readouterr().err)
    joined = "\n".join(errors)
    assert "indicator: found 'severe'" in joined and "mode: found 'loud'" in joined
    assert "found '24hours'" in joined and "template syntax error" in joined
    assert "sumatriptan-sc.dose.value: found -6 (a number); allowed: more than 0" in joined
    assert len(errors) == 5, joined


def test_validate_reports_schema_and_cross_check_problems_of_one_file_together(rules_copy, capsys):
    """A bad value does not hide the other problems of the same rule (unknown policy unit, card reference)."""
    rule = rules_copy / "dhe-cyp3a4-inhibitor.yaml"
    edit(rule, "    unit: days\n    meaning: A CYP3A4", "    unit: day\n    meaning: A CYP3A4")
    edit(rule, "active: true, within: {policy: recent-dhe-window}}\n  dhe-on-board-for-moderate",
         "active: true, within: 24hours}\n  dhe-on-board-for-moderate")
    edit(rules_copy.parent / "cards/dhe-cyp3a4-inhibitor.yaml", "{% set strong = checks['strong-inhibitor-on-board']",
         "{% set strong = checks['strong-inhibitor']")
    assert main(["validate", "--rules", str(rules_copy)]) == 1
    joined = "\n".join(error_lines(capsys.readouterr().err))
    assert "checks.dhe-on-board-for-strong.medication.within: found '24hours'" in joined
    assert "policies.cyp3a4-inhibitor-washout.unit: found 'day'; allowed for a time window: minutes, hours, days" in joined
    assert "refers to checks['strong-inhibitor'], but rule 'dhe-cyp3a4-inhibitor' has no check 'strong-inhibitor'" in joined
    # the check with the bad value is left out of the cross-checks: no second error for the card's use of it
    assert "has no check 'dhe-on-board-for-strong'" not in joined


def test_validate_reports_yaml_errors_with_line_and_column(rules_copy, capsys):
    (rules_copy / "opioid-in-migraine.yaml").write_text("id: opioid-in-migraine\ntitle: [unclosed\n")
    assert main(["validate", "--rules", str(rules_copy)]) == 1
    err = capsys.readouterr().err
    assert re.search(r"opioid-in-migraine\.yaml:3:1: \(yaml\): not valid YAML", err), err


def test_validate_checks_site_overrides(rules_copy, tmp_path, capsys):
    local = tmp_path / "local"
    local.mkdir()
    (local / "x.yaml").write_text("id: no-such-rule\nenabled: false\n")
    (local / "y.yaml").write_text("id: dhe-vasopressor\nindicator: loud\n")
    assert main(["validate", "--rules", str(rules_copy), "--local", str(local)]) == 1
    err = capsys.readouterr().err
    assert f"{local / 'x.yaml'}:1:5: id: overrides unknown rule 'no-such-rule'" in err
    # The bad value is in the override file: reported there, at its line.
    assert f"{local / 'y.yaml'}:2:12: indicator: found 'loud'" in err


def test_old_positional_rules_folder_still_works_with_a_note(rules_copy, capsys):
    assert main(["validate", str(rules_copy)]) == 0
    err = capsys.readouterr().err
    assert "`validate DIR` is deprecated; use `validate --rules DIR`" in err
    assert main(["validate", str(rules_copy), "--rules", str(rules_copy)]) == 2


def test_test_command_passes_and_fails(rules_copy, capsys):
    assert main(["test", "--rules", str(rules_copy), "--rule", "opioid-in-migraine"]) == 0
    assert "0 failed" in capsys.readouterr().out
    edit(rules_copy / "opioid-in-migraine.tests.yaml", "expect: no-fire\n    drafts:\n      - {drug: \"860092\"",
         "expect: fire\n    drafts:\n      - {drug: \"860092\"")
    assert main(["test", "--rules", str(rules_copy), "--rule", "opioid-in-migraine"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "expected fire, got no-fire" in out
    assert main(["test", "--rules", str(rules_copy), "--rule", "opioid-in-migraine", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["failed"] == out.count("FAIL ") > 0 and doc["passed"] > 10
    assert [r["message"] for r in doc["results"] if not r["passed"]][0].startswith("expected fire, got no-fire")


def test_a_rule_without_a_quiet_scenario_is_an_error(rules_copy, capsys):
    path = rules_copy / "opioid-in-migraine.tests.yaml"
    text = path.read_text()
    path.write_text(text[: text.index("  - name: Opioid for a fracture")])
    assert main(["test", "--rules", str(rules_copy), "--rule", "opioid-in-migraine"]) == 1
    assert "needs at least one scenario that fires and one that does not" in capsys.readouterr().err


def test_unknown_rule_id_is_an_error(capsys):
    assert main(["test", "--rule", "opioid-in-migrane"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert error_lines(captured.err) == [
        "error: unknown rule 'opioid-in-migrane' (did you mean 'opioid-in-migraine'?); rules: dhe-contraindicated-condition, "
        "dhe-cyp3a4-inhibitor, dhe-triptan-ergot-24h, dhe-vasopressor, ketamine-non-refractory-migraine, opioid-in-migraine"]


@pytest.mark.parametrize("argv, message", [
    (["validate", "--rules", "/no/such/rules"], "error: /no/such/rules: no such rules folder"),
    (["test", "--rules", "/no/such/rules"], "error: /no/such/rules: no such rules folder"),
    (["validate", "--local", "/no/such/local"], "error: /no/such/local: no such site overrides folder"),
    (["replay", "/wrong/path"], "error: /wrong/path: no such file or folder"),
    (["explain", "/wrong/request.json"], "error: /wrong/request.json: no such file"),
    (["replay", str(REPO / "fhir_examples"), "--baseline", "/no/such/rules"], "error: --baseline /no/such/rules: no such folder"),
])
def test_missing_paths_are_one_line_errors(capsys, argv, message):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [message]
    assert "Traceback" not in captured.err


def test_empty_input_is_an_error(tmp_path, capsys):
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    assert main(["replay", str(empty_dir)]) == 2
    assert "no *.json request files in this folder" in capsys.readouterr().err
    (empty_dir / "other.json").write_text('{"resourceType": "Patient"}')
    assert main(["replay", str(empty_dir)]) == 2
    assert "none of the 1 JSON file(s) is an order-select or order-sign request" in capsys.readouterr().err
    empty_file = tmp_path / "empty.json"
    empty_file.write_text("  \n")
    assert main(["explain", str(empty_file)]) == 2
    assert "the file is empty" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"hook": "patient-view"}')
    assert main(["explain", str(bad)]) == 2
    assert "not an order-select or order-sign request" in capsys.readouterr().err


def test_a_rules_folder_without_rules_is_an_error(tmp_path, capsys):
    rules = tmp_path / "rules"
    shutil.copytree(REPO / "rules", rules, ignore=shutil.ignore_patterns("*-*.yaml"))  # keep shared/alternatives
    (tmp_path / "cards").mkdir()
    for command in ("validate", "test"):
        assert main([command, "--rules", str(rules)]) == 2
        assert capsys.readouterr().err.strip().startswith(f"error: {rules}: no rule")


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"python -m cds_hooks_service {version('cds-hooks-service')}"


def test_explain_into_a_closed_pipe_ends_quietly():
    """`explain ... | head`: the reader leaves early; no BrokenPipe traceback. `| true` closes the pipe before the
    command writes, so the broken pipe happens every time."""
    proc = subprocess.run(["bash", "-c", f"{sys.executable} -m cds_hooks_service explain {EXAMPLE} --now {SCENARIO_NOW} "
                           "| true; echo ${PIPESTATUS[0]}"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.stdout.strip() == "141"
    proc = subprocess.run(["bash", "-c", f"{sys.executable} -m cds_hooks_service explain {EXAMPLE} --now {SCENARIO_NOW} "
                           "| head -1"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.stdout.strip() == "hook: order-sign" and "Traceback" not in proc.stderr, proc.stderr


def test_explain_shows_the_drug_chain_and_each_check(capsys):
    assert main(["explain", str(EXAMPLE), "--now", SCENARIO_NOW]) == 0
    out = capsys.readouterr().out
    assert "named in the order text (hydromorphone" in out  # text-only draft: recognised by name
    assert "in value sets rx-hydromorphone, rx-opioids" in out
    draft_id = json.loads(EXAMPLE.read_text())["context"]["draftOrders"]["entry"][0]["resource"]["id"]
    assert f"opioid-in-migraine on MedicationRequest/{draft_id}: FIRED [warning]" in out
    assert "+ headache-diagnosis" in out and "- other-order-reason" in out
    assert "not triggered" in out  # e.g. the ketamine rule


def test_explain_json(capsys):
    assert main(["explain", str(EXAMPLE), "--now", SCENARIO_NOW, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert any(r["rule"] == "opioid-in-migraine" and r["outcome"].startswith("FIRED") for r in rep["rules"])


def test_replay_counts_and_compares_with_a_baseline(rules_copy, capsys):
    edit(rules_copy / "opioid-in-migraine.yaml", "mode: active", "mode: shadow")
    args = ["replay", str(REPO / "fhir_examples/opioid-in-migraine"), "--now", SCENARIO_NOW,
            "--rules", str(rules_copy), "--baseline", str(REPO / "rules")]
    assert main(args) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("opioid-in-migraine"))
    shown, shadow, suppressed, baseline, change = row.split()[1:]
    assert shown == "0" and int(shadow) == int(baseline) > 0 and change == "+0"
    assert main(args + ["--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    row = doc["rules"]["opioid-in-migraine"]
    assert doc["requests"] > 0 and row["shown"] == 0 and row["shadow"] == row["baseline"] > 0 and row["change"] == 0


def test_progress_bar_only_on_a_terminal(monkeypatch):
    from cds_hooks_service import cli

    class Terminal:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

        def write(self, text):
            return len(text)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stderr", Terminal(False))
    assert cli._progress(range(3), desc="x", unit="y").disable is True
    monkeypatch.setattr(sys, "stderr", Terminal(True))
    bar = cli._progress(range(3), desc="x", unit="y")
    assert bar.disable is False and bar.delay == 2.0  # shown only once the work has taken 2 s
    assert list(bar) == [0, 1, 2]


def test_replay_through_a_pipe_prints_no_progress_bar(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cds_hooks_service", "replay", str(REPO / "fhir_examples"),
                           "--now", SCENARIO_NOW], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ})
    assert proc.returncode == 0, proc.stderr
    assert "requests replayed" in proc.stdout
    assert "\r" not in proc.stderr and "request/s" not in proc.stderr


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
