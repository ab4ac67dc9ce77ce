"""The JSON shapes of the registrar API, as JSON Schema (draft 2020-12): one for every request
body, checked before its handler does anything (`read_body`, `read_signed_body`), and one for
every answer. eucareg/api/openapi.py publishes them (GET /v1/openapi.json, docs/openapi.json).

Patterns and bounds come from the core grammar (eucareg/core/grammar.py), so a value the API
accepts is one the rest of eucareg accepts; "x-grammar" names the grammar whose message a
refusal gives. Request bodies take no field they do not name (`additionalProperties: false`).
"""

from __future__ import annotations

import dataclasses
import enum
import re
import types
import typing
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from jsonschema.protocols import Validator

from eucareg.api import auth
from eucareg.api.validate import (
    MAX_DURATION,
    MAX_USES,
    check,
    compile_schema,
    parse_json,
)
from eucareg.core import grammar
from eucareg.core.model import Event, HookRun, Record, Role
from eucareg.core.trust import Mode, Task, Token
from eucareg.core.txt import MAX_TXT_VALUE
from eucareg.pki import credentials as cred
from eucareg.pki import signing
from eucareg.upgrade.plan import MAX_IMPORT, Action

Schema = dict[str, Any]


def full(regex: re.Pattern[str]) -> str:
    """A grammar's full-match regex as a JSON Schema pattern (which matches anywhere)."""
    return f"^(?:{regex.pattern})$"


def _text(regex: re.Pattern[str], low: int, high: int, name: str, what: str) -> Schema:
    return {
        "type": "string",
        "pattern": full(regex),
        "minLength": low,
        "maxLength": high,
        "x-grammar": name,
        "description": what,
    }


COMPONENT_ID = _text(
    grammar.COMPONENT_ID, 8, 64, "component_id", "A component id: 8-64 of a-z 0-9 -."
)
CLUSTER = _text(grammar.CLUSTER, 1, 64, "cluster", "A cluster name: 1-64 of A-Z a-z 0-9 _ . -.")
FINGERPRINT = _text(
    grammar.FINGERPRINT, 71, 71, "fingerprint", "A key fingerprint: sha256: and 64 hex digits."
)
TOKEN_ID = _text(grammar.TOKEN_ID, 12, 12, "token_id", "A join token id: 12 of a-z 0-9.")
# The serial of a certificate this registrar issued, as the agent writes it (lowercase hex).
SERIAL = {"type": "string", "pattern": "^[0-9a-f]{1,64}$", "description": "A serial, in hex."}
DURATION: Schema = {
    "anyOf": [
        # grammar._DURATION is the one duration grammar (it has no public name yet).
        {"type": "string", "pattern": full(grammar._DURATION), "maxLength": 430},
        {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_DURATION},
    ],
    "x-grammar": "duration",
    "description": "A duration: seconds, or a string such as '30s', '5m', '1.5h', '2d'; "
    "more than zero and at most 3650d.",
}
ROLE = {"enum": [r.value for r in Role if r is not Role.CLC]}
TASKS: Schema = {
    "anyOf": [
        {"enum": ["clc", "cc", "all"]},
        # No uniqueItems: jsonschema compares unsortable items pairwise, and 5000 objects in a
        # body took 15 s of the event loop. A task named twice is simply the same task.
        {"type": "array", "items": {"enum": [t.value for t in Task]}, "maxItems": len(Task)},
        {"type": "null"},
    ],
    "x-error": "must be clc, cc, all or a list of those",
    "description": "The tasks to lock or unlock; all, null or [] is every task this registrar has.",
}


def _object(
    properties: Schema, required: tuple[str, ...] = (), more: Schema | None = None
) -> Schema:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
        **(more or {}),
    }


# -- request bodies --------------------------------------------------------------------------

