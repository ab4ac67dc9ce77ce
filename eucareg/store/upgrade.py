"""Bring the registry database to the schema this code knows (Alembic, migrations/), before the
registrar reads it: one transaction under the database's write lock, a copy of the SQLite file
first, and a database newer than this code refused untouched.
"""

from __future__ import annotations

import io
import logging
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool

from eucareg.store.errors import SchemaTooNew, StoreBusy
from eucareg.store.migrations import v010
from eucareg.store.owner import holder

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
BASELINE = "0001"  # the revision equal to eucareg 0.1.0's schema
REGISTRY_TABLES = frozenset(t.name for t in v010.metadata.sorted_tables)
BUSY_TIMEOUT_MS = 60_000  # another upgrader holds the write lock: wait for it this long
PG_LOCK_KEY = 0x6575636172656701  # "eucareg" + 1: the advisory lock of a PostgreSQL upgrade


@dataclass(frozen=True)
class SchemaState:
    """Where a database stands. kind: empty (no tables), unversioned (0.1.0 or older, no
    alembic_version), behind, current, or newer (a revision this code does not know)."""

    kind: str
    current: str | None
    head: str
    pending: tuple[str, ...] = field(default=())  # what an upgrade applies, oldest first

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.kind,
            "revision": self.current,
            "head": self.head,
            "pending": list(self.pending),
        }


def alembic_config(
    connection: Connection | None = None, extra_versions: Sequence[Path] = ()
) -> AlembicConfig:
    """Alembic's configuration, made here rather than read from an alembic.ini."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("path_separator", "os")
    locations = [str(MIGRATIONS / "versions"), *map(str, extra_versions)]
    cfg.set_main_option("version_locations", os.pathsep.join(locations))
    cfg.attributes["connection"] = connection
    return cfg


def scripts(extra_versions: Sequence[Path] = ()) -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config(None, extra_versions))


def read_state(conn: Connection, script: ScriptDirectory) -> SchemaState:
    """The schema state of the database behind `conn` (reads only)."""
    head = script.get_current_head()
    assert head is not None
    tables = set(sa.inspect(conn).get_table_names())
    everything = tuple(reversed([r.revision for r in script.walk_revisions()]))
    if "alembic_version" not in tables:
        if tables & REGISTRY_TABLES:
            return SchemaState("unversioned", None, head, everything[1:])
        return SchemaState("empty", None, head, everything)
    stamped = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all()
    if len(stamped) != 1:
        # Alembic writes exactly one row on a linear history; anything else is not ours.
        return SchemaState("newer", ",".join(stamped) or None, head)
    current = stamped[0]
    try:
        script.get_revision(current)
    except CommandError:
        return SchemaState("newer", current, head)
    pending = tuple(reversed([r.revision for r in script.iterate_revisions(head, current)]))
    return SchemaState("behind" if pending else "current", current, head, pending)


def schema_state(engine: Engine, extra_versions: Sequence[Path] = ()) -> SchemaState:
    with engine.connect() as conn:
        return read_state(conn, scripts(extra_versions))


def upgrade(
    engine: Engine, extra_versions: Sequence[Path] = (), *, lock_held: bool = False
) -> list[str]:
    """Bring the database to head; return what was done ([] when it already was).

    Raises SchemaTooNew, changing nothing, when the database carries a revision this code
    does not know (a newer eucareg wrote it), and StoreBusy when it needs an upgrade but a
    running registrar owns it (its schema is never changed under it), unless the caller holds
    that registrar lock itself (`lock_held`). Blocking: call it off the event loop.
    `extra_versions` adds revision folders (tests use it to add a failing revision).
    """
    script = scripts(extra_versions)
    with _migration_engine(engine) as mig:
        with mig.connect() as conn:
            state = read_state(conn, script)  # no write lock for the common case
        _refuse_newer(state, engine)
        if state.kind == "current":
            return []
        with mig.begin() as conn:
            _lock(conn)
            # Read again under the lock: a concurrent upgrader may have done it all.
            state = read_state(conn, script)
            _refuse_newer(state, engine)
            if state.kind == "current":
                return []
            if not lock_held:
                _refuse_owned(engine)
            done: list[str] = []
            if state.kind != "empty":
                copy = copy_before(engine, state.head)
                if copy is not None:
                    done.append(f"copied the database to {copy}")
            if state.kind == "unversioned":
                added = v010.add_missing(conn)
                done += [f"added {name} (pre-0.1.0 database)" for name in added]
                command.stamp(alembic_config(conn, extra_versions), BASELINE)
                done.append(f"stamped {BASELINE} (the schema of eucareg 0.1.0)")
            command.upgrade(alembic_config(conn, extra_versions), "head")
            if state.kind == "empty":
                done.append(f"created the registry at revision {state.head}")
            else:
                done += [f"applied revision {rev}" for rev in state.pending]
    for step in done:
        log.info("registry schema: %s", step)
    log.info("registry schema at revision %s", state.head)
    return done


def sql_script(dialect: str, extra_versions: Sequence[Path] = ()) -> str:
    """The SQL that creates the registry from nothing to head on `dialect` (e.g. postgresql),
    as Alembic's offline mode writes it; no database is touched."""
    out = io.StringIO()
    cfg = alembic_config(None, extra_versions)
    cfg.output_buffer = out
    cfg.attributes["dialect"] = dialect
    command.upgrade(cfg, "head", sql=True)
    return out.getvalue()


