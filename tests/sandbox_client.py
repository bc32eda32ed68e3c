"""Replays what the CDS Hooks Sandbox (github.com/cds-hooks/sandbox, master) sends, for tests.

Sources (read in the stored copy of the Sandbox repository):
* JWT: ``src/retrieve-data-helpers/jwt-generator.js`` -- ES384, kid 44823f3d-..., hosted ``jku``,
  payload iss/aud/exp(now+300)/iat/jti(uuid v4); no ``sub``, no ``tenant``; key ``keys/ecprivkey.pem``
  (copied to ``tests/fixtures/sandbox/``, public by design).
* Request body: ``src/retrieve-data-helpers/service-exchange.js`` (``callServices``) --
  ``{hookInstance, hook, fhirServer, context: {patientId, userId, ...hook context}, prefetch?}``;
  ``prefetch`` only when at least one key was fetched, ``fhirAuthorization`` only when SMART-launched
  (not reproduced here); ``userId`` defaults to ``Practitioner/COREPRACTITIONER1``; no ``encounterId``.
* Hook context: ``src/components/RxView/rx-view.jsx`` (order-select: ``selections`` + ``draftOrders``),
  ``src/components/RxSign/rx-sign.jsx`` (order-sign: ``draftOrders`` only).
* Draft order: ``createFhirResource`` in ``src/reducers/medication-reducers.js`` (R4 branch: FHIR
  server ``fhirVersion`` >= 4.0.0). Not strict R4: no ``Bundle.type``, ``category`` is ONE object,
  ``reasonCode`` is ONE CodeableConcept (the chosen Condition's ``code``), ``intent`` only once a
  drug is chosen.
* Re-click quirk: ``src/middleware/cds-execution.js`` calls ``callServices`` without context when the
  active Rx View / Rx Sign tab is clicked again -> ``context`` = ``{patientId, userId}``.
* Feedback: ``src/components/CardList/card-list.jsx``; shapes as recorded in Sandbox PRs #135 and #139:
  ``{"feedback": [{card, outcome, acceptedSuggestions?, outcomeTimestamp, overrideReason?}]}`` with
  ``overrideReason`` = ``{"reason": {code, system}}`` -- no ``display``, no ``userComment``;
  timestamp = JS ``new Date().toISOString()`` (milliseconds, ``Z``).
"""
from __future__ import annotations

import uuid
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.serialization import load_pem_private_key

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "sandbox"
SANDBOX_ISS = "https://sandbox.cds-hooks.org"
SANDBOX_KID = "44823f3d-0b01-4a6c-a80e-b9d3e8a7226f"
SANDBOX_JKU = "https://sandbox.cds-hooks.org/.well-known/jwks.json"
SANDBOX_USER = "Practitioner/COREPRACTITIONER1"
DEFAULT_FHIR_SERVER = "http://localhost:8080/fhir"  # a local R4 server; the Sandbox's own default is DSTU2

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
UCUM = "http://unitsofmeasure.org"
MEDREQ_CATEGORY = "http://terminology.hl7.org/CodeSystem/medicationrequest-category"
FREQUENCIES = {"daily": 1, "bid": 2, "tid": 3, "qid": 4}  # the Sandbox's frequency dropdown


# --- JWT -------------------------------------------------------------------------------------------

def sandbox_private_key():
    return load_pem_private_key((FIXTURES / "ecprivkey.pem").read_bytes(), password=None)


def mint_jwt(
    private_key: Any,
    alg: str,
    kid: str | None,
    claims: dict,
    *,
    extra_headers: dict | None = None,
) -> str:
    """Sign ``claims`` with ``private_key`` (header: alg, typ JWT, kid when given, + extra_headers)."""
    headers: dict[str, Any] = {"typ": "JWT"}
    if kid is not None:
        headers["kid"] = kid
    headers.update(extra_headers or {})
    return jwt.encode(claims, private_key, algorithm=alg, headers=headers)


