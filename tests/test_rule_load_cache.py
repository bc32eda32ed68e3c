"""The caches inside rule loading (rulefiles.load_yaml_text by exact text, rulebook's set of (schema, document)
pairs that validated): an edited file is read anew, nobody shares a mutable document, a broken file is refused
with the same words every time, and the caches stay within their bounds."""
from __future__ import annotations

import datetime
import json

import jsonschema
import pytest
import yaml

from cds_hooks_service import rulebook as rulebook_module
from cds_hooks_service import rulefiles
from cds_hooks_service.rulebook import RulebookError, load_rulebook


def test_the_same_text_gives_equal_documents_that_share_nothing_mutable():
    text = "a: [1, {b: x}]\nc: {d: 2026-01-01}\ne: !!set {f}\n"
    first = rulefiles.load_yaml_text(text)
    first["a"][1]["b"] = "changed"
    first["a"].append("more")
    first["c"]["new"] = 1
    first["e"].add("g")
    second = rulefiles.load_yaml_text(text)
    assert second == {"a": [1, {"b": "x"}], "c": {"d": datetime.date(2026, 1, 1)}, "e": {"f"}}
    third = rulefiles.load_yaml_text(text)
    assert third == second and third is not second
    assert third["a"] is not second["a"] and third["a"][1] is not second["a"][1] and third["e"] is not second["e"]


def test_an_edited_text_is_parsed_anew():
    assert rulefiles.load_yaml_text("value: 1\n") == {"value": 1}
    assert rulefiles.load_yaml_text("value: 2\n") == {"value": 2}
    assert rulefiles.load_yaml_text("value: '1'\n") == {"value": "1"}
    assert rulefiles.load_yaml_text("value: 1\n") == {"value": 1}


@pytest.mark.parametrize("text", ["a: [1, 2\n", "a: &x 1\nb: *x\n", "[" * 100 + "]" * 100])
def test_a_broken_text_is_refused_the_same_way_every_time_and_never_kept(text):
    messages = []
    for _ in range(3):
        with pytest.raises(yaml.YAMLError) as info:
            rulefiles.load_yaml_text(text)
        messages.append(str(info.value))
    assert messages[0] == messages[1] == messages[2]
    assert text not in rulefiles._parsed


def test_the_kept_texts_stay_within_their_bounds(monkeypatch):
    monkeypatch.setattr(rulefiles, "_parsed", type(rulefiles._parsed)())
    monkeypatch.setattr(rulefiles, "_parsed_chars", 0)
    monkeypatch.setattr(rulefiles, "YAML_CACHE_MAX_ENTRIES", 5)
    monkeypatch.setattr(rulefiles, "YAML_CACHE_MAX_CHARS", 400)
    for i in range(20):
        assert rulefiles.load_yaml_text(f"n: {i}\n") == {"n": i}
    assert len(rulefiles._parsed) == 5 and list(rulefiles._parsed) == [f"n: {i}\n" for i in range(15, 20)]
    big = "x: '" + "y" * 90 + "'\n"  # under a quarter of the limit: kept; four of them fill it
    for i in range(4):
        rulefiles.load_yaml_text(big + f"n: {i}\n")
    assert rulefiles._parsed_chars == sum(len(t) for t in rulefiles._parsed) <= 400
    huge = "x: '" + "y" * 200 + "'\n"  # over a quarter of the limit: parsed, never kept
    assert rulefiles.load_yaml_text(huge) == {"x": "y" * 200}
    assert huge not in rulefiles._parsed


def test_the_validity_key_keeps_types_schemas_and_validators_apart():
    schema = {"type": "object"}
    v = jsonschema.Draft202012Validator(schema)
    keys = {rulebook_module._validity_key(v, {"a": value}) for value in (1, 1.0, True, "1", None, [1], {"1": 1})}
    assert None not in keys and len(keys) == 7
    other = jsonschema.Draft202012Validator({"type": "object", "required": ["a"]})
    assert rulebook_module._validity_key(other, {"a": 1}) != rulebook_module._validity_key(v, {"a": 1})
    checking_formats = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    assert rulebook_module._validity_key(checking_formats, {"a": 1}) is None


def _problems(rules_dir):
    with pytest.raises(RulebookError) as info:
        load_rulebook(rules_dir)
    return [str(p) for p in info.value.problems]


def test_an_edited_rule_file_is_checked_again_and_its_problems_are_the_same_every_time(rules_copy):
    path = rules_copy / "dhe-vasopressor.yaml"
    good = path.read_text()
    assert load_rulebook(rules_copy).get("dhe-vasopressor") is not None  # the shipped text: parsed, kept
    path.write_text(good.replace("indicator: critical", "indicator: alarming", 1))
    first = _problems(rules_copy)
    assert any("alarming" in p for p in first)
    assert _problems(rules_copy) == first  # refused again, in the same words (nothing kept from the first)
    path.write_text(good)
    assert load_rulebook(rules_copy).get("dhe-vasopressor") is not None


