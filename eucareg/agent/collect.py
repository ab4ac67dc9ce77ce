"""The signed credential collection protocol (docs/credentials.md): one long-polling request and
what its answer means, removing revoked credentials, and the HTTP fallback announcement. Any
answer we cannot use is a ProtocolError with the reason, for the caller to log and retry.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import aiohttp
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from yarl import URL

from eucareg.core.model import Role
from eucareg.pki import certificates, handover, keypairs, names, tls
from eucareg.pki import credentials as cred
from eucareg.pki.chain import chain_digest
from eucareg.pki.signing import signed_body, socket_audience

from .euca_keys import EucaKeys
from .identity import Identity
from .locate import Endpoint

log = logging.getLogger(__name__)

LONG_POLL = 25.0  # seconds a collector waits inside one credential request
# Seconds a registered component asks its registrar to hold a request watching for revocation
# (a 410 ends it at once): its one periodic request. The registrar may hold it less (MAX_WAIT).
WATCH_POLL = 240.0
# How often a component heard over HTTP announces itself again, unless its registrar says
# (`refresh` in the answer); never more often than MIN_REFRESH.
DEFAULT_REFRESH = 30.0
MIN_REFRESH = 1.0
HTTP_SLACK = 10.0  # beyond the wait: connecting, the registrar's answer, reading it


@dataclass
class HeldChain:
    """The digest of the chain above a component's certificate (pki/chain.py), as last
    accepted from its registrar: sent with each watch, so that the watch is answered at once
    when the registrar's chain differs, even if the answer that carried it was lost."""

    digest: str | None = None
    # False once a registrar refused the field (400 unknown-field: one older than it).
    sent: bool = True


class Outcome(StrEnum):
    WRITTEN = "written"  # a new bundle was verified and written
    PENDING = "pending"  # not registered (yet); the registrar said why
    UNCHANGED = "unchanged"  # watching: the credentials we hold are still current
    RENEWED = "renewed"  # watching: a new certificate for our key (or its chain) was written
    REVOKED = "revoked"  # watching: the registrar revoked the credentials we hold


