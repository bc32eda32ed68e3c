"""Issue 10.8: rule files cannot hurt the service. Card templates run in an immutable sandbox with render limits
(time, work, output, value size) enforced at validate, test, reload and request time; YAML anchors/aliases,
non-regular files and oversized files are refused; the gunicorn master loads rules with a deadline."""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cds_hooks_service import cli, create_app
from cds_hooks_service.rulebook import RulebookError, load_rulebook
from tests.helpers import REPO
from tests.helpers import SIGN, post, request_body

RULE = "opioid-in-migraine"


@pytest.fixture
def rules(tmp_path):
    shutil.copytree(REPO / "rules", tmp_path / "rules")
    shutil.copytree(REPO / "cards", tmp_path / "cards")
    return tmp_path


def set_detail(root: Path, template: str, rule: str = RULE) -> Path:
    path = root / "cards" / f"{rule}.yaml"
    text = path.read_text()
    head = text[:text.index("detail: |")]
    path.write_text(head + "detail: |\n" + "".join(f"  {line}\n" for line in template.splitlines()))
    return path


def names_card(problem: str, card: Path, key: str = "detail") -> bool:
    """The problem line names the card file (with a line and column where known) and the template field."""
    return re.match(rf"{re.escape(str(card))}(:\d+(:\d+)?)?: {key}: ", problem) is not None


def problems(root: Path) -> list[str]:
    with pytest.raises(RulebookError) as caught:
        load_rulebook(root / "rules", root / "cards")
    return [str(p) for p in caught.value.problems]


def problems_unless_blocked(root: Path, *fifos: Path, timeout: float = 20) -> list[str]:
    """The problems of loading ``root`` on a thread; fails if the load blocks (then unblocks the FIFOs)."""
    outcome: dict = {}

    def load():
        try:
            load_rulebook(root / "rules", root / "cards")
            outcome["problems"] = []
        except RulebookError as exc:
            outcome["problems"] = [str(p) for p in exc.problems]
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            outcome["problems"] = [f"{type(exc).__name__}: {exc}"]

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(timeout)
    blocked = thread.is_alive()
    for fifo in fifos if blocked else ():  # the old loader: unblock it
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    assert not blocked, "the loader blocked on a FIFO"
    return outcome["problems"]


# -- card templates: refused at validate/test/reload ---------------------------------------------------
@pytest.mark.parametrize("template, limit", [
    ("{% for i in range(3000) %}{% for j in range(3000) %}{% endfor %}{% endfor %}", "loop iterations"),
    ("{{ 'x' * 10**8 }}", "would build a value"),
    ("{% for i in range(5000) %}{{ 'abcdefghijklmnopqrstuvwxyz' }}{% endfor %}", "output longer"),
    ("{% set ns = namespace(s='x' * 1000) %}{% for i in range(30) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "~"),
    ("{{ range(10000)|join('x' * 30000) }}", "join"),
    ("{% macro a(n) %}{% for i in range(100) %}{{ a(n - 1) if n }}{% endfor %}{% endmacro %}{{ a(5) }}",
     "loop iterations|took longer"),
], ids=["nested-loops", "string-times-1e8", "output", "concat-doubling", "join", "recursive-macro"])
def test_a_template_over_a_render_limit_fails_validate_naming_the_card(rules, template, limit):
    card = set_detail(rules, template)
    [problem] = problems(rules)
    assert names_card(problem, card) and re.search(limit, problem), problem


@pytest.mark.parametrize("template", [
    "{{ rule.source.update({'label': 'changed by a template'}) }}",
    "{{ rule.source.clear() or '' }}",
    "{{ draft.names.append('x') or '' }}",
])
def test_a_template_cannot_mutate_shared_rule_data(rules, template):
    card = set_detail(rules, template)
    [problem] = problems(rules)
    assert names_card(problem, card) and "unsafe" in problem, problem


@pytest.mark.parametrize("template", ["{{ 'x'|center(10**9) }}", "{{ '%0999999999d'|format(1) }}",
                                      "{{ 'x'.ljust(10**9) }}", "{{ '%0999999999d' % 1 }}"])
def test_amplifying_filters_methods_and_formats_are_not_available(rules, template):
    set_detail(rules, template)
    assert problems(rules)


def test_no_lipsum():
    from cds_hooks_service.cards import DETAIL_ENV

    assert "lipsum" not in DETAIL_ENV.globals  # lipsum(10**6) built megabytes of text


def test_the_shipped_cards_are_within_the_limits():
    load_rulebook(REPO / "rules", REPO / "cards")  # no RulebookError


def test_cli_validate_and_test_name_the_card(rules, capsys):
    card = set_detail(rules, "{% for i in range(3000) %}{% for j in range(3000) %}{% endfor %}{% endfor %}")
    for command in ("validate", "test"):
        assert cli.main([command, str(rules / "rules"), "--cards", str(rules / "cards")]) == 1
        err = capsys.readouterr().err
        assert any(names_card(line.removeprefix("error: "), card) for line in err.splitlines()), err


def test_a_reload_with_a_template_over_the_limit_is_refused(rules, make_settings):
    app = create_app(make_settings(rules_dir=rules / "rules", cards_dir=rules / "cards"))
    rt = app.extensions["cds"]
    good = rt.rulebook
    set_detail(rules, "{% for i in range(3000) %}{% for j in range(3000) %}{% endfor %}{% endfor %}")
    ok, message = rt.reload_rules()
    assert not ok and re.search(rf"{RULE}\.yaml(:\d+:\d+)?: detail: ", message) and rt.rulebook is good


# -- card templates: at request time, over a limit only with real data ---------------------------------
def test_over_the_limit_at_request_time_sends_the_plain_text_and_logs(rules, make_settings, caplog):
    # fine with the example data of validate (a short display), far over with a long one from the request
    set_detail(rules, "{% for a in draft.display %}{% for b in draft.display %}{% endfor %}{% endfor %}done")
    app = create_app(make_settings(rules_dir=rules / "rules", cards_dir=rules / "cards",
                                   metrics_token="m" * 40))
    body = request_body()
    concept = body["context"]["draftOrders"]["entry"][0]["resource"]["medicationCodeableConcept"]
    concept["text"] = concept["coding"][0]["display"] = "hydromorphone " + "x" * 500
    client = app.test_client()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="cds_hooks_service"):
        r = post(client, SIGN, body)
    assert time.monotonic() - started < 5
    assert r.status_code == 200
    [card] = r.get_json()["cards"]
    rule = app.extensions["cds"].rulebook.get(RULE)
    assert card["summary"].startswith(rule.title) and card["detail"].startswith("Reasons: ")
    [line] = [rec.getMessage() for rec in caplog.records if "refused at render" in rec.getMessage()]
    assert "loop iterations" in line and "hydromorphone" not in line
    metrics = client.get("/metrics", headers={"Authorization": "Bearer " + "m" * 40}).get_data(as_text=True)
    assert re.search(rf'cds_card_template_fallbacks_total{{rule="{RULE}"}} [1-9]', metrics)