def sandbox_claims(audience: str | list, *, now: float | None = None, jti: str | None = None) -> dict:
    """Payload exactly as jwt-generator.js builds it (``Math.round(Date.now() / 1000)``)."""
    now = round(datetime.now(timezone.utc).timestamp() if now is None else now)
    return {
        "iss": SANDBOX_ISS,
        "aud": audience,
        "exp": now + 300,
        "iat": now,
        "jti": jti or str(uuid.uuid4()),
    }


def sandbox_jwt(audience: str | list, *, now: float | None = None, jti: str | None = None) -> str:
    """A token as the Sandbox sends it: ES384, kid, hosted jku, aud = the exact URL being called."""
    return mint_jwt(
        sandbox_private_key(),
        "ES384",
        SANDBOX_KID,
        sandbox_claims(audience, now=now, jti=jti),
        extra_headers={"jku": SANDBOX_JKU},
    )


def sandbox_auth_header(audience: str, **kwargs: Any) -> str:
    return f"Bearer {sandbox_jwt(audience, **kwargs)}"


# --- Draft orders (medication-reducers.js createFhirResource, R4) -----------------------------------

def _today() -> str:
    return date.today().isoformat()  # moment().format('YYYY-MM-DD'), browser-local date


def bare_draft(patient_id: str, reason: dict | None = None, *, authored_on: str | None = None) -> dict:
    """The draft before a drug is chosen (Rx View sends it on tab switch): no medication, no intent,
    no dosage. ``reason``: a Condition.code CodeableConcept, placed as ONE object in ``reasonCode``."""
    resource: dict[str, Any] = {
        "resourceType": "MedicationRequest",
        "id": "request-123",
        "status": "draft",
        "subject": {"reference": f"Patient/{patient_id}"},
        "authoredOn": authored_on or _today(),
    }
    if reason is not None:
        resource["reasonCode"] = reason
    return resource


def medication_request(
    patient_id: str,
    rxnorm_code: str,
    display: str,
    reason: dict | None = None,
    *,
    dose: int = 1,
    frequency: str = "daily",
    supply_days: int = 30,
    start: str | None = None,
    end: str | None = None,
    authored_on: str | None = None,
) -> dict:
    """The draft once a drug is chosen, keys in the Sandbox's order. ``dose`` 1-5 pills,
    ``frequency`` daily|bid|tid|qid, ``supply_days`` 7|14|30|60|90 (Rx Sign) or 30 (Rx View default),
    ``start``/``end`` YYYY-MM-DD (``boundsPeriod`` only if either is set)."""
    repeat: dict[str, Any] = {"frequency": FREQUENCIES[frequency], "period": 1, "periodUnit": "d"}
    if start or end:
        repeat["boundsPeriod"] = {k: v for k, v in (("start", start), ("end", end)) if v}
    resource = {
        "resourceType": "MedicationRequest",
        "id": "request-123",
        "status": "draft",
        "subject": {"reference": f"Patient/{patient_id}"},
        "authoredOn": authored_on or _today(),
        "dosageInstruction": [
            {
                "timing": {"repeat": repeat},
                "doseAndRate": [{"doseQuantity": {"value": dose, "system": UCUM, "code": "{pill}"}}],
            }
        ],
        "dispenseRequest": {
            "expectedSupplyDuration": {"value": supply_days, "unit": "days", "system": UCUM, "code": "d"}
        },
        "intent": "order",
        "category": {"coding": [{"system": MEDREQ_CATEGORY, "code": "community"}]},  # ONE object
        "medicationCodeableConcept": {
            "text": display,
            "coding": [{"display": display, "system": RXNORM, "code": rxnorm_code}],
        },
    }
    if reason is not None:
        resource["reasonCode"] = reason  # ONE CodeableConcept, not a list
    return resource


def draft_orders(resource: dict) -> dict:
    return {"resourceType": "Bundle", "entry": [{"resource": resource}]}  # no Bundle.type


