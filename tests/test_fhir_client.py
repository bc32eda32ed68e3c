"""FhirClient against a real FHIR server (sekmet, tests/plugins/fhir_server.py) and, for faults a real
server cannot show, against `responses` mocks."""
from __future__ import annotations

import threading
import time

import pytest
import requests
import responses
from responses import matchers

from cds_hooks_service.fhir_client import (FhirBadResponse, FhirClient, FhirError, FhirUnauthorized,
                                           FhirUnavailable, SearchResult)

BASE = "https://ehr.test/fhir"
PUBLIC_IP = "93.184.216.34"  # ehr.test "resolves" here for the `responses` tests (nothing connects to it)


def public_dns(host, port):
    return [PUBLIC_IP]
TOKEN = "tok-Zx9q-very-secret-value"
PID = "pat-4711-secret"


def _patient(pid):
    return {"resourceType": "Patient", "id": pid, "name": [{"family": "Test", "given": ["Pat"]}]}


def _obs(oid, pid):
    return {"resourceType": "Observation", "id": oid, "status": "final", "code": {"text": "heart rate"},
            "subject": {"reference": f"Patient/{pid}"}}


def _cond(cid, pid):
    return {"resourceType": "Condition", "id": cid, "code": {"text": "migraine"},
            "subject": {"reference": f"Patient/{pid}"}}


def _far():
    return time.monotonic() + 10


def _assert_safe(exc: BaseException):
    """No token and no patient data in anything an exception shows."""
    for text in (str(exc), repr(exc), getattr(exc, "reason", "")):
        assert TOKEN not in text and PID not in text, text


class SlowSession(requests.Session):
    """Adds network latency and records how many requests were in flight at once."""

    def __init__(self, delay: float):
        super().__init__()
        self.delay, self.active, self.max_active = delay, 0, 0
        self._lock = threading.Lock()

    def get(self, *args, **kwargs):
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            time.sleep(self.delay)
            return super().get(*args, **kwargs)
        finally:
            with self._lock:
                self.active -= 1


# ---------------------------------------------------------------- real server

@pytest.fixture
def loaded(fhir_server):
    """A patient with 45 Observations (> 2 pages of 20) and 3 Conditions."""
    pid = fhir_server.unique_id("pat")
    fhir_server.load([_patient(pid)] + [_obs(f"{pid}-o{i}", pid) for i in range(45)]
                     + [_cond(f"{pid}-c{i}", pid) for i in range(3)])
    return pid


@pytest.fixture
def client(fhir_server):
    return FhirClient(fhir_server.base_url, fhir_server.token)


def test_search_follows_paging_to_get_all_matches(client, loaded):
    result = client.search("obs", f"Observation?patient={loaded}", deadline=_far())
    assert isinstance(result, SearchResult) and result.key == "obs"
    assert result.pages == 3  # sekmet pages at 20
    assert sorted(r["id"] for r in result.resources) == sorted(f"{loaded}-o{i}" for i in range(45))


def test_search_keeps_only_match_entries(client, loaded, fhir_server):
    query = f"Condition?patient={loaded}&_include=Condition:subject&no-such-param=1"
    raw = requests.get(f"{fhir_server.base_url}/{query}", headers=fhir_server.headers, timeout=5).json()
    assert {e["search"]["mode"] for e in raw["entry"]} == {"match", "include", "outcome"}  # the test means something
    result = client.search("conditions", query, deadline=_far())
    assert sorted(r["id"] for r in result.resources) == [f"{loaded}-c{i}" for i in range(3)]
    assert {r["resourceType"] for r in result.resources} == {"Condition"}


def test_unknown_search_parameter_does_not_crash(client, loaded):
    result = client.search("c", f"Condition?patient={loaded}&bogus-param=x", deadline=_far())
    assert len(result.resources) == 3


