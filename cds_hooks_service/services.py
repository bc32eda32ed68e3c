"""The CDS Services this server offers (discovery) and the FHIR queries behind their prefetch keys.

One service per hook, with distinct ids: the CDS Hooks Sandbox keys services by id, so two
entries sharing an id would overwrite each other there. Prefetch templates use only the query
forms CDS Hooks 2.0 allows (type-level search by patient reference, token equality with OR
lists, ``_sort`` and ``_count``) and first-level context tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

# Data key -> FHIR query template. The keys are the prefetch keys and the data keys rules need.
_BP_AND_LABS = ",".join("http://loinc.org|" + code for code in (
    "8480-6", "8462-4", "85354-9",  # systolic, diastolic, BP panel
    "62238-1", "98979-8", "48642-3", "48643-1",  # eGFR
    "2106-3", "2118-8", "21198-7",  # hCG (pregnancy tests)
))
PREFETCH = {
    "patient": "Patient/{{context.patientId}}",
    "conditions": "Condition?patient={{context.patientId}}&_count=200",
    "medicationRequests": "MedicationRequest?patient={{context.patientId}}&_count=200",
    "medicationAdministrations": "MedicationAdministration?patient={{context.patientId}}&_count=200",
    "medicationStatements": "MedicationStatement?patient={{context.patientId}}&_count=200",
    "observations": f"Observation?patient={{{{context.patientId}}}}&code={_BP_AND_LABS}&_sort=-date&_count=100",
    "procedures": "Procedure?patient={{context.patientId}}&_sort=-date&_count=100",
}


@dataclass(frozen=True)
class CdsService:
    id: str
    hook: str
    title: str
    description: str

    def discovery(self) -> dict:
        return {"hook": self.hook, "id": self.id, "title": self.title, "description": self.description,
                "prefetch": dict(PREFETCH),
                "usageRequirements": "Needs the patient's conditions, medications (ordered, given, taken), "
                                     "blood pressure, eGFR and pregnancy tests and procedures: prefetched, or "
                                     "readable on fhirServer. Without them the service answers 412."}


_DESCRIPTION = ("Warns about unsafe medication orders in headache care: opioids for migraine (AHS 2025), "
                "dihydroergotamine with triptans or ergots within 24 h, strong CYP3A4 inhibitors, vasopressors "
                "or contraindicated conditions (FDA labeling), and ketamine for non-refractory migraine "
                "(VA/DoD 2023).")
SERVICES = {
    s.id: s for s in (
        CdsService("migraine-med-safety-select", "order-select", "Migraine medication safety (order select)",
                   _DESCRIPTION + " Judges the selected orders."),
        CdsService("migraine-med-safety-sign", "order-sign", "Migraine medication safety (order sign)",
                   _DESCRIPTION + " Judges every order about to be signed."),
    )
}

SERVICE_FOR_HOOK = {s.hook: s for s in SERVICES.values()}


def render_query(template: str, context: dict) -> str | None:
    """Fill a prefetch template's tokens from the hook context; None if a token has no value."""
    out = template
    for token, value in (("{{context.patientId}}", context.get("patientId")),
                         ("{{context.userId}}", context.get("userId")),
                         ("{{context.encounterId}}", context.get("encounterId"))):
        if token in out:
            if not isinstance(value, str) or not value:
                return None
            out = out.replace(token, quote(value, safe="/"))
    return out
