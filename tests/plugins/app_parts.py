"""What every app of a run builds the same way is built once per run.

The request and feedback validators (request_validation.load_validators) are compiled from the JSON Schemas
shipped inside the package (cds_hooks_service/schemas/), which no test edits: the jsonschema validators are
immutable and the fastjsonschema checks are pure functions, yet compiling them (fastjsonschema generates and
compiles Python source) was about a third of the cost of each of the ~240 apps the fast loop makes. Each app
still gets its own dict; test_request_validation.py calls the real function.

Werkzeug's URL builder functions, compiled per route of every app, are kept by what their code depends on
(see _url_builders_once_per_run): about 5 ms of the ~16 ms an app costs.
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



_MAX_BUILDERS = 1024


def cached_url_builders(real):
    """A replacement for werkzeug's ``Rule._compile_builder`` that keeps one builder per distinct key (at most
    _MAX_BUILDERS), calling ``real`` for a key not seen before (and for anything it cannot key)."""
    kept: dict[tuple, object] = {}

    def _compile_builder(self, append_unknown: bool = True):
        try:
            defaults = self.defaults or {}
            dynamic = {data for is_dynamic, data in self._trace if is_dynamic}
            key = (self.rule, tuple(self._trace), bool(append_unknown), tuple(sorted(map(str, defaults))),
                   tuple(sorted((k, self._converters[k].to_url(v)) for k, v in defaults.items() if k in dynamic)))
            hash(key)
        except Exception:  # noqa: BLE001 - anything unexpected: Werkzeug's own path
            return real(self, append_unknown)
        builder = kept.get(key)
        if builder is None:
            builder = real(self, append_unknown)
            if len(kept) < _MAX_BUILDERS:
                kept[key] = builder
        return builder

    return _compile_builder


@pytest.fixture(scope="session", autouse=True)
def _url_builders_once_per_run():
    """Werkzeug compiles two URL builder functions for every route of every app (Python source generated from
    the rule, then ``compile``): with ~14 routes per app and ~240 apps, about 40 % of making an app. The code
    is a pure function of the rule's parsed parts, its defaults (as URLs) and ``append_unknown``, and takes the
    rule as its first argument (each rule binds it to itself), so one function per distinct key serves every
    app. If Werkzeug's internals differ from what this expects (another version), nothing is changed."""
    from werkzeug.routing import rules

    real = getattr(rules.Rule, "_compile_builder", None)
    if real is None or not hasattr(rules.Rule, "_get_func_code"):
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rules.Rule, "_compile_builder", cached_url_builders(real))
        yield