def test_bearer_token_is_required_and_sent(fhir_server, loaded):
    for token in ("wrong-token", None):
        bad = FhirClient(fhir_server.base_url, token)
        with pytest.raises(FhirUnauthorized) as ei:
            bad.search("obs", f"Observation?patient={loaded}", deadline=_far())
        assert ei.value.key == "obs" and "401" in ei.value.reason
        with pytest.raises(FhirUnauthorized):
            bad.read("patient", f"Patient/{loaded}", deadline=_far())
    assert FhirClient(fhir_server.base_url, fhir_server.token).read("p", f"Patient/{loaded}", deadline=_far())


def test_read_found_not_found_and_deleted(client, loaded, fhir_server):
    patient = client.read("patient", f"Patient/{loaded}", deadline=_far())
    assert patient["resourceType"] == "Patient" and patient["id"] == loaded
    assert client.read("patient", f"Patient/{fhir_server.unique_id('none')}", deadline=_far()) is None
    gone = fhir_server.unique_id("gone")
    fhir_server.load([_patient(gone)])
    requests.delete(f"{fhir_server.base_url}/Patient/{gone}", headers=fhir_server.headers, timeout=5).raise_for_status()
    assert client.read("patient", f"Patient/{gone}", deadline=_far()) is None  # 410 Gone


def test_open_server_without_token(open_fhir_server):
    pid = open_fhir_server.unique_id("pat")
    open_fhir_server.load([_patient(pid), _cond(f"{pid}-c", pid)])
    client = FhirClient(open_fhir_server.base_url)
    assert client.read("patient", f"Patient/{pid}", deadline=_far())["id"] == pid
    assert len(client.search("c", f"Condition?patient={pid}", deadline=_far()).resources) == 1


def test_fetch_all_mixes_reads_and_searches(client, loaded, fhir_server):
    missing = fhir_server.unique_id("none")
    out = client.fetch_all({"patient": f"Patient/{loaded}", "obs": f"Observation?patient={loaded}",
                            "conditions": f"Condition?patient={loaded}", "missing": f"Patient/{missing}"}, budget=5)
    assert list(out) == ["patient", "obs", "conditions", "missing"]
    assert out["patient"]["id"] == loaded
    assert len(out["obs"].resources) == 45 and len(out["conditions"].resources) == 3
    assert out["missing"] is None
    bad = FhirClient(fhir_server.base_url, "wrong").fetch_all({"patient": f"Patient/{loaded}"}, budget=5)
    assert isinstance(bad["patient"], FhirUnauthorized)  # returned, not raised


def test_fetch_all_runs_queries_concurrently(fhir_server, loaded):
    session = SlowSession(delay=0.2)  # simulated network latency on top of the real server
    client = FhirClient(fhir_server.base_url, fhir_server.token, session=session)
    q = f"Condition?patient={loaded}"
    t0 = time.monotonic()
    one = client.fetch_all({"a": q}, budget=5)
    t1 = time.monotonic() - t0
    t0 = time.monotonic()
    four = client.fetch_all({k: q for k in "abcd"}, budget=5)
    t4 = time.monotonic() - t0
    session.close()
    assert len(one["a"].resources) == 3
    assert all(len(four[k].resources) == 3 for k in "abcd")
    assert session.max_active >= 2
    assert t4 < 2.5 * t1, (t1, t4)  # sequential would be >= 4 * t1


def test_fetch_all_respects_budget_against_real_server(fhir_server, loaded):
    session = SlowSession(delay=0.6)
    client = FhirClient(fhir_server.base_url, fhir_server.token, session=session)
    t0 = time.monotonic()
    out = client.fetch_all({"patient": f"Patient/{loaded}", "c": f"Condition?patient={loaded}"}, budget=0.2)
    elapsed = time.monotonic() - t0
    assert elapsed < 0.5, elapsed
    assert all(isinstance(v, FhirUnavailable) and v.reason == "time budget exhausted" for v in out.values())
    time.sleep(0.5)  # let the abandoned workers finish before the session is closed
    session.close()


# ---------------------------------------------------------------- faults (responses)

@pytest.fixture
def mock():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


@pytest.fixture
def mclient():
    return FhirClient(BASE, TOKEN, resolver=public_dns)


