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
from urllib.parse import quote_plus

import yaml

from .rulefiles import RuleFileError, load_yaml_text, read_rule_text

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
# Ingredients without a verified RxCUI (drug-names.yaml `nameOnly`) are concepts of this local system,
# code = the generic name.
INGREDIENT_NAME = "https://migraine-med-safety.example.org/fhir/CodeSystem/ingredient-name"
DAILYMED_SEARCH = "https://dailymed.nlm.nih.gov/dailymed/search.cfm?labeltype=all&query="

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
RECOGNISED_CACHE_SIZE = 4096  # medications recognised, kept per (codings, texts) for the look-ups that follow
# The longest key (characters of its codes and texts together) a per-process cache keeps: a record's drug names
# and dosage texts are short; a long text (a hostile body may send megabytes) is read without the cache, so the
# caches hold a few MB at most and no large text outlives its request.
CACHE_KEY_MAX_CHARS = 512


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
                 products: dict[str, Product], precise: dict[str, str], names: dict[str, tuple[Concept, ...]],
                 ingredient_names: dict[str, str], name_refs: dict[str, dict] | None = None):
        self.valuesets = valuesets
        self.valueset_titles = valueset_titles
        self._products = products
        self._precise = precise  # PIN rxcui -> IN rxcui
        self._names = names  # lower-case name -> the ingredient concepts it names (one, or several for a combination)
        self.ingredient_names = ingredient_names  # IN rxcui -> generic name
        self.name_refs = name_refs or {}  # lower-case name -> {"name", "dailymed", "rxnorm"?}: where it is checked
        self._known_rx = frozenset(
            {c for vs in valuesets.values() for c in vs if c[0] == RXNORM}
            | {(RXNORM, code) for code in products} | {(RXNORM, code) for code in precise}
            | {(RXNORM, code) for code in ingredient_names})
        pattern = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
        self._name_re = re.compile(rf"(?<![\w.])(?:{pattern})(?![\w])") if names else None
        self._recognised: dict[tuple, DrugMatch] = {}

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

        names: dict[str, tuple[Concept, ...]] = {}
        ingredient_names: dict[str, str] = {}
        name_refs: dict[str, dict] = {}
        names_path = term_dir / "drug-names.yaml"
        if names_path.exists():
            try:
                # regular file, size cap, no anchors/aliases; libyaml when built in (rulefiles.load_yaml_text)
                doc = load_yaml_text(read_rule_text(names_path)) or {}
                _load_drug_names(doc, valuesets, products, names, ingredient_names, name_refs)
            except (yaml.YAMLError, TypeError, KeyError, AttributeError, ValueError) as exc:
                raise TerminologyError(f"{names_path}: {exc}") from exc
        return cls(valuesets, titles, products, precise, names, ingredient_names, name_refs)

    # -- look-ups ------------------------------------------------------------------------------
    def recognise(self, codings: list[Concept], texts: list[str]) -> DrugMatch:
        """Recognise a medication from its codings (any RxNorm level) and, failing that, its names. A record
        names the same few drugs again and again: the answer is kept per (codings, texts), up to
        RECOGNISED_CACHE_SIZE of them of at most CACHE_KEY_MAX_CHARS characters each (the terminology is
        immutable, a reload makes a new one)."""
        key = (tuple(codings), tuple(texts))
        match = self._recognised.get(key)
        if match is None:
            match = self._recognise(codings, texts)
            if sum(map(len, texts)) + sum(len(s) + len(c) for s, c in codings) > CACHE_KEY_MAX_CHARS:
                return match
            if len(self._recognised) >= RECOGNISED_CACHE_SIZE:
                self._recognised.clear()
            self._recognised[key] = match
        return match

    def _recognise(self, codings: list[Concept], texts: list[str]) -> DrugMatch:
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
                    concepts.update(self._names[name])
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
            if within is not None and (system, code) not in within:
                continue
            if system == RXNORM and code in self.ingredient_names:
                out.append(self.ingredient_names[code])
            elif system == INGREDIENT_NAME:
                out.append(code)
        return ", ".join(dict.fromkeys(out))


