"""A transition's Write as SQL, inside the transaction Store.apply opens: its records, tokens,
certificates, revocations, settings, hook runs and events upserted or deleted, and old history
pruned. Upsert statements are built once per shape and reused (docs/performance.md).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from eucareg.core.model import HookOutcome, NewEvent
from eucareg.core.transitions import Prune, TokenChange, Write
from eucareg.store import rows
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


def apply_write(conn: Connection, change: Write) -> None:
    for record in change.records:
        _upsert(conn, components, {"component_id": record.component_id}, rows.record_row(record))
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
        _upsert(conn, tokens, {"token_id": token.token_id}, rows.token_row(token))
    if change.trust is not None:
        values = {
            "mode": change.trust.mode.value,
            "locked": sorted(t.value for t in change.trust.locked),
            "install_until": change.trust.install_until,
        }
        for name, value in values.items():
            _upsert(conn, settings, {"key": name}, {"key": name, "value": json.dumps(value)})
    for run in change.hook_runs:
        _upsert(conn, hook_runs, {"run_id": run.run_id}, rows.hook_row(run))
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