def _refuse_newer(state: SchemaState, engine: Engine) -> None:
    if state.kind == "newer":
        raise SchemaTooNew(
            f"{_where(engine)}: the registry is at schema revision "
            f"{state.current}, which this eucareg does not know (it knows up to {state.head}); "
            "a newer eucareg wrote it. Run that version, or restore a backup made by this one"
        )


def _where(engine: Engine) -> str:
    """The database for a message: the SQLite file, or the URL without its password."""
    if engine.dialect.name == "sqlite":
        return str(engine.url.database)
    return engine.url.render_as_string(hide_password=True)


def _refuse_owned(engine: Engine) -> None:
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        return
    pid = holder(Path(database))
    if pid is not None:
        raise StoreBusy(
            f"{database} is in use by another registrar (pid {pid}); its schema is not "
            "upgraded under it: stop that agent first"
        )


@contextmanager
def _migration_engine(engine: Engine) -> Iterator[Engine]:
    """An engine whose transactions hold the database's write lock from their first statement
    and include DDL (SQLite's driver would otherwise commit before each CREATE or ALTER)."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield engine  # PostgreSQL: transactional DDL already; memory: one connection's own
        return
    mig = sa.create_engine(engine.url, poolclass=NullPool)

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # autocommit: we say BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        set_wal(cursor)
        cursor.close()

    def on_begin(conn: Connection) -> None:
        # IMMEDIATE: the write lock now, so two upgraders queue instead of interleaving.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    sa.event.listen(mig, "connect", on_connect)
    sa.event.listen(mig, "begin", on_begin)
    try:
        yield mig
    finally:
        mig.dispose()


def set_wal(cursor: Any) -> None:
    """Put a SQLite database in WAL mode (it stays so). Switching needs the database to
    itself and SQLite says "locked" at once, without waiting, while another connection holds
    a lock: then the database is left as it is for now, and a later connection switches it."""
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
    except sqlite3.OperationalError as exc:
        log.debug("journal mode not switched to WAL now: %s", exc)


def _lock(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LOCK_KEY})


def copy_before(engine: Engine, revision: str) -> Path | None:
    """Copy the SQLite file to `<database>.pre-<revision>` (0600) with SQLite's online backup,
    which reads a consistent snapshot; an existing copy is kept and a numbered one made. None
    for a database that is not a file (PostgreSQL: pg_dump is the operator's)."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        return None
    source = Path(database)
    target = source.with_name(f"{source.name}.pre-{revision}")
    n = 1
    while target.exists():
        n += 1
        target = source.with_name(f"{source.name}.pre-{revision}.{n}")
    snapshot_sqlite(source, target)
    return target


def snapshot_sqlite(source: Path, target: Path) -> None:
    """A consistent copy of a live SQLite database (online backup API), written 0600 under a
    temporary name and renamed into place, so a crash never leaves a half copy under `target`."""
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}-{time.monotonic_ns()}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    os.close(fd)
    try:
        src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
        dst = sqlite3.connect(partial)
        try:
            src.backup(dst)
            # The copy is one self-contained file, not a WAL database with a side file.
            dst.execute("PRAGMA journal_mode=DELETE")
        finally:
            dst.close()
            src.close()
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        os.rename(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
