"""The registry's rows and the model's objects, one into the other: records, tokens and hook
runs as the store writes them and as it reads them back (the enums stored as their values).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import sqlalchemy as sa

from eucareg.core.model import HookOutcome, HookRun, Record, Role, Status
from eucareg.core.trust import Token


def record(row: sa.RowMapping | Mapping[str, Any]) -> Record:
    values = dict(row)
    values["role"] = Role(values["role"])
    values["status"] = Status(values["status"])
    return Record(**values)


def record_row(record: Record) -> dict[str, Any]:
    values = asdict(record)
    values["role"] = record.role.value
    values["status"] = record.status.value
    return values


def token(
    row: sa.RowMapping,
    used_by: frozenset[str] = frozenset(),
    spent_by: frozenset[str] = frozenset(),
) -> Token:
    # Who used or spent the token is in token_uses, not in its row.
    return Token(
        token_id=row["token_id"],
        role=Role(row["role"]),
        cluster=row["cluster"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        uses=row["uses"],
        revoked_at=row["revoked_at"],
        ca_fingerprint=row["ca_fingerprint"],
        used_by=used_by,
        spent_by=spent_by,
    )


def token_row(token: Token) -> dict[str, Any]:
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


def hook_run(row: sa.RowMapping) -> HookRun:
    values = {k: v for k, v in row.items() if k != "seq"}
    values["run_id"] = values["run_id"] or f"seq-{row['seq']}"
    values["outcome"] = HookOutcome(values["outcome"])
    values["rerun"] = bool(values["rerun"])
    return HookRun(**values)


def hook_row(run: HookRun) -> dict[str, Any]:
    values = asdict(run)
    values["outcome"] = run.outcome.value
    return values