def _bundle(*resources, next_url=None, extra=()):
    b = {"resourceType": "Bundle", "type": "searchset",
         "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources] + list(extra)}
    if next_url:
        b["link"] = [{"relation": "self", "url": "ignored"}, {"relation": "next", "url": next_url}]
    return b


def _page(mock, path, params, body, **kw):
    mock.add("GET", f"{BASE}/{path}", json=body, match=[matchers.query_param_matcher(params)], **kw)


def test_sends_accept_and_bearer_and_caps_timeouts(mock, mclient):
    mock.add("GET", f"{BASE}/Observation", json=_bundle(_obs("o1", PID)))
    result = mclient.search("obs", f"Observation?patient={PID}", deadline=time.monotonic() + 0.3)
    assert [r["id"] for r in result.resources] == ["o1"] and result.pages == 1
    req = mock.calls[0].request
    assert req.headers["Authorization"] == f"Bearer {TOKEN}"
    assert req.headers["Accept"] == "application/fhir+json"
    connect, read = req.req_kwargs["timeout"]
    assert connect <= 0.3 and read <= 0.3  # min(configured, time left)


def test_no_authorization_header_without_token(mock):
    mock.add("GET", f"{BASE}/Patient/p1", json=_patient("p1"))
    assert FhirClient(BASE, resolver=public_dns).read("patient", "Patient/p1", deadline=_far())["id"] == "p1"
    assert "Authorization" not in mock.calls[0].request.headers


@pytest.mark.parametrize("exc", [requests.exceptions.ReadTimeout(f"{BASE}/Patient/{PID} timed out"),
                                 requests.exceptions.ConnectTimeout("connect timeout"),
                                 requests.exceptions.ConnectionError(f"refused {BASE}/Patient/{PID}")])
def test_network_failures_are_unavailable(mock, mclient, exc):
    mock.add("GET", f"{BASE}/Patient/{PID}", body=exc)
    with pytest.raises(FhirUnavailable) as ei:
        mclient.read("patient", f"Patient/{PID}", deadline=_far())
    _assert_safe(ei.value)


@pytest.mark.parametrize("status", [500, 502, 503, 429])
def test_server_errors_are_unavailable(mock, mclient, status):
    mock.add("GET", f"{BASE}/Condition", status=status, body="<html>boom</html>")
    with pytest.raises(FhirUnavailable) as ei:
        mclient.search("c", f"Condition?patient={PID}", deadline=_far())
    assert ei.value.reason == f"HTTP {status}"
    _assert_safe(ei.value)


@pytest.mark.parametrize("status", [401, 403])
def test_auth_errors(mock, mclient, status):
    mock.add("GET", f"{BASE}/Patient/{PID}", status=status, json={"resourceType": "OperationOutcome"})
    with pytest.raises(FhirUnauthorized) as ei:
        mclient.read("patient", f"Patient/{PID}", deadline=_far())
    _assert_safe(ei.value)


@pytest.mark.parametrize("body", [
    "<!DOCTYPE html><html><body>Login</body></html>",  # e.g. an SSO page
    '{"resourceType": "Bundle", "type": "searchset", "entry": [{"resou',  # truncated
    "", "[1, 2]", "null",
    requests.exceptions.ChunkedEncodingError("IncompleteRead"),  # connection cut mid-body
])
def test_unusable_bodies_are_bad_responses(mock, mclient, body):
    mock.add("GET", f"{BASE}/Condition", body=body, content_type="application/fhir+json")
    with pytest.raises(FhirBadResponse) as ei:
        mclient.search("c", f"Condition?patient={PID}", deadline=_far())
    _assert_safe(ei.value)


@pytest.mark.parametrize("entry", [{"x": 1}, ["not-an-object"], "nope"])
def test_malformed_bundle_entries(mock, mclient, entry):
    mock.add("GET", f"{BASE}/Condition", json={"resourceType": "Bundle", "type": "searchset", "entry": entry})
    with pytest.raises(FhirBadResponse, match="malformed"):
        mclient.search("c", f"Condition?patient={PID}", deadline=_far())


def test_wrong_resource_type(mock, mclient):
    mock.add("GET", f"{BASE}/Condition", json=_patient(PID))
    mock.add("GET", f"{BASE}/Patient/{PID}", json=_obs("o1", PID))
    with pytest.raises(FhirBadResponse, match="expected Bundle, got Patient"):
        mclient.search("c", f"Condition?patient={PID}", deadline=_far())
    with pytest.raises(FhirBadResponse, match="expected Patient, got Observation"):
        mclient.read("patient", f"Patient/{PID}", deadline=_far())


def test_operation_outcome_is_summarised_without_patient_data(mock, mclient):
    oo = {"resourceType": "OperationOutcome", "issue": [
        {"severity": "warning", "code": "informational", "diagnostics": "x"},
        {"severity": "error", "code": "invalid", "diagnostics": f"Patient {PID} (Jane Doe, MRN 123) bad"}]}
    mock.add("GET", f"{BASE}/Condition", status=400, json=oo)
    mock.add("GET", f"{BASE}/Observation", status=200, json=oo)
    for q in (f"Condition?patient={PID}", f"Observation?patient={PID}"):
        with pytest.raises(FhirBadResponse) as ei:
            mclient.search("c", q, deadline=_far())
        assert ei.value.reason == "server returned OperationOutcome: invalid"
        _assert_safe(ei.value)


def test_outcome_and_include_entries_dropped(mock, mclient):
    extra = [{"resource": _patient(PID), "search": {"mode": "include"}},
             {"resource": {"resourceType": "OperationOutcome", "issue": []}, "search": {"mode": "outcome"}},
             {"resource": {"resourceType": "OperationOutcome", "issue": []}},
             {"resource": _obs("o2", PID)}]  # no search.mode: kept
    mock.add("GET", f"{BASE}/Observation", json=_bundle(_obs("o1", PID), extra=extra))
    result = mclient.search("obs", f"Observation?patient={PID}", deadline=_far())
    assert [r["id"] for r in result.resources] == ["o1", "o2"]


def test_relative_next_link_resolves_against_base(mock, mclient):
    _page(mock, "Observation", {"patient": PID}, _bundle(_obs("o1", PID), next_url="Observation?page=2"))
    _page(mock, "Observation", {"page": "2"}, _bundle(_obs("o2", PID)))
    result = mclient.search("obs", f"Observation?patient={PID}", deadline=_far())
    assert [r["id"] for r in result.resources] == ["o1", "o2"] and result.pages == 2
    assert mock.calls[1].request.url == f"{BASE}/Observation?page=2"
    assert mock.calls[1].request.headers["Authorization"] == f"Bearer {TOKEN}"


def test_paging_loop_is_detected(mock, mclient):
    _page(mock, "Observation", {"patient": PID}, _bundle(_obs("o1", PID), next_url=f"{BASE}/Observation?page=2"))
    _page(mock, "Observation", {"page": "2"}, _bundle(_obs("o2", PID), next_url=f"{BASE}/Observation?patient={PID}"))
    with pytest.raises(FhirBadResponse, match="paging loop") as ei:
        mclient.search("obs", f"Observation?patient={PID}", deadline=_far())
    assert len(mock.calls) == 2
    _assert_safe(ei.value)


def test_page_and_entry_caps(mock):
    def endless(request):
        n = int(request.params.get("page", "0"))
        return 200, {}, __import__("json").dumps(_bundle(_obs(f"o{n}", PID), next_url=f"Observation?page={n + 1}"))
    mock.add_callback("GET", f"{BASE}/Observation", callback=endless)
    # a cap ends the search with what was read before it, and says which cap (long records: patient_data.py)
    result = FhirClient(BASE, TOKEN, resolver=public_dns).search("obs", "Observation?page=0", deadline=_far())
    assert len(mock.calls) == 10
    assert result.incomplete == "more than 10 pages" and [r["id"] for r in result.resources] == [f"o{n}" for n in range(10)]
    result = FhirClient(BASE, TOKEN, max_entries=3, resolver=public_dns).search("obs", "Observation?page=0", deadline=_far())
    assert result.incomplete == "more than 3 entries" and [r["id"] for r in result.resources] == ["o0", "o1", "o2"]


@pytest.mark.parametrize("foreign", ["https://evil.test/fhir/Observation?page=2",
                                     "https://ehr.test:8443/fhir/Observation?page=2",
                                     "http://ehr.test/fhir/Observation?page=2",
                                     "//evil.test/fhir/Observation?page=2",
                                     "https://ehr.test:x/fhir/Observation?page=2"])
def test_foreign_next_link_is_refused_and_token_not_sent(mock, mclient, foreign):
    _page(mock, "Observation", {"patient": PID}, _bundle(_obs("o1", PID), next_url=foreign))
    mock.add("GET", "https://evil.test/fhir/Observation", json=_bundle())
    mock.add("GET", "https://ehr.test:8443/fhir/Observation", json=_bundle())
    mock.add("GET", "http://ehr.test/fhir/Observation", json=_bundle())
    with pytest.raises(FhirBadResponse, match="different server") as ei:
        mclient.search("obs", f"Observation?patient={PID}", deadline=_far())
    assert [c.request.url for c in mock.calls] == [f"{BASE}/Observation?patient={PID}"]
    _assert_safe(ei.value)


def test_redirects_are_not_followed(mock, mclient):
    mock.add("GET", f"{BASE}/Patient/{PID}", status=302, headers={"Location": "https://evil.test/login"})
    with pytest.raises(FhirBadResponse, match="HTTP 302"):
        mclient.read("patient", f"Patient/{PID}", deadline=_far())
    assert len(mock.calls) == 1


def test_read_not_found_and_gone(mock, mclient):
    mock.add("GET", f"{BASE}/Patient/a", status=404, json={"resourceType": "OperationOutcome"})
    mock.add("GET", f"{BASE}/Patient/b", status=410, body="")
    assert mclient.read("p", "Patient/a", deadline=_far()) is None
    assert mclient.read("p", "Patient/b", deadline=_far()) is None


def test_expired_deadline_sends_nothing(mock, mclient):
    with pytest.raises(FhirUnavailable, match="time budget exhausted"):
        mclient.search("c", "Condition?patient=1", deadline=time.monotonic() - 0.01)
    assert len(mock.calls) == 0


@pytest.mark.slow  # waits on a real time-out or runs a concurrency stress (tests/conftest.py)
def test_fetch_all_budget_exhausted(mock, mclient):
    release = threading.Event()

    def slow(request):
        release.wait(2)
        return 200, {}, '{"resourceType": "Bundle", "type": "searchset"}'
    mock.add_callback("GET", f"{BASE}/Condition", callback=slow)
    mock.add("GET", f"{BASE}/Patient/{PID}", json=_patient(PID))
    t0 = time.monotonic()
    out = mclient.fetch_all({"patient": f"Patient/{PID}", "conditions": f"Condition?patient={PID}"}, budget=0.3)
    elapsed = time.monotonic() - t0
    release.set()
    assert 0.25 <= elapsed < 0.8, elapsed
    assert out["patient"]["id"] == PID
    assert isinstance(out["conditions"], FhirUnavailable)
    assert out["conditions"].reason == "time budget exhausted" and out["conditions"].key == "conditions"
    time.sleep(0.1)  # let the released worker finish inside the mock


def test_fetch_all_never_raises(mock, mclient):
    class Broken(requests.Session):
        def get(self, *a, **kw):
            raise RuntimeError(f"bug with {TOKEN}")
    out = FhirClient(BASE, TOKEN, session=Broken(), resolver=public_dns).fetch_all({"p": f"Patient/{PID}"}, budget=1)
    assert type(out["p"]) is FhirError
    _assert_safe(out["p"])
    mock.add("GET", f"{BASE}/Condition", status=500)
    out = mclient.fetch_all({"c": "Condition?patient=1", "bad": "Patient/../../etc"}, budget=1)
    assert isinstance(out["c"], FhirUnavailable) and isinstance(out["bad"], FhirError)
    assert mclient.fetch_all({}, budget=1) == {}


def test_token_not_in_client_repr():
    assert TOKEN not in repr(FhirClient(BASE, TOKEN))
