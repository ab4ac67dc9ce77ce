"""The JSON Schema (draft 2020-12) of every request body, by route, and their reading: each body
is checked against its route's schema before its handler does anything (`read_body`,
`read_signed_body`). Request bodies take no field they do not name (`additionalProperties: false`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from jsonschema.protocols import Validator

from eucareg.api import auth
from eucareg.api.fields import (
    CLUSTER,
    COMPONENT_ID,
    DURATION,
    FINGERPRINT,
    ROLE,
    SERIAL,
    TASKS,
    TOKEN_ID,
    Schema,
    full,
    object_,
)
from eucareg.api.validate import MAX_USES, check, compile_schema, parse_json
from eucareg.core import grammar
from eucareg.core.trust import Mode
from eucareg.core.txt import MAX_TXT_VALUE
from eucareg.pki import keypairs, signing
from eucareg.upgrade.plan import MAX_IMPORT

NAME_COMPONENT = object_(
    {"component_id": COMPONENT_ID, "fingerprint": FINGERPRINT},
    (),
    {
        "anyOf": [{"required": ["component_id"]}, {"required": ["fingerprint"]}],
        "x-error": "name the component: component_id or fingerprint is required",
        "x-code": "missing-field",
        "description": "One component, by id or by key fingerprint (the id wins).",
    },
)
SET_MODE = object_({"mode": {"enum": [m.value for m in Mode]}}, ("mode",))
SET_LOCK = object_(
    {"tasks": TASKS, "locked": {"type": "boolean", "default": True}},
)
INSTALL_WINDOW = object_(
    {"open": {"type": "boolean", "default": False}, "for": DURATION},
    (),
    # Opening needs a length; closing ignores one.
    {
        "if": {"properties": {"open": {"const": True}}, "required": ["open"]},
        "then": {"required": ["for"]},
    },
)
CREATE_TOKEN = object_(
    {
        "role": ROLE,
        "cluster": {**CLUSTER, "type": ["string", "null"]},
        "ttl": {**DURATION, "default": "1h"},
        "uses": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_USES},
    },
    ("role",),
)
REVOKE_TOKEN = object_({"token_id": TOKEN_ID}, ("token_id",))
IMPORT = object_(
    {
        "components": {
            "type": "array",
            "minItems": 1,
            "maxItems": MAX_IMPORT,
            "items": object_(
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
REGISTER = object_(
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
    return object_({**properties, **ENVELOPE}, (*required, *ENVELOPE))


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
CHAIN_DIGEST = {
    "type": "string",
    "pattern": "^[0-9a-f]{64}$",
    "description": "The digest of the certificate chain held (docs/protocol.md).",
}
CREDENTIALS = _signed(
    {"component_id": COMPONENT_ID, "have": SERIAL, "euca": EUCA_DIGEST, "chain": CHAIN_DIGEST},
    ("component_id",),
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


async def read_signed_body(request: web.Request) -> tuple[dict[str, Any], keypairs.PublicKey]:
    """A signed request's verified payload, checked against its route's schema, and its key."""
    payload, key = await auth.read_signed(request)
    return check(payload, _validator(request)), key
