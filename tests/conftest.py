"""Shared pytest fixtures. Fixture modules that start real servers live in tests/plugins/."""
from __future__ import annotations

import pytest

from tests.helpers import REPO, SCENARIO_NOW  # noqa: F401 (also imported from here by older test modules)

pytest_plugins = [
    "tests.plugins.postgres",
    "tests.plugins.fhir_server",
    "tests.plugins.fault_server",
]


@pytest.fixture(scope="session")
def rulebook():
    from cds_hooks_service.rulebook import load_rulebook

    return load_rulebook(REPO / "rules", REPO / "cards")


@pytest.fixture
def make_settings(tmp_path):
    from cds_hooks_service.config import Settings
    from cds_hooks_service.facts import parse_time

    def make(**overrides):
        base = dict(database_url=f"sqlite:///{tmp_path / 'store.sqlite3'}", instance_dir=tmp_path,
                    suppression_secret=b"test-secret", fixed_now=parse_time(SCENARIO_NOW))
        base.update(overrides)
        return Settings(**base)

    return make


@pytest.fixture
def make_app(make_settings, rulebook):
    from cds_hooks_service import create_app

    def make(shared_rules=True, **overrides):
        settings = make_settings(**overrides)
        parts = {"rulebook": rulebook} if shared_rules and not settings.rules_local_dir else {}
        return create_app(settings, **parts)

    return make


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()
