"""FHIR server faults, at the service level: what the CDS client gets when `fhirServer` misbehaves.

Every test posts a real hook call (order-sign, some order-select) whose prefetch lacks the keys the triggered
rules need, with `fhirServer` pointing at a REAL HTTP server on loopback that misbehaves
(tests/plugins/fault_server.py: a ThreadingHTTPServer whose answer is chosen per resource type), so the
service's own requests session, timeouts and socket handling are what is tested.

The defined answer, for every fault below:

* HTTP **200** with a spec-exact CDS Hooks response; never a 5xx, never a hang (the call returns within the
  time budget `CDS_TIME_BUDGET` plus a small margin, whatever the FHIR server does).
* One **info card** for every triggered rule that could not see data it needs and did not fire (issue 9 §4:
  at most one per response): "Check not completed: <rule title>" (or "<n> safety checks ..."), whose detail
  lists each such check as "- <rule title>" and names each piece of data that could not be read
  (`patient_data.DATA_LABELS`) with the reason in plain words: "<label>: <plain reason>" (below).
  Never `{"cards": []}` when a check could not run.
* A card that fires on the draft alone (e.g. an opioid whose order reason is migraine, DHE drafted with
  sumatriptan) still goes out, with "_Not checked, could not be read: <labels>._" appended to its detail.
* A fault on one key names only that key's data; keys no triggered rule needs are not even fetched.
* The card names a class of fault in plain words only (`fhir_client.PLAIN_REASONS`): no status code, no exception
  name (they made the card a port scanner), no access token, no URL, no patient id. The technical reason goes to
  the service's log (and the kind to `/metrics`). The access token from `fhirAuthorization` is sent to the FHIR
  server as `Authorization: Bearer <token>`, never to another origin, and appears neither in the response nor in
  the logs.

| fault on the FHIR server                                   | in the card                  | in the log (`fhir_client.py`)              |
|------------------------------------------------------------|------------------------------|--------------------------------------------|
| slower than the time budget (no headers)                   | could not be reached         | `time budget exhausted` or `timed out`     |
| body trickles in slower than the time budget               | could not be reached         | `time budget exhausted` or `timed out`     |
| HTTP 500 / 502 / 503 / 429                                 | answered with an error       | `HTTP 500` / `HTTP 502` / `HTTP 503` / `HTTP 429` |
| HTTP 401 / 403 (token refused)                             | answered with an error       | `HTTP 401` / `HTTP 403`                    |
| redirect (302 to a login page; not followed)               | answered with an error       | `HTTP 302`                                 |
| 404 on a search                                            | answered with an error       | `HTTP 404`                                 |
| 200 with an OperationOutcome instead of a Bundle           | answered with an error       | `server returned OperationOutcome: <code>` |
| 200 with an HTML page (e.g. an SSO login)                  | an answer that could not be used | `body is not a FHIR JSON resource`     |
| 200, JSON cut short (complete HTTP message)                | an answer that could not be used | `body is not a FHIR JSON resource`     |
| 200, connection cut before Content-Length bytes            | an answer that could not be used | `truncated or undecodable body`        |
| a single resource instead of a searchset Bundle            | an answer that could not be used | `expected Bundle, got Condition` (etc.) |
| a Bundle of Patients for a Condition search (wrong type)   | an answer that could not be used | `expected Condition entries, got Patient` |
| more than MAX_ENTRIES (50 here) matching entries           | only partly read (50 read, ...) | `more than 50 entries`                 |
| body larger than 32 MiB                                    | an answer that could not be used | `response body too large`              |
| paging loop (next link = the same page)                    | an answer that could not be used | `paging loop: next link already visited` |
| endless paging (always a new next page)                    | only partly read (0 read, ...) | `more than 50 pages` (MAX_PAGES), or `time budget exhausted` first on a loaded machine |
| next link to another origin (not followed, no token sent)  | the next page link points outside the FHIR server named in fhirServer | `next link points to a different server` |
| connection refused (nothing listening)                     | could not be reached         | `request failed (ConnectionError)`         |
| connection closed without an answer                        | could not be reached         | `request failed (ConnectionError)`         |
| only the first page was prefetched, the rest fails         | `only the first page was prefetched and the rest could not be read: <plain reason>` | |

Every fault server here is on the app's FHIR server allowlist (`fhir_servers`, i.e. CDS_FHIR_SERVERS); a server
not on it is never contacted (tests/test_ssrf.py). The requests answered 412 (data neither prefetched nor
readable: no `fhirServer`, or one not trusted for the client) are tested in test_api.py and test_ssrf.py.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from cds_hooks_service.cards import markdown_escape
from cds_hooks_service.fhir_client import PLAIN_REASONS
from cds_hooks_service.patient_data import DATA_LABELS
from cds_hooks_service.scenarios import expand_record
from tests.cds_checks import topics
from tests.helpers import (NOW, OPIOID_FOR_MIGRAINE, OPIOID_RULE, PATIENT, SELECT, SIGN, TOKEN, Answer,
                           assert_shows_nothing_secret, assert_token_not_logged, call, hook_body, patient_record)
from tests.plugins import fault_server as fs

BUDGET = 1.0  # CDS_TIME_BUDGET of the app in these tests (the slow faults use SLOW_BUDGET)
SLOW_BUDGET = 0.3
MARGIN = 0.5  # what the service may take on top of its time budget (rules, cards, the store)

DHE = {"drug": "3418", "text": "dihydroergotamine 1 mg IV", "route": "IV"}
SUMATRIPTAN = {"drug": "37418", "text": "sumatriptan 6 mg SC", "route": "SC"}
DHE_RULES = ["dhe-contraindicated-condition", "dhe-cyp3a4-inhibitor", "dhe-triptan-ergot-24h", "dhe-vasopressor"]


# ---------------------------------------------------------------- helpers

def assert_names_exactly(text: str, keys: set[str], shown: str) -> None:
    """`text` gives the plain reason for every key in `keys` and names no other data."""
    for key in keys:
        assert markdown_escape(f"{DATA_LABELS[key]}: {shown}") in text, (key, shown, text)
    for key in set(DATA_LABELS) - keys:
        assert markdown_escape(DATA_LABELS[key]) not in text, (key, text)


def assert_token_only_as_bearer(server: fs.FaultServer) -> None:
    assert server.requests, "the FHIR server was never asked"
    assert {r.authorization for r in server.requests} == {f"Bearer {TOKEN}"}


@pytest.fixture
def rule_by_id(rulebook):
    return {r.id: r for r in rulebook.rules}


@pytest.fixture(autouse=True)
def _entry_cap(monkeypatch):
    """The entry cap at 50 here: a fault server sending 10,000 entries to four searches at once does not fit the
    tests' time budget on a busy machine."""
    from cds_hooks_service import patient_data
    monkeypatch.setattr(patient_data, "MAX_ENTRIES", 50)


