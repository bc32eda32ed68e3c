"""Checks that a CDS Hooks 2.0 response is spec-exact, and that what the service emits is valid FHIR R4."""
from __future__ import annotations

from fhir.resources.R4B.medicationrequest import MedicationRequest

INDICATORS = {"info", "warning", "critical"}


def _no_empty(value, path: str) -> None:
    """The spec: JSON elements SHALL NOT be null or empty (cards: [] being the one sanctioned empty)."""
    assert value is not None, f"{path} is null"
    if isinstance(value, (str, list, dict)) and path != "cards":
        assert len(value) > 0, f"{path} is empty"
    if isinstance(value, dict):
        for k, v in value.items():
            _no_empty(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _no_empty(v, f"{path}[{i}]")


def check_response(body: dict) -> list[dict]:
    assert set(body) <= {"cards", "systemActions"}, body.keys()
    assert isinstance(body["cards"], list)
    for i, card in enumerate(body["cards"]):
        check_card(card, f"cards[{i}]")
    return body["cards"]


def check_card(card: dict, path: str = "card") -> None:
    _no_empty(card, path)
    assert set(card) <= {"uuid", "summary", "detail", "indicator", "source", "suggestions", "selectionBehavior",
                         "overrideReasons", "links"}, set(card)
    assert isinstance(card["summary"], str) and 0 < len(card["summary"]) < 140, card["summary"]
    assert card["indicator"] in INDICATORS
    assert isinstance(card["source"]["label"], str)
    assert set(card["source"]) <= {"label", "url", "icon", "topic"}
    topic = card["source"].get("topic")
    if topic:
        assert topic["system"] and topic["code"]
    if "suggestions" in card:
        assert card["selectionBehavior"] in ("at-most-one", "any")
        recommended = 0
        for s in card["suggestions"]:
            assert s["label"] and s["uuid"]
            recommended += bool(s.get("isRecommended"))
            for action in s["actions"]:
                assert action["type"] in ("create", "update", "delete") and action["description"]
                if action["type"] == "delete":
                    assert "/" in action["resourceId"] and "resource" not in action
                else:
                    MedicationRequest.model_validate(action["resource"])  # strict FHIR R4 (R4B models)
        if card["selectionBehavior"] == "at-most-one":
            assert recommended <= 1
    for reason in card.get("overrideReasons", []):
        assert reason["code"] and reason["system"] and reason["display"]
    for link in card.get("links", []):
        assert link["label"] and link["url"].startswith("http") and link["type"] in ("absolute", "smart")


def topics(body: dict) -> list[str]:
    return [c["source"]["topic"]["code"] for c in body["cards"] if c["source"].get("topic")]
