"""Whether a component's credentials are on disk ("key presence is registration"). They are
verified once, then re-verified, in a thread, only when a stat of the files shows a change: a
re-check (when a file watch fires, or polled where none works) costs stats, not RSA key loads.
Also the chain file a registered component presents as a TLS client, made from those files.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from eucareg.core.model import Role
from eucareg.pki import certificates, keypairs, tls
from eucareg.pki import credentials as cred


@dataclass(frozen=True)
class Held:
    """What a verification found: present or not, and facts the agent needs when present."""

    present: bool
    serial: str | None = None  # our certificate's serial (hex), sent as `have` when watching
    issuer_fingerprint: str | None = None  # key of the registrar that certified us


def _verify(key_dir: Path, role: Role, key: keypairs.PrivateKey) -> Held:
    """Full check (blocking): every file there, our certificate and key copy are ours."""
    if not cred.credentials_present(key_dir, role, key):
        return Held(False)
    try:
        own = certificates.load_cert(key_dir / cred.LAYOUTS[role].cert)
        issuer = certificates.load_cert(key_dir / cred.issuer_cert_name(role))
        return Held(True, format(own.serial_number, "x"), certificates.cert_fingerprint(issuer))
    except keypairs.CredentialError:
        # Replaced between the two reads: the next re-check sees another stamp and verifies.
        return Held(False)


class CredentialPresence:
    """The cached verdict on one component's credentials, refreshed only when files change."""

    def __init__(self, key_dir: Path, role: Role, key: keypairs.PrivateKey) -> None:
        self._key_dir = key_dir
        self._role = role
        self._key = key
        self._stamp: tuple[cred.FileStamp, ...] | None = None
        self.held = Held(False)
        self.verifications = 0  # how often the files were actually verified
        self._lock = asyncio.Lock()  # both loops check; one verification serves both

    async def check(self) -> Held:
        """The current verdict; verifies afresh only if the files changed since last time."""
        async with self._lock:
            # Stamp before verifying: a change during the verification shows up next time.
            stamp = cred.credential_stamp(self._key_dir, self._role)
            if stamp != self._stamp:
                if None in stamp:
                    self.held = Held(False)  # a file is missing: nothing worth reading
                else:
                    self.verifications += 1
                    self.held = await asyncio.to_thread(
                        _verify, self._key_dir, self._role, self._key
                    )
                self._stamp = stamp
            return self.held


class HeldRoot:
    """The cloud CA certificate on disk (cloud-cert.pem): once a component holds one, every
    registrar it talks to must be signed by it. Re-read only when a stat shows a change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int, int] | None = None
        self.cert: x509.Certificate | None = None
        self.unusable = False  # a file is there, but it is no CA we can pin

    async def check(self) -> x509.Certificate | None:
        try:
            st = os.stat(self.path)
            stamp: tuple[int, int, int, int] | None = (
                st.st_dev,
                st.st_ino,
                st.st_size,
                st.st_mtime_ns,
            )
        except OSError:
            stamp = None
        if stamp != self._stamp:
            self._stamp = stamp
            self.cert = await asyncio.to_thread(tls.load_root, self.path) if stamp else None
            self.unusable = stamp is not None and self.cert is None
        return self.cert


def write_client_chain(key_dir: Path, role: Role, path: Path) -> None:
    """Our certificate, then its issuer's when that is not the cloud CA (a node's CC), as
    one file for the TLS client context (blocking)."""
    layout = cred.LAYOUTS[role]
    names = [layout.cert] + ([layout.issuer] if layout.issuer else [])
    certs = [certificates.load_cert(key_dir / name) for name in names]
    path.parent.mkdir(mode=0o700, exist_ok=True)
    tls.write_chain(path, certs)
