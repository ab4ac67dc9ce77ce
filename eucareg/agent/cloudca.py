"""The CLC's cloud CA certificate while the agent runs: renewed for the same key when a third of
its life is left (at start, then on time), and taken up at once when the operator renews it
(`eucareg ca renew` writes cloud-cert.pem; an inotify watch tells us).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from cryptography import x509

from eucareg.core import renewal
from eucareg.pki import certificates, handover, keypairs
from eucareg.pki import credentials as cred
from eucareg.pki.cloud import check_genuine, read_held

from .timing import wait_event
from .watch import FileWatch

log = logging.getLogger(__name__)

RECHECK = 86400.0  # with nothing due sooner, look again daily (the clock may have jumped)
RETRY = 300.0  # after a failed renewal (a full disk, say): not in a loop


def renew_held(
    key_dir: Path, key: keypairs.PrivateKey, now: float, old: x509.Certificate | None = None
) -> x509.Certificate:
    """Renew cloud-cert.pem for `key` (blocking): a new certificate under the name of `old`
    (by default, the file as it is, if it is this CLC's), written atomically."""
    old = old if old is not None else read_held(key_dir, key)
    new = certificates.renew_cloud_ca(key, old, now=now)
    cred.write_atomic(key_dir / cred.CLOUD_CERT, certificates.cert_pem(new).encode())
    return new


def settle_held(
    key_dir: Path, key: keypairs.PrivateKey, current: x509.Certificate, now: float
) -> tuple[x509.Certificate, str]:
    """The certificate to serve now (blocking), and what was done to get it ("" if nothing):
    the file on disk if it is this CLC's, else `current` written back over it (a foreign or
    damaged file must never be what this host, or Eucalyptus here, takes as the cloud CA);
    either one renewed if due, or if it is not signed by the CLC's key (found so at start)."""
    path = key_dir / cred.CLOUD_CERT
    note = ""
    try:
        held = read_held(key_dir, key)
    except keypairs.CredentialError as exc:
        _check_not_rotated(key_dir, key)
        held, note = current, f"{path} is not this CLC's ({exc}): written back"
    if certificates.validity(held).not_before < certificates.validity(current).not_before:
        # Ours, but older than the one served: a copy put back (or a bundle written late by
        # a CC on this host) must not undo a renewal.
        held, note = current, f"{path} held an older certificate than the one served: written back"
    try:
        check_genuine(held, key)
        due = renewal.phase(certificates.validity(held), renewal.ca_margin(), now)
        if due is not renewal.Phase.CURRENT:
            note = f"{note}; " if note else ""
            held, note = renew_held(key_dir, key, now, held), f"{note}renewed ({due.value})"
        elif note:
            cred.write_atomic(path, certificates.cert_pem(held).encode())
    except keypairs.CredentialError as exc:
        if certificates.cert_fingerprint(held) != keypairs.fingerprint(key.public_key()):
            raise
        # Certifies our key under our name, signed by someone else: replaced by ours at once.
        held = renew_held(key_dir, key, now, held)
        note = f"{path}: the certificate held was not signed by this CLC's key ({exc}): replaced"
    return held, note


def _check_not_rotated(key_dir: Path, key: keypairs.PrivateKey) -> None:
    """CredentialError if cloud-cert.pem is the CA our key handed over to (`ca rotate` ran
    beside this agent): writing ours back over it would leave a key, stored by the rotation,
    that no cloud-cert.pem certifies, and the next start would fail; a restart takes it up."""
    try:
        new = certificates.load_cert(key_dir / cred.CLOUD_CERT)
        passed = handover.parse((key_dir / handover.HANDOVER).read_bytes())
        handover.check_signed(passed, keypairs.fingerprint(key.public_key()), new)
    except (OSError, ValueError, keypairs.CredentialError):
        return  # not a handover from our key: a foreign or damaged file, written back
    raise keypairs.CredentialError(
        f"the cloud CA key was replaced (eucareg ca rotate) while this agent ran: "
        f"{cred.CLOUD_CERT} now certifies {certificates.cert_fingerprint(new)}; restart the agent"
    )


class CloudCA:
    """The cloud CA certificate the CLC hands out and serves; `on_change` runs (on the loop)
    whenever it is replaced by another one for the same key."""

    def __init__(
        self,
        key_dir: Path,
        key: keypairs.PrivateKey,
        cert: x509.Certificate,
        on_change: Callable[[], Awaitable[None]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.key_dir, self.key, self.cert = key_dir, key, cert
        self._on_change = on_change
        self._clock = clock
        self._wake = asyncio.Event()
        # When the handover from the previous CA key ends (`eucareg ca rotate`), if one runs:
        # then the old CA is served and trusted no more.
        self.handover_ends: float | None = None

    @property
    def due_at(self) -> float:
        due = renewal.due_at(certificates.validity(self.cert), renewal.ca_margin())
        return min(due, self.handover_ends) if self.handover_ends is not None else due

    async def check(self) -> bool:
        """Take up a changed cloud-cert.pem (or put ours back over a foreign one), renew it
        if due; True if the certificate served (or the handover served with it) changed."""
        held, note = await asyncio.to_thread(
            settle_held, self.key_dir, self.key, self.cert, self._clock()
        )
        if note:
            log.warning("cloud CA certificate: %s", note)
        passed = await asyncio.to_thread(
            handover.load_held, self.key_dir / handover.HANDOVER, held, self._clock()
        )
        ends = passed.ends if passed is not None else None
        if ends != self.handover_ends:
            if passed is None:
                log.info("the handover from the previous cloud CA key has ended")
            else:
                log.info(
                    "handing over from CA %s until %s", passed.old_fingerprint, _at(passed.ends)
                )
            self.handover_ends = ends
            if held == self.cert:
                await self._on_change()
                return True
        if held == self.cert:
            return False
        log.info("cloud CA certificate is now serial %x (%s)", held.serial_number, _shown(held))
        self.cert = held
        await self._on_change()
        return True

    async def run(self) -> None:
        """Follow cloud-cert.pem and the CA's renewal date until cancelled."""
        with FileWatch([self.key_dir / cred.CLOUD_CERT], self._wake.set) as files:
            while True:
                self._wake.clear()
                try:
                    await self.check()
                    wait = min(RECHECK, max(1.0, self.due_at - self._clock()))
                except (OSError, keypairs.CredentialError) as exc:
                    log.warning("cannot renew the cloud CA certificate: %s", exc)
                    wait = RETRY
                if files.polling:
                    wait = min(wait, 60.0)
                await wait_event(self._wake, wait)


def _shown(cert: x509.Certificate) -> str:
    return cert.not_valid_after_utc.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _at(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
