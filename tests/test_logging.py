"""Structured logs: JSON lines (python-json-logger) correlated by hookInstance / requestId; no patient data."""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import uuid
from datetime import datetime, timedelta

import pytest

from cds_hooks_service import logs
from tests import sandbox_client as sandbox
from tests.helpers import REPO
from tests.helpers import SIGN, post, request_body

HOOK_INSTANCE = request_body()["hookInstance"]


@pytest.fixture
def json_log():
    """The service's logger writes JSON lines to a buffer, configured as gunicorn.conf.py does; returns a reader."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logs.configure_handlers([handler], "json")
    app_log = logging.getLogger("cds_hooks_service")
    level = app_log.level
    app_log.addHandler(handler)
    app_log.setLevel(logging.DEBUG)

    def lines() -> list[dict]:
        return [json.loads(line) for line in stream.getvalue().splitlines()]  # every line is one JSON object

    lines.text = stream.getvalue
    yield lines
    app_log.removeHandler(handler)
    app_log.setLevel(level)


def hook_lines(lines: list[dict]) -> list[dict]:
    return [line for line in lines if line["logger"] == "cds_hooks_service.api" and line["message"].startswith("hook ")]


def sent(response):
    """The response closed, as a WSGI server closes it once its body is written: the hook call's line is written
    then (Flask's test client closes nothing by itself)."""
    response.close()
    return response


def test_one_json_line_per_hook_call_with_the_hook_instance(client, json_log):
    r = sent(post(client, SIGN, request_body(), headers={"X-Request-Id": "req-42.a"}))
    assert r.status_code == 200 and r.headers["X-Request-Id"] == "req-42.a"
    [line] = hook_lines(json_log())
    assert list(line)[:8] == ["time", "level", "logger", "message", "hookInstance", "requestId", "service", "pid"]
    assert line["hookInstance"] == HOOK_INSTANCE and line["requestId"] == "req-42.a"
    assert line["service"] == "migraine-med-safety-sign" and line["pid"] == os.getpid() and line["level"] == "INFO"
    assert line["status"] == 200 and line["cards"] == {"warning": 1} and line["duration_ms"] > 0
    assert datetime.fromisoformat(line["time"]).utcoffset() == timedelta(0)  # ISO 8601, UTC


def test_the_hook_line_is_written_once_the_answer_is_sent_with_the_calls_ids(client, json_log):
    """Written when the server closes the response (after sending it), not before: the client does not wait
    for it; its request and hook ids are the call's, though the request is over by then."""
    r = post(client, SIGN, request_body(), headers={"X-Request-Id": "req-43"})
    assert r.status_code == 200 and hook_lines(json_log()) == []
    logging.getLogger("cds_hooks_service.runtime").info("between the answer and the close")
    sent(r)
    [line] = hook_lines(json_log())
    assert (line["requestId"], line["hookInstance"], line["service"]) == (
        "req-43", HOOK_INSTANCE, "migraine-med-safety-sign")
    [between] = [x for x in json_log() if x["message"] == "between the answer and the close"]
    assert between["requestId"] is None  # the request's context was over: the ids were taken before


def test_error_answers_are_logged_too(client, json_log):
    assert sent(post(client, SIGN, {"hook": "order-sign"})).status_code == 400
    assert sent(post(client, "/cds-services/no-such-service", request_body())).status_code == 404
    bad, unknown = hook_lines(json_log())
    assert (bad["status"], bad["cards"], bad["service"]) == (400, {}, "migraine-med-safety-sign")
    assert bad["hookInstance"] == bad["requestId"]  # no valid body: the request id stands in
    assert unknown["status"] == 404 and "no-such-service" not in json_log.text()


def test_a_line_from_a_deeper_module_carries_the_hook_instance(make_app, tmp_path, json_log):
    """cards.py logs a failing card template while the hook call is handled: the line is correlated."""
    shutil.copytree(REPO / "rules", tmp_path / "rules")
    shutil.copytree(REPO / "cards", tmp_path / "cards")
    card = tmp_path / "cards/opioid-in-migraine.yaml"
    card.write_text(card.read_text().replace("detail: |\n", "detail: |\n  {{ 1 // 0 }}\n", 1))
    app = make_app(shared_rules=False, rules_dir=tmp_path / "rules", cards_dir=tmp_path / "cards")
    r = post(app.test_client(), SIGN, request_body())
    assert r.status_code == 200
    [deep] = [line for line in json_log() if line["logger"] == "cds_hooks_service.cards"]
    assert deep["level"] == "ERROR" and "ZeroDivisionError" in deep["exc_info"]
    assert deep["hookInstance"] == HOOK_INSTANCE and deep["requestId"] == r.headers["X-Request-Id"]
    assert deep["service"] == "migraine-med-safety-sign"


def test_feedback_and_auth_lines_carry_the_request_id_and_no_secrets(make_app, json_log):
    secured = make_app(jwt_issuers_file=REPO / "tests/fixtures/sandbox/issuers-sandbox.json").test_client()
    header = sandbox.sandbox_auth_header("http://localhost" + SIGN)
    body = request_body(patient="patient-secret-4711")
    assert post(secured, SIGN, body, headers={"Authorization": header}).status_code == 200
    assert post(secured, SIGN, body, headers={"Authorization": header}).status_code == 401  # replayed jti
    r = post(secured, SIGN + "/feedback", {"feedback": []}, headers={"Authorization": "Bearer garbage.token.value"})
    assert r.status_code == 401
    lines = json_log()
    rejected = [line for line in lines if line["message"].startswith("JWT rejected")]
    assert len(rejected) == 2
    # feedback: no hookInstance in the body; the request id stands in (echoed to the client)
    assert rejected[1]["hookInstance"] == rejected[1]["requestId"] == r.headers["X-Request-Id"]
    text = json_log.text()
    assert "patient-secret-4711" not in text
    assert header.split()[1] not in text and "garbage.token.value" not in text


def test_request_id_is_echoed_only_when_safe(client):
    assert client.get("/healthz", headers={"X-Request-Id": "abc-123"}).headers["X-Request-Id"] == "abc-123"
    for unsafe in ("a b", "x" * 101, "<script>", "-leading-dash"):
        echoed = client.get("/healthz", headers={"X-Request-Id": unsafe}).headers["X-Request-Id"]
        assert echoed != unsafe and uuid.UUID(echoed)
    first, second = (client.get("/nowhere").headers["X-Request-Id"] for _ in range(2))  # also on a 404
    assert uuid.UUID(first) and first != second


def test_unsafe_hook_instance_is_not_repeated(client, json_log):
    body = request_body()
    body["hookInstance"] = "line\nforged"
    assert sent(post(client, SIGN, body)).status_code == 200
    [line] = hook_lines(json_log())
    assert line["hookInstance"] == "invalid"


def test_lines_outside_a_request_carry_null_ids(client, json_log):
    post(client, SIGN, request_body())
    logging.getLogger("cds_hooks_service.runtime").info("outside any request")
    [outside] = [line for line in json_log() if line["message"] == "outside any request"]
    assert outside["hookInstance"] is None and outside["requestId"] is None and outside["service"] is None


def test_log_format_setting(monkeypatch):
    monkeypatch.delenv("CDS_LOG_FORMAT", raising=False)
    assert logs.log_format() == "json"
    monkeypatch.setenv("CDS_LOG_FORMAT", "TEXT")
    assert logs.log_format() == "text"
    handler = logging.StreamHandler(io.StringIO())
    before = handler.formatter
    logs.configure_handlers([handler])
    assert handler.formatter is before and len(handler.filters) == 1  # text: the formatter is left alone
    logs.configure_handlers([handler])
    assert len(handler.filters) == 1  # idempotent
    monkeypatch.setenv("CDS_LOG_FORMAT", "xml")
    with pytest.raises(ValueError, match="CDS_LOG_FORMAT"):
        logs.log_format()