@pytest.fixture(autouse=True)
def _capture_all_logs(caplog):
    caplog.set_level(logging.DEBUG)  # urllib3 and the service at DEBUG: the token must not show anywhere


# ---------------------------------------------------------------- the faults

@dataclass
class Fault:
    id: str
    install: Callable  # (fault_server, make_fault_server) -> fhirServer URL
    reasons: tuple[str, ...]  # the technical reason, logged (one of these)
    shown: str  # what the CDS client reads: plain words (no status codes or exception names)
    reaches_server: bool = True
    slow: bool = False

    def __repr__(self) -> str:
        return self.id


def everywhere(behaviour) -> Callable:
    def install(server, _make):
        server.default = behaviour
        return server.base_url
    return install


def _refused(_server, _make):
    return fs.closed_port_url()


def _foreign_next(server, make):
    foreign = make()
    foreign.default = fs.bundle_of({})
    server.default = fs.next_link_to(foreign.origin)
    server.foreign = foreign  # checked: it got nothing, so the token never left the EHR's server
    return server.base_url


UNREACHED, ERROR, UNUSABLE = PLAIN_REASONS["unavailable"], PLAIN_REASONS["http_error"], PLAIN_REASONS["bad_response"]

OPERATION_OUTCOME = {"resourceType": "OperationOutcome", "issue": [
    {"severity": "error", "code": "processing", "diagnostics": f"Patient/{PATIENT} could not be searched"}]}

