"""The credential desk: answers components' signed credential requests (long polls).

A signed request is the component's proof that it holds the announced key; an accepted component
waits for it before its hook runs. A certificate is issued once per key, committed with its event
before it is handed out, and signing runs off the event loop.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography import x509

from eucareg.core.model import IssuedCertificate, Record, Status
from eucareg.core.transitions import certificate_issued, collected
from eucareg.pki import credentials as cred
from eucareg.registrar.faults import crash_point

if TYPE_CHECKING:
    from collections.abc import Callable

    from eucareg.core.model import Role
    from eucareg.registrar.engine import Registrar

# A component whose registration is under way: a woken request keeps waiting for the outcome.
IN_PROGRESS = frozenset({Status.AWAITING_KEY, Status.REGISTERING, Status.FAILED, Status.REGISTERED})


@dataclass(frozen=True)
class Issuer:
    """The key and certificate a registrar signs component certificates with."""

    key: cred.PrivateKey
    cert: x509.Certificate
    cloud_cert: x509.Certificate

    def bundle(self, record: Record, cert_pem: str) -> dict[str, str]:
        layout = cred.LAYOUTS[record.role]
        files = {cred.CLOUD_CERT: cred.cert_pem(self.cloud_cert), layout.cert: cert_pem}
        if layout.issuer:
            files[layout.issuer] = cred.cert_pem(self.cert)
        return files


class CredentialRefused(Exception):
    """A credential request that must be answered with an error (status, message)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class CredentialAnswer:
    status: Status | None
    reason: str
    files: dict[str, str] | None


class CredentialDesk:
    def __init__(self, engine: Registrar, issuer_for: Callable[[Role], Issuer | None]) -> None:
        self.engine = engine
        self._issuer_for = issuer_for
        self._issuing: dict[str, asyncio.Lock] = {}

    async def credentials(
        self,
        component_id: str,
        public_key: cred.PublicKey,
        wait: float,
        have: str | None = None,
    ) -> CredentialAnswer:
        """Answer a component's (already signature-checked) request for its credentials.

        With `have` (the serial of the certificate it holds), the request watches for
        revocation instead. A component with a request open counts as online.
        """
        engine = self.engine
        record = engine.memory.records.get(component_id)
        # Only the component itself counts as heard: anyone can sign a request naming any
        # id, and that must neither keep a silent machine "online" nor leave state behind.
        counted = record is not None and record.fingerprint == cred.fingerprint(public_key)
        if counted:
            engine.presence.request_opened(component_id)
        try:
            with engine.waiting_on(component_id):
                return await self._answer(component_id, public_key, wait, have)
        finally:
            if counted and engine.presence.request_closed(component_id):
                engine.maybe_silent(component_id)

    async def _answer(
        self, component_id: str, public_key: cred.PublicKey, wait: float, have: str | None
    ) -> CredentialAnswer:
        engine = self.engine
        fingerprint = cred.fingerprint(public_key)
        deadline = engine.clock() + max(0.0, wait)
        status: Status | None
        woken = False
        while True:
            if engine.stopping:
                raise CredentialRefused(503, "the registrar is stopping; ask again shortly")
            event = engine.change_event(component_id)
            record = engine.memory.records.get(component_id)
            if have is not None and have in engine.memory.revoked:
                raise CredentialRefused(410, "these credentials were revoked (deregistered)")
            if record is None:
                if have is not None:
                    raise CredentialRefused(410, f"{component_id} is not registered here")
                status, reason = None, "not known to this registrar (yet)"
            elif record.fingerprint != fingerprint:
                raise CredentialRefused(403, f"{component_id} is registered with another key")
            elif record.status is Status.REGISTERED:
                files, serial = await self._bundle(record, public_key)
                if have != serial or engine.clock() >= deadline:
                    return CredentialAnswer(Status.REGISTERED, record.reason, files)
                status, reason = record.status, record.reason
            else:
                if record.status is Status.AWAITING_KEY:
                    engine.key_proven(record)
                status, reason = record.status, record.reason
            remaining = deadline - engine.clock()
            if remaining <= 0 or (woken and status not in IN_PROGRESS):
                # Woken while not progressing by itself (refused, pending, ...): answer now,
                # so a component announcing over HTTP re-announces under the new settings.
                return CredentialAnswer(status, reason, None)
            try:
                await asyncio.wait_for(event.wait(), remaining)
                woken = True
            except TimeoutError:
                woken = False

    async def _bundle(
        self, record: Record, public_key: cred.PublicKey
    ) -> tuple[dict[str, str], str]:
        issuer = self._issuer_for(record.role)
        if issuer is None:
            raise CredentialRefused(503, f"no issuer for {record.role.value} credentials here")
        lock = self._issuing.setdefault(record.component_id, asyncio.Lock())
        async with lock:
            issued = await self._issued(record, public_key, issuer)
        if not lock.locked():
            self._issuing.pop(record.component_id, None)
        # Nothing is handed out before everything it depends on is durable.
        await self.engine.writer.flush()
        return issuer.bundle(record, issued.cert_pem), issued.serial

    async def _issued(
        self, record: Record, public_key: cred.PublicKey, issuer: Issuer
    ) -> IssuedCertificate:
        engine = self.engine
        issued = engine.memory.certificates.get(record.component_id)
        if issued is not None and issued.fingerprint == record.fingerprint:
            return issued
        cert = await asyncio.to_thread(
            cred.issue_certificate,
            issuer_key=issuer.key,
            issuer_cert=issuer.cert,
            subject_key=public_key,
            role=record.role,
            component_id=record.component_id,
            cluster=record.cluster,
        )
        # Signing ran off the loop: the component may have been deregistered and registered
        # again, with another key, meanwhile. Only the registration we signed for is served.
        current = engine.memory.records.get(record.component_id)
        if (
            current is None
            or current.status is not Status.REGISTERED
            or current.fingerprint != record.fingerprint
            or current.registered_at != record.registered_at
        ):
            raise CredentialRefused(409, f"{record.component_id} changed while issuing; ask again")
        issued = IssuedCertificate(
            component_id=record.component_id,
            fingerprint=record.fingerprint,
            serial=format(cert.serial_number, "x"),
            cert_pem=cred.cert_pem(cert),
            issued_at=engine.clock(),
        )
        previous = engine.memory.certificates.get(record.component_id)
        await engine.step(certificate_issued(current, issued, previous))
        crash_point("after-certificate")
        return issued

    async def mark_collected(self, component_id: str) -> None:
        record = self.engine.memory.records.get(component_id)
        if record is not None:
            await self.engine.step(collected(record, self.engine.clock()))
