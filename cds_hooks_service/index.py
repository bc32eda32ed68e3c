"""The patient's record and the order session's drafts, indexed once by concept.

One pass over the request turns resources into facts keyed by concept (RxNorm ingredient or product,
condition code, LOINC code, procedure code). A resource is normalised in full only when its codes (or,
for a medication without a known code, its names) hit a concept that some loaded rule can match; the
rest are dropped after a dictionary look-up. Checks then ask the index for the facts of their value
sets: the cost of a call is linear in the resources, the drafts and the findings, never
drafts x resources or rules x resources.

Nothing here knows HTTP, the store or the FHIR client.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, partial
from typing import Generic, Iterable, TypeVar

import msgspec

from .facts import (DRAFT_TYPES, IGNORED_MEDICATION_STATUSES, MEDICATION_TYPES, ConditionFact, MedicationFact,
                    MedicationIndex, Normaliser, ObservationFact, ProcedureFact, bare_codes,
                    codeable_concepts, reason_condition, resource_may_match)
from . import typed_record
from .terminology import Concept

F = TypeVar("F")
RECORD_MEDICATION_KEYS = ("medicationRequests", "medicationAdministrations", "medicationStatements")
_RECORD_MEDICATION_TYPES = MEDICATION_TYPES + DRAFT_TYPES  # what a record's medication key may hold (a tuple: a
# resourceType that is a list is compared, not hashed)


@dataclass(frozen=True)
class RuleConcepts:
    """Every concept a check of the loaded rules can match, per kind of fact: anything else needs no fact."""

    medications: frozenset[Concept]
    conditions: frozenset[Concept]
    observations: frozenset[Concept]
    procedures: frozenset[Concept]

    @classmethod
    def of(cls, rulebook, rules=None) -> "RuleConcepts":
        """The concepts of ``rules`` (default: every loaded rule). Computed once per loaded rulebook and set of
        rules (a reload makes a new rulebook, so new sets): a call indexes only what the rules that trigger on
        its drafts can match, so an opioid order never normalises the blood-pressure readings the DHE rules read."""
        rules = tuple(rulebook.rules) if rules is None else tuple(rules)
        key = frozenset(rule.id for rule in rules)
        cache = rulebook.__dict__.setdefault("_rule_concepts", {})
        cached = cache.get(key)
        if cached is None:
            kinds: dict[str, set[Concept]] = {"medication": set(), "condition": set(), "observation": set(),
                                              "procedure": set()}
            for rule in rules:  # (a trigger's drugs are matched against the drafts, which are always normalised)
                for c in rule.checks.values():
                    if c.kind in ("medication", "drafted"):
                        kinds["medication"] |= c.valueset
                    elif c.kind == "medicationClasses":
                        for vs in c.classes.values():
                            kinds["medication"] |= vs
                    elif c.kind == "condition":
                        kinds["condition"] |= c.valueset
                    elif c.kind == "observation":
                        for vs, _, _ in c.observations:
                            kinds["observation"] |= vs
                    elif c.kind == "score":
                        for vs, _, _ in c.observations:
                            kinds["observation"] |= vs
                        kinds["condition"] |= c.valueset
                    elif c.kind == "procedure":
                        kinds["procedure"] |= c.valueset
            cached = cache[key] = cls(*(frozenset(kinds[k]) for k in ("medication", "condition", "observation",
                                                                      "procedure")))
        return cached


class ConceptIndex(Generic[F]):
    """Facts (anything with ``concepts``) keyed by concept; look-ups return facts in their original order."""

    def __init__(self, facts: Iterable[F]):
        self.facts: list[F] = list(facts)
        by: dict[Concept, list[int]] = {}
        for i, fact in enumerate(self.facts):
            for c in fact.concepts:
                by.setdefault(c, []).append(i)
        self._by = by
        self._keys = frozenset(by)
        self._cache: dict[frozenset, list[F]] = {}
        self._positions: dict[int, int] | None = None

    def __len__(self) -> int:
        return len(self.facts)

    def position(self, fact: F) -> int:
        """Where a fact stands in the original order (the map is built on first use)."""
        if self._positions is None:
            self._positions = {id(f): i for i, f in enumerate(self.facts)}
        return self._positions[id(fact)]

    def matching(self, valueset: frozenset[Concept]) -> list[F]:
        """The facts with a concept in ``valueset``, in order. Cost: the smaller of the value set and the
        concepts present, plus the hits (set intersection iterates the smaller set)."""
        found = self._cache.get(valueset)
        if found is None:
            hits = valueset & self._keys
            if len(hits) == 1:
                positions = self._by[next(iter(hits))]
            else:
                positions = sorted({i for c in hits for i in self._by[c]})
            found = self._cache[valueset] = [self.facts[i] for i in positions]
        return found


class RecordIndex:
    """The facts of one hook call: drafts, and the record's medications, conditions, observations and
    procedures, each a :class:`ConceptIndex` built on first use. ``concepts`` None (the explain trace) keeps every fact.

    ``shared`` holds, per (rule id, check name), what a check found that does not depend on the draft
    being judged, so that a check costs its hits once per call, not once per draft.
    """

    def __init__(self, resources: dict[str, list[dict]], normaliser: Normaliser, medications: MedicationIndex,
                 drafts: list[MedicationFact], concepts: RuleConcepts | None):
        # resources seen / normalised in full / skipped after a look-up
        self.stats = {"resources": 0, "normalised": 0, "skipped": 0}
        self.drafts = ConceptIndex(drafts)
        self.shared: dict[tuple[str, str], object] = {}
        self._resources, self._normaliser, self._medication_index = resources, normaliser, medications
        self._concepts = concepts
        self._exclude = frozenset(d.ref for d in drafts)  # the drafts themselves, if the EHR also returns them
        self._reasons: dict[int, tuple[tuple, tuple[str, ...]]] = {}  # reasons_of, by id(draft)

    # Each kind is indexed on first use: a call whose checks read no observation never looks at one.
    @cached_property
    def medications(self) -> ConceptIndex[MedicationFact]:
        return ConceptIndex(self._medications(self._resources, self._normaliser, self._medication_index,
                                              self._exclude, self._concepts))

    @cached_property
    def conditions(self) -> ConceptIndex[ConditionFact]:
        return ConceptIndex(self._read("conditions", "Condition", self._normaliser.condition,
                                       self._concepts.conditions if self._concepts is not None else None))

    @cached_property
    def observations(self) -> ConceptIndex[ObservationFact]:
        return ConceptIndex(self._read("observations", "Observation", self._normaliser.observations,
                                       self._concepts.observations if self._concepts is not None else None,
                                       components=True))

    @cached_property
    def procedures(self) -> ConceptIndex[ProcedureFact]:
        return ConceptIndex(self._read("procedures", "Procedure", self._normaliser.procedure,
                                       self._concepts.procedures if self._concepts is not None else None))

    @cached_property
    def _conditions_by_ref(self) -> dict[str, dict]:
        """The record's Condition resources by "Condition/id", for reasonReference (built on first use; a
        Condition decoded typed is given as the dictionary of its fields, which is all a reason reads)."""
        out = dict(self._medication_index.conditions)
        for r in self._resources.get("conditions") or ():
            if type(r) is typed_record.Condition:
                if isinstance(r.id, str):
                    out.setdefault(f"Condition/{r.id}", msgspec.to_builtins(r))
            elif isinstance(r, dict) and r.get("resourceType") == "Condition" and isinstance(r.get("id"), str):
                out.setdefault(f"Condition/{r['id']}", r)
        return out

    def reasons_of(self, draft: MedicationFact) -> tuple[tuple, tuple[str, ...]]:
        """A draft's reasons: its reasonCode and the Conditions its reasonReference points at, wherever they
        are (contained, in the draft bundle, or in the record). Read once per draft and call."""
        if not draft.reason_refs:
            return draft.reasons, draft.reason_texts
        found = self._reasons.get(id(draft))  # the drafts live as long as this index: their ids stay theirs
        if found is None:
            reasons, texts = list(draft.reasons), list(draft.reason_texts)
            for ref in draft.reason_refs:
                condition = reason_condition(ref, draft.resource, self._conditions_by_ref)
                if condition is not None:
                    c, t = codeable_concepts(condition.get("code"))
                    reasons += c
                    texts += t
            found = self._reasons[id(draft)] = (tuple(reasons), tuple(texts))
        return found

    # The two loops below run once per resource of the record: counts are kept in locals, not in ``stats``.
    def _medications(self, resources, normaliser, medications, exclude, concepts) -> list[MedicationFact]:
        out = []
        seen = normalised = 0
        relevant = concepts.medications if concepts is not None else None
        # A resource decoded typed (request_body) has its own readers, which give the same facts.
        typed = (partial(typed_record.drug, normaliser), partial(typed_record.medication, normaliser))
        plain = (normaliser.drug, lambda r, index, drug: normaliser.medication(r, index, drug=drug))
        for key in RECORD_MEDICATION_KEYS:
            for r in resources.get(key) or ():
                if type(r) is typed_record.Medication:
                    read_drug, read_fact = typed
                elif isinstance(r, dict) and r.get("resourceType") in _RECORD_MEDICATION_TYPES:
                    read_drug, read_fact = plain
                else:
                    continue
                seen += 1
                drug = read_drug(r, medications)
                if relevant is not None and relevant.isdisjoint(drug[0].concepts):
                    continue
                normalised += 1
                fact = read_fact(r, medications, drug)
                if fact.ref not in exclude and fact.status not in IGNORED_MEDICATION_STATUSES:
                    out.append(fact)
        self._count(seen, normalised)
        return out

    def _read(self, key: str, rtype: str, read, relevant: frozenset[Concept] | None, components: bool = False) -> list:
        """The facts of the record's ``rtype`` resources under ``key``. A resource none of whose codes (nor, with
        ``components``, its components' codes) is a code of ``relevant`` is skipped after that look-up; the
        others are read by ``read(resource, relevant)`` (a fact, a list of facts, or None). A resource decoded typed
        (request_body) is read by typed_record's reader, which makes the same look-up and gives the same facts."""
        out: list = []
        seen = normalised = 0
        codes = bare_codes(relevant) if relevant is not None else None
        typed = typed_record.RESOURCES[rtype]
        read_typed = typed_record.READERS[typed]
        for r in self._resources.get(key) or ():
            if type(r) is typed:
                seen += 1
                facts = read_typed(r, relevant, codes)
            elif not isinstance(r, dict) or r.get("resourceType") != rtype:
                continue
            else:
                seen += 1
                if codes is not None and not resource_may_match(r, codes, components):
                    continue
                facts = read(r, relevant)
            if facts:
                normalised += 1
                if isinstance(facts, list):
                    out += facts
                else:
                    out.append(facts)
        self._count(seen, normalised)
        return out

    def _count(self, seen: int, normalised: int) -> None:
        self.stats["resources"] += seen
        self.stats["normalised"] += normalised
        self.stats["skipped"] += seen - normalised
