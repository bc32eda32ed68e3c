"""Schema versions of the store (Alembic): the start-up check and `cds-hooks-service db upgrade`.

The revisions live in ``versions/``; ``store.py``'s SQLAlchemy metadata stays the source of truth and the
newest revision must produce exactly that schema (tests/test_migrations.py compares them). At start the
store calls ``prepare_schema``: an empty database is created at the newest revision; a database at an older
revision, or made before revisions were recorded, is refused with the command to run; one at a revision this
version does not know (made by a newer version of the service) is refused too.
"""
from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

# alembic and SQLAlchemy are imported where used: the CLI registers `db` for every command, and the
# pharmacists' commands (validate, test, explain, replay) must run without SQLAlchemy.

SCRIPT_DIR = Path(__file__).resolve().parent
UPGRADE_COMMAND = "cds-hooks-service db upgrade"


class SchemaVersionError(RuntimeError):
    """The database's schema is not the one this version of the service uses; the message says what to do."""


def alembic_config(url: str | None = None):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPT_DIR))
    if url is not None:
        cfg.attributes["url"] = url
    return cfg


def _versions_signature() -> tuple:
    """What the revision files are now: the folder, and each ``versions/*.py`` file's name, size and
    modification time."""
    entries = sorted(os.scandir(SCRIPT_DIR / "versions"), key=lambda e: e.name)
    return (str(SCRIPT_DIR),) + tuple((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in entries
                                      if e.name.endswith(".py") and e.is_file())


# The newest revision and every known one, by the signature of the revision files. Alembic finds them by
# importing every revision file, which every store start-up (each app, each `db` command) did again although
# the files ship with the package and do not change while it runs; a changed file is a new signature and is
# read again. At most _KNOWN_MAX signatures (a few strings each) are kept.
_known: dict[tuple, tuple[str, frozenset[str]]] = {}
_known_lock = threading.Lock()
_KNOWN_MAX = 4


def known_revisions() -> tuple[str, frozenset[str]]:
    """(the newest revision, every revision) of the revision files."""
    from alembic.script import ScriptDirectory

    signature = _versions_signature()
    with _known_lock:
        kept = _known.get(signature)
    if kept is not None:
        return kept
    script = ScriptDirectory.from_config(alembic_config())
    kept = (script.get_current_head(), frozenset(rev.revision for rev in script.walk_revisions()))
    with _known_lock:
        if len(_known) >= _KNOWN_MAX:
            _known.clear()
        _known[signature] = kept
    return kept


def head_revision() -> str:
    return known_revisions()[0]


def prepare_schema(conn, metadata) -> None:
    """Create an empty database at the newest revision, or check that an existing one is at it.

    Runs inside the store's first write transaction (serialised between processes by its caller)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlalchemy import inspect

    head, known = known_revisions()
    context = MigrationContext.configure(conn)
    current = context.get_current_revision()
    if current == head:
        return
    present = [name for name in metadata.tables if inspect(conn).has_table(name)]
    if current is None and not present:
        metadata.create_all(conn)
        context.stamp(ScriptDirectory.from_config(alembic_config()), head)
        return
    if current is None:
        raise SchemaVersionError(
            f"the database holds the store's tables but no schema version (made before migrations): "
            f"run `{UPGRADE_COMMAND}` (with the same DATABASE_URL) once, then start the service")
    if current not in known:
        raise SchemaVersionError(
            f"the database's schema is at revision {current}, which this version of the service does not know "
            f"(its newest is {head}): the database was upgraded by a newer version; run that version")
    raise SchemaVersionError(
        f"the database's schema is at revision {current}, this version needs {head}: "
        f"run `{UPGRADE_COMMAND}` (with the same DATABASE_URL), then start the service")


def _engine(url: str):
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    from ..store import _normalise_url

    url = _normalise_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        Path(parsed.database).resolve().parent.mkdir(parents=True, exist_ok=True)
    return create_engine(url)


def upgrade(url: str) -> tuple[str | None, str]:
    """Bring the database at ``url`` to the newest revision; returns (revision before, revision after)."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    engine = _engine(url)
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":  # one upgrade at a time (same key as the store's start-up)
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7345012261)")
            before = MigrationContext.configure(conn).get_current_revision()
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
            after = MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
    return before, after


def current_revision(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    engine = _engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def cmd_db(args) -> int:
    from ..config import Settings

    url = Settings.from_env().database_url
    try:
        if args.db_command == "upgrade":
            before, after = upgrade(url)
            print(f"database schema: {before or 'none recorded'} -> {after}" if before != after
                  else f"database schema already at the newest revision ({after})")
        else:
            current, head = current_revision(url), head_revision()
            print(f"database schema: {current or 'none recorded'}; this version needs {head}"
                  + ("" if current == head else f": run `{UPGRADE_COMMAND}`"))
            return 0 if current == head else 1
    except Exception as exc:  # noqa: BLE001 - a one-line reason for the operator, not a traceback
        print(f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr)
        return 1
    return 0


def register(sub) -> None:
    p = sub.add_parser("db", help="database schema: `db upgrade` (migrate to this version), `db current`")
    p.add_argument("db_command", choices=("upgrade", "current"),
                   help="upgrade: apply the migrations DATABASE_URL lacks; current: show its revision")
    p.set_defaults(func=cmd_db)