def _load_drug_names(doc: dict, valuesets: dict[str, frozenset[Concept]], products: dict[str, Product],
                     names: dict[str, tuple[Concept, ...]], ingredient_names: dict[str, str],
                     name_refs: dict[str, dict]) -> None:
    """Read drug-names.yaml (format in its header) into the look-up tables; ValueError names the first problem."""
    known_rx = {c for vs in valuesets.values() for c in vs if c[0] == RXNORM} | {(RXNORM, p) for p in products}

    def add(name: object, concepts: tuple[Concept, ...], ref: dict, where: str) -> None:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{where}: a name must be a non-empty string")
        if not isinstance(ref.get("dailymed"), str) or not ref["dailymed"].strip():
            raise ValueError(f"{where}: {name!r} needs `dailymed` (the DailyMed label search query that shows it)")
        rxnorm = ref.get("rxnorm")
        if rxnorm is not None and (RXNORM, str(rxnorm)) not in known_rx:
            raise ValueError(f"{where}: {name!r}: rxnorm {rxnorm!r} is not a verified code of the value sets or rollup")
        key = name.strip().lower()
        if key in names and names[key] != concepts:
            raise ValueError(f"{where}: {name!r} already names another entry")
        names[key] = concepts
        name_refs[key] = {"name": name.strip(), "dailymed": DAILYMED_SEARCH + quote_plus(ref["dailymed"].strip()),
                          **({"rxnorm": str(rxnorm)} if rxnorm is not None else {})}

    unknown = set(doc) - {"ingredients", "nameOnly", "combinations"}
    if unknown:
        raise ValueError(f"unknown sections {sorted(unknown)}; allowed: ingredients, nameOnly, combinations")
    by_key: dict[str, Concept] = {}
    for code, item in (doc.get("ingredients") or {}).items():
        code = str(code)
        if not code.isdigit():
            raise ValueError(f"ingredients.{code}: the key is the ingredient RxCUI")
        generic = str(item["name"]).strip().lower()
        ingredient_names[code] = generic
        by_key[code] = (RXNORM, code)
        add(generic, ((RXNORM, code),), item, f"ingredients.{code}")
        for alias in item.get("names") or []:
            add(alias.get("name"), ((RXNORM, code),), alias, f"ingredients.{code}.names")
    for generic, item in (doc.get("nameOnly") or {}).items():
        generic = str(generic).strip().lower()
        c = (INGREDIENT_NAME, generic)
        by_key[generic] = c
        add(generic, (c,), item, f"nameOnly.{generic}")
        for vs_id in item.get("valueSets") or []:
            if vs_id not in valuesets:
                raise ValueError(f"nameOnly.{generic}.valueSets: unknown value set {vs_id!r}")
            valuesets[vs_id] = valuesets[vs_id] | {c}
        for product in item.get("products") or []:
            product = str(product)
            if product in products:
                raise ValueError(f"nameOnly.{generic}.products: {product} already rolls up to other ingredients")
            products[product] = Product(frozenset({c}), None, None)
        for alias in item.get("names") or []:
            add(alias.get("name"), (c,), alias, f"nameOnly.{generic}.names")
    for i, item in enumerate(doc.get("combinations") or []):
        parts = []
        for ingredient in item.get("ingredients") or []:
            key = str(ingredient).strip().lower()
            if key not in by_key:
                raise ValueError(f"combinations.{i} ({item.get('name')}): unknown ingredient {ingredient!r} "
                                 "(an RxCUI of `ingredients` or a name of `nameOnly`)")
            parts.append(by_key[key])
        if len(parts) < 2:
            raise ValueError(f"combinations.{i} ({item.get('name')}): a combination names two or more ingredients")
        add(item.get("name"), tuple(parts), item, f"combinations.{i}")
