"""Issue 9 §1, long records: what the rules need arrives even when it sits at the end of a long record; a prefetched
first page is continued from its own `next` link on `fhirServer`; a record that could not be read whole is said to
be so in plain words (the card's note or the "Check not completed" card).

Real FHIR server on loopback (sekmet, tests/plugins/fhir_server.py; it pages in insertion order when no `_sort` is
given, so what is loaded last is on the last page), seen through the fault server's proxy where the test must see
the requests; the fault server alone where paging must misbehave in a chosen way.
"""
from __future__ import annotations

import json
import time

import pytest
import requests

from cds_hooks_service import request_body, typed_record
from cds_hooks_service.cards import markdown_escape
from cds_hooks_service.patient_data import DATA_LABELS, FIRST_PAGE_ONLY, MAX_PAGES
from cds_hooks_service.scenarios import expand_record
from tests.cds_checks import topics
from tests.plugins import fault_server as fs
from tests.helpers import (NOW, OPIOID, OPIOID_FOR_MIGRAINE, OPIOID_RULE, PATIENT, patient_record,
                                    assert_shows_nothing_secret, assert_token_not_logged, call, hook_body)

RECORD_SIZE = 5000
MED_KEYS = ("medicationAdministrations", "medicationRequests", "medicationStatements")
# What the opioid card reads besides the conditions: ketorolac's contraindications (alternatives.yaml).
OTHER_KEYS = MED_KEYS + ("observations", "procedures")
EMPTY = fs.searchset([])


def _long_record(server, size: int = RECORD_SIZE) -> str:
    """A patient whose record holds `size` resources: `size - 1` unrelated conditions (acute upper respiratory
    infection, years of visits) loaded first, and the one migraine diagnosis the opioid rule needs loaded last."""
    patient = server.unique_id("pat")
    subject = {"reference": f"Patient/{patient}"}
    server.load([{"resourceType": "Patient", "id": patient}])
    filler = [{"resourceType": "Condition", "id": server.unique_id("c"), "subject": subject,
               "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "J06.9"}]},
               "recordedDate": f"{2000 + i % 25}-01-{1 + i % 28:02d}"} for i in range(size - 1)]
    for i in range(0, len(filler), 1000):
        server.load(filler[i:i + 1000])
    migraine = expand_record({"condition": "G43.909", "display": "Migraine, unspecified"}, 0, NOW)
    migraine.update(id=server.unique_id("mig"), subject=subject)
    server.load([migraine])
    return patient


def _body_for(patient: str, url: str, token: str | None, drafts=(OPIOID,), prefetch=None) -> dict:
    body = hook_body(url, drafts=drafts, token=token, prefetch=prefetch)
    body["context"]["patientId"] = patient
    for entry in body["context"]["draftOrders"]["entry"]:
        entry["resource"]["subject"] = {"reference": f"Patient/{patient}"}
    return body


@pytest.fixture(scope="module")
def long_record(fhir_server):
    t0 = time.monotonic()
    patient = _long_record(fhir_server)
    print(f"\nloaded {RECORD_SIZE} resources in {time.monotonic() - t0:.1f}s")
    return patient


# ---------------------------------------------------------------- 5,000 resources, the relevant one last

@pytest.mark.slow
def test_5000_resources_relevant_only_on_the_last_page_fires_the_card(fhir_server, long_record, make_app,
                                                                      fault_server):
    """Nothing prefetched: the service reads the conditions itself, 5 pages of 1000, and finds the migraine on the
    last one. The budget here is generous: this asserts that paging reaches the end (the old code gave up after 10
    pages or 2,000 entries), not how fast; the time is measured in bench/long_record.py and printed here."""
    fault_server.default = fs.proxy_to(fhir_server.base_url)
    t0 = time.monotonic()
    answer = call(make_app(time_budget=60, fhir_read_timeout=30), _body_for(long_record, fault_server.base_url,
                                                                           fhir_server.token))
    elapsed = time.monotonic() - t0
    pages = [r for r in fault_server.requests if r.rtype == "Condition"]
    print(f"\n5,000 conditions: {len(pages)} pages read, hook call answered in {elapsed:.2f}s")
    assert topics(answer.body) == [OPIOID_RULE], answer.body
    assert "partly read" not in answer.cards[0]["detail"] and "Not checked" not in answer.cards[0]["detail"]
    assert len(pages) == RECORD_SIZE // 1000


