"""Terminology: value sets, the RxNorm product -> ingredient rollup, and drug names.

Everything here is compiled once when the rules are loaded. At request time recognising a drug is
a few dict and frozenset look-ups: a concept is a ``(system, code)`` pair, a value set is a frozenset
of concepts, and a medication is the set of concepts it carries (its own codes plus the ingredients
they roll up to).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .rulefiles import RuleFileError, load_yaml_text, read_rule_text

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"

# Spellings of the same code systems seen in real EHR data (OIDs, WHO ICD-10, http/https).
_SYSTEM_ALIASES = {
    "urn:oid:2.16.840.1.113883.6.88": RXNORM,
    "http://www.nlm.nih.gov/research/umls/rxnorm/": RXNORM,
    "https://www.nlm.nih.gov/research/umls/rxnorm": RXNORM,
    "urn:oid:2.16.840.1.113883.6.96": SNOMED,
    "https://snomed.info/sct": SNOMED,
    "urn:oid:2.16.840.1.113883.6.1": LOINC,
    "https://loinc.org": LOINC,
    "urn:oid:2.16.840.1.113883.6.90": ICD10CM,
    "http://hl7.org/fhir/sid/icd-10": ICD10CM,
    "https://hl7.org/fhir/sid/icd-10-cm": ICD10CM,
}

Concept = tuple[str, str]


def concept(system: object, code: object) -> Concept | None:
    """The canonical (system, code) pair of a coding, or None when it has no usable code."""
    if not isinstance(code, str) or not code or not isinstance(system, str):
        return None
    system = _SYSTEM_ALIASES.get(system, system)
    code = code.strip()
    if system == ICD10CM and "." not in code and len(code) > 3:
        code = code[:3] + "." + code[3:]  # "G43909" -> "G43.909"
    return system, code


class TerminologyError(ValueError):
    """A value set or terminology file is missing or malformed."""


@dataclass(frozen=True)
class Product:
    ingredients: frozenset[Concept]
    dose_form: str | None
    display: str | None = None


@dataclass(frozen=True)
class DrugMatch:
    """What a medication was recognised as."""

    concepts: frozenset[Concept]  # its own codes + rolled-up ingredients (+ named ingredients)
    matched_by: str  # "code" or "name" (text or coding display named an ingredient) or "none"
    dose_form: str | None
    matched_names: tuple[str, ...] = ()


class Terminology:
    def __init__(self, valuesets: dict[str, frozenset[Concept]], valueset_titles: dict[str, str],
                 products: dict[str, Product], precise: dict[str, str], names: dict[str, str],
                 ingredient_names: dict[str, str]):
        self.valuesets = valuesets
        self.valueset_titles = valueset_titles
        self._products = products
        self._precise = precise  # PIN rxcui -> IN rxcui
        self._names = names  # lower-case name -> IN rxcui
        self.ingredient_names = ingredient_names  # IN rxcui -> generic name
        self._known_rx = frozenset(
            {c for vs in valuesets.values() for c in vs if c[0] == RXNORM}
            | {(RXNORM, code) for code in products} | {(RXNORM, code) for code in precise}
            | {(RXNORM, code) for code in ingredient_names})
        pattern = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
        self._name_re = re.compile(rf"(?<![\w.])(?:{pattern})(?![\w])") if names else None

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def load(cls, rules_dir: Path) -> "Terminology":
        vs_dir = rules_dir / "valuesets"
        valuesets: dict[str, frozenset[Concept]] = {}
        titles: dict[str, str] = {}
        for path in sorted(vs_dir.glob("*.json")):
            try:
                doc = json.loads(read_rule_text(path))
            except (OSError, json.JSONDecodeError, RuleFileError) as exc:
                raise TerminologyError(f"{path}: not readable JSON ({exc})") from exc
            if doc.get("resourceType") != "ValueSet" or not doc.get("id"):
                raise TerminologyError(f"{path}: not a FHIR ValueSet with an id")
            members = set()
            for item in (doc.get("expansion") or {}).get("contains") or []:
                c = concept(item.get("system"), item.get("code"))
                if c:
                    members.add(c)
            valuesets[doc["id"]] = frozenset(members)
            titles[doc["id"]] = doc.get("title") or doc["id"]

        term_dir = rules_dir / "terminology"
        products: dict[str, Product] = {}
        precise: dict[str, str] = {}
        rollup_path = term_dir / "rxnorm-ingredients.json"
        if rollup_path.exists():
            rollup = json.loads(read_rule_text(rollup_path))
            for code, item in (rollup.get("products") or {}).items():
                products[code] = Product(frozenset((RXNORM, i) for i in item.get("ingredients", [])),
                                         item.get("doseForm"), item.get("display"))
            precise = dict(rollup.get("preciseIngredients") or {})

        names: dict[str, str] = {}
        ingredient_names: dict[str, str] = {}
        names_path = term_dir / "drug-names.yaml"
        if names_path.exists():
            doc = load_yaml_text(read_rule_text(names_path)) or {}
            for code, item in doc.items():
                code = str(code)
                generic = str(item.get("name", "")).strip().lower()
                if generic:
                    ingredient_names[code] = generic
                    names[generic] = code
                for alias in item.get("names") or []:
                    names[str(alias).strip().lower()] = code
        return cls(valuesets, titles, products, precise, names, ingredient_names)

    # -- look-ups ------------------------------------------------------------------------------
    def recognise(self, codings: list[Concept], texts: list[str]) -> DrugMatch:
        """Recognise a medication from its codings (any RxNorm level) and, failing that, its names."""
        concepts = set(codings)
        dose_form = None
        for system, code in codings:
            if system != RXNORM:
                continue
            product = self._products.get(code)
            if product:
                concepts |= product.ingredients
                dose_form = dose_form or product.dose_form
            ingredient = self._precise.get(code)
            if ingredient:
                concepts.add((RXNORM, ingredient))
        if not self._known_rx.isdisjoint(codings):
            return DrugMatch(frozenset(concepts), "code", dose_form)
        # No code we know: fall back to the names in the text and coding displays.
        found: list[str] = []
        if self._name_re is not None:
            for text in texts:
                for name in self._name_re.findall(text.lower()):
                    concepts.add((RXNORM, self._names[name]))
                    found.append(name)
        if found:
            return DrugMatch(frozenset(concepts), "name", dose_form, tuple(dict.fromkeys(found)))
        return DrugMatch(frozenset(concepts), "none", dose_form)

    def display_of(self, codings: list[Concept]) -> str | None:
        """A readable name for codes sent without a display: the RxNorm product or ingredient name."""
        for system, code in codings:
            if system == RXNORM:
                product = self._products.get(code)
                if product and product.display:
                    return product.display
                if code in self.ingredient_names:
                    return self.ingredient_names[code]
        return None

    def ingredient_label(self, concepts: frozenset[Concept], within: frozenset[Concept] | None = None) -> str:
        """Generic names of the ingredients among ``concepts`` (optionally only those in a value set)."""
        out = []
        for system, code in sorted(concepts):
            if system == RXNORM and code in self.ingredient_names and (within is None or (system, code) in within):
                out.append(self.ingredient_names[code])
        return ", ".join(dict.fromkeys(out))