def test_a_changed_schema_checks_a_document_that_passed_under_the_old_one(rules_copy):
    load_rulebook(rules_copy)  # every shipped rule validated (and kept as valid) under the shipped schema
    schema_path = rules_copy / "rule.schema.json"
    schema = schema_path.read_text()
    doc = json.loads(schema)
    doc["required"] = sorted(set(doc.get("required", [])) | {"a-field-no-rule-has"})
    schema_path.write_text(json.dumps(doc))
    problems = _problems(rules_copy)
    assert any("a-field-no-rule-has" in p for p in problems)


def test_a_loaded_rulebook_does_not_change_when_a_later_load_of_the_same_text_is_edited(rules_copy):
    first = load_rulebook(rules_copy)
    checks = {r.id: sorted(r.checks) for r in first.rules}
    doc = rulefiles.load_yaml_text((rules_copy / "dhe-vasopressor.yaml").read_text())
    doc["checks"].clear()  # a caller scribbling on its document touches nobody else's
    doc.clear()
    second = load_rulebook(rules_copy)
    assert {r.id: sorted(r.checks) for r in second.rules} == checks
    assert checks["dhe-vasopressor"] and {r.id: sorted(r.checks) for r in first.rules} == checks


def test_a_card_that_passed_its_render_check_is_checked_again_when_a_limit_changes(rules_copy, monkeypatch):
    from cds_hooks_service import cards

    load_rulebook(rules_copy)  # every shipped card rendered within the limits (and the passes kept)
    monkeypatch.setattr(cards, "RENDER_MAX_STEPS", 1)
    first = _problems(rules_copy)
    assert any("ketamine-non-refractory-migraine.yaml" in p and "more than 1 loop iterations" in p for p in first), first
    assert _problems(rules_copy) == first  # a template over a limit is rendered (and refused) every time
    monkeypatch.setattr(cards, "RENDER_MAX_STEPS", 20_000)
    monkeypatch.setattr(cards, "RENDER_MAX_CHARS", 10)
    assert any("output longer than 10 characters" in p for p in _problems(rules_copy))


def test_a_card_is_rendered_again_when_its_text_or_its_rules_example_data_change(rules_copy, monkeypatch):
    from cds_hooks_service import rulebook as module

    rendered = []
    real = module.load_time_problems
    monkeypatch.setattr(module, "load_time_problems", lambda template, doc: rendered.append(doc["id"]) or real(template, doc))
    load_rulebook(rules_copy)
    rendered.clear()
    load_rulebook(rules_copy)
    assert rendered == []  # nothing changed: every render check answered from the kept passes
    rule = rules_copy / "opioid-in-migraine.yaml"
    text = rule.read_text()
    assert "title: " in text
    rule.write_text(text.replace("title: ", "title: Edited ", 1))  # the title is part of the example data
    load_rulebook(rules_copy)
    assert rendered == ["opioid-in-migraine", "opioid-in-migraine"]  # its summary and detail, no other card
    rendered.clear()
    card = rules_copy.parent / "cards" / "ketamine-non-refractory-migraine.yaml"
    card.write_text(card.read_text().replace("detail: |\n", "detail: |\n  Edited.\n", 1))
    load_rulebook(rules_copy)
    assert rendered == ["ketamine-non-refractory-migraine"]  # the changed detail text only


def test_an_edited_scenario_file_is_read_again_by_validate(rules_copy):
    load_rulebook(rules_copy, scenarios=True)  # every shipped scenario file read (and its pass kept)
    path = rules_copy / "opioid-in-migraine.tests.yaml"
    good = path.read_text()
    path.write_text(good.replace("expect: fire", "expect: maybe", 1))
    with pytest.raises(RulebookError) as first:
        load_rulebook(rules_copy, scenarios=True)
    with pytest.raises(RulebookError) as second:
        load_rulebook(rules_copy, scenarios=True)
    assert [str(p) for p in first.value.problems] == [str(p) for p in second.value.problems]
    assert any("opioid-in-migraine.tests.yaml" in str(p) and "expect: fire | no-fire | suppressed" in str(p)
               for p in first.value.problems)
    load_rulebook(rules_copy)  # the service does not read scenarios
    path.write_text(good)
    load_rulebook(rules_copy, scenarios=True)


def test_a_kept_text_is_parsed_again_under_another_depth_limit(monkeypatch):
    text = "a: " + "[" * 10 + "]" * 10 + "\n"
    assert rulefiles.load_yaml_text(text) == {"a": [[[[[[[[[[]]]]]]]]]]}
    monkeypatch.setattr(rulefiles, "YAML_MAX_DEPTH", 5)
    with pytest.raises(yaml.YAMLError, match="nested deeper than 5 levels"):
        rulefiles.load_yaml_text(text)
    monkeypatch.undo()
    assert rulefiles.load_yaml_text(text) == {"a": [[[[[[[[[[]]]]]]]]]]}