NAME_COMPONENT = _object(
    {"component_id": COMPONENT_ID, "fingerprint": FINGERPRINT},
    (),
    {
        "anyOf": [{"required": ["component_id"]}, {"required": ["fingerprint"]}],
        "x-error": "name the component: component_id or fingerprint is required",
        "x-code": "missing-field",
        "description": "One component, by id or by key fingerprint (the id wins).",
    },
)
SET_MODE = _object({"mode": {"enum": [m.value for m in Mode]}}, ("mode",))
SET_LOCK = _object(
    {"tasks": TASKS, "locked": {"type": "boolean", "default": True}},
)
INSTALL_WINDOW = _object(
    {"open": {"type": "boolean", "default": False}, "for": DURATION},
    (),
    # Opening needs a length; closing ignores one.
    {
        "if": {"properties": {"open": {"const": True}}, "required": ["open"]},
        "then": {"required": ["for"]},
    },
)
CREATE_TOKEN = _object(
    {
        "role": ROLE,
        "cluster": {**CLUSTER, "type": ["string", "null"]},
        "ttl": {**DURATION, "default": "1h"},
        "uses": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_USES},
    },
    ("role",),
)
REVOKE_TOKEN = _object({"token_id": TOKEN_ID}, ("token_id",))
IMPORT = _object(
    {
        "components": {
            "type": "array",
            "minItems": 1,
            "maxItems": MAX_IMPORT,
            "items": _object(
                {
                    "role": ROLE,
                    "address": {"type": "string", "minLength": 2, "maxLength": 45},
                    "cluster": {**CLUSTER, "type": ["string", "null"]},
                    "fingerprint": {**FINGERPRINT, "type": ["string", "null"]},
                },
                ("role", "address"),
            ),
        },
        "dry_run": {"type": "boolean", "default": False},
        "source": {"type": "string", "maxLength": 200},
    },
    ("components",),
)
REGISTER = _object(
    {
        "role": ROLE,
        "address": {
            "type": "string",
            "minLength": 2,
            "maxLength": 45,
            "description": "The component's address (IPv4 or IPv6).",
        },
        "cluster": {**CLUSTER, "type": ["string", "null"]},
        "fingerprint": {**FINGERPRINT, "type": ["string", "null"]},
    },
    ("role", "address"),
)

# What every signed request carries (docs/credentials.md, "Signed requests"); auth.py checks
# it, cheapest first, before the route's own fields are looked at.
ENVELOPE: Schema = {
    "v": {"const": signing.SIGNED_VERSION},
    "method": {"type": "string", "minLength": 1, "maxLength": auth.MAX_BOUND},
    "path": {"type": "string", "minLength": 1, "maxLength": auth.MAX_BOUND},
    "audience": {"type": "string", "minLength": 1, "maxLength": auth.MAX_BOUND},
    "public_key": {"type": "string", "maxLength": auth.MAX_PEM},
    "timestamp": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": auth.MAX_TIMESTAMP},
    "nonce": {"type": "string", "minLength": 1, "maxLength": auth.MAX_NONCE},
}


def _signed(properties: Schema, required: tuple[str, ...] = ()) -> Schema:
    return _object({**properties, **ENVELOPE}, (*required, *ENVELOPE))


def _txt_value(regex: re.Pattern[str], name: str) -> Schema:
    return {"type": "string", "pattern": full(regex), "x-grammar": name}


# A TXT record (docs/mdns.md): the keys decoding knows, through the grammar; other keys are
# passed on (and ignored), bounded. Whether the record is complete is decoding's to say.
TXT: Schema = {
    "type": "object",
    "properties": {
        "id": _txt_value(grammar.COMPONENT_ID, "component_id"),
        "fp": _txt_value(grammar.FINGERPRINT, "fingerprint"),
        "cluster": _txt_value(grammar.CLUSTER, "cluster"),
        "eucavers": _txt_value(grammar.VERSION, "version"),
        "tok": _txt_value(grammar.TOKEN_ID, "token_id"),
        "tproof": _txt_value(grammar.PROOF, "proof"),
    },
    "propertyNames": {"minLength": 1, "maxLength": 64},
    "additionalProperties": {"type": "string", "maxLength": MAX_TXT_VALUE},
    "maxProperties": 32,
}
# `euca`: the digest of the Eucalyptus key set the component was last given ("" for none);
# sent only by a component that asks for Eucalyptus's own key files (docs/credentials.md).
EUCA_DIGEST = {
    "type": "string",
    "pattern": "^(?:[a-z0-9]{1,16}:[0-9a-f]{1,64})?$",
    "description": "The digest of the Eucalyptus key set held, or empty.",
}
CREDENTIALS = _signed(
    {"component_id": COMPONENT_ID, "have": SERIAL, "euca": EUCA_DIGEST}, ("component_id",)
)
ANNOUNCE = _signed({"txt": TXT}, ("txt",))
PEER = _signed({})

