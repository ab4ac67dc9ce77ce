"""What every API handler is handed: the registrar and the agent's context, stored on the aiohttp
application under typed keys (`request.app[REGISTRAR]`), so handlers are plain functions with
no closure over the agent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from cryptography import x509

from eucareg.api.limits import RateLimits
from eucareg.pki import keypairs
from eucareg.registrar.engine import Registrar


@dataclass(frozen=True)
class ApiContext:
    """What the API needs from the agent besides the registrar."""

    admin_token: str
    local_components: Callable[[], list[dict[str, Any]]]
    # The cloud CA's fingerprint: who may read this registry as a peer, and what tokens pin.
    ca_fingerprint: Callable[[], str | None]
    # The CLC's key, to sign its requests to CC registrars (None elsewhere).
    peer_key: keypairs.PrivateKey | None = None
    # The CLC's cloud CA, that a CC must prove itself against over TLS (None elsewhere).
    cloud_cert: x509.Certificate | None = None
    # Limits on unauthenticated requests (the [registrar] rate_* keys; api/limits.py).
    limits: RateLimits = field(default_factory=RateLimits)
    # The mDNS backend in use, and why (eucareg/agent/host.py mdns_in_use), for status.
    mdns: Callable[[], dict[str, Any]] = lambda: {
        "backend": "none",
        "setting": None,
        "reason": "not told",
    }


REGISTRAR = web.AppKey("registrar", Registrar)
CONTEXT = web.AppKey("context", ApiContext)
