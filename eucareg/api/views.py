"""The JSON shapes of registrar state that several endpoints share: a record's ROW, the trust
settings object and the flat registry (docs/cli.md, "OUTPUT FORMATS").
"""

from __future__ import annotations

import time
from dataclasses import fields
from typing import Any

from eucareg.api.context import ApiContext
from eucareg.core.model import Record
from eucareg.registrar.engine import Registrar

_RECORD_FIELDS = tuple(f.name for f in fields(Record))


def record_json(record: Record, online: bool) -> dict[str, Any]:
    # Every field is a scalar: a flat copy, not asdict()'s deep one (7x faster; a status of
    # 2,000 NCs spent 32 ms of the event loop in asdict alone).
    data = {name: getattr(record, name) for name in _RECORD_FIELDS}
    data["role"] = record.role.value
    data["status"] = record.status.value
    data["online"] = online
    return data


def trust_json(registrar: Registrar) -> dict[str, Any]:
    trust = registrar.trust
    now = time.time()
    until = trust.install_until
    return {
        "mode": trust.mode.value,
        "locked": sorted(t.value for t in trust.locked),
        "install_until": until,
        "install_open": trust.install_open(now),
        "install_remaining": max(0.0, until - now) if until is not None else 0.0,
    }


def _sort_key(record: Record) -> tuple[str, str, str]:
    return (record.role.value, record.cluster or "", record.address)


def registry_json(registrar: Registrar, ctx: ApiContext) -> dict[str, Any]:
    """This registrar's own records, flat: GET /v1/registry and what peers read."""
    settings = registrar.settings
    return {
        "registrar": {
            "registers": sorted(r.value for r in settings.registers),
            "cluster": settings.own_cluster,
            "started_at": registrar.started_at,
            "trust": trust_json(registrar),
        },
        "local": ctx.local_components(),
        "components": [
            record_json(r, registrar.online(r.component_id))
            for r in sorted(registrar.records().values(), key=_sort_key)
        ],
    }
