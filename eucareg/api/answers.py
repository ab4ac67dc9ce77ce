"""The JSON Schema (draft 2020-12) of every answer, by route and status (RESPONSES), the rows
they carry (a dataclass's schema is derived from its fields, `row_of`), and `changed`, which
builds the "changed" list a mutating call answers.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Mapping
from typing import Any

from eucareg.api.fields import COMPONENT_ID, ROLE, TOKEN_ID, Schema, object_
from eucareg.core import grammar
from eucareg.core.model import Event, HookRun, Record, Role
from eucareg.core.trust import Mode, Task, Token
from eucareg.upgrade.plan import Action


def _json_type(hint: Any) -> Schema:
    """The JSON Schema of a dataclass field's type, as dataclasses.asdict and json write it."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [_json_type(h) for h in typing.get_args(hint) if h is not type(None)]
        [only] = options
        kind = only.get("type")
        if isinstance(kind, str):
            return {**only, "type": [kind, "null"]}
        return {"anyOf": [only, {"type": "null"}]}
    if origin in (frozenset, set, tuple, list):
        return {"type": "array", "items": _json_type(typing.get_args(hint)[0])}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return {"type": "string", "enum": [m.value for m in hint]}
    names = {bool: "boolean", int: "integer", float: "number", str: "string"}
    return {"type": names[hint]}


def row_of(cls: type[Any], **extra: Schema) -> Schema:
    """The object dataclasses.asdict makes of `cls`, plus the `extra` fields."""
    hints = typing.get_type_hints(cls)
    properties = {f.name: _json_type(hints[f.name]) for f in dataclasses.fields(cls)}
    properties.update(extra)
    return object_(properties, tuple(properties))