# --- Requests (service-exchange.js callServices) ----------------------------------------------------

def hook_request(
    hook: str,
    patient_id: str,
    hook_context: dict | None = None,
    *,
    fhir_server: str = DEFAULT_FHIR_SERVER,
    prefetch: dict | None = None,
    user_id: str = SANDBOX_USER,
) -> dict:
    request: dict[str, Any] = {
        "hookInstance": str(uuid.uuid4()),
        "hook": hook,
        "fhirServer": fhir_server,
        "context": {"patientId": patient_id, "userId": user_id, **(hook_context or {})},
    }
    if prefetch:  # omitted when no key could be fetched; never null values
        request["prefetch"] = prefetch
    return request


def order_select_request(
    patient_id: str,
    rxnorm_code: str,
    display: str,
    reason: dict | None = None,
    fhir_server: str = DEFAULT_FHIR_SERVER,
    prefetch: dict | None = None,
    **medication: Any,
) -> dict:
    """Rx View (order-select) with a drug chosen; ``medication``: see :func:`medication_request`."""
    resource = medication_request(patient_id, rxnorm_code, display, reason, **medication)
    return hook_request(
        "order-select",
        patient_id,
        {"selections": ["MedicationRequest/request-123"], "draftOrders": draft_orders(resource)},
        fhir_server=fhir_server,
        prefetch=prefetch,
    )


def order_sign_request(
    patient_id: str,
    rxnorm_code: str,
    display: str,
    reason: dict | None = None,
    fhir_server: str = DEFAULT_FHIR_SERVER,
    prefetch: dict | None = None,
    **medication: Any,
) -> dict:
    """Rx Sign "Sign Order" (order-sign): same draft, no ``selections``."""
    resource = medication_request(patient_id, rxnorm_code, display, reason, **medication)
    return hook_request(
        "order-sign",
        patient_id,
        {"draftOrders": draft_orders(resource)},
        fhir_server=fhir_server,
        prefetch=prefetch,
    )


def bare_order_select_request(
    patient_id: str,
    reason: dict | None = None,
    fhir_server: str = DEFAULT_FHIR_SERVER,
    prefetch: dict | None = None,
) -> dict:
    """Rx View before a drug is chosen: selections + a draft without medication or intent."""
    return hook_request(
        "order-select",
        patient_id,
        {"selections": ["MedicationRequest/request-123"], "draftOrders": draft_orders(bare_draft(patient_id, reason))},
        fhir_server=fhir_server,
        prefetch=prefetch,
    )


def reclick_request(
    hook: str,
    patient_id: str,
    fhir_server: str = DEFAULT_FHIR_SERVER,
    prefetch: dict | None = None,
) -> dict:
    """Clicking the already active Rx View / Rx Sign tab: context is only {patientId, userId}."""
    return hook_request(hook, patient_id, None, fhir_server=fhir_server, prefetch=prefetch)


# --- Feedback (card-list.jsx) ------------------------------------------------------------------------

def _js_iso_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def feedback_request(
    card_uuid: str,
    outcome: str,
    suggestion_uuid: str | None = None,
    override_reason: dict | None = None,
    *,
    outcome_timestamp: str | None = None,
) -> dict:
    """``{"feedback": [one item]}``. ``accepted`` (suggestion clicked) carries ``acceptedSuggestions``;
    ``overridden`` (Dismiss) carries ``overrideReason`` only if a reason was picked from the menu, reduced
    to ``{"reason": {"code", "system"}}`` (the Sandbox drops ``display``)."""
    item: dict[str, Any] = {"card": card_uuid, "outcome": outcome}
    if suggestion_uuid is not None:
        item["acceptedSuggestions"] = [{"id": suggestion_uuid}]
    item["outcomeTimestamp"] = outcome_timestamp or _js_iso_now()
    if override_reason is not None:
        item["overrideReason"] = {
            "reason": {k: override_reason[k] for k in ("code", "system") if k in override_reason}
        }
    return {"feedback": [item]}
