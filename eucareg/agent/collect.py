"""The signed credential collection protocol (docs/credentials.md): one long-polling request and
what its answer means, removing revoked credentials, and the HTTP fallback announcement. Any
answer we cannot use is a ProtocolError with the reason, for the caller to log and retry.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.exceptions import UnsupportedAlgorithm

from eucareg.api.app import signed_body
from eucareg.core.model import Role
from eucareg.pki import credentials as cred

from .identity import Identity
from .locate import Endpoint

log = logging.getLogger(__name__)

LONG_POLL = 25.0  # seconds a collector waits inside one credential request


class Outcome(StrEnum):
    WRITTEN = "written"  # a new bundle was verified and written
    PENDING = "pending"  # not registered (yet); the registrar said why
    UNCHANGED = "unchanged"  # watching: the credentials we hold are still current
    REVOKED = "revoked"  # watching: the registrar revoked the credentials we hold


class ProtocolError(Exception):
    """A registrar's answer we cannot use: an error status, a malformed body or bundle."""


# What a collection attempt may fail with, short of a bug: logged, then retried with backoff.
COLLECT_ERRORS: tuple[type[Exception], ...] = (
    aiohttp.ClientError,
    TimeoutError,
    OSError,
    ProtocolError,
    cred.CredentialError,
)


async def _signed_post(
    session: aiohttp.ClientSession, url: str, key: cred.PrivateKey, fields: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    """POST a signed body; the status and the answer, which must be a JSON object."""
    body, headers = signed_body(key, fields)
    async with session.post(url, data=body, headers=headers) as response:
        status, raw = response.status, await response.read()
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ProtocolError(f"HTTP {status}, answer is not JSON: {raw[:80]!r}") from exc
    if not isinstance(data, dict):
        raise ProtocolError(f"HTTP {status}, answer is not a JSON object: {raw[:80]!r}")
    return status, data


def _reason(status: int, data: Mapping[str, Any]) -> str:
    return f"HTTP {status}: {str(data.get('error', data))[:200]}"


async def collect_credentials(
    session: aiohttp.ClientSession,
    identity: Identity,
    role: Role,
    endpoint: Endpoint,
    key_dir: Path,
    wait: float = LONG_POLL,
    have: str | None = None,
    pin: str | None = None,
) -> Outcome:
    """One signed, long-polling credential request: WRITTEN or PENDING, or, when watching
    credentials we hold (`have`: our certificate's serial), UNCHANGED or REVOKED.

    The signature proves we hold the announced key; the registrar answers only that key, and
    we accept only a bundle that certifies it and chains to the pinned CA, if any. A 410 is
    believed as it comes: answers are not signed, so whom we ask is the defence (locate.py).
    """
    fields: dict[str, Any] = {"component_id": identity.component_id}
    if have is not None:
        fields["have"] = have
    url = f"{endpoint.url}/v1/credentials?wait={wait:g}"
    log.debug("requesting credentials for %s from %s", identity.component_id, url)
    status, data = await _signed_post(session, url, identity.key, fields)
    if status == 410 and have is not None:
        log.warning("credentials of %s revoked: %s", identity.component_id, data.get("error"))
        return Outcome.REVOKED
    if status == 202:
        log.debug("%s not registered yet: %s", identity.component_id, data)
        return Outcome.PENDING
    if status != 200:
        raise ProtocolError(_reason(status, data))
    files = data.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in files.items()
    ):
        raise ProtocolError(f"HTTP 200 without a credential bundle: {str(data)[:200]}")
    # Verifying signatures and fsyncing files block: do both in a thread.
    return await asyncio.to_thread(_accept, files, role, identity, endpoint, key_dir, have, pin)


def _accept(
    files: Mapping[str, str],
    role: Role,
    identity: Identity,
    endpoint: Endpoint,
    key_dir: Path,
    have: str | None,
    pin: str | None,
) -> Outcome:
    try:
        verified = cred.verify_bundle(files, role, identity.key)
    except (ValueError, UnsupportedAlgorithm) as exc:
        # Certificates that parse but hold what cryptography cannot use (say, a curve).
        raise ProtocolError(f"unusable credential bundle: {exc}") from exc
    if pin is not None:
        ca = cred.cert_fingerprint(cred.load_cert_pem(verified[cred.CLOUD_CERT]))
        if ca != pin:
            raise cred.CredentialError(
                f"registrar at {endpoint.address} belongs to CA {ca}, but we pin {pin}: "
                "refusing a rogue registrar"
            )
    own = cred.load_cert_pem(verified[cred.LAYOUTS[role].cert])
    if have is not None and format(own.serial_number, "x") == have.lower():
        return Outcome.UNCHANGED
    cred.write_credentials(key_dir, role, verified)
    log.info("credentials for %s %s written to %s", role.value, identity.component_id, key_dir)
    return Outcome.WRITTEN


def remove_credentials(key_dir: Path, role: Role) -> None:
    """Drop a deregistered component's own certificate and key copy (never cloud-cert.pem,
    which other components on the host may share)."""
    layout = cred.LAYOUTS[role]
    for name in (layout.cert, layout.key):
        (key_dir / name).unlink(missing_ok=True)


async def announce_over_http(
    session: aiohttp.ClientSession,
    identity: Identity,
    endpoint: Endpoint,
    record: Mapping[str, str],
) -> None:
    """Send our TXT record to a registrar that cannot hear us (the design's fallback)."""
    url = f"{endpoint.url}/v1/announce"
    status, data = await _signed_post(session, url, identity.key, {"txt": dict(record)})
    if status != 200:
        raise ProtocolError(_reason(status, data))
    log.info(
        "fallback announcement of %s to %s: %s (%s)",
        identity.component_id,
        endpoint.address,
        data.get("status"),
        data.get("reason"),
    )
