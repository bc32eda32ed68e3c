"""Shared pytest fixtures. Fixture modules that start real servers live in tests/plugins/."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = [
    "tests.plugins.postgres",
    "tests.plugins.fhir_server",
    "tests.plugins.fault_server",
]

REPO = Path(__file__).resolve().parent.parent
SCENARIO_NOW = "2026-03-01T12:00:00Z"


@pytest.fixture(scope="session")
def rulebook():
    from cds_hooks_service.rulebook import load_rulebook

    return load_rulebook(REPO / "rules", REPO / "cards")


def fixture_fhir_servers(request) -> tuple[str, ...]:
    """The FHIR servers a test uses as fixtures (fhir_server, open_fhir_server, fault_server): the open-mode
    FHIR server allowlist (CDS_FHIR_SERVERS) of the apps it makes. Other servers must be listed by the test."""
    names = ("fhir_server", "open_fhir_server", "fault_server")
    return tuple(request.getfixturevalue(n).base_url for n in names if n in request.fixturenames)


@pytest.fixture
def make_settings(tmp_path, request):
    from cds_hooks_service.config import Settings
    from cds_hooks_service.facts import parse_time

    def make(**overrides):
        base = dict(database_url=f"sqlite:///{tmp_path / 'store.sqlite3'}", instance_dir=tmp_path,
                    suppression_secret=b"test-secret", fixed_now=parse_time(SCENARIO_NOW),
                    public_url="http://localhost",  # the test client's root: the JWT aud of the tests
                    fhir_servers=fixture_fhir_servers(request),
                    listen_hosts=("127.0.0.1",))  # a loopback service: open mode allowed
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
