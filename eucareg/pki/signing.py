"""The sending half of signed requests (docs/credentials.md, "Signed requests"): the envelope a
component or the CLC signs for one method, path and registrar. Here, not in the API, so that an
agent that only sends (an NC) does not load the registrar's server side to do it.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from eucareg.core.grammar import peer_address

from . import keypairs, signatures

SIGNATURE_HEADER = "X-Eucareg-Signature"
SIGNED_VERSION = 2  # the envelope's "v"; 1 (no "v") bound neither method, path nor registrar


def signed_body(
    key: keypairs.PrivateKey,
    fields: dict[str, Any],
    *,
    method: str,
    path: str,
    audience: str,
) -> tuple[bytes, dict[str, str]]:
    """A request body for `method path` (the path with its query, exactly as sent) to the
    registrar `audience` (its component id, or "ADDRESS:PORT" as we connect to it), carrying
    our public key, the time and a nonce; and its signature header."""
    body = json.dumps(
        {
            **fields,
            "v": SIGNED_VERSION,
            "method": method,
            "path": path,
            "audience": audience,
            "public_key": keypairs.public_pem(key.public_key()),
            "timestamp": time.time(),
            "nonce": secrets.token_hex(16),
        }
    ).encode()
    return body, {SIGNATURE_HEADER: signatures.sign(key, body), "Content-Type": "application/json"}


def socket_audience(host: str, port: int) -> str:
    """How a registrar reached at an IP address and port is named in a signed request:
    "10.0.2.10:8780", "[fd00::10]:8780" (IPv4-mapped IPv6 as IPv4, no zone)."""
    address = peer_address(host)
    if address is None:
        raise ValueError(f"{host!r} is not an IP address")
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"
