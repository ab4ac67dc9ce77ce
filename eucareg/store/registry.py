"""The registry store: loads the registrar's whole state once, writes transitions atomically
(each as changes.py spells it in SQL), and answers the operator's history queries (events, hook
runs); rows.py turns its rows into the model's objects and back.

SQLAlchemy Core over a SQLite file by default (any SQLAlchemy URL works). Its methods block:
the registrar calls them from its writer thread or through `asyncio.to_thread`, never on the loop.
Opening one brings its schema to this code's (store/upgrade.py) or refuses a newer one.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from eucareg.core.model import Event, HookOutcome, HookRun, IssuedCertificate, Record
from eucareg.core.transitions import Write
from eucareg.core.trust import Mode, Task, Token, TrustSettings
from eucareg.store import rows
from eucareg.store.changes import apply_write
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
    """Typed access to the registry database; its SQL is here and in changes.py."""

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
                row["component_id"]: rows.record(row)
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
                rows.hook_run(row)
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
                apply_write(conn, change)

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
            found = conn.execute(query).mappings().all()
        return [Event(**dict(row)) for row in reversed(found)]

    def hook_runs(self, component_id: str | None = None) -> list[HookRun]:
        query = sa.select(hook_runs).order_by(hook_runs.c.seq)
        if component_id:
            query = query.where(hook_runs.c.component_id == component_id)
        with self.engine.begin() as conn:
            found = conn.execute(query).mappings().all()
        return [rows.hook_run(row) for row in found]

    # Kept for tests and tools that look at one record without a registrar.
    def records(self) -> dict[str, Record]:
        return self.load().records

    def get(self, component_id: str) -> Record | None:
        return self.records().get(component_id)


def _tokens(conn: Connection) -> list[Token]:
    found = conn.execute(sa.select(tokens).order_by(tokens.c.created_at)).mappings().all()
    used: dict[str, set[str]] = {}
    spent: dict[str, set[str]] = {}
    for token_id, component_id, is_spent in conn.execute(
        sa.select(token_uses.c.token_id, token_uses.c.component_id, token_uses.c.spent)
    ):
        (spent if is_spent else used).setdefault(token_id, set()).add(component_id)
    return [
        rows.token(
            row,
            used_by=frozenset(used.get(row["token_id"], set())),
            spent_by=frozenset(spent.get(row["token_id"], set())),
        )
        for row in found
    ]
