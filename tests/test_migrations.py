"""Schema migrations (Alembic, cds_hooks_service/migrations/): a store made by the code before migrations
(tests/fixtures/store-before-migrations/, with rows written by that code) is refused at start with the command
to run, and `cds-hooks-service db upgrade` brings it to the newest revision without losing a row; the newest
revision is exactly store.py's metadata; a database from a newer version is refused."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, func, select, text

from cds_hooks_service.cli import main as cli
from cds_hooks_service.migrations import SchemaVersionError, current_revision, head_revision, upgrade
from cds_hooks_service.store import FeedbackStore, _normalise_url, metadata

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "store-before-migrations"
UTC = timezone.utc
TABLES = ("cds_issued_card", "cds_feedback", "cds_override", "cds_used_jti")


def _execute_script(url: str, sql: str) -> None:
    engine = create_engine(_normalise_url(url))
    try:
        with engine.begin() as conn:
            for statement in sql.split(";\n"):
                lines = [line for line in statement.splitlines() if not line.startswith("--")]
                if "".join(lines).strip():
                    conn.exec_driver_sql("\n".join(lines))
    finally:
        engine.dispose()


def _counts(url: str) -> dict[str, int]:
    engine = create_engine(_normalise_url(url))
    try:
        with engine.connect() as conn:
            return {t: conn.execute(select(func.count()).select_from(text(t))).scalar_one() for t in TABLES}
    finally:
        engine.dispose()


def _schema_diff(url: str) -> list:
    engine = create_engine(_normalise_url(url))
    try:
        with engine.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn), metadata)
    finally:
        engine.dispose()


def test_a_store_from_before_migrations_is_refused_then_upgraded_without_losing_rows(store_url, monkeypatch, capsys):
    dialect = "sqlite" if store_url.startswith("sqlite") else "postgresql"
    _execute_script(store_url, (FIXTURES / f"{dialect}.sql").read_text())
    before = _counts(store_url)
    assert before == {"cds_issued_card": 3, "cds_feedback": 2, "cds_override": 1, "cds_used_jti": 1}

    with pytest.raises(SchemaVersionError, match="run `cds-hooks-service db upgrade`"):
        FeedbackStore(store_url)
    monkeypatch.setenv("DATABASE_URL", store_url)
    assert cli(["db", "current"]) == 1
    assert "run `cds-hooks-service db upgrade`" in capsys.readouterr().out
    assert cli(["db", "upgrade"]) == 0
    assert f"none recorded -> {head_revision()}" in capsys.readouterr().out
    assert cli(["db", "upgrade"]) == 0  # a second run changes nothing
    assert "already at the newest revision" in capsys.readouterr().out

    after = _counts(store_url)
    assert all(after[t] >= before[t] for t in TABLES), (before, after)  # no row lost
    assert _schema_diff(store_url) == []
    store = FeedbackStore(store_url)
    try:
        # the old rows still work: the override suppresses, the jti stays used, stats count the old cards
        assert store.overridden_keys(["key-0", "key-1"], datetime(2026, 11, 29, tzinfo=UTC)) == {"key-0"}
        assert store.use_jti("jti-from-before", datetime(2099, 1, 1, tzinfo=UTC)) is False
        stats = {r["rule_id"]: r for r in store.stats()}
        assert stats["dhe-triptan-ergot-24h"]["issued"] == 2 and stats["dhe-triptan-ergot-24h"]["overridden"] == 1
        assert stats["opioid-in-migraine"]["accepted"] == 1
        assert stats["dhe-triptan-ergot-24h"]["top_override_reasons"][0]["code"] == "benefit-outweighs-risk"
        # and new rows go in beside them (PostgreSQL: the id sequence continues)
        assert store.record_feedback("migraine-med-safety-sign", [{
            "card": "00000000-0000-4000-8000-000000000002", "outcome": "accepted",
            "outcomeTimestamp": "2026-11-30T10:09:00Z"}]) == 1
    finally:
        store.close()
    assert _counts(store_url)["cds_feedback"] == 3


def test_a_store_made_before_the_override_table_gets_its_overrides_indexed(store_url):
    """The baseline revision does what store.py did at start before migrations: a store of a version before
    cds_override existed gets that table, filled from its recorded "overridden" feedback."""
    dialect = "sqlite" if store_url.startswith("sqlite") else "postgresql"
    _execute_script(store_url, (FIXTURES / f"{dialect}.sql").read_text() + ";\nDROP TABLE cds_override;\n")
    with pytest.raises(SchemaVersionError, match="cds-hooks-service db upgrade"):
        FeedbackStore(store_url)
    upgrade(store_url)
    store = FeedbackStore(store_url)
    try:
        assert store.overridden_keys(["key-0", "key-1", "key-2"], datetime(2026, 11, 29, tzinfo=UTC)) == {"key-0"}
    finally:
        store.close()
    assert _counts(store_url)["cds_override"] == 1


def test_a_new_database_is_created_at_the_newest_revision_and_matches_the_metadata(store_url):
    FeedbackStore(store_url).close()
    assert current_revision(store_url) == head_revision()
    assert _schema_diff(store_url) == []


def test_the_migrations_build_exactly_the_schema_of_store_py(store_url):
    """An empty database upgraded revision by revision ends with store.py's tables, columns and indexes: a change
    to store.py's metadata without a migration fails here."""
    assert upgrade(store_url) == (None, head_revision())
    assert _schema_diff(store_url) == []
    FeedbackStore(store_url).close()  # and the service accepts it


