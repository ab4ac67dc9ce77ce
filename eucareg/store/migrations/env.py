"""Alembic's environment for the registry. Online: always given an open connection inside a
transaction by eucareg/store/upgrade.py (no alembic.ini, no URL of its own), so a migration
commits with everything else of its upgrade, or not at all. Offline: the SQL the revisions
would run on a dialect (upgrade.sql_script), to check them for PostgreSQL without a server.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from eucareg.store.schema import metadata

if context.is_offline_mode():
    context.configure(
        dialect_name=str(context.config.attributes["dialect"]),
        target_metadata=metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    connection = context.config.attributes.get("connection")
    if not isinstance(connection, Connection):
        raise RuntimeError("the registry's migrations run through eucareg.store.upgrade only")
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite cannot ALTER most things in place: batch mode copies the table instead.
        render_as_batch=True,
    )
    with context.begin_transaction():  # joins the caller's transaction
        context.run_migrations()
