"""Unit tests of terminology.py on small rules folders made here: value sets, the RxNorm roll-up, look-ups and
the errors of a broken value set (the shipped files are covered by test_engine.py and test_drug_names.py)."""
from __future__ import annotations

import json

import pytest

from cds_hooks_service.terminology import ICD10CM, RXNORM, SNOMED, Terminology, TerminologyError

SUMATRIPTAN, SUMATRIPTAN_SUCCINATE, SUMATRIPTAN_TABLET = "37418", "253178", "313160"


def _folder(tmp_path, valuesets: dict[str, dict], rollup: dict | None = None):
    (tmp_path / "valuesets").mkdir()
    for name, doc in valuesets.items():
        (tmp_path / "valuesets" / f"{name}.json").write_text(json.dumps(doc))
    if rollup is not None:
        (tmp_path / "terminology").mkdir()
        (tmp_path / "terminology" / "rxnorm-ingredients.json").write_text(json.dumps(rollup))
    return tmp_path


def _valueset(vs_id: str, *codings: tuple[str | None, str], title: str | None = None) -> dict:
    doc = {"resourceType": "ValueSet", "id": vs_id,
           "expansion": {"contains": [{"system": s, "code": c} for s, c in codings]}}
    if title:
        doc["title"] = title
    return doc


def test_value_sets_are_read_with_canonical_systems_and_codes(tmp_path):
    folder = _folder(tmp_path, {
        "cond-migraine": _valueset("cond-migraine", ("http://hl7.org/fhir/sid/icd-10", "G43909"),
                                   ("urn:oid:2.16.840.1.113883.6.96", "37796009"), (None, "no-system"),
                                   (ICD10CM, ""), title="Migraine"),
        "rx-triptans": _valueset("rx-triptans", (RXNORM, SUMATRIPTAN)),
    })
    terminology = Terminology.load(folder)
    assert terminology.valuesets["cond-migraine"] == frozenset({(ICD10CM, "G43.909"), (SNOMED, "37796009")})
    assert terminology.valueset_titles == {"cond-migraine": "Migraine", "rx-triptans": "rx-triptans"}


def test_products_and_precise_ingredients_roll_up_to_their_ingredient(tmp_path):
    folder = _folder(tmp_path, {"rx-triptans": _valueset("rx-triptans", (RXNORM, SUMATRIPTAN))}, rollup={
        "products": {SUMATRIPTAN_TABLET: {"ingredients": [SUMATRIPTAN], "doseForm": "Oral Tablet",
                                          "display": "sumatriptan 100 MG Oral Tablet"}},
        "preciseIngredients": {SUMATRIPTAN_SUCCINATE: SUMATRIPTAN}})
    terminology = Terminology.load(folder)
    product = terminology.recognise([(RXNORM, SUMATRIPTAN_TABLET)], [])
    assert product.matched_by == "code" and (RXNORM, SUMATRIPTAN) in product.concepts
    assert product.dose_form == "Oral Tablet"
    precise = terminology.recognise([(RXNORM, SUMATRIPTAN_SUCCINATE)], [])
    assert precise.matched_by == "code" and (RXNORM, SUMATRIPTAN) in precise.concepts
    assert terminology.display_of([(SNOMED, "1"), (RXNORM, SUMATRIPTAN_TABLET)]) == "sumatriptan 100 MG Oral Tablet"
    unknown = terminology.recognise([(RXNORM, "999999")], ["something else"])
    assert unknown.matched_by == "none" and terminology.display_of([(RXNORM, "999999")]) is None


def test_a_folder_without_terminology_files_has_value_sets_only(tmp_path):
    terminology = Terminology.load(_folder(tmp_path, {"rx-triptans": _valueset("rx-triptans", (RXNORM, SUMATRIPTAN))}))
    assert terminology.recognise([(RXNORM, SUMATRIPTAN)], []).matched_by == "code"
    assert terminology.recognise([], ["sumatriptan"]).matched_by == "none"  # no names file: no names


@pytest.mark.parametrize("text, message", [
    ("{not json", "not readable JSON"),
    (json.dumps({"resourceType": "CodeSystem", "id": "x"}), "not a FHIR ValueSet with an id"),
    (json.dumps({"resourceType": "ValueSet"}), "not a FHIR ValueSet with an id"),
])
def test_a_broken_value_set_is_an_error_naming_the_file(tmp_path, text, message):
    folder = _folder(tmp_path, {})
    (folder / "valuesets" / "rx-broken.json").write_text(text)
    with pytest.raises(TerminologyError, match=message) as caught:
        Terminology.load(folder)
    assert "rx-broken.json" in str(caught.value)


def test_an_edited_value_set_is_read_again(tmp_path):
    """Loading the same folder after an edit gives the edit (the suite's per-content cache included)."""
    folder = _folder(tmp_path, {"rx-triptans": _valueset("rx-triptans", (RXNORM, SUMATRIPTAN))})
    before = Terminology.load(folder)
    (folder / "valuesets" / "rx-triptans.json").write_text(json.dumps(_valueset("rx-triptans", (RXNORM, "1"))))
    after = Terminology.load(folder)
    assert before.valuesets["rx-triptans"] == frozenset({(RXNORM, SUMATRIPTAN)})
    assert after.valuesets["rx-triptans"] == frozenset({(RXNORM, "1")})