def test_a_database_from_a_newer_version_is_refused(store_url):
    FeedbackStore(store_url).close()
    engine = create_engine(_normalise_url(store_url))
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'f00dfeed0099'"))
    engine.dispose()
    with pytest.raises(SchemaVersionError, match="does not know.*newer version"):
        FeedbackStore(store_url)


def test_db_upgrade_reports_an_unreachable_database_in_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    assert cli(["db", "upgrade"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: OperationalError") and "\n" not in err


def test_the_revisions_are_read_once_and_again_when_a_revision_file_changes(tmp_path, monkeypatch):
    """Every store start-up asks for the newest revision: Alembic imports every revision file to answer, so
    the answer is kept per process, keyed by the revision files (name, size, modification time)."""
    import shutil

    from alembic.script import ScriptDirectory

    from cds_hooks_service import migrations

    original = migrations.SCRIPT_DIR
    shipped = ScriptDirectory.from_config(migrations.alembic_config())
    assert migrations.known_revisions() == (shipped.get_current_head(),
                                            frozenset(r.revision for r in shipped.walk_revisions()))
    copy = tmp_path / "migrations"
    shutil.copytree(migrations.SCRIPT_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(migrations, "SCRIPT_DIR", copy)
    reads = []
    real = ScriptDirectory.from_config.__func__
    monkeypatch.setattr(ScriptDirectory, "from_config",
                        classmethod(lambda cls, *a, **kw: reads.append(1) or real(cls, *a, **kw)))
    head, known = migrations.known_revisions()
    assert migrations.known_revisions() == (head, known) and migrations.head_revision() == head
    assert len(reads) == 1  # read once for these files
    (copy / "versions" / "0099_later.py").write_text(
        f'revision = "0099"\ndown_revision = "{head}"\nbranch_labels = None\ndepends_on = None\n\n\n'
        "def upgrade() -> None:\n    pass\n\n\ndef downgrade() -> None:\n    pass\n")
    assert migrations.known_revisions() == ("0099", known | {"0099"})  # a new file: read again
    assert len(reads) == 2
    url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    FeedbackStore(url).engine.dispose()  # a store made at 0099 (the newest of these files)
    assert current_revision(url) == "0099"
    monkeypatch.setattr(migrations, "SCRIPT_DIR", original)  # the shipped files: 0099 is unknown to them
    with pytest.raises(SchemaVersionError, match="revision 0099, which this version of the service does not know"):
        FeedbackStore(url)
