"""The registry store: loads the registrar's whole state once, writes transitions atomically,
and answers the operator's history queries (events, hook runs).

SQLAlchemy Core over a SQLite file by default (any SQLAlchemy URL works). Its methods block:
the registrar calls them from its writer thread or through `asyncio.to_thread`, never on the loop.
Opening one brings its schema to this code's (store/upgrade.py) or refuses a newer one.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from eucareg.core.model import (
    Event,
    HookOutcome,
    HookRun,
    IssuedCertificate,
    NewEvent,
    Record,
    Role,
    Status,
)
from eucareg.core.transitions import Prune, TokenChange, Write
from eucareg.core.trust import Mode, Task, Token, TrustSettings
from eucareg.store.errors import StoreBusy
from eucareg.store.owner import open_lock
from eucareg.store.schema import (
    certificates,
    components,
    events,
    hook_runs,
    revocations,
    settings,
    token_uses,
    tokens,
)
from eucareg.store.upgrade import set_wal, upgrade


@dataclass
class Snapshot:
    """Everything the registrar keeps in memory, as loaded at start."""

    records: dict[str, Record] = field(default_factory=dict)
    tokens: dict[str, Token] = field(default_factory=dict)
    trust: TrustSettings = field(default_factory=TrustSettings)
    certificates: dict[str, IssuedCertificate] = field(default_factory=dict)
    revoked: set[str] = field(default_factory=set)
    running_hooks: list[HookRun] = field(default_factory=list)
    # Components whose latest hook run was interrupted: a run they still owe is a re-run.
    interrupted: frozenset[str] = frozenset()


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets `eucareg status` read while the registrar writes; FULL sync makes a
    # committed registration survive power loss, which is what "never register twice" needs.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=5000")
    set_wal(cursor)
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


CLAIM_PATIENCE = 3.0  # seconds a starting registrar waits for a just-dead one's lock


class Store:
    """Typed access to the registry database; the only module that speaks SQL."""

    def __init__(self, url: str) -> None:
        self.engine: Engine = sa.create_engine(url)
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        try:
            self.migrated = upgrade(self.engine)  # what was done to the schema ([]: nothing)
        except BaseException:
            self.engine.dispose()
            raise
        self._claim: int | None = None  # the lock file's descriptor while we own the store

    def claim(self, patience: float = CLAIM_PATIENCE) -> None:
        """Become the one registrar that writes this database, or raise StoreBusy.

        Two registrars on one state would each take the other's running hooks for orphans
        and kill them. The lock is an flock on `<database>.lock`, so the kernel drops it when
        the owner dies, however it dies; the file names the owner's PID for the message.
        A registrar restarted right after a crash waits up to `patience` seconds: a hook the
        dead one was forking holds the lock until its exec closes it. (Blocking: call it off
        the event loop.)
        """
        if self._claim is not None:
            return
        database = self.engine.url.database
        if self.engine.dialect.name != "sqlite" or not database or database == ":memory:":
            return
        path = Path(database).with_name(Path(database).name + ".lock")
        # Never through a planted link: holding it truncates it, and the agent runs as root.
        fd = open_lock(path)
        deadline = time.monotonic() + patience
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise StoreBusy(
                f"{database} is in use by another registrar (pid {holder}); "
                "two registrars must never share a state directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._claim = fd

    def release(self) -> None:
        """Stop owning the database (claim() again to take it back)."""
        if self._claim is not None:
            os.close(self._claim)  # closing the descriptor drops the flock
            self._claim = None

    def close(self) -> None:
        self.engine.dispose()
        self.release()

    # -- loading ---------------------------------------------------------------------------

    def load(self) -> Snapshot:
        with self.engine.begin() as conn:
            records = {
                row["component_id"]: _record(row)
                for row in conn.execute(sa.select(components)).mappings()
            }
            raw = {
                k: json.loads(v)
                for k, v in conn.execute(sa.select(settings.c.key, settings.c.value))
            }
            certs = {
                row["component_id"]: IssuedCertificate(**dict(row))
                for row in conn.execute(sa.select(certificates)).mappings()
            }
            revoked = {row[0] for row in conn.execute(sa.select(revocations.c.serial))}
            running = [
                _hook_run(row)
                for row in conn.execute(
                    sa.select(hook_runs).where(hook_runs.c.outcome == HookOutcome.RUNNING.value)
                ).mappings()
            ]
            latest = (
                sa.select(sa.func.max(hook_runs.c.seq)).group_by(hook_runs.c.component_id)
            ).scalar_subquery()
            interrupted = frozenset(
                conn.execute(
                    sa.select(hook_runs.c.component_id).where(
                        hook_runs.c.seq.in_(latest),
                        hook_runs.c.outcome == HookOutcome.INTERRUPTED.value,
                    )
                ).scalars()
            )
            token_list = _tokens(conn)
        trust = TrustSettings(
            mode=Mode(raw.get("mode", Mode.LOCAL.value)),
            locked=frozenset(Task(t) for t in raw.get("locked", [])),
            install_until=raw.get("install_until"),
        )
        return Snapshot(
            records=records,
            tokens={t.token_id: t for t in token_list},
            trust=trust,
            certificates=certs,
            revoked=revoked,
            running_hooks=running,
            interrupted=interrupted,
        )

    # -- writing ---------------------------------------------------------------------------

    def apply(self, changes: Sequence[Write]) -> None:
        """Write every change in one transaction: all of them, or none."""
        with self.engine.begin() as conn:
            for change in changes:
                _apply(conn, change)

    # -- history (read-only) ---------------------------------------------------------------

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
        with self.engine.begin() as conn:
            rows = conn.execute(query).mappings().all()
        return [Event(**dict(row)) for row in reversed(rows)]

    def hook_runs(self, component_id: str | None = None) -> list[HookRun]:
        query = sa.select(hook_runs).order_by(hook_runs.c.seq)
        if component_id:
            query = query.where(hook_runs.c.component_id == component_id)
        with self.engine.begin() as conn:
            rows = conn.execute(query).mappings().all()
        return [_hook_run(row) for row in rows]

    # Kept for tests and tools that look at one record without a registrar.
    def records(self) -> dict[str, Record]:
        return self.load().records

    def get(self, component_id: str) -> Record | None:
        return self.records().get(component_id)


def _apply(conn: Connection, change: Write) -> None:
    for record in change.records:
        _upsert(conn, components, {"component_id": record.component_id}, _record_row(record))
    for component_id in change.revoke:
        cert = (
            conn.execute(sa.select(certificates).where(certificates.c.component_id == component_id))
            .mappings()
            .first()
        )
        if cert is not None:
            _upsert(
                conn,
                revocations,
                {"serial": cert["serial"]},
                {
                    "serial": cert["serial"],
                    "component_id": component_id,
                    "fingerprint": cert["fingerprint"],
                    "at": _first_event_time(change.events),
                    "reason": change.revoke_reason,
                },
            )
        conn.execute(certificates.delete().where(certificates.c.component_id == component_id))
    for component_id in change.deleted:
        conn.execute(components.delete().where(components.c.component_id == component_id))
        conn.execute(certificates.delete().where(certificates.c.component_id == component_id))
    for issued in change.certificates:
        _upsert(conn, certificates, {"component_id": issued.component_id}, asdict(issued))
    for use in change.token_uses:
        key = {"token_id": use.token_id, "component_id": use.component_id}
        where = [
            token_uses.c.token_id == use.token_id,
            token_uses.c.component_id == use.component_id,
        ]
        if use.change is TokenChange.RELEASE:
            conn.execute(token_uses.delete().where(*where))
        else:
            spent = use.change is TokenChange.SPEND
            at = _first_event_time(change.events)
            _upsert(conn, token_uses, key, {**key, "at": at, "spent": spent})
    for token in change.tokens:
        _upsert(conn, tokens, {"token_id": token.token_id}, _token_row(token))
    if change.trust is not None:
        values = {
            "mode": change.trust.mode.value,
            "locked": sorted(t.value for t in change.trust.locked),
            "install_until": change.trust.install_until,
        }
        for name, value in values.items():
            _upsert(conn, settings, {"key": name}, {"key": name, "value": json.dumps(value)})
    for run in change.hook_runs:
        _upsert(conn, hook_runs, {"run_id": run.run_id}, _hook_row(run))
    if change.events:
        conn.execute(events.insert(), [asdict(e) for e in change.events])
    if change.prune is not None:
        _prune(conn, change.prune)


def _prune(conn: Connection, prune: Prune) -> None:
    """Drop old history: events and finished hook runs before `prune.before`, and all but
    the newest `max_*` of each. A running hook's journal row is never dropped (a restart
    needs it to find the hook)."""
    conn.execute(events.delete().where(events.c.at < prune.before))
    _keep_newest(conn, events, events.c.seq, prune.max_events)
    finished = hook_runs.c.outcome != HookOutcome.RUNNING.value
    conn.execute(hook_runs.delete().where(hook_runs.c.started_at < prune.before, finished))
    newest = conn.execute(sa.select(sa.func.max(hook_runs.c.seq))).scalar()
    if newest is not None:
        conn.execute(
            hook_runs.delete().where(hook_runs.c.seq <= newest - prune.max_hook_runs, finished)
        )


def _keep_newest(conn: Connection, table: sa.Table, seq: sa.Column[Any], keep: int) -> None:
    newest = conn.execute(sa.select(sa.func.max(seq))).scalar()
    if newest is not None:
        conn.execute(table.delete().where(seq <= newest - keep))


def _upsert(
    conn: Connection, table: sa.Table, key: Mapping[str, Any], values: Mapping[str, Any]
) -> None:
    """Update the row with `key`, or insert it (portable across SQLite and PostgreSQL)."""
    update, insert, bound = _upsert_statements(table, tuple(key), tuple(values))
    params = {**values, **{bound[name]: value for name, value in key.items()}}
    if conn.execute(update, params).rowcount == 0:
        conn.execute(insert, dict(values))


_Upsert = tuple[sa.Update, sa.Insert, dict[str, str]]
_UPSERTS: dict[tuple[str, tuple[str, ...], tuple[str, ...]], _Upsert] = {}


def _upsert_statements(table: sa.Table, key: tuple[str, ...], columns: tuple[str, ...]) -> _Upsert:
    """The UPDATE and INSERT of an upsert, built once with bound parameters, and the name each
    key column is bound as in the UPDATE. A statement made anew with its values inside costs
    SQLAlchemy a cache key and more each time, and the writer thread holding the GIL for that
    slowed the event loop (docs/performance.md)."""
    made = _UPSERTS.get((table.name, key, columns))
    if made is None:
        bound = {name: _key_param(table, name) for name in key}
        where = [table.c[name] == sa.bindparam(bound[name]) for name in key]
        row: dict[str, Any] = {name: sa.bindparam(name) for name in columns}
        made = (table.update().where(*where).values(row), table.insert().values(row), bound)
        _UPSERTS[(table.name, key, columns)] = made
    return made


def _key_param(table: sa.Table, name: str) -> str:
    # Not the name of any column: a column's own value is bound under its name.
    param = f"key_{name}"
    while param in table.c:
        param = "_" + param
    return param


def _first_event_time(new_events: Iterable[NewEvent]) -> float:
    return next((e.at for e in new_events), 0.0)


def _tokens(conn: Connection) -> list[Token]:
    rows = conn.execute(sa.select(tokens).order_by(tokens.c.created_at)).mappings().all()
    used: dict[str, set[str]] = {}
    spent: dict[str, set[str]] = {}
    for token_id, component_id, is_spent in conn.execute(
        sa.select(token_uses.c.token_id, token_uses.c.component_id, token_uses.c.spent)
    ):
        (spent if is_spent else used).setdefault(token_id, set()).add(component_id)
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


def _token_row(token: Token) -> dict[str, Any]:
    return {
        "token_id": token.token_id,
        "role": token.role.value,
        "cluster": token.cluster,
        "created_at": token.created_at,
        "expires_at": token.expires_at,
        "uses": token.uses,
        "revoked_at": token.revoked_at,
        "ca_fingerprint": token.ca_fingerprint,
    }


def _record(row: sa.RowMapping | Mapping[str, Any]) -> Record:
    values = dict(row)
    values["role"] = Role(values["role"])
    values["status"] = Status(values["status"])
    return Record(**values)


def _record_row(record: Record) -> dict[str, Any]:
    values = asdict(record)
    values["role"] = record.role.value
    values["status"] = record.status.value
    return values


def _hook_run(row: sa.RowMapping) -> HookRun:
    values = {k: v for k, v in row.items() if k != "seq"}
    values["run_id"] = values["run_id"] or f"seq-{row['seq']}"
    values["outcome"] = HookOutcome(values["outcome"])
    values["rerun"] = bool(values["rerun"])
    return HookRun(**values)


def _hook_row(run: HookRun) -> dict[str, Any]:
    values = asdict(run)
    values["outcome"] = run.outcome.value
    return values
