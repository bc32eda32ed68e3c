"""Brand and combination names (issue 9 §2, rules/terminology/drug-names.yaml): every name resolves to its
ingredient(s) and, through them, to the right value sets; every name carries a primary-source reference."""
from __future__ import annotations

import shutil

import pytest

from cds_hooks_service.rulebook import RulebookError, load_rulebook
from cds_hooks_service.sources import url_problem
from cds_hooks_service.terminology import INGREDIENT_NAME, RXNORM
from tests.helpers import REPO, dump_yaml, load_yaml

NAMES_FILE = REPO / "rules/terminology/drug-names.yaml"
STRONG = "rx-strong-cyp3a4-inhibitors"

# name in an order text -> (ingredients it must resolve to, value sets it must fall in)
EXPECTED = {
    # boosted regimens: ritonavir or cobicistat -> strong CYP3A4 inhibitor (DHE boxed warning)
    "Paxlovid": ({"ritonavir", "nirmatrelvir"}, {STRONG}),
    "Kaletra": ({"lopinavir", "ritonavir"}, {STRONG}),
    "Genvoya": ({"elvitegravir", "cobicistat", "emtricitabine", "tenofovir alafenamide"}, {STRONG}),
    "Stribild": ({"elvitegravir", "cobicistat", "emtricitabine", "tenofovir disoproxil fumarate"}, {STRONG}),
    "Prezcobix": ({"darunavir", "cobicistat"}, {STRONG}),
    "Evotaz": ({"atazanavir", "cobicistat"}, {STRONG}),
    "Symtuza": ({"darunavir", "cobicistat", "emtricitabine", "tenofovir alafenamide"}, {STRONG}),
    "Viekira Pak": ({"ombitasvir", "paritaprevir", "ritonavir", "dasabuvir"}, {STRONG}),
    # triptans
    "Tosymra": ({"sumatriptan"}, {"rx-triptans"}),
    "Zembrace SymTouch": ({"sumatriptan"}, {"rx-triptans"}),
    "Onzetra Xsail": ({"sumatriptan"}, {"rx-triptans"}),
    "Treximet": ({"sumatriptan", "naproxen"}, {"rx-triptans"}),
    # ergots
    "Cafergot": ({"ergotamine", "caffeine"}, {"rx-ergots-other-than-dhe"}),
    "Migergot": ({"ergotamine", "caffeine"}, {"rx-ergots-other-than-dhe"}),
    "Trudhesa": ({"dihydroergotamine"}, {"rx-dihydroergotamine"}),
    # opioids: without a verified ingredient RxCUI; combinations; MOUD products
    "Olinvyk": ({"oliceridine"}, {"rx-opioids"}),
    "Percocet": ({"oxycodone", "acetaminophen"}, {"rx-opioids"}),
    "Suboxone": ({"buprenorphine", "naloxone"}, {"rx-opioids", "rx-moud-opioids"}),
}


def _ingredients(terminology, concepts) -> set[str]:
    out = set()
    for system, code in concepts:
        if system == RXNORM and code in terminology.ingredient_names:
            out.add(terminology.ingredient_names[code])
        elif system == INGREDIENT_NAME:
            out.add(code)
    return out


def _valuesets(terminology, concepts) -> set[str]:
    return {vs for vs, members in terminology.valuesets.items() if members & concepts}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_brand_resolves_to_its_ingredients_and_value_sets(rulebook, name):
    t = rulebook.terminology
    match = t.recognise([], [f"{name} as directed"])
    ingredients, valuesets = EXPECTED[name]
    assert match.matched_by == "name"
    assert _ingredients(t, match.concepts) == ingredients
    assert valuesets <= _valuesets(t, match.concepts)


def test_a_brand_does_not_reach_value_sets_of_ingredients_it_lacks(rulebook):
    t = rulebook.terminology
    assert STRONG not in _valuesets(t, t.recognise([], ["Treximet"]).concepts)
    assert "rx-triptans" not in _valuesets(t, t.recognise([], ["Paxlovid"]).concepts)
    assert t.recognise([], ["Descovy"]).matched_by == "none"  # unboosted: not tracked at all


