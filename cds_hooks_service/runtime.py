"""What one running service holds: settings, the compiled rules, the feedback store, the JWT verifier.

The rulebook is swapped whole (never edited in place), so a request always sees one consistent set
of rules, and a reload that fails validation leaves the previous rules serving.
"""
from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import jsonschema
from flask import current_app

from .auth import JwtVerifier
from .config import Settings
from .rulebook import Rulebook, RulebookError, load_rulebook
from .store import FeedbackStore

log = logging.getLogger(__name__)
SCHEMA_DIR = Path(__file__).parent / "schemas"


def load_validators() -> dict:
    request_schema = json.loads((SCHEMA_DIR / "cds-request.json").read_text())
    feedback_schema = json.loads((SCHEMA_DIR / "feedback.json").read_text())
    cls = jsonschema.Draft202012Validator
    hook_schema = lambda hook: {**request_schema["$defs"][hook], "$defs": request_schema["$defs"]}  # noqa: E731
    return {
        "request": cls(request_schema),
        "order-select": cls(hook_schema("order-select")),
        "order-sign": cls(hook_schema("order-sign")),
        "feedback": cls(feedback_schema),
    }


class Runtime:
    def __init__(self, settings: Settings, *, rulebook: Rulebook | None = None, store: FeedbackStore | None = None):
        self.settings = settings
        self.validators = load_validators()
        self._rulebook = rulebook or load_rulebook(settings.rules_dir, settings.cards_dir, settings.rules_local_dir)
        self._reload_lock = threading.Lock()
        if store is None:
            if settings.database_url.startswith("sqlite:///"):
                Path(settings.database_url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
            store = FeedbackStore(settings.database_url)
        self.store = store
        self.verifier = None
        if settings.jwt_issuers_file:
            self.verifier = JwtVerifier.from_file(settings.jwt_issuers_file, replay_check=store.use_jti)
        else:
            log.warning("CDS_JWT_ISSUERS is not set: the service runs in OPEN MODE and accepts calls without a JWT. "
                        "Do not expose it like this outside development.")

    @property
    def rulebook(self) -> Rulebook:
        return self._rulebook

    def reload_rules(self) -> tuple[bool, str]:
        """Load the rule files again; keep the current rules if the new ones do not validate."""
        with self._reload_lock:
            try:
                new = load_rulebook(self.settings.rules_dir, self.settings.cards_dir, self.settings.rules_local_dir)
            except RulebookError as exc:
                log.error("rule reload refused, previous rules keep serving:\n%s", exc)
                return False, str(exc)
            self._rulebook = new
            log.info("rules reloaded: %d rules", len(new.rules))
            return True, f"{len(new.rules)} rules loaded"


def runtime() -> Runtime:
    return current_app.extensions["cds"]