FAULTS = [
    Fault("slow-no-headers", everywhere(fs.slow(5)), ("time budget exhausted", "timed out"), UNREACHED, slow=True),
    Fault("slow-trickling-body", everywhere(fs.trickle(3)), ("time budget exhausted", "timed out"), UNREACHED, slow=True),
    Fault("http-500", everywhere(fs.status(500, b"Internal Server Error")), ("HTTP 500",), ERROR),
    Fault("http-502-html", everywhere(fs.html(502)), ("HTTP 502",), ERROR),
    Fault("http-503-retry-after", everywhere(fs.status(503, headers={"Retry-After": "120"})), ("HTTP 503",), ERROR),
    Fault("http-429", everywhere(fs.status(429, headers={"Retry-After": "1"})), ("HTTP 429",), ERROR),
    Fault("http-401", everywhere(fs.json_reply({"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "login"}]}, 401)), ("HTTP 401",), ERROR),
    Fault("http-403", everywhere(fs.status(403, b"Forbidden")), ("HTTP 403",), ERROR),
    Fault("redirect-302", everywhere(fs.status(302, headers={"Location": "https://sso.example/login"})), ("HTTP 302",), ERROR),
    Fault("http-404-on-search", everywhere(fs.status(404)), ("HTTP 404",), ERROR),
    Fault("html-200", everywhere(fs.html(200)), ("body is not a FHIR JSON resource",), UNUSABLE),
    Fault("json-cut-short", everywhere(fs.truncated(cut_connection_midway=False)), ("body is not a FHIR JSON resource",), UNUSABLE),
    Fault("connection-cut-mid-body", everywhere(fs.truncated(cut_connection_midway=True)),
          ("truncated or undecodable body",), UNUSABLE),
    Fault("operation-outcome-200", everywhere(fs.json_reply(OPERATION_OUTCOME)),
          ("server returned OperationOutcome: processing",), ERROR),
    Fault("single-resource-not-bundle", everywhere(fs.single_resource),
          tuple(f"expected Bundle, got {t}" for t in ("Condition", "MedicationRequest", "MedicationAdministration",
                                                        "MedicationStatement", "Observation", "Procedure")), UNUSABLE),
    Fault("bundle-of-patients", everywhere(fs.wrong_entries("Patient")),
          tuple(f"expected {t} entries, got Patient" for t in (
              "Condition", "MedicationRequest", "MedicationAdministration", "MedicationStatement", "Observation",
              "Procedure")), UNUSABLE),
    # a long record is read up to the caps (patient_data.MAX_*) and said to be only partly read
    Fault("too-many-entries", everywhere(fs.many_entries(51)), ("more than 50 entries",),
          "only partly read ("),
    Fault("body-over-32-mib", everywhere(fs.huge_body(32 * 1024 * 1024 + 1)), ("response body too large",), UNUSABLE),
    Fault("paging-loop", everywhere(fs.self_next_link), ("paging loop: next link already visited",), UNUSABLE),
    # stopped at the page cap, or, on a loaded machine, at the time budget first (every key the rules and their
    # alternatives read pages in the same budget): either way the reason is logged and the card says "partly read"
    Fault("endless-paging", everywhere(fs.endless_pages), ("more than 50 pages", "time budget exhausted"),
          "only partly read ("),
    Fault("next-link-foreign-origin", _foreign_next, ("next link points to a different server",),
          PLAIN_REASONS["next_link"]),
    Fault("connection-refused", _refused, ("request failed (ConnectionError)",), UNREACHED, reaches_server=False),
    Fault("connection-closed-no-answer", everywhere(fs.cut_connection), ("request failed (ConnectionError)",), UNREACHED),
]
BY_ID = {f.id: f for f in FAULTS}


def _app(make_app, fault: Fault, url: str):
    return make_app(time_budget=SLOW_BUDGET if fault.slow else BUDGET, fhir_servers=(url,))


def _assert_in_time(answer: Answer, fault: Fault) -> None:
    budget = SLOW_BUDGET if fault.slow else BUDGET
    print(f"{fault.id}: answered in {answer.elapsed:.3f}s (budget {budget}s)")
    assert answer.elapsed < budget + MARGIN, f"{fault.id}: {answer.elapsed:.2f}s for a {budget}s budget"


def _assert_fault_answer(answer, fault, server, caplog, rule_by_id, expected_rules, fired=()) -> None:
    """The defined answer: one info card per triggered rule that did not fire, naming exactly its data."""
    _assert_in_time(answer, fault)
    assert answer.cards, "a check that could not run must never pass for an empty answer"
    titles = {rule_by_id[r].title: r for r in expected_rules}
    not_completed = answer.not_completed()
    assert set(not_completed) == set(titles), (sorted(not_completed), sorted(titles))
    needs = set().union(*(rule_by_id[r].needs for r in expected_rules))
    for title, card in not_completed.items():
        assert card["source"]["topic"]["code"] == "data-unavailable"
        assert "could not be read" in card["detail"] and "Check the record by hand" in card["detail"]
        assert_names_exactly(card["detail"], needs, fault.shown)
        for word in ("HTTP", "Error", "Exception", "OperationOutcome", "timed out", "budget"):
            assert word not in card["detail"], (word, card["detail"])  # no status codes, no exception names
        assert_shows_nothing_secret(card["summary"] + card["detail"], server)
    shown = topics(answer.body)
    assert shown.count("data-unavailable") == 1  # one card naming every check not completed
    assert {t for t in shown if t != "data-unavailable"} == set(fired)
    if not fired:
        assert_shows_nothing_secret(json.dumps(answer.body), server)
    if fault.reaches_server:
        assert_token_only_as_bearer(server)
    if hasattr(server, "foreign"):
        assert server.foreign.requests == [], "followed a next link to another origin (with the token?)"
    assert_token_not_logged(caplog)
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("cds_hooks_service"))
    assert any(r in ours for r in fault.reasons), "the technical reason goes to the service's log"
    assert PATIENT not in ours


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.id)
def test_fault_order_sign_opioid(fault, fault_server, make_fault_server, make_app, caplog, rule_by_id):
    """IV hydromorphone without an order reason: opioid-in-migraine needs the conditions to decide."""
    url = fault.install(fault_server, make_fault_server)
    answer = call(_app(make_app, fault, url), hook_body(url))
    _assert_fault_answer(answer, fault, fault_server, caplog, rule_by_id, [OPIOID_RULE])
    assert len(answer.cards) == 1
    if fault.reaches_server:  # only the data opioid-in-migraine and ketorolac's contraindications need is asked for
        assert fault_server.requested_types() == {
            "Condition", "MedicationRequest", "MedicationAdministration", "MedicationStatement", "Observation",
            "Procedure"}


@pytest.mark.parametrize("fault", [BY_ID[i] for i in ("slow-no-headers", "http-500", "http-401", "html-200",
                                                       "paging-loop", "connection-refused")], ids=lambda f: f.id)
def test_fault_order_select_opioid(fault, fault_server, make_fault_server, make_app, caplog, rule_by_id):
    url = fault.install(fault_server, make_fault_server)
    answer = call(_app(make_app, fault, url), hook_body(url, hook="order-select"), SELECT)
    _assert_fault_answer(answer, fault, fault_server, caplog, rule_by_id, [OPIOID_RULE])


@pytest.mark.parametrize("fault", [BY_ID[i] for i in ("slow-no-headers", "http-503-retry-after", "http-403",
                                                       "connection-cut-mid-body", "bundle-of-patients",
                                                       "next-link-foreign-origin")], ids=lambda f: f.id)
@pytest.mark.parametrize("hook", ["order-sign", "order-select"])
def test_fault_dhe_every_dhe_rule_is_named(fault, hook, fault_server, make_fault_server, make_app, caplog,
                                           rule_by_id):
    """DHE triggers four rules needing six kinds of data: one "not completed" card naming the four checks and
    exactly the data they need (issue 9 §4: at most one such card per response)."""
    url = fault.install(fault_server, make_fault_server)
    answer = call(_app(make_app, fault, url), hook_body(url, drafts=(DHE,), hook=hook), SIGN if hook == "order-sign" else SELECT)
    _assert_fault_answer(answer, fault, fault_server, caplog, rule_by_id, DHE_RULES)
    assert len(answer.cards) == 1
    if fault.reaches_server and fault.id != "next-link-foreign-origin":
        assert fault_server.requested_types() == {
            "Condition", "MedicationRequest", "MedicationAdministration", "MedicationStatement", "Observation",
            "Procedure"}


@pytest.mark.parametrize("fault", [BY_ID[i] for i in ("slow-trickling-body", "http-500", "connection-refused")],
                         ids=lambda f: f.id)
def test_card_firing_on_the_draft_alone_still_goes_out_with_a_note(fault, fault_server, make_fault_server, make_app,
                                                                    caplog, rule_by_id):
    """The order's reason is migraine: the opioid card fires without any record, and says what it could not check
    (its exceptions, e.g. cancer or palliative care, need the conditions)."""
    url = fault.install(fault_server, make_fault_server)
    answer = call(_app(make_app, fault, url), hook_body(url, drafts=(OPIOID_FOR_MIGRAINE,)))
    _assert_in_time(answer, fault)
    assert topics(answer.body) == [OPIOID_RULE]
    [card] = answer.cards
    assert card["indicator"] == "warning"
    note = card["detail"].rsplit("\n\n", 1)[-1]
    assert note.startswith("_Not checked, could not be read: ") and note.endswith("._"), note
    for key in rule_by_id[OPIOID_RULE].needs:
        assert markdown_escape(DATA_LABELS[key]) in note
    assert_shows_nothing_secret(note, fault_server)
    assert TOKEN not in json.dumps(answer.body)
    assert_token_not_logged(caplog)


def test_dhe_with_sumatriptan_drafted_fires_and_names_the_rest(fault_server, make_app, caplog, rule_by_id):
    """DHE and sumatriptan in one order session: the 24 h rule fires on the drafts (critical, with a note; one card
    per drafted order of the pair); the three other DHE rules are named as not completed."""
    fault_server.default = fs.status(503)
    answer = call(make_app(time_budget=BUDGET), hook_body(fault_server.base_url, drafts=(DHE, SUMATRIPTAN)))
    fired = [c for c in answer.cards if c["indicator"] != "info"]
    assert fired and {c["indicator"] for c in fired} == {"critical"}
    for card in fired:
        assert card["source"]["topic"]["code"] == "dhe-triptan-ergot-24h"
        note = card["detail"].rsplit("\n\n", 1)[-1]
        assert note.startswith("_Not checked, could not be read: ")
        for key in rule_by_id["dhe-triptan-ergot-24h"].needs:
            assert markdown_escape(DATA_LABELS[key]) in note
    _assert_fault_answer(answer, BY_ID["http-503-retry-after"], fault_server, caplog, rule_by_id,
                         ["dhe-contraindicated-condition", "dhe-cyp3a4-inhibitor", "dhe-vasopressor"],
                         fired=["dhe-triptan-ergot-24h"])


# ---------------------------------------------------------------- a fault on one key only

def test_one_failing_key_on_a_real_fhir_server_names_only_that_data(fault_server, fhir_server, make_app, caplog,
                                                                    rule_by_id):
    """Everything is read from the real FHIR server (sekmet) through the fault server, except the Observation
    search, which fails: DHE with coronary artery disease still gets its critical card (with a note naming the
    observations). The other DHE rules read observations only for ketorolac's contraindications: they are not
    "not completed"; ketorolac is not offered, and the card says so once."""
    patient = fhir_server.unique_id("pat")
    cad = expand_record({"condition": "I25.10", "display": "Atherosclerotic heart disease of native coronary artery"},
                        0, NOW)
    cad.update(id=fhir_server.unique_id("cond"), subject={"reference": f"Patient/{patient}"})
    fhir_server.load([{"resourceType": "Patient", "id": patient}, cad])
    fault_server.default = fs.proxy_to(fhir_server.base_url)
    fault_server.route("Observation", fs.status(500))
    body = hook_body(fault_server.base_url, drafts=(DHE,), token=fhir_server.token)
    body["context"]["patientId"] = patient
    body["context"]["draftOrders"]["entry"][0]["resource"]["subject"] = {"reference": f"Patient/{patient}"}

    answer = call(make_app(time_budget=3), body)
    assert answer.cards[0]["source"]["topic"]["code"] == "dhe-contraindicated-condition"
    assert answer.cards[0]["indicator"] == "critical"
    note = answer.cards[0]["detail"].rsplit("\n\n", 1)[-1]
    assert note == "_Not checked, could not be read: " + markdown_escape(DATA_LABELS["observations"]) + "._"
    assert "**Ketorolac not offered:** not checked, could not read: lab results." in answer.cards[0]["detail"]
    assert answer.not_completed() == {}
    assert not any("ketorolac" in s["label"].lower() for c in answer.cards for s in c.get("suggestions", []))
    assert all(patient not in c.get("detail", "") for c in answer.cards)
    assert {r.authorization for r in fault_server.requests} == {f"Bearer {fhir_server.token}"}
    assert fhir_server.token not in json.dumps(answer.body) and fhir_server.token not in caplog.text


def test_a_fault_on_data_no_triggered_rule_needs_changes_nothing(fault_server, make_app, caplog):
    """Observations fail and procedures are slow: the opioid rule's own logic does not need them (only ketorolac's
    contraindications read them), so the card is the ordinary one with no note and no "not completed" card;
    ketorolac, which could not be checked, is not offered, and the card says why in one line."""
    migraine = patient_record({"condition": "G43.909", "display": "Migraine, unspecified"})
    fault_server.default = fs.bundle_of({"Condition": migraine})
    fault_server.route("Observation", fs.status(500))
    fault_server.route("Procedure", fs.slow(5))
    answer = call(make_app(time_budget=BUDGET), hook_body(fault_server.base_url))
    assert topics(answer.body) == [OPIOID_RULE]
    assert "_Not checked" not in answer.cards[0]["detail"]
    assert "**Ketorolac not offered:** not checked, could not read: lab results, procedures." \
        in answer.cards[0]["detail"]
    assert not any("ketorolac" in s["label"].lower() for s in answer.cards[0]["suggestions"])
    assert any("prochlorperazine" in s["label"].lower() for s in answer.cards[0]["suggestions"])
    assert_token_only_as_bearer(fault_server)
    assert_token_not_logged(caplog)


def test_prefetched_conditions_and_a_failing_server_for_the_rest(fault_server, make_app, caplog):
    """Conditions are prefetched (migraine), the other keys are absent and the server fails: the opioid card
    fires from the prefetch; the opioid orders and doses its overuse count reads (rule 1.2.0) could not be read,
    and the card's last line says so; ketorolac, whose contraindications read the rest, is not offered, naming
    what could not be read."""
    migraine = patient_record({"condition": "G43.909", "display": "Migraine, unspecified"})
    prefetch = {"conditions": fs.searchset(migraine)}
    fault_server.default = fs.status(500)
    answer = call(make_app(time_budget=BUDGET), hook_body(fault_server.base_url, prefetch=prefetch))
    assert topics(answer.body) == [OPIOID_RULE]
    detail = answer.cards[0]["detail"]
    assert detail.rsplit("\n\n", 1)[-1] == ("_Not checked, could not be read: "
                                            + markdown_escape(DATA_LABELS["medicationAdministrations"]) + ", "
                                            + markdown_escape(DATA_LABELS["medicationRequests"])
                                            + " (so not checked: Opioid orders or doses on 3 or more days in the"
                                              " past 30 days)._")
    assert "\n\n**Ketorolac not offered:** not checked, could not read: medications, lab results, procedures.\n\n" \
        in detail
    assert "Condition" not in fault_server.requested_types()
    assert_token_not_logged(caplog)


def test_first_page_prefetched_rest_unreadable(fault_server, make_app, caplog, rule_by_id):
    """The client prefetched the first page of the conditions (it has a next link) and the server then fails: the
    check is named as not completed, saying only the first page could be read."""
    page = fs.searchset([], next_url=f"{fault_server.base_url}/Condition?patient={PATIENT}&page=2")
    empty = fs.searchset([])
    prefetch = {"conditions": page, "medicationRequests": empty, "medicationAdministrations": empty,
                "medicationStatements": empty, "observations": empty, "procedures": empty}
    fault_server.default = fs.status(503)
    answer = call(make_app(time_budget=BUDGET), hook_body(fault_server.base_url, prefetch=prefetch))
    [card] = answer.cards
    assert card["summary"] == f"Check not completed: {rule_by_id[OPIOID_RULE].title}"
    assert (markdown_escape(DATA_LABELS["conditions"]) + ": only the first page was prefetched and the rest could "
            "not be read: " + markdown_escape(ERROR)) in card["detail"]
    for key in ("medicationAdministrations", "medicationRequests", "medicationStatements"):
        assert markdown_escape(DATA_LABELS[key]) not in card["detail"]
    assert fault_server.requested_types() == {"Condition"}
    assert_shows_nothing_secret(json.dumps(answer.body), fault_server)
    assert_token_not_logged(caplog)


def test_a_well_behaved_fault_server_gives_the_ordinary_answer(fault_server, make_app):
    """Control: the same request against the same server, answering properly, fires the opioid card and nothing
    else (so the fault tests above measure the faults, not the set-up)."""
    migraine = patient_record({"condition": "G43.909", "display": "Migraine, unspecified"})
    fault_server.default = fs.bundle_of({"Condition": migraine})
    answer = call(make_app(time_budget=BUDGET), hook_body(fault_server.base_url))
    assert topics(answer.body) == [OPIOID_RULE]
    assert "Not checked" not in answer.cards[0]["detail"]
    assert_token_only_as_bearer(fault_server)


def test_urllib3_debug_logs_carry_no_patient_ids(make_fault_server, caplog):
    """An operator turning on DEBUG logging (e.g. for the whole root logger) must not get FHIR request paths:
    urllib3 logs each request line ("GET /fhir/Condition?patient=<id>"). Hosts and status codes stay in the
    log; paths and queries are withheld."""
    import logging

    from cds_hooks_service.fhir_client import FhirClient

    server = make_fault_server()
    server.default = fs.bundle_of({})
    caplog.set_level(logging.DEBUG)
    FhirClient(server.base_url, TOKEN).fetch_all({"c": f"Condition?patient={PATIENT}", "p": f"Patient/{PATIENT}"},
                                                 budget=2)
    FhirClient(fs.closed_port_url(), TOKEN).fetch_all({"c": f"Condition?patient={PATIENT}"}, budget=2)
    urllib3_lines = [r.getMessage() for r in caplog.records if r.name.startswith("urllib3")]
    assert any(f":{server.port} " in line and " 200 " in line for line in urllib3_lines), urllib3_lines
    assert PATIENT not in caplog.text and TOKEN not in caplog.text
