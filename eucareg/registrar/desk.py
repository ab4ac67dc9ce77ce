"""The credential desk: answers components' signed credential requests (long polls).

A signed request is the component's proof that it holds the announced key; an accepted component
waits for it before its hook runs. A certificate is issued once per key, renewed for the same key
once it is due (core/renewal.py), committed with its event before it is handed out, and signing
runs off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography import x509

from eucareg.core import renewal
from eucareg.core.model import IssuedCertificate, Record, Role, Status, event_for
from eucareg.core.operations import certificate_issued, collected
from eucareg.core.transitions import Transition, Write
from eucareg.pki import certificates, keypairs
from eucareg.pki import credentials as cred
from eucareg.pki.chain import chain_digest
from eucareg.pki.handover import HANDOVER
from eucareg.registrar.euca_keys import INVALID, OFF_SET, READY, EucaKeySource, EucaSet
from eucareg.registrar.faults import crash_point

if TYPE_CHECKING:
    from collections.abc import Callable

    from eucareg.registrar.ports import Engine

# A component whose registration is under way: a woken request keeps waiting for the outcome.
IN_PROGRESS = frozenset({Status.AWAITING_KEY, Status.REGISTERING, Status.FAILED, Status.REGISTERED})


@dataclass(frozen=True)
class Issuer:
    """The key and certificate a registrar signs component certificates with."""

    key: keypairs.PrivateKey
    cert: x509.Certificate
    cloud_cert: x509.Certificate
    # How long certificates last and when they are renewed ([registrar] certificate_*).
    policy: renewal.RenewalPolicy = renewal.DEFAULT_POLICY
    # While the cloud CA key hands over (`eucareg ca rotate`): cloud-handover.pem, which lets
    # a component that pins the old key move to the new one.
    handover: str | None = None

    def bundle(self, record: Record, cert_pem: str) -> dict[str, str]:
        layout = cred.LAYOUTS[record.role]
        files = {cred.CLOUD_CERT: certificates.cert_pem(self.cloud_cert), layout.cert: cert_pem}
        if layout.issuer:
            files[layout.issuer] = certificates.cert_pem(self.cert)
        if self.handover is not None:
            files[HANDOVER] = self.handover
        return files

    @functools.cached_property
    def key_id(self) -> bytes:
        """The key identifier certificates signed by this issuer carry (AuthorityKeyIdentifier)."""
        return x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()).digest


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
    # Eucalyptus's own key files, for a component that asked for them (docs/credentials.md).
    eucalyptus: EucaSet | None = None


class CredentialDesk:
    def __init__(
        self,
        engine: Engine,
        issuer_for: Callable[[Role], Issuer | None],
        euca_keys: EucaKeySource | None = None,
    ) -> None:
        self.engine = engine
        self._issuer_for = issuer_for
        # Per component: the lock that serialises issuing, and how many requests hold or wait
        # for it (dropped only when none does: a waiter must not find a fresh lock taken).
        self._issuing: dict[str, tuple[asyncio.Lock, int]] = {}
        # This host's Eucalyptus key files, when its configuration delivers them.
        self.euca_keys = euca_keys
        # The Eucalyptus key set each component was last told of (an event each change, not
        # each request: a component sending any digest it likes must not flood the events).
        self._told: dict[str, str] = {}
        self._watching: dict[str, int] = {}  # component id -> its requests watching (`have`)
        # The chain above its certificate (CA, CC, handover) each component was last answered
        # with, as a digest. A chain that changes while the component is between two requests
        # wakes no watch; its next watch must not adopt the new chain as "what it holds" and
        # sit out its whole wait (CI saw NCs miss their CC's renewal so, minute after minute).
        # Unknown (this registrar restarted meanwhile): the first watch is answered at once.
        self._told_chain: dict[str, str] = {}

    def chain_changed(self) -> None:
        """The certificates above the components' own changed (this CC's certificate or the
        cloud CA renewed): every watch answers with the new bundle now."""
        for component_id in list(self._watching):
            self.engine.notify(component_id)

    async def credentials(
        self,
        component_id: str,
        public_key: keypairs.PublicKey,
        wait: float,
        have: str | None = None,
        euca: str | None = None,
        chain: str | None = None,
    ) -> CredentialAnswer:
        """Answer a component's (already signature-checked) request for its credentials.

        With `have` (the serial of the certificate it holds), the request watches for
        revocation instead; with `chain` (pki/chain.py: the digest of the chain it holds) it
        is also answered as soon as the chain differs. With `euca` (the digest of the
        Eucalyptus key set it was last given, "" for none), it asks for Eucalyptus's own key
        files too, and a watch also ends when they change. A component with a request open
        counts as online.
        """
        engine = self.engine
        record = engine.memory.records.get(component_id)
        # Only the component itself counts as heard: anyone can sign a request naming any
        # id, and that must neither keep a silent machine "online" nor leave state behind.
        counted = record is not None and record.fingerprint == keypairs.fingerprint(public_key)
        if counted:
            engine.presence.request_opened(component_id)
        if have is not None:
            self._watching[component_id] = self._watching.get(component_id, 0) + 1
        try:
            with engine.waiting_on(component_id), contextlib.ExitStack() as watches:
                return await self._answer(
                    component_id, public_key, wait, have, euca, chain, watches
                )
        finally:
            if have is not None:
                left = self._watching.pop(component_id) - 1
                if left:
                    self._watching[component_id] = left
            if counted and engine.presence.request_closed(component_id):
                engine.maybe_silent(component_id)

    async def _answer(
        self,
        component_id: str,
        public_key: keypairs.PublicKey,
        wait: float,
        have: str | None,
        euca: str | None,
        chain_held: str | None,
        watches: contextlib.ExitStack,
    ) -> CredentialAnswer:
        engine = self.engine
        fingerprint = keypairs.fingerprint(public_key)
        deadline = engine.clock() + max(0.0, wait)
        status: Status | None
        woken = False
        # The chain this request is measured against, fixed at its start: every watch open
        # when the chain changes is answered (the first answer updates `_told_chain`, and a
        # second watch, one whose connection is not known dead yet, must not then sit out
        # its wait on the chain it never received).
        # The component's own word for what it holds is best (an answer lost on a dead
        # connection counts as told here, not there); older agents do not send it.
        told = chain_held if chain_held is not None else self._told_chain.get(component_id)
        keys_changed: asyncio.Event | None = None  # the Eucalyptus key files it waits on
        while True:
            wake_at = deadline
            if engine.stopping:
                raise CredentialRefused(503, "the registrar is stopping; ask again shortly")
            event = engine.change_event(component_id)
            record = engine.memory.records.get(component_id)
            if have is not None and have in engine.memory.revoked:
                raise CredentialRefused(410, "these credentials were revoked (deregistered)")
            if record is None:
                self._told_chain.pop(component_id, None)
                if have is not None:
                    raise CredentialRefused(410, f"{component_id} is not registered here")
                status, reason = None, "not known to this registrar (yet)"
            elif record.fingerprint != fingerprint:
                raise CredentialRefused(403, f"{component_id} is registered with another key")
            elif record.status is Status.REGISTERED:
                files, serial, due = await self._bundle(record, public_key)
                chain = chain_digest(files, record.role)
                keys = await self._euca_set(record) if euca is not None else None
                moved = keys is not None and keys.digest != euca
                if have != serial or engine.clock() >= deadline or chain != told or moved:
                    if moved and keys is not None:
                        await self._note_keys(record, keys)
                    self._tell_chain(component_id, chain)
                    return CredentialAnswer(Status.REGISTERED, record.reason, files, keys)
                if keys is not None and keys_changed is None and self.euca_keys is not None:
                    keys_changed = watches.enter_context(
                        self.euca_keys.watching(record.role, record.cluster)
                    )
                status, reason = record.status, record.reason
                # Watching: look again when the certificate falls due, and renew it then.
                wake_at = min(deadline, max(due, engine.clock() + 1.0))
            else:
                if record.status is Status.AWAITING_KEY:
                    engine.key_proven(record)
                status, reason = record.status, record.reason
            remaining = deadline - engine.clock()
            if remaining <= 0 or (woken and status not in IN_PROGRESS):
                # Woken while not progressing by itself (refused, pending, ...): answer now,
                # so a component announcing over HTTP re-announces under the new settings.
                return CredentialAnswer(status, reason, None)
            woken = await _either(event, keys_changed, wake_at - engine.clock())
            if keys_changed is not None and keys_changed.is_set():
                keys_changed = None  # watched afresh on the next round

    def _tell_chain(self, component_id: str, chain: str) -> None:
        told = self._told_chain
        told[component_id] = chain
        # Deregistered components leave entries behind: dropped once they are half of them.
        if len(told) > 2 * len(self.engine.memory.records) + 64:
            records = self.engine.memory.records
            self._told_chain = {
                cid: digest
                for cid, digest in told.items()
                if (record := records.get(cid)) is not None and record.status is Status.REGISTERED
            }

    async def _bundle(
        self, record: Record, public_key: keypairs.PublicKey
    ) -> tuple[dict[str, str], str, float]:
        """The component's bundle, its certificate's serial, and when that falls due."""
        issuer = self._issuer_for(record.role)
        if issuer is None:
            raise CredentialRefused(503, f"no issuer for {record.role.value} credentials here")
        cid = record.component_id
        lock, users = self._issuing.get(cid, (asyncio.Lock(), 0))
        self._issuing[cid] = (lock, users + 1)
        try:
            async with lock:
                issued = await self._issued(record, public_key, issuer)
        finally:
            lock, users = self._issuing[cid]
            if users <= 1:
                del self._issuing[cid]
            else:
                self._issuing[cid] = (lock, users - 1)
        # Nothing is handed out before everything it depends on is durable.
        await self.engine.writer.flush()
        due = renewal.due_at(validity_of(issued.cert_pem), issuer.policy.margin, issued.serial)
        return issuer.bundle(record, issued.cert_pem), issued.serial, due

    async def _issued(
        self, record: Record, public_key: keypairs.PublicKey, issuer: Issuer
    ) -> IssuedCertificate:
        engine = self.engine
        issued = engine.memory.certificates.get(record.component_id)
        renewing: IssuedCertificate | None = None
        if issued is not None and issued.fingerprint == record.fingerprint:
            margin = issuer.policy.margin
            now = engine.clock()
            stage = renewal.phase(validity_of(issued.cert_pem), margin, now, issued.serial)
            # One signed by another key (the cloud CA before `eucareg ca rotate`) is renewed
            # at once, under ours: the same key, no hook, nothing revoked.
            if stage is renewal.Phase.CURRENT and signer_of(issued.cert_pem) == issuer.key_id:
                return issued
            renewing = issued  # the same key, due: a new certificate, the old one kept valid
        cert = await asyncio.to_thread(
            certificates.issue_certificate,
            issuer_key=issuer.key,
            issuer_cert=issuer.cert,
            subject_key=public_key,
            role=record.role,
            component_id=record.component_id,
            cluster=record.cluster,
            now=engine.clock(),
            lifetime=datetime.timedelta(seconds=issuer.policy.lifetime),
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
            cert_pem=certificates.cert_pem(cert),
            issued_at=engine.clock(),
        )
        previous = engine.memory.certificates.get(record.component_id)
        if renewing is not None and previous == renewing:
            until = cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%SZ")
            await engine.step(renewal.certificate_renewed(current, issued, renewing, until))
        else:
            await engine.step(certificate_issued(current, issued, previous))
        crash_point("after-certificate")
        return issued

    async def _euca_set(self, record: Record) -> EucaSet:
        """The Eucalyptus key files this registrar has for `record`: only for its own cluster
        (an NC's CC) or the cluster it was registered in (a CC), never named by the request."""
        if self.euca_keys is None:
            return OFF_SET
        own = self.engine.settings.own_cluster
        if record.role is Role.NC and record.cluster != own:
            return EucaSet(INVALID, f"{record.component_id} is not of this CC's cluster {own}")
        return await self.euca_keys.current(record.role, record.cluster)

    async def _note_keys(self, record: Record, keys: EucaSet) -> None:
        """An event each time a component is given another Eucalyptus key set (or told why
        not): once per change, not once per watch."""
        told = f"{record.fingerprint} {keys.digest}"
        if self._told.get(record.component_id) == told:
            return
        self._told[record.component_id] = told
        if keys.state == READY:
            code, reason = "euca-keys-sent", f"Eucalyptus key files sent: {keys.reason}"
        else:
            code = f"euca-keys-{keys.state}"
            reason = f"Eucalyptus key files not sent: {keys.reason}"
        event = event_for(record, self.engine.clock(), "credentials", code, reason)
        await self.engine.step(Transition(Write(events=(event,))))

    async def mark_collected(self, component_id: str) -> None:
        record = self.engine.memory.records.get(component_id)
        if record is not None:
            await self.engine.step(collected(record, self.engine.clock()))


@functools.lru_cache(maxsize=8192)
def validity_of(cert_pem: str) -> renewal.Validity:
    """The validity of a stored certificate (parsed once: every bundle handed out asks); one
    that cannot be read counts as expired, and is replaced at the next request."""
    try:
        return certificates.validity(certificates.load_cert_pem(cert_pem))
    except (keypairs.CredentialError, ValueError):
        return renewal.UNREADABLE


@functools.lru_cache(maxsize=8192)
def signer_of(cert_pem: str) -> bytes | None:
    """The key identifier of the key that signed a stored certificate (its AKI), None when it
    cannot be read (then it is re-issued, as one that cannot be read is renewed)."""
    try:
        cert = certificates.load_cert_pem(cert_pem)
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except (keypairs.CredentialError, ValueError, x509.ExtensionNotFound):
        return None
    return aki.key_identifier


async def _either(event: asyncio.Event, other: asyncio.Event | None, timeout: float) -> bool:
    """Wait until `event` or `other` is set, at most `timeout` seconds; whether one was."""
    if other is None:
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return False
        return True
    waits = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(other.wait())]
    try:
        done, _ = await asyncio.wait(
            waits, timeout=max(0.0, timeout), return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        for task in waits:
            task.cancel()
    return bool(done)
