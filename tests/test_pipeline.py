"""The hook call's pipeline (decide -> record -> render): one outcome per finding, and the clinical core and
the pharmacists' commands without Flask or SQLAlchemy."""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import subprocess
import sys

from cds_hooks_service.config import Settings
from cds_hooks_service.hook_call import (EXCEPTED, FIRED, NOT_FIRED, SHADOW, SUPPRESSED, call_service, covering_keys,
                                        suppression_key)
from cds_hooks_service.services import SERVICE_FOR_HOOK
from cds_hooks_service.store import FeedbackStore
from tests.helpers import DHE, HYDROMORPHONE, MIGRAINE, NOW, REPO, request_body

SIGN = SERVICE_FOR_HOOK["order-sign"]
SELECT = SERVICE_FOR_HOOK["order-select"]
WEB_PACKAGES = ("flask", "werkzeug", "flask_cors", "sqlalchemy", "prometheus_client", "gunicorn")


def _settings():
    return Settings(suppression_secret=b"pipeline", fixed_now=NOW)


def test_each_finding_has_one_outcome_fired_excepted_or_not_fired(rulebook):
    cancer = {"condition": "C71.9", "display": "Malignant neoplasm of brain"}  # the opioid rule's exception
    fired = call_service(SIGN, request_body(record=[MIGRAINE]), rulebook=rulebook, store=None, settings=_settings())
    (finding,) = fired.findings
    assert (finding.outcome, finding.reason) == (FIRED, "") and len(fired.response["cards"]) == 1
    excepted = call_service(SIGN, request_body(record=[MIGRAINE, cancer]), rulebook=rulebook, store=None,
                            settings=_settings())
    (finding,) = excepted.findings
    assert finding.outcome == EXCEPTED and finding.reason.startswith("exception: ")
    assert excepted.response["cards"] == []
    traced = call_service(SIGN, request_body(record=[]), rulebook=rulebook, store=None, settings=_settings(),
                          trace=True)
    assert {f.outcome for f in traced.findings} == {NOT_FIRED}


def test_a_shadow_rule_is_counted_not_shown(rulebook):
    # a copy with the rule in shadow mode: the run's rulebook is shared by every test and never changed
    rules = [dataclasses.replace(r, mode="shadow") if r.id == "opioid-in-migraine" else r for r in rulebook.rules]
    shadowed = dataclasses.replace(rulebook, rules=rules)
    assert shadowed.get("opioid-in-migraine").mode == "shadow" and rulebook.get("opioid-in-migraine").mode == "active"
    result = call_service(SIGN, request_body(), rulebook=shadowed, store=None, settings=_settings())
    (finding,) = result.findings
    assert finding.outcome == SHADOW and result.response["cards"] == []


def test_an_override_at_order_select_suppresses_the_card_at_order_sign(rulebook, tmp_path):
    store = FeedbackStore(f"sqlite:///{tmp_path / 'store.sqlite3'}")
    settings = _settings()
    selected = call_service(SELECT, request_body("order-select"), rulebook=rulebook, store=store, settings=settings)
    (card,) = selected.response["cards"]
    store.record_feedback(SELECT.id, [{"card": card["uuid"], "outcome": "overridden",
                                       "outcomeTimestamp": "2026-03-01T11:59:00Z"}])
    signed = call_service(SIGN, request_body(), rulebook=rulebook, store=store, settings=settings)
    (finding,) = signed.findings
    assert finding.outcome == SUPPRESSED and "overridden" in finding.reason
    assert signed.response["cards"] == []


def _key(message: str) -> str:
    return hmac.new(b"pipeline", message.encode(), hashlib.sha256).hexdigest()


def test_the_suppression_keys_keep_their_format(rulebook):
    """Stored overrides hold these keys (cds_override): the same finding must get the same keys after an upgrade."""
    body = dict(request_body(), fhirServer="https://ehr.example.org/fhir")
    (finding,) = call_service(SIGN, body, rulebook=rulebook, store=None, settings=_settings()).findings
    drugs = ",".join(sorted(code for _, code in finding.draft.concepts))
    prefix = f"open|https://ehr.example.org/fhir|example-patient|{finding.draft.ref}|{drugs}|opioid-in-migraine|"
    assert finding.indicator == "warning"
    assert covering_keys(b"pipeline", body, finding) == (_key(prefix + "critical"), _key(prefix + "warning"))
    assert suppression_key(b"pipeline", body, finding) == _key(prefix + "warning")
    assert suppression_key(b"pipeline", body, finding, "client-b", indicator="info") == \
        _key(prefix.replace("open|", "client-b|", 1) + "info")


def test_a_conflict_between_drafts_is_keyed_by_both_orders(rulebook):
    sumatriptan = {"drug": "37418", "text": "sumatriptan 6 mg SC", "route": "SC"}
    body = request_body(drafts=[DHE, sumatriptan], record=[MIGRAINE])
    result = call_service(SIGN, body, rulebook=rulebook, store=None, settings=_settings())
    conflicts = [f for f in result.findings if f.rule.id == "dhe-triptan-ergot-24h" and f.evidence]
    assert conflicts
    drafts = {d.ref: d for f in result.findings for d in [f.draft]}
    orders = sorted((d.ref, ",".join(sorted(code for _, code in d.concepts))) for d in drafts.values())
    conflict = "conflict:" + ";".join(f"{ref}#{codes}" for ref, codes in orders)
    for f in conflicts:  # the same key from either order's side
        assert covering_keys(b"pipeline", body, f, drafts=drafts)[-1] == \
            _key(f"open||example-patient|{conflict}|dhe-triptan-ergot-24h|{f.indicator}")


def test_findings_of_several_drafts_are_rendered_most_severe_first(rulebook):
    record = [MIGRAINE, {"given": "37418", "text": "sumatriptan", "route": "SC", "at": "-2h"}]
    result = call_service(SIGN, request_body(drafts=[HYDROMORPHONE, DHE], record=record), rulebook=rulebook,
                          store=None, settings=_settings())
    indicators = [c["indicator"] for c in result.response["cards"]]
    assert indicators == sorted(indicators, key=["critical", "warning", "info"].index) and "critical" in indicators


def _imported_by(code: str) -> list[str]:
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120,
                         check=True).stdout
    return [m for m in json.loads(out.splitlines()[-1]) if m in WEB_PACKAGES]


def test_the_clinical_core_imports_without_flask_or_sqlalchemy():
    assert _imported_by("import cds_hooks_service.hook_call, cds_hooks_service.engine, cds_hooks_service.index, "
                        "cds_hooks_service.explain, cds_hooks_service.replay, cds_hooks_service.scenarios") == []


def test_the_pharmacists_commands_run_without_flask_or_sqlalchemy(tmp_path):
    request = tmp_path / "request.json"
    request.write_text(json.dumps(request_body()))
    code = ("import contextlib, io\nfrom cds_hooks_service.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    codes = [main(['test']), main(['explain', {str(request)!r}]), main(['replay', {str(tmp_path)!r}]),"
            " main(['validate'])]\n"
            "assert codes == [0, 0, 0, 0], codes")
    assert _imported_by(code) == []