@pytest.mark.slow
def test_5000_resources_under_a_short_budget_say_the_record_was_not_read_whole(fhir_server, long_record, make_app,
                                                                              fault_server, caplog):
    """The same record when the time budget cannot cover it: no silent "nothing found"; the check is named as not
    completed, the conditions as only partly read, in plain words; the operator's log has the technical reason."""
    def slow_proxy(h):  # page 1 at once, the later pages not within the budget
        if "_offset=" in h.path:
            h.fault_server.released.wait(5)
        fs.proxy_to(fhir_server.base_url)(h)
    fault_server.default = slow_proxy
    answer = call(make_app(time_budget=3, fhir_read_timeout=10),
                  _body_for(long_record, fault_server.base_url, fhir_server.token))
    [card] = answer.cards
    assert card["summary"].startswith("Check not completed") and card["indicator"] == "info"
    assert markdown_escape(DATA_LABELS["conditions"] + ": only partly read (1,000 read, the rest did not arrive in "
                           "the time allowed)") in card["detail"]
    for word in ("budget", "Error", "Exception", "HTTP", "http://"):
        assert word not in card["detail"]
    assert "stopped before the end: time budget exhausted" in caplog.text
    assert_token_not_logged(caplog)


# ---------------------------------------------------------------- a prefetched first page with a next link

