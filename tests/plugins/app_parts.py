"""What every app of a run builds the same way is built once per run.

The request and feedback validators (request_validation.load_validators) are compiled from the JSON Schemas
shipped inside the package (cds_hooks_service/schemas/), which no test edits: the jsonschema validators are
immutable and the fastjsonschema checks are pure functions, yet compiling them (fastjsonschema generates and
compiles Python source) was about a third of the cost of each of the ~240 apps the fast loop makes. Each app
still gets its own dict; test_request_validation.py calls the real function.
"""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def _validators_once_per_run():
    from cds_hooks_service import runtime
    from cds_hooks_service.request_validation import SCHEMA_DIR

    real_load = runtime.load_validators
    kept: dict[tuple, dict] = {}

    def load_validators() -> dict:
        # Keyed by the schema files' bytes, so a schema edited during a run is compiled again.
        key = tuple((p.name, p.read_bytes()) for p in sorted(SCHEMA_DIR.glob("*.json")))
        if key not in kept:
            kept.clear()
            kept[key] = real_load()
        validators = kept[key]
        return {**validators, "fast": dict(validators["fast"])}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runtime, "load_validators", load_validators)
        yield