ERROR = object_(
    {
        "error": {"type": "string", "description": "What was wrong, naming the field."},
        "code": {
            "type": "string",
            "pattern": "^[a-z][a-z0-9-]*$",
            "description": "A stable code (see x-error-codes).",
        },
    },
    ("error", "code"),
)
# A fallback announcement refused outright (nothing stored); agents read `code`.
REFUSED = object_(
    {"status": {"const": "refused"}, "code": {"type": "string"}, "reason": {"type": "string"}},
    ("status", "code", "reason"),
)
NUMBER_OR_NULL = {"type": ["number", "null"]}
TIME = {"type": "number", "minimum": 0}
ROW = row_of(Record, online={"type": "boolean"})
EVENT = row_of(Event)
HOOK_RUN = row_of(HookRun)
TOKEN = row_of(
    Token, state={"enum": ["valid", "expired", "used-up", "revoked"]}, role={"enum": ROLE["enum"]}
)
TRUST = object_(
    {
        "mode": {"enum": [m.value for m in Mode]},
        "locked": {"type": "array", "items": {"enum": [t.value for t in Task]}},
        "install_until": NUMBER_OR_NULL,
        "install_open": {"type": "boolean"},
        "install_remaining": {"type": "number", "minimum": 0},
    },
    ("mode", "locked", "install_until", "install_open", "install_remaining"),
)
CHANGE = object_(
    {
        "object": {"enum": ["component", "certificate", "token", "trust"]},
        "id": {"type": "string"},
        "action": {"enum": ["created", "updated", "deleted"]},
        "before": {"type": ["object", "null"], "description": "The fields as they were."},
        "after": {"type": ["object", "null"], "description": "The fields as they are now."},
    },
    ("object", "id", "action", "before", "after"),
    {
        "description": "One stored object a call changed: only the fields that changed for "
        "an update, every field for a created or deleted one."
    },
)
CHANGES = {"type": "array", "items": CHANGE}
# Other rows (the agent's own components, peers' NC rows): objects naming their component.
ANY_ROW = {"type": "object", "required": ["component_id", "role"]}
_REGISTRAR_FIELDS: Schema = {
    "registers": {"type": "array", "items": {"enum": [r.value for r in Role]}},
    "cluster": {"type": ["string", "null"]},
    "started_at": TIME,
    "trust": TRUST,
}
# Open to more fields: the registrar tells more about itself as it learns to.
REGISTRAR = {"type": "object", "properties": _REGISTRAR_FIELDS, "required": list(_REGISTRAR_FIELDS)}
REGISTRY = {
    "type": "object",
    "properties": {
        "registrar": REGISTRAR,
        "local": {"type": "array", "items": {"type": "object"}},
        "components": {"type": "array", "items": ROW},
    },
    "required": ["registrar", "local", "components"],
}
_LAG = object_(
    {n: {"type": "number"} for n in ("worst_ms", "last_ms", "since", "interval_ms")},
    ("worst_ms", "last_ms", "since", "interval_ms"),
)
_ROWS = {"type": "array", "items": ANY_ROW}
_LEGACY = object_(  # a pre-eucareg component heard now (eucareg/core/legacy.py)
    {
        "kind": {"type": "string", "enum": ["9.10", "10.04"]},
        "role": {"type": "string"},
        "cluster": {"type": ["string", "null"]},
        "address": {"type": "string"},
        "eucavers": {"type": ["string", "null"]},
        "instance": {"type": "string"},
    },
    ("kind", "role", "cluster", "address", "eucavers", "instance"),
)
STATUS = {
    "type": "object",
    "properties": {
        "registrar": {**REGISTRAR, "properties": {**_REGISTRAR_FIELDS, "loop_lag": _LAG}},
        "local": {"type": "array", "items": {"type": "object"}},
        "tree": {
            "type": "object",
            "properties": {
                "clc": {"type": ["object", "null"]},
                "walrus": _ROWS,
                "clusters": {
                    "type": "array",
                    "items": object_(
                        {"name": {"type": "string"}, "cc": _ROWS, "sc": _ROWS, "nc": _ROWS},
                        ("name", "cc", "sc", "nc"),
                    ),
                },
                "unmatched": _ROWS,
            },
            "required": ["clc", "walrus", "clusters", "unmatched"],
        },
        "errors": {"type": "array", "items": {"type": "string"}},
        "warnings": {"type": "array", "items": {"type": "string"}},
        "legacy": {"type": "array", "items": _LEGACY},
        # The mDNS backend in use on this host ([mdns] backend, docs/mdns.md).
        "mdns": object_(
            {
                "backend": {"type": "string"},
                "setting": {"type": ["string", "null"]},
                "reason": {"type": "string"},
            },
            ("backend", "setting", "reason"),
        ),
    },
    "required": ["registrar", "local", "tree", "errors", "warnings", "legacy", "mdns"],
}
TOKEN_TEXT = {
    "type": "string",
    "pattern": rf"^eucareg1\.{grammar.TOKEN_ID.pattern}\.{grammar.PROOF.pattern}\.[0-9a-f]{{64}}$",
}
STATUS_REASON = object_(
    {"status": {"type": "string"}, "reason": {"type": "string"}}, ("status", "reason")
)
# What /v1/announce answers a component whose record it keeps.
ANNOUNCED = object_(
    {
        "status": {"type": "string"},
        "reason": {"type": "string"},
        "waiting_for": {"type": "string", "description": "What a pending component waits on."},
        "refresh": {
            "type": "number",
            "description": "Announce again within this many seconds to stay heard (for three).",
        },
    },
    ("status", "reason"),
)
TRUST_CHANGED = {**TRUST, "properties": {**TRUST["properties"], "changed": CHANGES}}
# What became of a deregistered component's deregister hook (docs/hooks.md, "Deregistering").
DEREGISTER_HOOK = object_(
    {
        "state": {"enum": ["none", "running", "done", "stopped"]},
        "reason": {"type": "string"},
        "run": {"anyOf": [HOOK_RUN, {"type": "null"}]},
    },
    ("state", "reason", "run"),
    {"description": "The deregister hook: none owed, still running (see `eucareg hooks`), done."},
)
# One component of an import plan (eucareg/upgrade/plan.py, PlanRow).
PLAN_ROW = object_(
    {
        "role": ROLE,
        "cluster": {"type": ["string", "null"]},
        "address": {"type": "string"},
        "action": {"enum": [a.value for a in Action]},
        "reason": {"type": "string"},
        "component_id": {"type": ["string", "null"]},
        "where": {"type": "string"},
        "fingerprint": {"type": ["string", "null"]},
    },
    ("role", "cluster", "address", "action", "reason", "component_id", "where", "fingerprint"),
)
COMPONENT_CHANGED = object_({"component": ROW, "changed": CHANGES}, ("component", "changed"))


