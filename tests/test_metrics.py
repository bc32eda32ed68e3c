"""GET /metrics (Prometheus): what is counted, bounded labels, the token, and gunicorn's several workers.

The metrics are process-wide (defined once at import), so the in-process tests compare before and after.
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests import sandbox_client as sandbox
from tests.helpers import REPO, SCENARIO_NOW
from tests.plugins.gunicorn_service import GunicornService, free_port, wait_for
from tests.helpers import SIGN, post, request_body

HOOK_COUNT = "cds_hook_duration_seconds_count"


def parse(text: str) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(client, **headers) -> dict[tuple, float]:
    r = client.get("/metrics", headers=headers)
    assert r.status_code == 200 and r.content_type.startswith("text/plain"), r.get_data(as_text=True)
    return parse(r.get_data(as_text=True))


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


class Delta:
    """Samples after minus before, for one client."""

    def __init__(self, client):
        self.client, self.before = client, scrape(client)

    def __call__(self, name: str, **labels) -> float:
        return value(scrape(self.client), name, **labels) - value(self.before, name, **labels)


def test_a_hook_call_that_fires_a_card(client):
    delta = Delta(client)
    r = post(client, SIGN, request_body())
    assert r.status_code == 200 and len(r.get_json()["cards"]) == 1
    assert delta("cds_cards_total", rule="opioid-in-migraine", indicator="warning") == 1
    assert delta(HOOK_COUNT, service="migraine-med-safety-sign") == 1
    assert delta("cds_hook_duration_seconds_bucket", service="migraine-med-safety-sign", le="+Inf") == 1
    assert delta("cds_http_responses_total", endpoint="cds.hook", status="200") == 1
    assert delta("cds_fhir_queries_total", key="conditions") == 0  # all prefetched


def test_fhir_fallback_failures_by_kind(make_app, fhir_server):
    closed = f"http://127.0.0.1:{free_port()}/fhir"  # nothing listens there
    client = make_app(fhir_servers=(closed, fhir_server.base_url)).test_client()
    delta = Delta(client)
    body = request_body(patient="patient-secret-4711")
    body.pop("prefetch")
    body["fhirServer"] = closed
    r = post(client, SIGN, body)
    assert r.status_code == 200
    [card] = r.get_json()["cards"]
    assert card["indicator"] == "info" and card["summary"].startswith("Check not completed")
    assert delta("cds_checks_not_completed_total", rule="opioid-in-migraine") == 1
    assert delta("cds_cards_total", rule="data-unavailable", indicator="info") == 1
    assert delta("cds_fhir_queries_total", key="conditions") == 1
    assert delta("cds_fhir_failures_total", key="conditions", reason_class="unavailable") == 1

    body["fhirServer"] = fhir_server.base_url
    body["fhirAuthorization"] = {"access_token": "wrong-token", "token_type": "Bearer", "expires_in": 300,
                                 "scope": "user/*.read", "subject": "cds-service"}
    assert post(client, SIGN, body).status_code == 200
    assert delta("cds_fhir_failures_total", key="conditions", reason_class="unauthorized") == 1
    text = client.get("/metrics").get_data(as_text=True)
    for secret in ("patient-secret-4711", "wrong-token", "127.0.0.1", fhir_server.base_url):
        assert secret not in text


def test_errors_by_endpoint_and_status_with_bounded_labels(client):
    delta = Delta(client)
    raw_id = f"svc-{uuid.uuid4().hex}"
    assert post(client, SIGN, {"hook": "order-sign"}).status_code == 400
    assert post(client, f"/cds-services/{raw_id}", request_body()).status_code == 404
    assert client.get(f"/{raw_id}/x").status_code == 404
    assert client.delete(SIGN).status_code == 405
    assert delta("cds_http_responses_total", endpoint="cds.hook", status="400") == 1
    assert delta("cds_http_responses_total", endpoint="cds.hook", status="404") == 1
    assert delta("cds_http_responses_total", endpoint="unmatched", status="404") == 1
    assert delta("cds_http_responses_total", endpoint="unmatched", status="405") == 1
    assert delta(HOOK_COUNT, service="unknown") == 1
    assert delta(HOOK_COUNT, service="migraine-med-safety-sign") == 1  # the 400
    assert raw_id not in client.get("/metrics").get_data(as_text=True)


def test_feedback_and_shadow_findings_are_counted(make_app, tmp_path, client):
    delta = Delta(client)
    card = post(client, SIGN, request_body()).get_json()["cards"][0]
    fb = sandbox.feedback_request(card["uuid"], "accepted", card["suggestions"][0]["uuid"])
    assert post(client, SIGN + "/feedback", fb).status_code == 200
    assert delta("cds_feedback_items_total", service="migraine-med-safety-sign") == 1

    local = tmp_path / "local"
    local.mkdir()
    (local / "opioid.yaml").write_text("id: opioid-in-migraine\nmode: shadow\n")
    shadow = make_app(rules_local_dir=local).test_client()
    assert post(shadow, SIGN, request_body()).get_json() == {"cards": []}
    assert delta("cds_shadow_findings_total", rule="opioid-in-migraine") == 1


def test_token_protects_metrics_and_the_cds_jwt_is_never_needed(make_app):
    secured = make_app(jwt_issuers_file=REPO / "tests/fixtures/sandbox/issuers-sandbox.json").test_client()
    assert secured.get("/cds-services").status_code == 401
    scrape(secured)  # open by default, no JWT

    client = make_app(jwt_issuers_file=REPO / "tests/fixtures/sandbox/issuers-sandbox.json",
                      metrics_token="s3cret-metrics-token-of-32-characters").test_client()
    for header in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic czNjcmV0LW1ldHJpY3MtdG9rZW4tb2YtMzItY2hhcmFjdGVycw=="},
                   {"Authorization": "Bearer s3cret-metrics-token-of-32-charactersX"}):
        r = client.get("/metrics", headers=header)
        assert r.status_code == 401 and r.get_json()["resourceType"] == "OperationOutcome"
        assert r.headers["WWW-Authenticate"] == "Bearer"
        assert "cds_" not in r.get_data(as_text=True)
    assert "cds_http_responses_total" in str(scrape(client, Authorization="Bearer s3cret-metrics-token-of-32-characters"))


def test_several_apps_in_one_process_share_the_metrics(make_app):
    first, second = make_app().test_client(), make_app().test_client()  # no "Duplicated timeseries"
    delta = Delta(second)
    post(first, SIGN, request_body())
    assert delta(HOOK_COUNT, service="migraine-med-safety-sign") == 1


# -- gunicorn, 2 workers: /metrics adds up every worker ---------------------------------------------------
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_gunicorn_metrics_add_up_all_workers(tmp_path):
    started = time.monotonic()
    token = "metrics-token-for-the-test-32-characters"
    service = GunicornService(tmp_path, dict(CDS_FIXED_NOW=SCENARIO_NOW, CDS_METRICS_TOKEN=token, CDS_LOG_FORMAT="json",
                                             TMPDIR=str(tmp_path)),
                              workers=2, threads=2, access_log_format="%(p)s %(U)s %(s)s",
                              args=("--no-control-socket",), drop_env=("PROMETHEUS_MULTIPROC_DIR",),
                              wait_for_workers=True)
    base = service.base_url
    body = json.dumps(request_body())
    auth = {"Authorization": f"Bearer {token}", "Connection": "close"}
    # a metrics directory left by a killed master (its lock is free) is swept; one in use (held) is not
    for name in ("cds-metrics-killed", "cds-metrics-in-use"):
        (tmp_path / name).mkdir()
        (tmp_path / name / ".lock").touch()
    in_use = os.open(tmp_path / "cds-metrics-in-use" / ".lock", os.O_RDONLY)
    fcntl.flock(in_use, fcntl.LOCK_EX)
    log = service.log

    def hook_lines() -> list[dict]:
        lines = [line for line in log().splitlines() if line.startswith("{")]
        return [d for d in map(json.loads, lines) if d["logger"] == "cds_hooks_service.api"]

    def answered_by(path: str) -> set[int]:
        return {int(line.split()[0].strip("<>")) for line in service.access_log().splitlines()
                if line.split()[1:2] == [path]}

    try:
        service.start()
        workers = service.worker_pids()
        assert not (tmp_path / "cds-metrics-killed").exists()
        [metrics_dir] = set(tmp_path.glob("cds-metrics-*")) - {tmp_path / "cds-metrics-in-use"}  # the master's (TMPDIR)
        assert metrics_dir.stat().st_mode & 0o077 == 0  # private
        probe = os.open(metrics_dir / ".lock", os.O_RDONLY)
        with pytest.raises(BlockingIOError):  # held by the master (and its workers): a later start keeps it
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(probe)

        def call(_):
            r = requests.post(base + SIGN, data=body, timeout=5,
                              headers={"Content-Type": "application/json", "Connection": "close"})
            return r.status_code, len(r.json().get("cards", []))

        sent = 0
        with ThreadPoolExecutor(4) as pool:  # 4 at a time, each on its own connection: both workers get some
            while sent < 40 or (answered_by(SIGN) != workers and sent < 200):
                assert set(pool.map(call, range(20))) == {(200, 1)}
                sent += 20
        assert answered_by(SIGN) == workers

        def hook_count() -> float:
            r = requests.get(f"{base}/metrics", headers=auth, timeout=5)
            assert r.status_code == 200, r.text
            return value(parse(r.text), HOOK_COUNT, service="migraine-med-safety-sign")

        assert requests.get(f"{base}/metrics", timeout=5).status_code == 401  # the token, from the environment
        scrapes = 0
        while scrapes < 6 or (answered_by("/metrics") != workers and scrapes < 60):
            assert hook_count() == sent  # whichever worker answers
            scrapes += 1
        assert answered_by("/metrics") == workers

        # the JSON log: one line per hook call, each with its pid and the request's hookInstance
        lines = wait_for(lambda: len(hook_lines()) == sent and hook_lines(), timeout=3)
        assert lines, log()
        assert {d["pid"] for d in lines} == workers
        assert {d["hookInstance"] for d in lines} == {request_body()["hookInstance"]}

        # a worker that exits (as after max_requests) still counts
        gone = sorted(workers)[0]
        os.kill(gone, signal.SIGTERM)
        assert wait_for(lambda: gone not in service.worker_pids(), timeout=10), log()
        assert hook_count() == sent
        # before stopping, the replacement worker must be past its first instants: a SIGTERM that reaches a worker
        # between gunicorn's fork and its post_fork hook (serving.hold_signals) runs the master's inherited handler
        # and is lost, and the master then waits its graceful timeout for it (seen once on a loaded machine)
        fresh = wait_for(lambda: set(service.worker_pids()) - workers, timeout=10)
        assert fresh, log()

        def booted(pid: int) -> bool:  # its app is loaded (its open-mode warning): past post_fork
            return any(f'"pid":{pid}' in line and '"logger":"cds_hooks_service.runtime"' in line
                       for line in log().splitlines())

        assert wait_for(lambda: all(booted(pid) for pid in fresh), timeout=20), log()
    finally:
        service.stop()
        os.close(in_use)
    assert not metrics_dir.exists(), "the master's metrics directory was not removed"
    print(f"gunicorn metrics test: {sent} hook calls, {scrapes} scrapes, {time.monotonic() - started:.1f}s")
    assert time.monotonic() - started < 90  # a guard against hanging; speed is measured in bench/
