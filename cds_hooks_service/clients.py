"""Who is calling: the CDS client identified by its JWT issuer, or the one open-mode client.

Everything the service keeps per caller (issued cards, overrides that suppress a card, feedback) and
everything a caller may make the service do (which FHIR servers it may have read) is keyed by
``Client.id``. A client never sees or silences another client's cards.
"""
from __future__ import annotations

from dataclasses import dataclass

OPEN_CLIENT_ID = "open"  # the only client when the service runs without CDS_JWT_ISSUERS


@dataclass(frozen=True)
class Client:
    id: str  # the JWT "iss" of the caller, or OPEN_CLIENT_ID
    fhir_servers: tuple[str, ...] = ()  # base URLs this client's requests may name as fhirServer


OPEN_CLIENT = Client(OPEN_CLIENT_ID)
