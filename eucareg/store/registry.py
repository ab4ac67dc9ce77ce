"""The registry store: registration records, decision events and hook runs in one database.

SQLAlchemy Core over a SQLite file by default (any SQLAlchemy URL works). Every write is its own
transaction, so a crash leaves the last committed state, and a restarted registrar resumes from it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from eucareg.core.model import Event, Record, Role, Status
from eucareg.core.trust import Mode, Task, Token, TrustSettings

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
    sa.Column("approved", sa.Boolean, nullable=False, default=False),
    sa.Column("admitted_by", sa.String(64), nullable=False, default=""),
)

settings = sa.Table(
    "settings",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),  # JSON
)

tokens = sa.Table(
    "tokens",
    metadata,
    sa.Column("token_id", sa.String(16), primary_key=True),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("cluster", sa.String(64)),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("uses", sa.Integer),
    sa.Column("revoked_at", sa.Float),
    sa.Column("ca_fingerprint", sa.String(80), nullable=False),
)

token_uses = sa.Table(
    "token_uses",
    metadata,
    sa.Column("token_id", sa.String(16), primary_key=True),
    sa.Column("component_id", sa.String(64), primary_key=True),
    sa.Column("at", sa.Float, nullable=False),
    # Set when the component was deregistered: the token no longer admits it.
    sa.Column("spent", sa.Boolean, nullable=False, default=False),
)

revocations = sa.Table(
    "revocations",
    metadata,
    sa.Column("serial", sa.String(64), primary_key=True),
    sa.Column("component_id", sa.String(64), nullable=False),
    sa.Column("fingerprint", sa.String(80), nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
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

    def delete(
        self,
        component_id: str,
        event: tuple[str, str, str] | None = None,
        revoke_reason: str | None = None,
    ) -> None:
        """Remove a record (and its certificate, revoked when `revoke_reason` is given)."""
        with self._tx() as conn:
            row = (
                conn.execute(sa.select(components).where(components.c.component_id == component_id))
                .mappings()
                .first()
            )
            if row is None:
                return
            cert = (
                conn.execute(
                    sa.select(certificates).where(certificates.c.component_id == component_id)
                )
                .mappings()
                .first()
            )
            if cert is not None and revoke_reason is not None:
                conn.execute(
                    revocations.insert().values(
                        serial=cert["serial"],
                        component_id=component_id,
                        fingerprint=cert["fingerprint"],
                        at=time.time(),
                        reason=revoke_reason,
                    )
                )
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


class TrustStore:
    """Trust settings, tokens and revocations; shares the registry's database."""

    def __init__(self, store: Store) -> None:
        self.engine = store.engine

    def load_settings(self) -> TrustSettings:
        with self.engine.begin() as conn:
            rows = dict(conn.execute(sa.select(settings.c.key, settings.c.value)).all())
        raw = {k: json.loads(v) for k, v in rows.items()}
        return TrustSettings(
            mode=Mode(raw.get("mode", Mode.LOCAL.value)),
            locked=frozenset(Task(t) for t in raw.get("locked", [])),
            install_until=raw.get("install_until"),
        )

    def save_settings(self, trust: TrustSettings) -> None:
        values = {
            "mode": trust.mode.value,
            "locked": sorted(t.value for t in trust.locked),
            "install_until": trust.install_until,
        }
        with self.engine.begin() as conn:
            for key, value in values.items():
                conn.execute(settings.delete().where(settings.c.key == key))
                conn.execute(settings.insert().values(key=key, value=json.dumps(value)))

    def add_token(self, token: Token) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                tokens.insert().values(
                    token_id=token.token_id,
                    role=token.role.value,
                    cluster=token.cluster,
                    created_at=token.created_at,
                    expires_at=token.expires_at,
                    uses=token.uses,
                    revoked_at=token.revoked_at,
                    ca_fingerprint=token.ca_fingerprint,
                )
            )

    def tokens(self) -> list[Token]:
        with self.engine.begin() as conn:
            rows = conn.execute(sa.select(tokens).order_by(tokens.c.created_at)).mappings().all()
            uses = conn.execute(
                sa.select(token_uses.c.token_id, token_uses.c.component_id, token_uses.c.spent)
            ).all()
        used: dict[str, set[str]] = {}
        spent: dict[str, set[str]] = {}
        for token_id, component_id, is_spent in uses:
            used.setdefault(token_id, set()).add(component_id)
            if is_spent:
                spent.setdefault(token_id, set()).add(component_id)
        return [
            Token(
                token_id=row["token_id"],
                role=Role(row["role"]),
                cluster=row["cluster"],
                created_at=row["created_at"],
                expires_at=row["expires_at"],
                uses=row["uses"],
                revoked_at=row["revoked_at"],
                ca_fingerprint=row["ca_fingerprint"],
                used_by=frozenset(used.get(row["token_id"], set())),
                spent_by=frozenset(spent.get(row["token_id"], set())),
            )
            for row in rows
        ]

    def token(self, token_id: str) -> Token | None:
        return next((t for t in self.tokens() if t.token_id == token_id), None)

    def revoke_token(self, token_id: str, at: float) -> bool:
        with self.engine.begin() as conn:
            result = conn.execute(
                tokens.update()
                .where(tokens.c.token_id == token_id, tokens.c.revoked_at.is_(None))
                .values(revoked_at=at)
            )
        return bool(result.rowcount)

    def use_token(self, token_id: str, component_id: str, at: float) -> None:
        with self.engine.begin() as conn:
            exists = conn.execute(
                sa.select(token_uses.c.token_id).where(
                    token_uses.c.token_id == token_id, token_uses.c.component_id == component_id
                )
            ).first()
            if exists is None:
                conn.execute(
                    token_uses.insert().values(token_id=token_id, component_id=component_id, at=at)
                )

    def spend_token(self, token_id: str, component_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                token_uses.update()
                .where(token_uses.c.token_id == token_id, token_uses.c.component_id == component_id)
                .values(spent=True)
            )

    def revoked(self, serial: str) -> bool:
        with self.engine.begin() as conn:
            row = conn.execute(
                sa.select(revocations.c.serial).where(revocations.c.serial == serial)
            ).first()
        return row is not None


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