def _seq(name: str, items: Schema) -> Schema:
    return object_({name: {"type": "array", "items": items}}, (name,))


# Each route's answers by status (anything else it answers is ERROR).
RESPONSES: Mapping[tuple[str, str], Mapping[int, Schema]] = {
    ("GET", "/v1/openapi.json"): {200: {"type": "object", "required": ["openapi", "paths"]}},
    ("GET", "/v1/health"): {200: object_({"ok": {"const": True}}, ("ok",))},
    ("POST", "/v1/credentials"): {
        200: object_(
            {
                "status": {"const": "registered"},
                "files": {"type": "object", "additionalProperties": {"type": "string"}},
                "eucalyptus": object_(
                    {
                        "state": {"enum": ["ready", "missing", "invalid", "off"]},
                        "reason": {"type": "string"},
                        "digest": {"type": "string"},
                        "files": {
                            "type": "object",
                            "additionalProperties": {"type": "string", "contentEncoding": "base64"},
                        },
                    },
                    ("state", "reason", "digest", "files"),
                    {"description": "Eucalyptus's own key files, for a component that asked."},
                ),
            },
            ("status", "files"),
        ),
        202: STATUS_REASON,
    },
    ("POST", "/v1/announce"): {200: ANNOUNCED, 403: {"anyOf": [REFUSED, ERROR]}},
    ("POST", "/v1/peer/registry"): {200: REGISTRY},
    ("GET", "/v1/registry"): {200: REGISTRY},
    ("GET", "/v1/status"): {200: STATUS},
    ("GET", "/v1/events"): {200: _seq("events", EVENT)},
    ("GET", "/v1/hooks"): {200: _seq("hook_runs", HOOK_RUN)},
    ("GET", "/v1/pending"): {200: _seq("pending", ROW)},
    ("POST", "/v1/approve"): {200: COMPONENT_CHANGED},
    ("POST", "/v1/reject"): {200: COMPONENT_CHANGED},
    ("POST", "/v1/register"): {200: COMPONENT_CHANGED, 409: ERROR},
    ("POST", "/v1/import"): {
        200: object_(
            {
                "plan": {"type": "array", "items": PLAN_ROW},
                "imported": {"type": "integer", "minimum": 0},
                "dry_run": {"type": "boolean"},
                "changed": CHANGES,
            },
            ("plan", "imported", "dry_run", "changed"),
        ),
        409: ERROR,
    },
    ("POST", "/v1/deregister"): {
        200: object_(
            {"deregistered": COMPONENT_ID, "changed": CHANGES, "hook": DEREGISTER_HOOK},
            ("deregistered", "changed"),
        )
    },
    ("GET", "/v1/trust"): {200: TRUST},
    ("POST", "/v1/trust/mode"): {200: TRUST_CHANGED},
    ("POST", "/v1/trust/lock"): {200: TRUST_CHANGED},
    ("POST", "/v1/trust/install-window"): {200: TRUST_CHANGED},
    ("GET", "/v1/tokens"): {200: _seq("tokens", TOKEN)},
    ("POST", "/v1/tokens"): {
        200: object_({"token": TOKEN_TEXT, "changed": CHANGES}, ("token", "changed"))
    },
    ("POST", "/v1/tokens/revoke"): {
        200: object_({"revoked": TOKEN_ID, "changed": CHANGES}, ("revoked", "changed"))
    },
}


def changed(
    kind: str, ident: str, before: Mapping[str, Any] | None, after: Mapping[str, Any] | None
) -> list[dict[str, Any]]:
    """What a mutating call answers under "changed" about one stored object (CHANGE): nothing
    when no field changed; only the changed fields for an update."""
    if before is None or after is None:
        action = "created" if before is None else "deleted"
        return [{"object": kind, "id": ident, "action": action, "before": before, "after": after}]
    keys = [k for k in dict.fromkeys([*before, *after]) if before.get(k) != after.get(k)]
    if not keys:
        return []
    return [
        {
            "object": kind,
            "id": ident,
            "action": "updated",
            "before": {k: before.get(k) for k in keys},
            "after": {k: after.get(k) for k in keys},
        }
    ]
