"""Bounds on the work, memory and output of one hook call (environment variables, read once at start).

Each limit has a clear answer when reached: too many draft orders is a 400 naming the limit; evidence
beyond the items listed per check is counted ("and N more"); cards beyond the cards or bytes of one
response are named in one info card; a call that runs out of evaluation time says which checks it
could not complete (an info card), never an empty answer.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


def _positive(env, name: str, default: float, cast=int):
    value = env.get(name)
    if not value:
        return default
    try:
        parsed = cast(value)
    except ValueError:
        raise ValueError(f"{name} must be a positive number, got {value!r}") from None
    if parsed <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return parsed


@dataclass(frozen=True)
class Limits:
    max_drafts: int = 100  # CDS_MAX_DRAFTS: entries of context.draftOrders per request (more: 400)
    max_evidence_items: int = 10  # CDS_MAX_EVIDENCE_ITEMS: record entries listed per check on a card
    max_cards: int = 20  # CDS_MAX_CARDS: cards per response (the rest are named in one info card)
    max_response_bytes: int = 1024 * 1024  # CDS_MAX_RESPONSE_BYTES: JSON bytes of the cards of one response
    eval_deadline: float = 0.5  # CDS_EVAL_DEADLINE: CPU seconds of rule evaluation per request (the request's thread)

    @classmethod
    def from_env(cls, env=None) -> "Limits":
        env = os.environ if env is None else env
        return cls(
            max_drafts=_positive(env, "CDS_MAX_DRAFTS", cls.max_drafts),
            max_evidence_items=_positive(env, "CDS_MAX_EVIDENCE_ITEMS", cls.max_evidence_items),
            max_cards=_positive(env, "CDS_MAX_CARDS", cls.max_cards),
            max_response_bytes=max(_positive(env, "CDS_MAX_RESPONSE_BYTES", cls.max_response_bytes), 16 * 1024),
            eval_deadline=_positive(env, "CDS_EVAL_DEADLINE", cls.eval_deadline, float),
        )