class ProtocolError(Exception):
    """A registrar's answer we cannot use: an error status, a malformed body or bundle.

    `retry_after`: the seconds the registrar asked us to wait (429 or 503 with Retry-After)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# The longest Retry-After we honour: a registrar asking for more is asked sooner. Our own ask
# for seconds; and a component that trusts on first use must not be parked for long by the
# first registrar to answer.
MAX_RETRY_AFTER = 60.0


# What a collection attempt may fail with, short of a bug: logged, then retried with backoff.
COLLECT_ERRORS: tuple[type[Exception], ...] = (
    aiohttp.ClientError,
    TimeoutError,
    OSError,
    ProtocolError,
    keypairs.CredentialError,
)


async def _target(endpoint: Endpoint) -> tuple[str, str]:
    """The base URL to send to and the registrar to sign for: the component id it announces
    (its TXT `id`, heard over mDNS), or, for the configured fallback, which has none,
    "ADDRESS:PORT" as we connect to it (a name is resolved here, and that address used)."""
    if endpoint.component_id:
        return endpoint.url, endpoint.component_id
    address = endpoint.address
    try:
        ipaddress.ip_address(address)
    except ValueError:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(address, endpoint.port, type=socket.SOCK_STREAM)
        if not infos:
            raise OSError(f"cannot resolve registrar {address}") from None
        # IPv4 first, as the fallback's documented form is; then whatever the name has.
        infos.sort(key=lambda info: info[0] != socket.AF_INET)
        address = str(infos[0][4][0])
    return replace(endpoint, address=address).url, socket_audience(address, endpoint.port)


async def _signed_post(
    session: aiohttp.ClientSession,
    endpoint: Endpoint,
    path: str,
    key: keypairs.PrivateKey,
    fields: dict[str, Any],
    expect: tls.Expect,
    client: tls.ClientCert | None = None,
    wait: float = 0.0,
) -> tuple[int, dict[str, Any]]:
    """POST a body signed for this path (with its query) at this registrar, over TLS to the
    registrar `expect` accepts (else ClientConnectorCertificateError, nothing sent); the
    status and the answer, which must be a JSON object. `wait`: how long it may hold it."""
    base, audience = await _target(endpoint)
    url = URL(base + path)
    body, headers = signed_body(key, fields, method="POST", path=url.raw_path_qs, audience=audience)
    async with session.post(
        url,
        data=body,
        headers=headers,
        ssl=tls.client_context(expect, client),
        server_hostname=tls.SERVER_NAMES[expect.role],
        timeout=_timeout(session, wait),
    ) as response:
        status, raw = response.status, await response.read()
        later = retry_after(response.headers.get("Retry-After")) if status in (429, 503) else None
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ProtocolError(f"HTTP {status}, answer is not JSON: {raw[:80]!r}", later) from exc
    if not isinstance(data, dict):
        raise ProtocolError(f"HTTP {status}, answer is not a JSON object: {raw[:80]!r}", later)
    if later is not None:
        raise ProtocolError(_reason(status, data), later)
    return status, data


def retry_after(value: str | None) -> float | None:
    """A Retry-After header in seconds (RFC 9110: delay-seconds; an HTTP date is not used by
    our registrars and is ignored), at most MAX_RETRY_AFTER; None if absent or unusable."""
    if value is None or not value.strip().isdigit():
        return None
    return min(float(value.strip()), MAX_RETRY_AFTER)


def _timeout(session: aiohttp.ClientSession, wait: float) -> aiohttp.ClientTimeout:
    """The session's timeouts, with the total stretched to cover a long-poll of `wait`."""
    base = session.timeout
    if base.total is None or base.total >= wait + HTTP_SLACK:
        return base
    return aiohttp.ClientTimeout(
        total=wait + HTTP_SLACK,
        connect=base.connect,
        sock_read=base.sock_read,
        sock_connect=base.sock_connect,
        ceil_threshold=base.ceil_threshold,
    )


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
    expect: tls.Expect | None = None,
    named: names.CertIdentity | None = None,
    client: tls.ClientCert | None = None,
    euca: EucaKeys | None = None,
    chain: HeldChain | None = None,
) -> Outcome:
    """One signed, long-polling credential request: WRITTEN or PENDING, or, when watching
    credentials we hold (`have`: our certificate's serial), UNCHANGED or REVOKED.

    The signature proves we hold the announced key; the registrar answers only that key. TLS
    proves the registrar is the one `expect` accepts (by default: any registrar of the right
    role, trust on first use), so a 410 or a bundle from anyone else never reaches us. We
    accept only a bundle that certifies our key (naming us as `named` says) and chains to
    the pinned CA.
    """
    if expect is None:
        registrar = Role.CC if role is Role.NC else Role.CLC
        expect = tls.Expect(registrar, component_id=endpoint.component_id or None)
    fields: dict[str, Any] = {"component_id": identity.component_id}
    if have is not None:
        fields["have"] = have
    if euca is not None:
        # Asking for Eucalyptus's own key files too (docs/credentials.md): the digest of the
        # set we were last given, so that a watch ends when the registrar's set changes.
        fields["euca"] = euca.digest
    if have is not None and chain is not None and chain.sent and chain.digest is not None:
        fields["chain"] = chain.digest
    path = f"/v1/credentials?wait={wait:g}"
    log.debug("requesting credentials for %s from %s%s", identity.component_id, endpoint.url, path)
    status, data = await _signed_post(
        session,
        endpoint,
        path,
        identity.key,
        fields,
        expect,
        client if expect.root else None,
        wait=wait,
    )
    if status == 400 and "chain" in fields and data.get("code") == "unknown-field":
        assert chain is not None
        log.info("registrar %s does not take a chain digest: watching without", endpoint.url)
        chain.sent = False
        again = (session, identity, role, endpoint, key_dir, wait, have, expect, named, client)
        return await collect_credentials(*again, euca, chain)
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
    outcome = await asyncio.to_thread(
        _accept, files, role, identity, endpoint, key_dir, have, _pin_of(expect), named
    )
    if chain is not None:
        chain.digest = chain_digest(files, role)  # what we hold now: accepted, written
    if euca is not None:
        # Only from a registrar whose bundle we just accepted, and after our own files.
        await asyncio.to_thread(euca.receive, data.get("eucalyptus"))
    return outcome


def _pin_of(expect: tls.Expect) -> str | None:
    """The CA key a bundle must chain to: the CA we hold, else the one we pin."""
    return certificates.cert_fingerprint(expect.root) if expect.root is not None else expect.pin