def test_every_name_in_the_file_resolves_to_exactly_its_entry(rulebook):
    t = rulebook.terminology
    doc = load_yaml(NAMES_FILE.read_text(encoding="utf-8"))
    expected: dict[str, set[str]] = {}
    for code, item in doc["ingredients"].items():
        for name in [item["name"]] + [n["name"] for n in item.get("names") or []]:
            expected[name] = {t.ingredient_names[str(code)]}
    for generic, item in doc["nameOnly"].items():
        for name in [generic] + [n["name"] for n in item.get("names") or []]:
            expected[name] = {generic}
    for item in doc["combinations"]:
        expected[item["name"]] = {t.ingredient_names.get(str(i), str(i)) for i in item["ingredients"]}
    assert len(expected) > 150
    for name, ingredients in expected.items():
        match = t.recognise([], [f"{name} 1 dose"])
        assert match.matched_by == "name" and _ingredients(t, match.concepts) == ingredients, name


def test_every_name_has_a_dailymed_reference_on_a_primary_host(rulebook):
    refs = rulebook.terminology.name_refs
    assert refs and set(refs) == set(rulebook.terminology._names)
    for key, ref in refs.items():
        assert url_problem(ref["dailymed"], rulebook.sources.allowed_hosts) is None, (key, ref)
        assert ref["dailymed"].startswith("https://dailymed.nlm.nih.gov/dailymed/search.cfm?")
    assert refs["treximet"]["rxnorm"] == "797426"  # MIN naproxen / sumatriptan, verified in codes.json


def test_oliceridine_products_roll_up_by_code(rulebook):
    t = rulebook.terminology
    for code in ("2392234", "2392242", "2392244"):  # verified SCDs (VSAC Opioids, All, in codes.json)
        match = t.recognise([(RXNORM, code)], [])
        assert match.matched_by == "code" and "rx-opioids" in _valuesets(t, match.concepts)


# --- a broken names file fails validate -------------------------------------------------------------------
@pytest.fixture
def rules_copy(tmp_path):
    shutil.copytree(REPO / "rules", tmp_path / "rules")
    shutil.copytree(REPO / "cards", tmp_path / "cards")
    return tmp_path


def _break(rules_copy, change) -> str:
    path = rules_copy / "rules/terminology/drug-names.yaml"
    doc = load_yaml(path.read_text())
    change(doc)
    path.write_text(dump_yaml(doc, sort_keys=False))
    with pytest.raises(RulebookError) as exc:
        load_rulebook(rules_copy / "rules", rules_copy / "cards")
    return str(exc.value)


def test_a_name_without_a_reference_is_refused(rules_copy):
    msg = _break(rules_copy, lambda d: d["combinations"][0].pop("dailymed"))
    assert "Paxlovid" in msg and "needs `dailymed`" in msg


def test_an_invented_rxcui_is_refused(rules_copy):
    msg = _break(rules_copy, lambda d: d["combinations"][0].update(rxnorm="2587897"))
    assert "not a verified code" in msg


def test_a_name_for_two_entries_is_refused(rules_copy):
    msg = _break(rules_copy, lambda d: d["ingredients"]["85762"]["names"].append({"name": "Kaletra", "dailymed": "x"}))
    assert "'Kaletra' already names another entry" in msg


def test_a_combination_with_an_unknown_ingredient_is_refused(rules_copy):
    msg = _break(rules_copy, lambda d: d["combinations"][0]["ingredients"].append("molnupiravir"))
    assert "unknown ingredient 'molnupiravir'" in msg


def test_a_name_only_ingredient_in_an_unknown_value_set_is_refused(rules_copy):
    msg = _break(rules_copy, lambda d: d["nameOnly"]["oliceridine"].update(valueSets=["rx-opiods"]))
    assert "unknown value set 'rx-opiods'" in msg
