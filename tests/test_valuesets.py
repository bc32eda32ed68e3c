"""Checks on the generated value sets and terminology files (rules/valuesets, rules/terminology)."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
from fhir.resources.R4B.valueset import ValueSet

from tests.helpers import load_yaml

REPO = Path(__file__).resolve().parent.parent
VS_DIR = REPO / "rules" / "valuesets"
TERM_DIR = REPO / "rules" / "terminology"
CODES_JSON = REPO.parent / "shared" / "clinical" / "codes.json"
BUILD_SCRIPT = REPO / "tools" / "build_valuesets.py"

# simple-icd-10-cm loads its data with deprecated importlib.resources calls
pytestmark = pytest.mark.filterwarnings(r"ignore:.*Use files\(\) instead:DeprecationWarning")

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
CODE_SOURCE_EXT = "https://migraine-med-safety.example.org/fhir/StructureDefinition/code-source"
ALLOWED_SYSTEMS = {RXNORM, ICD10CM, "http://snomed.info/sct", "http://loinc.org",
                   "http://www.cms.gov/Medicare/Coding/ICD10"}

# Value-set ids other code depends on.
EXPECTED_IDS = {
    "rx-opioids", "rx-moud-opioids", "rx-parenteral-opioid-products", "rx-dihydroergotamine",
    "rx-ergots-other-than-dhe", "rx-triptans", "rx-strong-cyp3a4-inhibitors", "rx-moderate-cyp3a4-inhibitors",
    "rx-vasopressors-systemic", "rx-vasoconstrictors-oral", "rx-nasal-decongestants", "rx-ketamine",
    "rx-esketamine", "rx-dopamine-antagonists", "rx-ketorolac", "rx-nsaids-parenteral", "rx-sumatriptan",
    "rx-dexamethasone", "rx-valproate",
    "cond-migraine", "cond-headache", "cond-migraine-refractory", "cond-hemiplegic-or-basilar-migraine",
    "cond-migraine-with-aura", "cond-coronary-artery-disease", "cond-peripheral-arterial-disease",
    "cond-raynaud", "cond-hypertensive-crisis", "cond-hypertension", "cond-pregnancy", "cond-lactation",
    "cond-sepsis", "cond-severe-hepatic-impairment", "cond-severe-renal-impairment", "cond-stroke-or-tia",
    "cond-seizure-disorder", "cond-psychosis", "cond-substance-use-disorder", "cond-opioid-use-disorder",
    "cond-malignancy-or-palliative-care", "proc-vascular-surgery",
    "obs-systolic-bp", "obs-diastolic-bp", "obs-bp-panel", "obs-egfr", "obs-pregnancy-test",
}

VS_FILES = sorted(VS_DIR.glob("*.json"))


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _members(doc: dict) -> list[tuple[str, str]]:
    return [(c["system"], c["code"]) for c in doc["expansion"]["contains"]]


@pytest.fixture(scope="module")
def valuesets() -> dict[str, dict]:
    return {p.stem: _load(p) for p in VS_FILES}


@pytest.fixture(scope="module")
def verified_codes() -> set[tuple[str, str]]:
    if not CODES_JSON.exists():
        pytest.skip(f"{CODES_JSON} not available")
    codes = _load(CODES_JSON)
    out = set()
    for vs in codes.values():
        for item in vs["codes"]:
            if item.get("verified") is True and item.get("code"):
                out.add((item.get("system") or vs["system"], item["code"]))
    return out


def test_expected_ids_present():
    assert EXPECTED_IDS <= {p.stem for p in VS_FILES}


@pytest.mark.parametrize("path", VS_FILES, ids=lambda p: p.stem)
def test_valueset_is_valid_fhir(path):
    doc = _load(path)
    ValueSet.model_validate(doc)
    assert doc["resourceType"] == "ValueSet"
    assert doc["id"] == path.stem
    assert doc["url"] == f"https://migraine-med-safety.example.org/fhir/ValueSet/{path.stem}"
    assert doc["version"] == "1.0.0" and doc["status"] == "active"
    assert re.fullmatch(r"[A-Z][A-Za-z0-9]*", doc["name"])
    assert doc["title"] and doc["description"]
    exp = doc["expansion"]
    assert exp["identifier"].startswith("urn:uuid:")
    assert exp["timestamp"] == "2026-11-21T00:00:00Z"
    assert exp["contains"], "empty value set"
    assert exp["total"] == len(exp["contains"])


@pytest.mark.parametrize("path", VS_FILES, ids=lambda p: p.stem)
def test_members_unique_and_documented(path):
    doc = _load(path)
    members = _members(doc)
    assert len(members) == len(set(members)), "duplicate (system, code)"
    for c in doc["expansion"]["contains"]:
        assert c["system"] in ALLOWED_SYSTEMS
        assert c["code"] and c["display"]
        sources = [e["valueString"] for e in c.get("extension", []) if e["url"] == CODE_SOURCE_EXT]
        assert sources and all(sources), f"{c['code']} has no code-source extension"


def test_every_code_is_verified_or_from_icd_tabular(valuesets, verified_codes):
    cm = None
    if importlib.util.find_spec("simple_icd_10_cm"):
        import simple_icd_10_cm as cm
    problems = []
    for vs_id, doc in valuesets.items():
        for c in doc["expansion"]["contains"]:
            key = (c["system"], c["code"])
            if key in verified_codes:
                continue
            sources = " ".join(e["valueString"] for e in c.get("extension", []))
            from_tabular = c["system"] == ICD10CM and "simple-icd-10-cm" in sources
            if from_tabular and cm is not None:
                from_tabular = cm.is_valid_item(c["code"])
            if not from_tabular:
                problems.append((vs_id, key))
    assert not problems, problems[:20]


def test_unverified_codes_not_shipped(valuesets):
    for doc in valuesets.values():
        assert ("http://loinc.org", "82810-3") not in _members(doc)


def test_key_memberships(valuesets):
    def has(vs_id, code):
        return any(m[1] == code for m in _members(valuesets[vs_id]))

    assert has("rx-dihydroergotamine", "3418") and not has("rx-ergots-other-than-dhe", "3418")
    assert not has("rx-ergots-other-than-dhe", "1760") and not has("rx-ergots-other-than-dhe", "47579")
    assert not has("rx-triptans", "2256930")  # lasmiditan
    assert has("rx-opioids", "3423") and has("rx-opioids", "203177")
    assert {m[1] for m in _members(valuesets["rx-moud-opioids"])} == {"1819", "6813", "203841", "218337"}
    assert has("cond-malignancy-or-palliative-care", "Z51.5") and has("cond-malignancy-or-palliative-care", "C50.911")
    assert has("cond-opioid-use-disorder", "F11.20") and has("cond-substance-use-disorder", "F16.20")
    assert set(_members(valuesets["rx-ketorolac"])) <= set(_members(valuesets["rx-nsaids-parenteral"]))


# ---- terminology files ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def rollup() -> dict:
    return _load(TERM_DIR / "rxnorm-ingredients.json")


@pytest.fixture(scope="module")
def drug_names() -> dict:
    return load_yaml((TERM_DIR / "drug-names.yaml").read_text(encoding="utf-8"))


def test_rollup_shape(rollup):
    assert rollup["system"] == RXNORM and rollup["description"]
    assert rollup["products"] and rollup["preciseIngredients"]
    for code, item in rollup["products"].items():
        assert code.isdigit() and item["display"] and item["ingredients"], code
        assert all(i.isdigit() for i in item["ingredients"])
    assert rollup["products"]["897745"]["ingredients"] == ["3423"]
    assert rollup["products"]["897745"]["doseForm"] == "Injectable Solution"
    assert rollup["preciseIngredients"]["203177"] == "3423"  # hydromorphone HCl -> hydromorphone
    assert rollup["preciseIngredients"]["203176"] == "3418"  # DHE mesylate -> DHE, not ergotamine


def test_drug_names(valuesets, drug_names, rollup):
    seen = {}
    for code, item in drug_names["ingredients"].items():
        for name in [item["name"], *(n["name"] for n in item.get("names") or [])]:
            assert seen.setdefault(name.lower(), str(code)) == str(code), f"{name} maps to two ingredients"
    # every RxNorm code of a drug value set that is neither a product nor a salt (PIN) is an
    # ingredient, and every ingredient needs a generic name
    not_ingredients = set(rollup["products"]) | set(rollup["preciseIngredients"])
    for vs_id, doc in valuesets.items():
        for item in doc["expansion"]["contains"]:
            if vs_id.startswith("rx-") and item["code"] not in not_ingredients:
                assert item["code"] in {str(c) for c in drug_names["ingredients"]}, (vs_id, item["code"], item["display"])
    assert seen["HYDROmorphone".lower()] == "3423"
    assert seen["dilaudid"] == "3423" and seen["migranal"] == "3418"


def test_build_is_deterministic(tmp_path):
    if not CODES_JSON.exists() or not importlib.util.find_spec("simple_icd_10_cm"):
        pytest.skip("codes.json or simple-icd-10-cm not available")
    spec = importlib.util.spec_from_file_location("build_valuesets", BUILD_SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--codes", str(CODES_JSON), "--out", str(tmp_path), "-q"]) == 0
    for path in sorted((tmp_path / "valuesets").glob("*.json")):
        assert path.read_bytes() == (VS_DIR / path.name).read_bytes(), f"{path.name} is stale: re-run the build"
    name = "rxnorm-ingredients.json"  # drug-names.yaml is hand-maintained (tests/test_drug_names.py)
    assert (tmp_path / "terminology" / name).read_bytes() == (TERM_DIR / name).read_bytes(), name
