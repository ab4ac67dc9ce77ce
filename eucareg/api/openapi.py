"""The registrar API described: an OpenAPI 3.1 document of every route, with the JSON Schemas of
eucareg/api/bodies.py and answers.py for each request body and answer, and the stable error
codes. Served at GET /v1/openapi.json; docs/openapi.json is a copy, regenerated with

    python -m eucareg.api.openapi > docs/openapi.json

(tests/unit/test_api_openapi.py fails when the copy is stale).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from eucareg.api import answers, bodies, fields
from eucareg.api.components import MAX_WAIT, MAX_WATCH, WAIT
from eucareg.api.operator import MAX_DEREGISTER_WAIT, MAX_EVENTS
from eucareg.api.validate import MAX_BODY, MAX_DEPTH, MAX_SEQ
from eucareg.pki.signing import SIGNATURE_HEADER

Schema = dict[str, Any]
PATH = "/v1/openapi.json"

# Every code an error answer carries, and what it means (docs/cli.md, "HTTP API").
ERROR_CODES: Mapping[str, str] = {
    "bad-request": "400: the request cannot be taken as it is (the message says why)",
    "malformed-json": "400: the body is not UTF-8 JSON, has NaN or Infinity, a key twice, "
    "or a number of more than 4300 digits",
    "too-deep": f"400: the body nests arrays and objects more than {MAX_DEPTH} levels deep",
    "invalid-body": "400: the body is not a JSON object",
    "unknown-field": "400: the body has a field this request does not take",
    "missing-field": "400: a field the request needs is missing",
    "invalid-field": "400: a field has the wrong type, form or range (the message names it)",
    "invalid-query": "400: a query parameter is not valid",
    "unknown-component": "400: no component of this registrar has that id or fingerprint",
    "unknown-token": "400: no unrevoked token has that id",
    "wrong-status": "400: the component's status does not allow this decision",
    "out-of-scope": "400: a role, cluster or task this registrar does not have",
    "no-cloud-ca": "400: this registrar has no cloud CA yet, so it issues no tokens",
    "bad-txt": "400: the announced TXT record is not valid",
    "no-address": "400: the announced TXT record has no addr=",
    "bad-address": "400: the announced addr= is not an address a component may have",
    "replayed": "400: the announced addr= is not the announcing host's",
    "unauthorized": "401: no or a wrong admin credential; a signed request that is stale, "
    "replayed, meant for another method, path or registrar, or badly signed",
    "forbidden": "403: an operator request not from loopback; a signing key refused",
    "wrong-key": "403: the request is not signed by the component's (announced) key",
    "address-mismatch": "403: addr= is not the address the request comes from",
    "not-cloud-ca": "403: only the cloud controller may read this registry",
    "not-found": "404: no such endpoint",
    "method-not-allowed": "405: the endpoint does not take this method (see Allow)",
    "conflict": "409: the record changed while credentials were issued; ask again",
    "import-conflict": "409: POST /v1/import: a component conflicts or is refused; nothing "
    "was imported",
    "revoked": "410: these credentials were revoked, or the component is not registered here",
    "body-too-large": f"413: the body is over {MAX_BODY} bytes",
    "rate-limited": "429: too many requests from this source or of unregistered keys; "
    "ask again after Retry-After seconds",
    "client-closed": "499: the client hung up before the answer (seen only in logs)",
    "internal-error": "500: a bug; the registrar's log has its traceback",
    "unavailable": "503: the registrar is stopping, or cannot issue this now",
    "client-error": "another 4xx (none is expected; the message says why)",
    "server-error": "another 5xx (none is expected)",
}


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    who: str  # "open", "signed" (a component's or the CLC's key) or "operator"
    summary: str
    query: tuple[Schema, ...] = ()


def _query(name: str, schema: Schema, what: str) -> Schema:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": what}


_TEXT = {"type": "string", "maxLength": 256}
ROUTES: tuple[Route, ...] = (
    Route("GET", PATH, "open", "This description."),
    Route("GET", "/v1/health", "open", "Whether the registrar answers."),
    Route(
        "POST",
        "/v1/credentials",
        "signed",
        "A component collects its credentials (202 until it is registered); with `have`, "
        "it watches them for revocation (410).",
        (
            _query(
                "wait",
                {"type": "string", "pattern": fields.full(WAIT)},
                f"Seconds to hold the request until something changes: at most {MAX_WAIT:g}, "
                f"or {MAX_WATCH:g} for a registered component watching its certificate "
                "(`have`, signed by its key).",
            ),
        ),
    ),
    Route(
        "POST",
        "/v1/announce",
        "signed",
        "An announcement over HTTP (fallback_registrar), decided like an mDNS one and heard "
        "for three report intervals (`refresh` in the answer says how often to send it "
        "again); refused outright (403 with status refused) it leaves nothing stored.",
        (
            _query(
                "wait",
                {"type": "string", "pattern": fields.full(WAIT)},
                f"Seconds (at most {MAX_WAIT:g}) to hold the answer until the component's "
                "record changes: a pending caller learns the outcome as soon as it is known.",
            ),
        ),
    ),
    Route("POST", "/v1/peer/registry", "signed", "This registrar's records, for the CLC."),
    Route("GET", "/v1/registry", "operator", "This registrar's own records, flat."),
    Route(
        "GET",
        "/v1/status",
        "operator",
        "The cloud as a tree (on the CLC with the NCs its CCs report).",
        (_query("lag", {"enum": ["", "reset"]}, "reset: start a new loop-lag period."),),
    ),
    Route(
        "GET",
        "/v1/events",
        "operator",
        "The event log, oldest first.",
        (
            _query(
                "since",
                {"type": "integer", "minimum": 0, "maximum": MAX_SEQ, "default": 0},
                "Only events after this seq.",
            ),
            _query(
                "limit",
                {"type": "integer", "minimum": 1, "default": 1000},
                f"The newest N events (capped at {MAX_EVENTS}).",
            ),
            _query("component", _TEXT, "Only this component id."),
            _query("kind", _TEXT, "Only this kind of event."),
            _query("role", _TEXT, "Only this role."),
            _query("cluster", _TEXT, "Only this cluster."),
        ),
    ),
    Route(
        "GET",
        "/v1/hooks",
        "operator",
        "Recorded hook runs, oldest first.",
        (_query("component", _TEXT, "Only this component id."),),
    ),
    Route("GET", "/v1/pending", "operator", "Components waiting for a decision, oldest first."),
    Route("POST", "/v1/approve", "operator", "Approve a component."),
    Route("POST", "/v1/reject", "operator", "Reject a component until it is approved."),
    Route(
        "POST",
        "/v1/deregister",
        "operator",
        "Remove a component and revoke its credentials; its deregister hook runs (docs/hooks.md).",
        (
            _query(
                "wait",
                {"type": "string", "pattern": fields.full(WAIT)},
                f"Seconds (at most {MAX_DEREGISTER_WAIT:g}) to wait for the deregister hook's "
                "outcome; without, the answer says it is running.",
            ),
        ),
    ),
    Route(
        "POST",
        "/v1/register",
        "operator",
        "Register a component by role and address before it is heard (manual registration); "
        "409 with the check's code when the design's checks say no.",
    ),
    Route(
        "POST",
        "/v1/import",
        "operator",
        "Import what a Eucalyptus 1.6.2 front end registered (`eucareg import`): recorded as "
        "registered and claimable, no hook; all or nothing (409 import-conflict).",
    ),
    Route("GET", "/v1/trust", "operator", "The trust settings."),
    Route("POST", "/v1/trust/mode", "operator", "Set the registration mode."),
    Route("POST", "/v1/trust/lock", "operator", "Lock or unlock registration tasks."),
    Route("POST", "/v1/trust/install-window", "operator", "Open or close an install window."),
    Route("GET", "/v1/tokens", "operator", "Join tokens, oldest first, without secrets."),
    Route("POST", "/v1/tokens", "operator", "Create a join token (its secret is shown once)."),
    Route("POST", "/v1/tokens/revoke", "operator", "Revoke a join token."),
)

# Schemas shown once under components/schemas and referred to by name elsewhere.
NAMED: Mapping[str, Schema] = {
    "Error": answers.ERROR,
    "Refused": answers.REFUSED,
    "Change": answers.CHANGE,
    "Row": answers.ROW,
    "Event": answers.EVENT,
    "HookRun": answers.HOOK_RUN,
    "Token": answers.TOKEN,
    "Trust": answers.TRUST,
    "Registry": answers.REGISTRY,
    "Status": answers.STATUS,
    "ComponentId": fields.COMPONENT_ID,
    "Cluster": fields.CLUSTER,
    "Fingerprint": fields.FINGERPRINT,
    "TokenId": fields.TOKEN_ID,
    "Duration": fields.DURATION,
    "Txt": bodies.TXT,
    "NameComponent": bodies.NAME_COMPONENT,
}


def _refs(value: Any, top: Schema | None = None) -> Any:
    """`value` with every NAMED schema (by identity) replaced by a $ref, except `top`."""
    if isinstance(value, dict):
        if value is not top:
            for name, schema in NAMED.items():
                if value is schema:
                    return {"$ref": f"#/components/schemas/{name}"}
        return {k: _refs(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_refs(v) for v in value]
    return value


def _json(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _operation(route: Route) -> Schema:
    by_status = answers.RESPONSES[(route.method, route.path)]
    responses: Schema = {
        str(status): _json(schema, "the answer" if status < 300 else "refused")
        for status, schema in by_status.items()
    }
    responses.setdefault("4XX", _json(answers.ERROR, "refused: the error and its code"))
    responses.setdefault("5XX", _json(answers.ERROR, "a bug or an unavailable registrar"))
    operation: Schema = {
        "operationId": f"{route.method.lower()}{route.path.replace('/', '_').replace('-', '_')}",
        "summary": route.summary,
        "tags": [route.who],
        "security": {"open": [], "signed": [{"signed": []}], "operator": [{"admin": []}]}[
            route.who
        ],
    }
    if route.query:
        operation["parameters"] = list(route.query)
    if route.method == "POST":
        body = bodies.REQUEST_BODIES[route.path]
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": body}},
        }
    operation["responses"] = responses
    return operation


def build() -> Schema:
    paths: dict[str, Schema] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    document = {
        "openapi": "3.1.0",
        "info": {
            "title": "eucareg registrar API",
            "version": "1",
            "description": (
                "The API of an eucareg registrar (docs/cli.md, 'HTTP API'). Open routes "
                "answer anyone; signed routes want a request signed by the sender's key "
                f"(the body carries the envelope, the {SIGNATURE_HEADER} header the "
                "signature: docs/credentials.md); operator routes answer on the operator's "
                "Unix socket (or loopback) with the admin bearer token. The network port "
                "is HTTPS only (docs/security.md, 'TLS and pinning'). Request bodies are "
                "JSON objects of at most "
                f"{MAX_BODY} bytes, nested at most {MAX_DEPTH} levels, with no field their "
                "schema does not name. Every error answer is {error, code} (x-error-codes), "
                "except a refused announcement (Refused)."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": {name: _refs(schema, top=schema) for name, schema in NAMED.items()},
            "securitySchemes": {
                "admin": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The contents of state_dir/admin.token; the operator "
                    "socket or loopback only.",
                },
                "signed": {
                    "type": "apiKey",
                    "in": "header",
                    "name": SIGNATURE_HEADER,
                    "description": "The signature of the body by the key it encloses.",
                },
            },
        },
        "x-error-codes": dict(ERROR_CODES),
    }
    result: Schema = _refs(document)
    return result


DOCUMENT = build()
TEXT = json.dumps(DOCUMENT, indent=2) + "\n"


async def serve(_request: web.Request) -> web.Response:
    """GET /v1/openapi.json"""
    return web.Response(text=TEXT, content_type="application/json")


if __name__ == "__main__":
    print(TEXT, end="")
