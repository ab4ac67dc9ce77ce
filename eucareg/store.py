"""The registry store: registration records, decision events and hook runs in one database.

SQLAlchemy Core over a SQLite file by default (any SQLAlchemy URL works). Every write is its own
transaction, so a crash leaves the last committed state, and a restarted registrar resumes from it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from eucareg.model import Event, Record, Role, Status

metadata = sa.MetaData()

components = sa.Table(
    "components",
    metadata,
    sa.Column("component_id", sa.String(64), primary_key=True),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("cluster", sa.String(64)),
    sa.Column("address", sa.String(64), nullable=False),
    sa.Column("fingerprint", sa.String(80), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("waiting_for", sa.String(128)),
    sa.Column("instance", sa.String(255), nullable=False, default=""),
    sa.Column("first_seen", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("registered_at", sa.Float),
    sa.Column("expires_at", sa.Float),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("next_retry_at", sa.Float),
    sa.Column("credentials_issued_at", sa.Float),
    sa.Column("credentials_collected_at", sa.Float),
)

certificates = sa.Table(
    "certificates",
    metadata,
    sa.Column("component_id", sa.String(64), primary_key=True),
    sa.Column("fingerprint", sa.String(80), nullable=False),
    sa.Column("serial", sa.String(64), nullable=False),
    sa.Column("cert_pem", sa.Text, nullable=False),
    sa.Column("issued_at", sa.Float, nullable=False),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False, index=True),
    sa.Column("component_id", sa.String(64), nullable=False, index=True),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("cluster", sa.String(64)),
    sa.Column("address", sa.String(64), nullable=False),
    sa.Column("kind", sa.String(32), nullable=False, index=True),
    sa.Column("code", sa.String(64), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
)

hook_runs = sa.Table(
    "hook_runs",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("component_id", sa.String(64), nullable=False, index=True),
    sa.Column("hook", sa.String(255), nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("duration", sa.Float, nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("exit_code", sa.Integer),
    sa.Column("stdout", sa.Text, nullable=False),
    sa.Column("stderr", sa.Text, nullable=False),
)


@dataclass(frozen=True)
class HookRun:
    """The recorded outcome of one registration script run."""

    component_id: str
    hook: str
    started_at: float
    duration: float
    outcome: str  # ok | failed | timeout | skipped
    exit_code: int | None
    stdout: str
    stderr: str


@dataclass(frozen=True)
class IssuedCertificate:
    component_id: str
    fingerprint: str
    serial: str
    cert_pem: str
    issued_at: float


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets `eucareg status` read while the registrar writes; FULL sync makes a
    # committed registration survive power loss, which is what "never register twice" needs.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


class Store:
    """Typed access to the registry database; the only module that speaks SQL."""

    def __init__(self, url: str) -> None:
        self.engine: Engine = sa.create_engine(url)
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        metadata.create_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    # -- records -------------------------------------------------------------------------

    def records(self) -> dict[str, Record]:
        with self._tx() as conn:
            rows = conn.execute(sa.select(components)).mappings().all()
        return {row["component_id"]: _record_from_row(row) for row in rows}

    def get(self, component_id: str) -> Record | None:
        with self._tx() as conn:
            row = (
                conn.execute(sa.select(components).where(components.c.component_id == component_id))
                .mappings()
                .first()
            )
        return None if row is None else _record_from_row(row)

    def put(self, record: Record, event: tuple[str, str, str] | None = None) -> Record:
        """Insert or replace a record, and in the same transaction log (kind, code, reason)."""
        record = replace(record, updated_at=record.updated_at or time.time())
        values = _row_from_record(record)
        with self._tx() as conn:
            exists = conn.execute(
                sa.select(components.c.component_id).where(
                    components.c.component_id == record.component_id
                )
            ).first()
            if exists is None:
                conn.execute(components.insert().values(**values))
            else:
                conn.execute(
                    components.update()
                    .where(components.c.component_id == record.component_id)
                    .values(**values)
                )
            if event is not None:
                _insert_event(conn, record, *event, at=record.updated_at)
        return record

    def delete(self, component_id: str, event: tuple[str, str, str] | None = None) -> None:
        with self._tx() as conn:
            row = (
                conn.execute(sa.select(components).where(components.c.component_id == component_id))
                .mappings()
                .first()
            )
            if row is None:
                return
            conn.execute(components.delete().where(components.c.component_id == component_id))
            conn.execute(certificates.delete().where(certificates.c.component_id == component_id))
            if event is not None:
                _insert_event(conn, _record_from_row(row), *event, at=time.time())

    # -- events --------------------------------------------------------------------------

    def add_event(
        self,
        *,
        component_id: str,
        role: str,
        cluster: str | None,
        address: str,
        kind: str,
        code: str,
        reason: str,
        at: float | None = None,
    ) -> None:
        with self._tx() as conn:
            conn.execute(
                events.insert().values(
                    at=time.time() if at is None else at,
                    component_id=component_id,
                    role=role,
                    cluster=cluster,
                    address=address,
                    kind=kind,
                    code=code,
                    reason=reason,
                )
            )

    def events(
        self,
        *,
        since_seq: int = 0,
        component_id: str | None = None,
        kind: str | None = None,
        role: str | None = None,
        cluster: str | None = None,
        limit: int = 1000,
    ) -> list[Event]:
        query = sa.select(events).where(events.c.seq > since_seq)
        if component_id:
            query = query.where(events.c.component_id == component_id)
        if kind:
            query = query.where(events.c.kind == kind)
        if role:
            query = query.where(events.c.role == role)
        if cluster:
            query = query.where(events.c.cluster == cluster)
        # The newest `limit` events, returned oldest first so they read as a timeline.
        query = query.order_by(events.c.seq.desc()).limit(limit)
        with self._tx() as conn:
            rows = conn.execute(query).mappings().all()
        return [Event(**dict(row)) for row in reversed(rows)]

    # -- hook runs -----------------------------------------------------------------------

    def add_hook_run(self, run: HookRun) -> None:
        with self._tx() as conn:
            conn.execute(hook_runs.insert().values(**asdict(run)))

    def hook_runs(self, component_id: str | None = None) -> list[HookRun]:
        query = sa.select(hook_runs).order_by(hook_runs.c.seq)
        if component_id:
            query = query.where(hook_runs.c.component_id == component_id)
        with self._tx() as conn:
            rows = conn.execute(query).mappings().all()
        return [HookRun(**{k: v for k, v in row.items() if k != "seq"}) for row in rows]

    # -- certificates --------------------------------------------------------------------

    def certificate(self, component_id: str) -> IssuedCertificate | None:
        with self._tx() as conn:
            row = (
                conn.execute(
                    sa.select(certificates).where(certificates.c.component_id == component_id)
                )
                .mappings()
                .first()
            )
        return None if row is None else IssuedCertificate(**dict(row))

    def put_certificate(self, cert: IssuedCertificate) -> None:
        with self._tx() as conn:
            conn.execute(
                certificates.delete().where(certificates.c.component_id == cert.component_id)
            )
            conn.execute(certificates.insert().values(**asdict(cert)))
            conn.execute(
                components.update()
                .where(components.c.component_id == cert.component_id)
                .values(credentials_issued_at=cert.issued_at)
            )


def _insert_event(
    conn: Connection, record: Record, kind: str, code: str, reason: str, *, at: float
) -> None:
    conn.execute(
        events.insert().values(
            at=at,
            component_id=record.component_id,
            role=record.role.value,
            cluster=record.cluster,
            address=record.address,
            kind=kind,
            code=code,
            reason=reason,
        )
    )


def _record_from_row(row: sa.RowMapping | Mapping[str, Any]) -> Record:
    values = dict(row)
    values["role"] = Role(values["role"])
    values["status"] = Status(values["status"])
    return Record(**values)


def _row_from_record(record: Record) -> dict[str, Any]:
    values = asdict(record)
    values["role"] = record.role.value
    values["status"] = record.status.value
    return values
