"""Safe reload of the rule files: file watch and SIGHUP, in-process and under gunicorn with several workers.

A valid change is picked up; a change that fails validation is refused with a logged error and the
previous rules keep serving; there is never a moment without rules.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from cds_hooks_service import create_app, runtime as runtime_module
from tests.helpers import REPO, SCENARIO_NOW
from tests.plugins.gunicorn_service import GunicornService, wait_for

SIGN = "/cds-services/migraine-med-safety-sign"
BODY = json.loads((REPO / "fhir_examples/opioid-in-migraine/iv-hydromorphone-active-migraine-diagnosis.order-sign.json")
                  .read_text())
RULE = "opioid-in-migraine"
NEW_SUMMARY = "RELOADED: opioid for migraine/headache; IV prochlorperazine is first-line"


# -- helpers -------------------------------------------------------------------------------------------
@pytest.fixture
def rules(tmp_path):
    """A private copy of the rules and cards, plus an empty site-override directory."""
    shutil.copytree(REPO / "rules", tmp_path / "rules")
    shutil.copytree(REPO / "cards", tmp_path / "cards")
    (tmp_path / "local").mkdir()
    return tmp_path


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def set_summary(root: Path, summary: str) -> None:
    card = root / "cards" / f"{RULE}.yaml"
    card.write_text(re.sub(r"summary: >-\n  .*\n", f"summary: >-\n  {summary}\n", card.read_text(), count=1))


def break_yaml(root: Path) -> None:
    edit(root / "rules" / f"{RULE}.yaml", "mode: active", "mode: [active")


def unknown_valueset(root: Path) -> None:
    edit(root / "rules" / f"{RULE}.yaml", "drafted: [rx-opioids]", "drafted: [rx-no-such-value-set]")


def summaries(client) -> list[str]:
    r = client.post(SIGN, data=json.dumps(BODY), content_type="application/json")
    assert r.status_code == 200, r.get_data(as_text=True)
    return [c["summary"] for c in r.get_json()["cards"]]


@pytest.fixture
def watched(rules, make_settings):
    """An app on the copied rules with its watcher polling every 0.1 s; the watcher is stopped afterwards."""
    apps = []

    def make(interval=0.1, **overrides):
        settings = make_settings(rules_dir=rules / "rules", cards_dir=rules / "cards", **overrides)
        app = create_app(settings)
        apps.append(app)
        if interval is not None:
            app.extensions["cds"].start_watching(interval)
        return app, app.extensions["cds"]

    yield make
    for app in apps:
        app.extensions["cds"].stop_watching()


def refusals(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR and "rule reload refused" in r.getMessage()]


# -- in-process: the file watch -------------------------------------------------------------------------
def test_nothing_starts_by_itself(rules, make_settings):
    before = signal.getsignal(signal.SIGHUP)
    rt = create_app(make_settings(rules_dir=rules / "rules", cards_dir=rules / "cards")).extensions["cds"]
    assert not rt.watching
    assert signal.getsignal(signal.SIGHUP) is before


def test_settings_read_the_poll_interval(monkeypatch):
    from cds_hooks_service.config import Settings

    monkeypatch.setenv("CDS_RULES_POLL_SECONDS", "0")
    assert Settings.from_env(suppression_secret=b"x").rules_poll_seconds == 0
    monkeypatch.delenv("CDS_RULES_POLL_SECONDS")
    assert Settings.from_env(suppression_secret=b"x").rules_poll_seconds == 2.0


def test_watcher_picks_up_a_card_change(watched, rules):
    app, rt = watched()
    client = app.test_client()
    before = rt.rulebook
    assert summaries(client)[0].startswith("Opioid for migraine/headache")
    set_summary(rules, NEW_SUMMARY)
    assert wait_for(lambda: rt.rulebook is not before), "the change was not picked up"
    assert summaries(client) == [NEW_SUMMARY]


def test_watcher_is_one_thread_and_start_is_idempotent(watched):
    _, rt = watched()
    first = rt._watcher
    rt.start_watching(0.1)
    rt.start_watching(0.2)
    assert rt._watcher is first and first.is_alive()
    assert [t for t in threading.enumerate() if t.name == "cds-rules-watcher" and t is first] == [first]
    rt.stop_watching()
    assert not rt.watching


@pytest.mark.parametrize("bad_change", [break_yaml, unknown_valueset], ids=["broken-yaml", "unknown-value-set"])
def test_invalid_change_is_refused_and_a_later_fix_is_picked_up(watched, rules, caplog, bad_change):
    caplog.set_level(logging.INFO, logger="cds_hooks_service")
    app, rt = watched()
    client = app.test_client()
    good = rt.rulebook
    original = (rules / "rules" / f"{RULE}.yaml").read_text()

    bad_change(rules)
    assert wait_for(lambda: refusals(caplog)), "the refusal was not logged"
    assert f"{RULE}.yaml" in refusals(caplog)[0].getMessage()
    time.sleep(0.3)  # several more polls: refused files are not retried until they change
    assert len(refusals(caplog)) == 1
    assert rt.rulebook is good  # the previous rules keep serving
    assert summaries(client)[0].startswith("Opioid for migraine/headache")

    # the fix (with a visible change) is picked up
    (rules / "rules" / f"{RULE}.yaml").write_text(original.replace("mode: active", "mode: shadow", 1))
    assert wait_for(lambda: rt.rulebook is not good), "the fix was not picked up"
    assert rt.rulebook.rules and [r.mode for r in rt.rulebook.rules if r.id == RULE] == ["shadow"]
    assert summaries(client) == []  # shadow: counted, not shown


def test_site_override_changes_are_watched(watched, rules, caplog):
    app, rt = watched(rules_local_dir=rules / "local")
    client = app.test_client()
    assert summaries(client)
    good = rt.rulebook

    (rules / "local" / "opioid.yaml").write_text(f"id: {RULE}\nmode: shadow\n")
    assert wait_for(lambda: rt.rulebook is not good)
    assert summaries(client) == []

    shadow = rt.rulebook
    (rules / "local" / "typo.yaml").write_text("id: opioid-in-migrane\nenabled: false\n")  # unknown rule id
    assert wait_for(lambda: any("opioid-in-migrane" in r.getMessage() for r in refusals(caplog)))
    assert rt.rulebook is shadow

    (rules / "local" / "typo.yaml").unlink()
    (rules / "local" / "opioid.yaml").unlink()  # two steps: the watcher may load the state in between
    assert wait_for(lambda: summaries(client)), "removing the overrides was not picked up"


def test_a_valueset_change_is_watched(watched, rules, caplog):
    """Files in subdirectories count (rules/valuesets): a broken value set is refused."""
    _, rt = watched()
    good = rt.rulebook
    (rules / "rules" / "valuesets" / "rx-opioids.json").write_text("{ not json")
    assert wait_for(lambda: refusals(caplog))
    assert rt.rulebook is good


def test_sighup_reloads_in_process(watched, rules, caplog):
    app, rt = watched(interval=0)  # no polling: only SIGHUP acts
    previous = signal.getsignal(signal.SIGHUP)
    try:
        rt.install_sighup_handler()
        good = rt.rulebook
        break_yaml(rules)
        time.sleep(0.3)
        assert rt.rulebook is good and not refusals(caplog)  # no polling: nothing happened yet
        os.kill(os.getpid(), signal.SIGHUP)
        assert wait_for(lambda: refusals(caplog))
        assert rt.rulebook is good

        edit(rules / "rules" / f"{RULE}.yaml", "mode: [active", "mode: active")
        set_summary(rules, NEW_SUMMARY)
        os.kill(os.getpid(), signal.SIGHUP)
        assert wait_for(lambda: rt.rulebook is not good)
        assert summaries(app.test_client()) == [NEW_SUMMARY]
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_a_process_started_on_invalid_files_serves_the_last_good_rules(rules, make_settings, caplog, monkeypatch):
    """What a gunicorn worker respawned while the files are invalid does (the master keeps the last good rules)."""
    monkeypatch.setattr(runtime_module, "_last_good", None)
    settings = make_settings(rules_dir=rules / "rules", cards_dir=rules / "cards")
    assert runtime_module.remember_last_good_rules(settings)
    kept = runtime_module.last_good_rules(settings)
    break_yaml(rules)
    assert runtime_module.remember_last_good_rules(settings)  # refused, the last good rules stay
    assert runtime_module.last_good_rules(settings) is kept
    app = create_app(settings)
    assert app.extensions["cds"].rulebook is kept
    assert summaries(app.test_client())
    assert any("refused at start" in r.getMessage() for r in caplog.records)
    # without last good rules for these directories, a start on invalid files still fails loudly
    monkeypatch.setattr(runtime_module, "_last_good", None)
    from cds_hooks_service.rulebook import RulebookError
    with pytest.raises(RulebookError):
        create_app(settings)


# -- real processes: gunicorn, 3 workers, SIGHUP to the master ----------------------------------------
class Client(threading.Thread):
    """Posts the firing request in a loop, a new connection each time (so every worker gets some), and
    records (n, status, first card summary or error) for every answer."""

    def __init__(self, base: str):
        super().__init__(daemon=True)
        self.base = base
        self.results: list[tuple[int, int | None, str]] = []
        self.stop = threading.Event()

    def run(self):
        data = json.dumps(BODY)
        n = 0
        while not self.stop.is_set():
            n += 1
            try:
                r = requests.post(f"{self.base}{SIGN}?n={n}", data=data, timeout=5,
                                  headers={"Content-Type": "application/json", "Connection": "close"})
                cards = r.json().get("cards", []) if r.status_code == 200 else []
                self.results.append((n, r.status_code, cards[0]["summary"] if cards else "(no card)"))
            except Exception as exc:  # noqa: BLE001 - recorded and asserted on
                self.results.append((n, None, f"{type(exc).__name__}: {exc}"))

    def since(self, i: int):
        return self.results[i:]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_gunicorn_sighup_reloads_every_worker_without_restarts(rules):
    started = time.monotonic()
    service = GunicornService(rules, dict(CDS_RULES_DIR=str(rules / "rules"), CDS_CARDS_DIR=str(rules / "cards"),
                                          CDS_FIXED_NOW=SCENARIO_NOW),
                              workers=3, threads=4, access_log_format="%(p)s %(q)s %(s)s",
                              args=("--no-control-socket",), wait_for_workers=True)
    client = Client(service.base_url)
    log = service.log

    try:
        service.start()
        proc = service.proc
        assert wait_for(lambda: log().count("Booting worker") >= 3, timeout=5)
        workers = service.worker_pids()
        client.start()
        assert wait_for(lambda: len(client.results) >= 20, timeout=5)

        # (a) an invalid change, SIGHUP: refused in every worker, nobody restarts, the card keeps coming
        break_yaml(rules)
        mark_a = len(client.results)
        proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: log().count("rule reload refused") >= 3, timeout=20), log()
        time.sleep(0.3)
        assert service.worker_pids() == workers, "workers were restarted"
        after_a = client.since(mark_a)
        assert after_a and all(status == 200 and s.startswith("Opioid for migraine/headache")
                               for _, status, s in after_a), after_a[:5]

        # (b) a valid change (the card summary), SIGHUP: soon every worker answers with the new summary
        edit(rules / "rules" / f"{RULE}.yaml", "mode: [active", "mode: active")
        set_summary(rules, NEW_SUMMARY)
        mark_b = len(client.results)
        proc.send_signal(signal.SIGHUP)

        def all_new():
            recent = client.since(mark_b)[-30:]
            return len(recent) == 30 and all(s == NEW_SUMMARY for _, _, s in recent)
        assert wait_for(all_new, timeout=20), client.since(mark_b)[-30:]
        assert service.worker_pids() == workers, "workers were restarted"
        assert log().count("rules reloaded") >= 3

        # (c) invalid files again, then a worker is replaced (as after max_requests): the new worker starts
        # with the master's last good rules instead of failing to boot (which would halt gunicorn)
        break_yaml(rules)
        proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: log().count("rule reload refused") >= 6, timeout=20), log()
        victim = sorted(workers)[0]
        os.kill(victim, signal.SIGTERM)  # graceful, like a max_requests restart
        assert wait_for(lambda: len(service.worker_pids() - workers) == 1 and len(service.worker_pids()) == 3,
                        timeout=20, step=0.05), log()
        [replacement] = service.worker_pids() - workers
        assert wait_for(lambda: "refused at start" in log(), timeout=20), log()
        mark_c = len(client.results)
        assert wait_for(lambda: len(client.results) >= mark_c + 30, timeout=5)
        assert wait_for(lambda: f"<{replacement}> n=" in service.access_log(), timeout=5), \
            "the replacement worker answered nothing"
        assert proc.poll() is None, log()

        client.stop.set()
        client.join(10)
        results = client.results
        bad = [r for r in results if r[1] != 200]
        assert not bad, bad[:5]
        assert all(s in (NEW_SUMMARY,) or s.startswith("Opioid for migraine/headache") for _, _, s in results)
        assert all(s == NEW_SUMMARY for _, _, s in client.since(mark_c))

        # every worker answered, and each one's answers switched to the new summary after (b) and stayed
        service.terminate(15)
        by_n = {n: s for n, _, s in results}
        served: dict[int, list[str]] = {}
        for line in service.access_log().splitlines():
            pid, query, status = (line.split() + ["", ""])[:3]  # "<pid> n=<n> <status>" (%(p)s is "<pid>"); /healthz has no query
            if not query.startswith("n="):
                continue
            n = int(query[2:])
            if n in by_n:
                served.setdefault(int(pid.strip("<>")), []).append((n, by_n[n]))
        assert workers <= set(served), (workers, served.keys())
        for pid in served:
            answers = [summary for _, summary in sorted(served[pid])]
            first_new = answers.index(NEW_SUMMARY)
            assert all(s == NEW_SUMMARY for s in answers[first_new:]), f"worker {pid} went back to old rules"
        assert replacement in served and all(s == NEW_SUMMARY for _, s in served[replacement])
        print(f"gunicorn reload test: {len(results)} answers, all 200, by worker "
              f"{ {p: len(a) for p, a in served.items()} }, {time.monotonic() - started:.1f}s")
        assert time.monotonic() - started < 90  # a guard against hanging; speed is measured in bench/
    finally:
        client.stop.set()
        service.stop()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_gunicorn_master_and_workers_survive_a_fifo_and_an_alias_bomb(rules):
    """Issue 10.8: a FIFO named *.yaml hung the loader (the master, on SIGHUP, stopped managing workers) and a
    1 KB alias bomb exhausted memory in every worker and the master. Both are refused at once: the workers keep
    serving, and a worker replaced afterwards starts on the last good rules."""
    service = GunicornService(rules, dict(CDS_RULES_DIR=str(rules / "rules"), CDS_CARDS_DIR=str(rules / "cards"),
                                          CDS_FIXED_NOW=SCENARIO_NOW, CDS_RULES_POLL_SECONDS="0"),
                              workers=2, threads=2, args=("--no-control-socket",), wait_for_workers=True)
    fifo = rules / "rules" / "zz-fifo.yaml"
    try:
        service.start()
        log = service.log
        assert wait_for(lambda: log().count("Booting worker") >= 2, timeout=10)
        workers = service.worker_pids()
        os.mkfifo(fifo)
        (rules / "rules" / "bomb.yaml").write_text(
            "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
                f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(9)))
        service.proc.send_signal(signal.SIGHUP)
        # the master refused the files (it logs first), then each worker did
        assert wait_for(lambda: log().count("rule reload refused") >= 2, timeout=15), service.log_tail()
        assert "zz-fifo.yaml" in log() and "bomb.yaml" in log()
        r = requests.post(service.base_url + SIGN, data=json.dumps(BODY), timeout=5,
                          headers={"Content-Type": "application/json"})
        assert r.status_code == 200 and r.json()["cards"], r.text
        # the master still manages its workers: a killed worker is replaced, and starts on the last good rules
        victim = sorted(workers)[0]
        os.kill(victim, signal.SIGKILL)
        assert wait_for(lambda: len(service.worker_pids() - workers) == 1 and len(service.worker_pids()) == 2,
                        timeout=15, step=0.05), service.log_tail()
        assert wait_for(lambda: "refused at start" in log(), timeout=10), service.log_tail()
        for _ in range(6):
            r = requests.post(service.base_url + SIGN, data=json.dumps(BODY), timeout=5,
                              headers={"Content-Type": "application/json", "Connection": "close"})
            assert r.status_code == 200 and r.json()["cards"], r.text
        assert service.proc.poll() is None
    finally:
        if fifo.exists():  # unblock an old loader stuck on it, so the service can stop
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        service.stop()