def _first_page(server_base: str, template: str, patient: str, token: str | None) -> dict:
    query = template.replace("{{context.patientId}}", patient)
    headers = {"Accept": "application/fhir+json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    return requests.get(f"{server_base}/{query}", headers=headers, timeout=30).json()


def test_prefetched_first_page_is_continued_from_its_next_link(fhir_server, fault_server, make_app, rulebook,
                                                               caplog):
    """The EHR prefetched the first page of the conditions (2.0 lets it page); the migraine is on page 2. The
    service reads page 2 from the page's own next link on fhirServer (one request), not the whole search again."""
    patient = _long_record(fhir_server, size=1200)
    fault_server.default = fs.proxy_to(fhir_server.base_url)
    page = _first_page(fault_server.base_url, rulebook.prefetch["conditions"], patient, fhir_server.token)
    assert any(link["relation"] == "next" for link in page["link"]) and len(page["entry"]) == 1000
    fault_server.requests.clear()
    prefetch = {"conditions": page} | {k: EMPTY for k in OTHER_KEYS}
    body = _body_for(patient, fault_server.base_url, fhir_server.token, prefetch=prefetch)
    # the server's page is of the usual shape: decoded typed, then continued with the dictionaries of page 2
    assert isinstance(request_body.decode(json.dumps(body).encode())["prefetch"]["conditions"],
                      typed_record.ConditionBundle)
    answer = call(make_app(), body)
    assert topics(answer.body) == [OPIOID_RULE]
    assert "partly read" not in answer.cards[0]["detail"]
    [req] = fault_server.requests  # the second page only, by the next link, with the token
    next_link = next(link["url"] for link in page["link"] if link["relation"] == "next")
    assert fault_server.origin + req.path == next_link and req.authorization == f"Bearer {fhir_server.token}"
    assert_token_not_logged(caplog)


def test_prefetched_next_link_to_another_host_is_refused_and_said(fault_server, make_fault_server, make_app, caplog):
    """The first page's next link points to another host: nothing is sent there (not the token, not a request),
    the first page is used, and the answer says the rest could not be read because it lies outside fhirServer."""
    foreign = make_fault_server()
    foreign.default = fs.bundle_of({"Condition": patient_record({"condition": "G43.909", "display": "Migraine"})})
    page = fs.searchset([], next_url=f"{foreign.base_url}/Condition?patient={PATIENT}&page=2")
    fault_server.default = fs.bundle_of({})
    prefetch = {"conditions": page} | {k: EMPTY for k in OTHER_KEYS}
    answer = call(make_app(fhir_servers=(fault_server.base_url,)), hook_body(fault_server.base_url, prefetch=prefetch))
    assert foreign.requests == [] and fault_server.requests == []
    [card] = answer.cards
    assert card["summary"].startswith("Check not completed")
    assert markdown_escape(f"{DATA_LABELS['conditions']}: {FIRST_PAGE_ONLY}: the next page link points outside "
                           "the FHIR server named in fhirServer") in card["detail"]
    assert_shows_nothing_secret(json.dumps(answer.body), fault_server, foreign)
    assert "next link points to a different server" in caplog.text
    assert_token_not_logged(caplog)


def test_prefetched_first_page_without_fhir_server_is_used_and_said(make_app):
    """No fhirServer at all: the first page (which holds the migraine) is still evaluated rather than a 412, and
    the card says the conditions were only partly read."""
    migraine = patient_record({"condition": "G43.909", "display": "Migraine"})
    page = fs.searchset(migraine, next_url="https://ehr.example.org/fhir/Condition?page=2")
    prefetch = {"conditions": page} | {k: EMPTY for k in OTHER_KEYS}
    body = hook_body("x", prefetch=prefetch, token=None)
    del body["fhirServer"]
    answer = call(make_app(), body)
    assert topics(answer.body) == [OPIOID_RULE]
    note = answer.cards[0]["detail"].rsplit("\n\n", 1)[-1]
    assert note == "_Only partly read, the record is longer: " + markdown_escape(DATA_LABELS["conditions"]) + "._"


# ---------------------------------------------------------------- caps end a search with what was read

def test_page_cap_keeps_the_newest_pages_and_says_so(fault_server, make_app, caplog):
    """Endless paging: the first MAX_PAGES pages are read; the migraine on page 1 fires the card, whose note says
    the conditions were only partly read; the log has the cap."""
    migraine = patient_record({"condition": "G43.909", "display": "Migraine"})

    def endless(h):
        n = int(h.path.rsplit("page=", 1)[-1]) if "page=" in h.path else 0
        found = migraine if (h.rtype == "Condition" and n == 0) else []
        h.reply_json(fs.searchset(found, next_url=f"{h.fault_server.base_url}/{h.rtype}?page={n + 1}"))
    fault_server.default = endless
    answer = call(make_app(time_budget=5), hook_body(fault_server.base_url))
    assert topics(answer.body) == [OPIOID_RULE]
    note = answer.cards[0]["detail"].rsplit("\n\n", 1)[-1]
    labels = sorted(["conditions", *OTHER_KEYS])
    assert note == "_Only partly read, the record is longer: " + markdown_escape(
        ", ".join(DATA_LABELS[k] for k in labels)) + "._"
    assert sum(r.rtype == "Condition" for r in fault_server.requests) == MAX_PAGES
    assert f"stopped before the end: more than {MAX_PAGES} pages" in caplog.text


def test_pages_read_before_the_budget_ends_are_used(fault_server, make_app):
    """Page 1 (with the migraine) arrives at once, page 2 never does: the card fires from page 1 and says the
    conditions were only partly read; nothing is lost because a later page was slow."""
    migraine = patient_record({"condition": "G43.909", "display": "Migraine"})

    def behaviour(h):
        if h.rtype != "Condition":
            return h.reply_json(EMPTY)
        if "page=2" in h.path:
            return fs.slow(5)(h)
        h.reply_json(fs.searchset(migraine, next_url=f"{h.fault_server.base_url}/Condition?page=2"))
    fault_server.default = behaviour
    answer = call(make_app(time_budget=0.5), hook_body(fault_server.base_url))
    assert topics(answer.body) == [OPIOID_RULE]
    assert answer.cards[0]["detail"].endswith(
        "_Only partly read, the record is longer: " + markdown_escape(DATA_LABELS["conditions"]) + "._")
    assert answer.elapsed < 0.5 + 0.5


def test_the_draft_alone_card_names_both_kinds_of_gap(fault_server, make_app):
    """A card that fires on the draft (order reason migraine) while conditions were partly read and medications
    could not be read at all names each kind in its own words (the opioid rule reads the opioid orders and doses
    itself since 1.2.0, for its overuse count)."""
    def behaviour(h):
        if h.rtype == "Condition":
            return h.reply_json(fs.searchset([], next_url=f"{h.fault_server.base_url}/Condition?page=2")) \
                if "page=2" not in h.path else fs.slow(5)(h)
        fs.status(503)(h)
    fault_server.default = behaviour
    answer = call(make_app(time_budget=0.5), hook_body(fault_server.base_url, drafts=(OPIOID_FOR_MIGRAINE,)))
    note = answer.cards[0]["detail"].rsplit("\n\n", 1)[-1]
    assert note == ("_Not checked, could not be read: " + markdown_escape(DATA_LABELS["medicationAdministrations"]) + ", "
                    + markdown_escape(DATA_LABELS["medicationRequests"]) + " (so not checked: Opioid orders or doses "
                    "on 3 or more days in the past 30 days); Only partly read, the record is longer: "
                    + markdown_escape(DATA_LABELS["conditions"]) + "._")
    # the rest is read only for ketorolac's contraindications: ketorolac is not offered, and says why
    assert "**Ketorolac not offered:** not checked, could not read: medications, lab results, procedures." \
        in answer.cards[0]["detail"]


def test_a_later_page_that_fails_keeps_the_pages_before(fault_server, make_app):
    """Page 1 of the medication orders arrives, page 2 answers 503: page 1 is used and the check that did not fire
    says the orders were only partly read and why, in plain words; a failure on the first page stays a failure."""
    def behaviour(h):
        if h.rtype == "MedicationRequest":
            if "page=2" in h.path:
                return fs.status(503)(h)
            return h.reply_json(fs.searchset([], next_url=f"{h.fault_server.base_url}/MedicationRequest?page=2"))
        if h.rtype == "MedicationAdministration":
            return fs.status(503)(h)
        h.reply_json(EMPTY)
    fault_server.default = behaviour
    # DHE: three of its rules read the medication orders themselves (a DHE draft does not trigger the opioid rule)
    dhe = {"drug": "3418", "text": "dihydroergotamine 1 mg IV", "route": "IV"}
    answer = call(make_app(time_budget=2), hook_body(fault_server.base_url, drafts=(dhe,)))
    [card] = answer.cards
    assert markdown_escape(f"{DATA_LABELS['medicationRequests']}: only partly read (none read, the rest "
                           "could not be read: the FHIR server answered with an error)") in card["detail"]
    assert markdown_escape(f"{DATA_LABELS['medicationAdministrations']}: the FHIR server answered with an "
                           "error") in card["detail"]


@pytest.mark.parametrize("link", ["{base}/../admin/Condition?page=2", "{base}/%2e%2e/admin/Condition?page=2",
                                  "{base}/%2E%2E%2Fadmin/Condition", "{origin}/other/Condition?page=2"])
def test_prefetched_next_link_outside_the_base_path_is_refused(fault_server, make_app, link):
    """The same host, but outside fhirServer's base path (also with percent-encoded dots a server may decode): not
    requested; the first page is used and the rest is said to be unread."""
    url = link.format(base=fault_server.base_url, origin=fault_server.origin)
    prefetch = {"conditions": fs.searchset([], next_url=url)} | {k: EMPTY for k in OTHER_KEYS}
    answer = call(make_app(), hook_body(fault_server.base_url, prefetch=prefetch))
    assert fault_server.requests == []
    [card] = answer.cards
    assert markdown_escape(f"{DATA_LABELS['conditions']}: {FIRST_PAGE_ONLY}: ") in card["detail"]
