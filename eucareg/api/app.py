"""The registrar's HTTP API (aiohttp): routes every path to its handler module and turns refusals
into JSON errors. `build_app`, `ApiContext` and `signed_body` are the agent's entry points;
docs/cli.md ("HTTP API") lists the routes and docs/security.md who may call them.
"""

from __future__ import annotations

import logging

from aiohttp import web

from eucareg.api import components, limits, openapi, operator, pacing, peer, status, trust
from eucareg.api.auth import NONCES, Handler, NonceCache, operator_only
from eucareg.api.context import CONTEXT, REGISTRAR, ApiContext
from eucareg.api.validate import MAX_BODY, ApiError, error, http_error
from eucareg.pki.signing import signed_body
from eucareg.registrar.engine import Registrar

__all__ = ["ApiContext", "build_app", "signed_body"]

log = logging.getLogger(__name__)

# Anyone may call these; the signed ones check the key themselves.
OPEN_ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("GET", "/v1/health", status.health),
    ("GET", openapi.PATH, openapi.serve),
    ("POST", "/v1/credentials", components.collect),
    ("POST", "/v1/announce", components.announce),
    ("POST", "/v1/peer/registry", peer.peer_registry),
)
# Loopback and the admin credential only.
OPERATOR_ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("GET", "/v1/registry", status.registry),
    ("GET", "/v1/status", status.status),
    ("GET", "/v1/events", operator.events),
    ("GET", "/v1/hooks", operator.hooks),
    ("GET", "/v1/pending", operator.pending),
    ("POST", "/v1/approve", operator.approve),
    ("POST", "/v1/reject", operator.reject),
    ("POST", "/v1/deregister", operator.deregister),
    ("POST", "/v1/register", operator.register),
    ("POST", "/v1/import", operator.import_components),
    ("GET", "/v1/trust", trust.show),
    ("POST", "/v1/trust/mode", trust.set_mode),
    ("POST", "/v1/trust/lock", trust.set_lock),
    ("POST", "/v1/trust/install-window", trust.install_window),
    ("GET", "/v1/tokens", trust.list_tokens),
    ("POST", "/v1/tokens", trust.create_token),
    ("POST", "/v1/tokens/revoke", trust.revoke_token),
)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refusals become {"error": …, "code": …} with their status, aiohttp's own (404, 405,
    413) too; a bug becomes a JSON 500 and a log line, so the CLI can still print a reason."""
    try:
        return await handler(request)
    except ApiError as exc:
        return error(exc.status, exc.message, exc.code)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return http_error(request, exc)
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error(500, "internal error (see the registrar's log)")


def build_app(
    registrar: Registrar, ctx: ApiContext, pacer: pacing.Pacer | None = None
) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY, middlewares=[json_errors])
    app[REGISTRAR] = registrar
    app[CONTEXT] = ctx
    app[NONCES] = NonceCache()
    limits.install(app, ctx.limits)  # runs inside json_errors (api/limits.py)
    if pacer is not None:
        pacing.install(app, pacer)  # after the limits: a refused request never waits
    for method, path, handler in OPEN_ROUTES:
        _add(app, method, path, handler)
    for method, path, handler in OPERATOR_ROUTES:
        _add(app, method, path, operator_only(handler))
    return app


def _add(app: web.Application, method: str, path: str, handler: Handler) -> None:
    if method == "GET":
        app.router.add_get(path, handler)  # GET routes answer HEAD too
    else:
        app.router.add_route(method, path, handler)