def _accept(
    files: Mapping[str, str],
    role: Role,
    identity: Identity,
    endpoint: Endpoint,
    key_dir: Path,
    have: str | None,
    pin: str | None,
    named: names.CertIdentity | None,
) -> Outcome:
    try:
        verified = cred.verify_bundle(files, role, identity.key, expect=named)
    except (ValueError, UnsupportedAlgorithm) as exc:
        # Certificates that parse but hold what cryptography cannot use (say, a curve).
        raise ProtocolError(f"unusable credential bundle: {exc}") from exc
    cloud = certificates.load_cert_pem(verified[cred.CLOUD_CERT])
    passed = _handover_of(files, cloud, time.time())
    if passed is not None:
        # Kept, and a CC hands it on (written before the CA it leads to: cred.*_credentials).
        verified[handover.HANDOVER] = passed.pem().encode()
    if pin is not None:
        ca = certificates.cert_fingerprint(cloud)
        if ca != pin and (passed is None or passed.old_fingerprint != pin):
            raise keypairs.CredentialError(
                f"registrar at {endpoint.address} belongs to CA {ca}, but we pin {pin}"
                + (f" (its handover is from {passed.old_fingerprint})" if passed else "")
                + ": refusing a rogue registrar"
            )
        if ca != pin:
            # Moving our pin: the old key we pin signed the handover to this one.
            log.warning("cloud CA key handed over from %s to %s: moving our pin", pin, ca)
    own = certificates.load_cert_pem(verified[cred.LAYOUTS[role].cert])
    if have is not None:
        # Watching: a renewal (a new serial), or the same certificate under a renewed chain
        # (the CA's, or our CC's, certificate). Only what differs is replaced, each file
        # atomically and our certificate last: we never pass through "unregistered". What
        # replaces working credentials must work now: never an expired or future one.
        changed = cred.differing(key_dir, verified)
        if not changed:
            return Outcome.UNCHANGED
        cred.check_current(changed, time.time())
        cred.update_credentials(key_dir, role, changed)
        log.info(
            "credentials of %s %s renewed (%s), valid until %s",
            role.value,
            identity.component_id,
            ", ".join(changed),
            own.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%SZ"),
        )
        return Outcome.RENEWED
    cred.write_credentials(key_dir, role, verified)
    log.info("credentials for %s %s written to %s", role.value, identity.component_id, key_dir)
    return Outcome.WRITTEN


def _handover_of(
    files: Mapping[str, str], cloud: x509.Certificate, now: float
) -> handover.Handover | None:
    """The bundle's cloud-handover.pem, if it leads to its cloud CA now (else None: ignored;
    only a pin it moves depends on it, and then the pin check refuses the bundle)."""
    data = files.get(handover.HANDOVER)
    if data is None:
        return None
    try:
        passed = handover.parse(data)
        handover.verify(passed, passed.old_fingerprint, cloud, now)
    except (keypairs.CredentialError, ValueError, UnsupportedAlgorithm) as exc:
        log.warning("ignoring the handover in a credential bundle: %s", exc)
        return None
    return passed


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
    expect: tls.Expect,
    client: tls.ClientCert | None = None,
) -> float:
    """Send our TXT record to a registrar that cannot hear us (the design's fallback); with
    `client`, our certificate proves who we are, and no mode any is needed. Returns how soon
    the registrar wants to hear from us again (its `refresh`, within sane bounds)."""
    status, data = await post_announcement(session, identity, endpoint, record, expect, client)
    if status != 200:
        raise ProtocolError(_reason(status, data))
    waiting = f", waiting for {data['waiting_for']}" if data.get("waiting_for") else ""
    log.log(
        logging.DEBUG if client is not None else logging.INFO,
        "fallback announcement of %s to %s: %s (%s%s)",
        identity.component_id,
        endpoint.address,
        data.get("status"),
        data.get("reason"),
        waiting,
    )
    return refresh_of(data)


async def post_announcement(
    session: aiohttp.ClientSession,
    identity: Identity,
    endpoint: Endpoint,
    record: Mapping[str, str],
    expect: tls.Expect,
    client: tls.ClientCert | None = None,
    wait: float = 0.0,
) -> tuple[int, dict[str, Any]]:
    """POST /v1/announce[?wait=]: the HTTP status and the registrar's answer as it came."""
    path = f"/v1/announce?wait={wait:.3f}" if wait > 0 else "/v1/announce"
    fields = {"txt": dict(record)}
    return await _signed_post(session, endpoint, path, identity.key, fields, expect, client, wait)


def refresh_of(data: Mapping[str, Any]) -> float:
    """The registrar's `refresh`, kept within [MIN_REFRESH, WATCH_POLL]: a registrar cannot make
    us spin, and an older one that does not say gets the default."""
    value = data.get("refresh")
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        return DEFAULT_REFRESH
    return float(min(WATCH_POLL, max(MIN_REFRESH, value)))
