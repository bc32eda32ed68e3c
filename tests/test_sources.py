"""Primary sources only (issue 9 §5): card links come from rules/sources.yaml and only from the hosts of
clinical.md §3.0; `validate` refuses anything else."""
from __future__ import annotations

import json
import shutil
from urllib.parse import urlsplit

import pytest

from cds_hooks_service.rulebook import RulebookError, load_rulebook
from cds_hooks_service.sources import url_problem
from tests.helpers import REPO, dump_yaml, load_yaml

# clinical.md §3.0, verbatim: the only hosts a card may link to (over https).
PRIMARY_HOSTS = {
    "dailymed.nlm.nih.gov", "www.accessdata.fda.gov", "www.fda.gov", "pubmed.ncbi.nlm.nih.gov", "doi.org",
    "www.ncbi.nlm.nih.gov", "headachejournal.onlinelibrary.wiley.com", "onlinelibrary.wiley.com",
    "www.healthquality.va.gov", "www.cdc.gov", "ichd-3.org", "americanheadachesociety.org",
}
SPEC_SOURCE_FIELDS = {"label", "url", "icon", "topic"}  # CDS Hooks 2.0 Source
SPEC_LINK_FIELDS = {"label", "url", "type", "appContext"}


def _card_urls(card: dict) -> list[str]:
    urls = [card["source"]["url"]] if "url" in card["source"] else []
    return urls + [link["url"] for link in card.get("links") or []]


def _assert_primary(card: dict, where: str) -> None:
    assert set(card["source"]) <= SPEC_SOURCE_FIELDS, (where, card["source"])
    assert isinstance(card["source"]["label"], str) and card["source"]["label"]
    for link in card.get("links") or []:
        assert set(link) <= SPEC_LINK_FIELDS and link["type"] == "absolute", (where, link)
    for url in _card_urls(card):
        parts = urlsplit(url)
        assert parts.scheme == "https", (where, url)
        assert parts.hostname in PRIMARY_HOSTS, (where, url)


def test_the_allowlist_is_exactly_clinical_md_section_3_0(rulebook):
    assert rulebook.sources.allowed_hosts == PRIMARY_HOSTS
    for source in rulebook.sources.by_id.values():
        assert url_problem(source.url, PRIMARY_HOSTS) is None, source


def test_every_scenario_card_links_only_to_primary_sources(scenario_answers):
    rendered = 0
    for rule, sc, hook, response in scenario_answers():  # every scenario of every rule, for each of its hooks
        for card in response["cards"]:
            _assert_primary(card, f"{rule.id}: {sc.name} ({hook})")
            rendered += 1
    assert rendered > 100  # the scenarios do render cards (not a vacuous pass)


def test_every_rule_card_carries_its_sources_from_the_sources_file(rulebook):
    for rule in rulebook.rules:
        cited = [rule.raw["source"]] + list(rule.raw.get("references") or [])
        assert rule.source["url"] == rulebook.sources.get(cited[0]).url
        assert [r["url"] for r in rule.references] == [rulebook.sources.get(i).url for i in cited[1:]]


@pytest.mark.parametrize("path", sorted((REPO / "fhir_examples").glob("*/*.order-*.json")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_example_requests_get_only_primary_links(example_answer, path):
    r = example_answer(path)  # the request as `examples send` sends it, answered once per run (test_examples reads it too)
    assert r.request["hook"] == json.loads(path.read_text())["hook"]
    assert r.status == 200
    for card in r.json()["cards"]:
        _assert_primary(card, path.name)


# --- validate refuses what is not a primary source ---------------------------------------------------
@pytest.fixture
def rules_copy(tmp_path):
    shutil.copytree(REPO / "rules", tmp_path / "rules")
    shutil.copytree(REPO / "cards", tmp_path / "cards")
    return tmp_path


def _edit_yaml(path, change):
    doc = load_yaml(path.read_text())
    change(doc)
    path.write_text(dump_yaml(doc, sort_keys=False))


def _problems(tmp_path) -> str:
    with pytest.raises(RulebookError) as exc:
        load_rulebook(tmp_path / "rules", tmp_path / "cards")
    return str(exc.value)


def test_validate_refuses_plain_http(rules_copy):
    _edit_yaml(rules_copy / "rules/sources.yaml", lambda d: d["sources"]["ichd-3"].update(url="http://ichd-3.org/"))
    assert "only https links are allowed" in _problems(rules_copy)


@pytest.mark.parametrize("url", [
    "https://www.rxlist.com/migranal-drug/warnings-precautions.htm",  # third-party label copy
    "https://www.healthday.com/healthpro-news/pain-management/x",  # news
    "https://doctorabad.com/uptodate/d/image.htm",  # mirror
    "https://www.droracle.ai/articles/457842",  # AI page
    "https://dailymed.nlm.nih.gov.evil.example/x",  # look-alike host
    "https://evil@dailymed.nlm.nih.gov/x",  # user info
    "https://dailymed.nlm.nih.gov:8443/x",  # other port
])
def test_validate_refuses_hosts_outside_the_allowlist(rules_copy, url):
    _edit_yaml(rules_copy / "rules/sources.yaml", lambda d: d["sources"]["ichd-3"].update(url=url))
    assert "sources.ichd-3.url" in _problems(rules_copy)


def test_validate_refuses_an_unknown_source_id(rules_copy):
    _edit_yaml(rules_copy / "rules/opioid-in-migraine.yaml", lambda d: d["references"].append("uptodate-mirror"))
    problems = _problems(rules_copy)
    assert "unknown source id 'uptodate-mirror'" in problems and "opioid-in-migraine.yaml" in problems


def test_validate_refuses_a_url_in_place_of_a_source_id(rules_copy):
    _edit_yaml(rules_copy / "rules/opioid-in-migraine.yaml",
               lambda d: d.update(source={"label": "news", "url": "https://www.healthday.com/x"}))
    assert "opioid-in-migraine.yaml" in _problems(rules_copy)


def test_validate_refuses_a_link_written_into_a_card_template(rules_copy):
    path = rules_copy / "cards/opioid-in-migraine.yaml"
    _edit_yaml(path, lambda d: d.update(detail=d["detail"] + "\nSee [summary](https://www.healthday.com/x).\n"))
    assert "a card template may not contain a link" in _problems(rules_copy)


def test_validate_refuses_a_missing_sources_file(rules_copy):
    (rules_copy / "rules/sources.yaml").unlink()
    assert "sources.yaml is missing" in _problems(rules_copy)