# -- YAML ---------------------------------------------------------------------------------------------
def test_yaml_anchors_and_aliases_are_refused(rules):
    path = rules / "rules" / f"{RULE}.yaml"
    path.write_text(path.read_text().replace("mode: active", "mode: &m active\nx-alias: *m", 1))
    found = problems(rules)
    assert any(p.startswith(f"{path}:") and "anchors (&name) are not allowed in rule files" in p for p in found), found


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(9))


def test_a_1kb_alias_bomb_is_refused_at_once_without_expanding(rules):
    """Run in a child with 1 GB of address space and a timeout: the old loader expanded 9^10 nodes."""
    assert len(BOMB) < 1024
    (rules / "rules" / "bomb.yaml").write_text(BOMB)
    script = ("import resource, sys\n"
              "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
              "from cds_hooks_service.rulebook import RulebookError, load_rulebook\n"
              f"try:\n    load_rulebook({str(rules / 'rules')!r}, {str(rules / 'cards')!r})\n"
              "except RulebookError as exc:\n    print(exc)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "bomb.yaml" in proc.stdout and "anchors (&name) are not allowed in rule files" in proc.stdout


@pytest.mark.parametrize("depth", [100, 5000])
def test_deep_nesting_is_refused(rules, depth):
    (rules / "rules" / "deep.yaml").write_text("a: " + "[" * depth + "]" * depth + "\n")
    found = problems(rules)
    assert any("deep.yaml" in p and re.search("nested deeper|nesting depth", p) for p in found), found


# -- files --------------------------------------------------------------------------------------------
def test_a_fifo_named_yaml_is_refused_without_blocking(rules):
    fifo = rules / "rules" / "zz-fifo.yaml"
    os.mkfifo(fifo)
    found = problems_unless_blocked(rules, fifo)
    assert any("zz-fifo.yaml" in p and "FIFO" in p for p in found), found


def test_a_fifo_value_set_and_card_are_refused(rules):
    fifo = rules / "rules" / "valuesets" / "zz-fifo.json"
    os.mkfifo(fifo)
    found = problems_unless_blocked(rules, fifo)
    assert any("zz-fifo.json" in p and "FIFO" in p for p in found), found
    fifo.unlink()
    card = rules / "cards" / f"{RULE}.yaml"
    card.unlink()
    os.mkfifo(card)
    found = [p for p in problems_unless_blocked(rules, card) if str(card) in p]
    assert found and "FIFO" in found[0]


def test_a_rule_file_over_the_size_cap_is_refused(rules):
    path = rules / "rules" / f"{RULE}.yaml"
    with path.open("a") as f:
        f.write(("# padding\n" * 1000) * 500)  # 5 MB; the limit is 4 MiB
    found = problems(rules)
    assert any(str(path) in p and "over the limit" in p for p in found), found


def test_symlinked_rule_files_still_load(rules):
    """A Kubernetes ConfigMap mount is symlinks to regular files: those are fine."""
    path = rules / "rules" / f"{RULE}.yaml"
    target = rules / "elsewhere.yaml"
    path.rename(target)
    path.symlink_to(target)
    assert load_rulebook(rules / "rules", rules / "cards").get(RULE)


# -- the gunicorn master's load has a deadline -----------------------------------------------------------
@pytest.mark.slow  # waits on a real time-out or runs a concurrency stress (tests/conftest.py)
def test_the_master_gives_up_a_hanging_load_and_keeps_the_last_good_rules(rules, make_settings, monkeypatch, caplog):
    from cds_hooks_service import runtime

    settings = make_settings(rules_dir=rules / "rules", cards_dir=rules / "cards")
    monkeypatch.setattr(runtime, "_last_good", None)
    assert runtime.remember_last_good_rules(settings)
    good = runtime.last_good_rules(settings)
    settings.rules_load_timeout = 0.5
    # a load that hangs (a fault the limits above cannot produce any more: stands in for the unforeseen)
    monkeypatch.setattr(runtime, "load_rulebook", lambda *a, **k: time.sleep(60))
    started = time.monotonic()
    with caplog.at_level(logging.ERROR):
        assert runtime.remember_last_good_rules(settings, force=True)
    assert time.monotonic() - started < 5
    assert runtime.last_good_rules(settings) is good
    assert any("longer than 0.5 s" in r.getMessage() for r in caplog.records)


def test_the_load_timeout_setting(monkeypatch):
    from cds_hooks_service.config import Settings

    monkeypatch.setenv("CDS_RULES_LOAD_TIMEOUT", "7")
    assert Settings.from_env(suppression_secret=b"x").rules_load_timeout == 7
    monkeypatch.delenv("CDS_RULES_LOAD_TIMEOUT")
    assert Settings.from_env(suppression_secret=b"x").rules_load_timeout == 30


def test_deadline_off_the_main_thread_just_calls():
    from cds_hooks_service import rulefiles

    out = []
    thread = threading.Thread(target=lambda: out.append(rulefiles.call_with_deadline(0.01, lambda: "done")))
    thread.start()
    thread.join()
    assert out == ["done"]


def test_cli_test_reports_a_template_over_the_limit_with_scenario_data(rules, capsys):
    """Within the limits with validate's example data, over them with a scenario's: `test` fails naming the card."""
    # validate's example order is "Example medication 10 mg" (24 characters); the scenarios' are longer
    set_detail(rules, "{% for a in draft.display %}{% for b in range(600) %}{% endfor %}{% endfor %}")
    assert cli.main(["validate", str(rules / "rules"), "--cards", str(rules / "cards")]) == 0
    capsys.readouterr()
    code = cli.main(["test", str(rules / "rules"), "--cards", str(rules / "cards"), "--rule", RULE])
    err = capsys.readouterr().err
    assert code == 1 and f"card {RULE}.yaml: RenderLimitExceeded" in err, err


def test_the_wall_clock_limit_is_checked_in_loops_and_in_the_output_stream(monkeypatch):
    from cds_hooks_service import cards

    monkeypatch.setattr(cards, "RENDER_MAX_SECONDS", -1.0)  # every check is over time
    for source in ("{% for i in range(3) %}{% endfor %}", "plain text, no loop"):
        with pytest.raises(cards.RenderTimeExceeded):
            cards.DETAIL_ENV.from_string(source).render({})
    assert cards.load_time_problems(cards.DETAIL_ENV.from_string("x"), {"id": RULE}) == [
        "took longer than -1 s (rendered with example data)"]


@pytest.mark.parametrize("expression", [
    "d.display", "d['display']", "d.missing", "d['missing']", "d.missing.deeper", "d['missing']['deeper']",
    "d.nested.code", "d['nested'].code", "d.nested['code']", "d.items", "d['items']", "d.keys()|list",
    "d['keys']", "d.get('display')", "d['get']('display')", "d.__class__", "d['__class__']", "d[1]", "d[2]",
    "d.copy", "(d.missing or 'none')", "d.found|map(attribute='ref')|list", "d.found[0].ref", "d.found[5]",
    "'abc'.upper()", "'abc'['upper']()", "d.pop", "d.update",
])
def test_dict_look_ups_in_card_templates_give_what_jinjas_sandbox_gives(expression):
    """The card environments read a plain dict's items without Jinja's AttributeError per look-up
    (cards.CardEnvironment.getattr/getitem): the same values, undefined and refusals as Jinja's own sandbox."""
    from jinja2 import ChainableUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    from cds_hooks_service.cards import SUMMARY_ENV

    jinja = ImmutableSandboxedEnvironment(undefined=ChainableUndefined, finalize=SUMMARY_ENV.finalize)
    data = {"display": "Hydromorphone", "items": 5, "nested": {"code": "123"}, 1: "one",
            "found": [{"ref": "Condition/1"}, {"ref": "Condition/2"}]}

    def render(env):
        try:
            return env.from_string("{{ " + expression + " }}").render(d=data)
        except SecurityError as exc:
            return f"refused: {exc}"

    ours, theirs = render(SUMMARY_ENV), render(jinja)
    assert re.sub(r" at 0x[0-9a-f]+", "", ours) == re.sub(r" at 0x[0-9a-f]+", "", theirs)
