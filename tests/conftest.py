"""Shared pytest fixtures. Fixture modules that start real servers live in tests/plugins/."""
pytest_plugins = [
    "tests.plugins.postgres",
    "tests.plugins.fhir_server",
]
