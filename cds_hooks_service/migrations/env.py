"""Alembic environment: run by `cds-hooks-service db upgrade` (a connection is passed in) and by a developer's
`alembic` command from the repository (alembic.ini; the database is DATABASE_URL or the default store)."""
from __future__ import annotations

from alembic import context

from cds_hooks_service.store import metadata

config = context.config
target_metadata = metadata


def _run(connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite")  # SQLite alters tables by copying
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    from cds_hooks_service.config import Settings
    from cds_hooks_service.migrations import _engine

    engine = _engine(config.attributes.get("url") or Settings.from_env().database_url)
    try:
        with engine.connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        engine.dispose()