# Every POST route's body, by path.
REQUEST_BODIES: Mapping[str, Schema] = {
    "/v1/credentials": CREDENTIALS,
    "/v1/announce": ANNOUNCE,
    "/v1/peer/registry": PEER,
    "/v1/approve": NAME_COMPONENT,
    "/v1/reject": NAME_COMPONENT,
    "/v1/deregister": NAME_COMPONENT,
    "/v1/trust/mode": SET_MODE,
    "/v1/trust/lock": SET_LOCK,
    "/v1/trust/install-window": INSTALL_WINDOW,
    "/v1/tokens": CREATE_TOKEN,
    "/v1/tokens/revoke": REVOKE_TOKEN,
    "/v1/register": REGISTER,
    "/v1/import": IMPORT,
}
_VALIDATORS: dict[str, Validator] = {path: compile_schema(s) for path, s in REQUEST_BODIES.items()}


def _validator(request: web.Request) -> Validator:
    resource = request.match_info.route.resource
    return _VALIDATORS[resource.canonical if resource is not None else request.path]


async def read_body(request: web.Request) -> dict[str, Any]:
    """The body of an operator request, checked against its route's schema."""
    return check(parse_json(await request.read()), _validator(request))


async def read_signed_body(request: web.Request) -> tuple[dict[str, Any], cred.PublicKey]:
    """A signed request's verified payload, checked against its route's schema, and its key."""
    payload, key = await auth.read_signed(request)
    return check(payload, _validator(request)), key


# -- answers ---------------------------------------------------------------------------------


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
    return _object(properties, tuple(properties))


ERROR = _object(
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
REFUSED = _object(
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
TRUST = _object(
    {
        "mode": {"enum": [m.value for m in Mode]},
        "locked": {"type": "array", "items": {"enum": [t.value for t in Task]}},
        "install_until": NUMBER_OR_NULL,
        "install_open": {"type": "boolean"},
        "install_remaining": {"type": "number", "minimum": 0},
    },
    ("mode", "locked", "install_until", "install_open", "install_remaining"),
)
CHANGE = _object(
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
_LAG = _object(
    {n: {"type": "number"} for n in ("worst_ms", "last_ms", "since", "interval_ms")},
    ("worst_ms", "last_ms", "since", "interval_ms"),
)
_ROWS = {"type": "array", "items": ANY_ROW}
_LEGACY = _object(  # a pre-eucareg component heard now (eucareg/core/legacy.py)
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
                    "items": _object(
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
        "mdns": _object(
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
STATUS_REASON = _object(
    {"status": {"type": "string"}, "reason": {"type": "string"}}, ("status", "reason")
)
# What /v1/announce answers a component whose record it keeps.
ANNOUNCED = _object(
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
DEREGISTER_HOOK = _object(
    {
        "state": {"enum": ["none", "running", "done", "stopped"]},
        "reason": {"type": "string"},
        "run": {"anyOf": [HOOK_RUN, {"type": "null"}]},
    },
    ("state", "reason", "run"),
    {"description": "The deregister hook: none owed, still running (see `eucareg hooks`), done."},
)
# One component of an import plan (eucareg/upgrade/plan.py, PlanRow).
PLAN_ROW = _object(
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
COMPONENT_CHANGED = _object({"component": ROW, "changed": CHANGES}, ("component", "changed"))


def _seq(name: str, items: Schema) -> Schema:
    return _object({name: {"type": "array", "items": items}}, (name,))


# Each route's answers by status (anything else it answers is ERROR).
RESPONSES: Mapping[tuple[str, str], Mapping[int, Schema]] = {
    ("GET", "/v1/openapi.json"): {200: {"type": "object", "required": ["openapi", "paths"]}},
    ("GET", "/v1/health"): {200: _object({"ok": {"const": True}}, ("ok",))},
    ("POST", "/v1/credentials"): {
        200: _object(
            {
                "status": {"const": "registered"},
                "files": {"type": "object", "additionalProperties": {"type": "string"}},
                "eucalyptus": _object(
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
        200: _object(
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
        200: _object(
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
        200: _object({"token": TOKEN_TEXT, "changed": CHANGES}, ("token", "changed"))
    },
    ("POST", "/v1/tokens/revoke"): {
        200: _object({"revoked": TOKEN_ID, "changed": CHANGES}, ("revoked", "changed"))
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
