"""Shared pytest fixtures. Fixture modules that start real servers live in tests/plugins/."""
from __future__ import annotations

import functools
import re
import shutil

import pytest

from tests.helpers import REPO, SCENARIO_NOW, app_settings, shipped_rulebook  # noqa: F401 (REPO, SCENARIO_NOW: also imported from here by older test modules)

pytest_plugins = [
    "tests.plugins.temp_root",
    "tests.plugins.process_exit",
    "tests.plugins.postgres",
    "tests.plugins.fhir_server",
    "tests.plugins.fault_server",
    "tests.plugins.terminology_cache",
    "tests.plugins.app_parts",
    "tests.plugins.shared_answers",
]


@pytest.fixture(scope="session")
def rulebook():
    return shipped_rulebook()


def fixture_fhir_servers(request) -> tuple[str, ...]:
    """The FHIR servers a test uses as fixtures (fhir_server, open_fhir_server, fault_server): the open-mode
    FHIR server allowlist (CDS_FHIR_SERVERS) of the apps it makes. Other servers must be listed by the test."""
    names = ("fhir_server", "open_fhir_server", "fault_server")
    return tuple(request.getfixturevalue(n).base_url for n in names if n in request.fixturenames)


@pytest.fixture(scope="session")
def sqlite_store_template(tmp_path_factory):
    """An empty store file made once per run by the service's own start-up (schema at the newest revision):
    each test's default store is a copy of it. Creating the schema costs about 10 times the copy (DDL, Alembic
    stamp, fsyncs), paid by every app a test makes. Tests of the creation itself (test_migrations, the
    restart tests) use their own database URL."""
    from cds_hooks_service.store import FeedbackStore

    path = tmp_path_factory.mktemp("store-template") / "store.sqlite3"
    FeedbackStore(f"sqlite:///{path}").engine.dispose()  # closing the last connection folds the WAL into the file
    assert not path.with_name(path.name + "-wal").exists()
    return path


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """The store's database URL, once a SQLite file and once a fresh PostgreSQL database (the tests that must
    hold on both; the postgresql case is slow: it needs the PostgreSQL test server)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store-under-test.sqlite3'}"
    return request.getfixturevalue("fresh_postgres_url")


@pytest.fixture
def make_settings(tmp_path, request, sqlite_store_template):
    store = tmp_path / "store.sqlite3"

    def make(**overrides):
        if "database_url" not in overrides and not store.exists():
            shutil.copyfile(sqlite_store_template, store)
        return app_settings(tmp_path, **({"fhir_servers": fixture_fhir_servers(request)} | overrides))

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


@pytest.fixture(scope="session")
def shared_app(tmp_path_factory, rulebook, sqlite_store_template):
    """One app per set of settings for the whole run, for the many cases (one per example, per scenario) that
    only post a hook call and read the answer: an app costs about as much as the call. A test that changes
    what the app holds (feedback, overrides, reloads, settings, a FHIR server) makes its own with make_app."""
    from cds_hooks_service import create_app

    apps: dict[tuple, object] = {}

    def get(**overrides):
        key = tuple(sorted(overrides.items()))
        if key not in apps:
            folder = tmp_path_factory.mktemp("shared-app")
            shutil.copyfile(sqlite_store_template, folder / "store.sqlite3")
            apps[key] = create_app(app_settings(folder, **overrides), rulebook=rulebook)
        return apps[key]

    return get


@pytest.fixture
def client(app):
    return app.test_client()


# -- the fast loop: `pytest -m "not slow"` ---------------------------------------------------------------
# Slow: a test that starts a server process (gunicorn, PostgreSQL, the FHIR test servers), a browser, a load
# generator or other processes, builds a wheel, watches files for changes, runs a property-based fuzzer
# (schemathesis/hypothesis) over the HTTP API, or measures scaling. Recognised here from the source of the
# test, of the module-level helpers it names and of its fixtures, so a new test of that kind is marked
# without anyone remembering to. Also slow, marked by hand (@pytest.mark.slow): a test that waits on a real
# time-out (a hanging or trickling endpoint, a deadline) or runs a concurrency stress of many threads.
_SLOW_FIXTURES = {"postgres_url", "fresh_postgres_url", "_postgres_cluster", "fhir_server", "open_fhir_server"}
_SLOW_WORDS = ("GunicornService", "make_server(", "chromium", "playwright", "wrk", "bdist_wheel", "pip wheel", "schemathesis",
               "@given(", "hypothesis", "subprocess.", "multiprocessing", "Process(", "start_watching",
               "FaultServer", "fault_server", "simple_icd_10_cm")


_SLOW_RE = re.compile("|".join(map(re.escape, _SLOW_WORDS)))


@functools.cache
def _file_names_slow_parts(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return _SLOW_RE.search(f.read()) is not None
    except (OSError, UnicodeDecodeError):
        return True  # unknown: read the function's own source


@functools.cache  # each function, fixture and helper is checked once per run (~700 for ~2,500 tests)
def _source_names_slow_parts(obj) -> bool:
    """Whether the source of ``obj`` (as inspect.getsource reads it) holds a slow word. A file holding none
    cannot hold one in any of its functions: most are answered without reading a function's source."""
    import inspect

    try:
        path = inspect.getsourcefile(inspect.unwrap(obj))  # the file inspect.getsource reads
    except (TypeError, ValueError):
        path = None
    if path is not None and not _file_names_slow_parts(path):
        return False
    try:
        return _SLOW_RE.search(inspect.getsource(obj)) is not None
    except (OSError, TypeError):
        return False


@functools.cache
def _names_slow_parts(function) -> bool:
    """The function's source, or that of a module-level function or class of its module it names, holds a
    slow word."""
    import inspect

    if _source_names_slow_parts(function):
        return True
    code, module = getattr(function, "__code__", None), getattr(function, "__module__", None)
    for name in (code.co_names if code is not None else ()):
        obj = getattr(function, "__globals__", {}).get(name)
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__ == module and obj is not function \
                and _source_names_slow_parts(obj):
            return True
    return False


def _uses_slow_parts(item) -> bool:
    if _SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    callspec = getattr(item, "callspec", None)
    if callspec is not None and "postgresql" in callspec.id:
        return True
    functions = [getattr(item, "function", None)]  # the test and the fixtures it uses (e.g. one starting gunicorn)
    info = getattr(item, "_fixtureinfo", None)
    for defs in (info.name2fixturedefs.values() if info is not None else ()):
        functions += [d.func for d in defs if not d.func.__module__.startswith(("_pytest", "pytest"))]
    return any(_names_slow_parts(f) for f in functions if f is not None)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("slow") is None and _uses_slow_parts(item):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def rules_copy(tmp_path):
    """A copy of the shipped rules and cards to edit: returns the rules folder (cards/ beside it)."""
    shutil.copytree(REPO / "rules", tmp_path / "rules")
    shutil.copytree(REPO / "cards", tmp_path / "cards")
    return tmp_path / "rules"
