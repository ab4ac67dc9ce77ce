"""A component's identity on this host: its stable id and own key pair, the CLC's cloud CA made
from that key, and the registrar's root-only secrets. All blocking (files, RSA): the agent calls
these through asyncio.to_thread; the CLI calls them directly.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from eucareg.config.file import Config
from eucareg.core import grammar
from eucareg.core.model import Role
from eucareg.pki import certificates, keypairs
from eucareg.pki import credentials as cred

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Identity:
    """A component's own stable id and key pair, made at first start."""

    component_id: str
    key: keypairs.PrivateKey
    fingerprint: str


def load_or_create_identity(state_dir: Path, role: Role) -> Identity:
    """The id and key of this host's `role` component, made once and kept (docs/credentials.md)."""
    directory = state_dir / "identity"
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    if role is Role.CLC:
        from .rotation import finish_pending

        finish_pending(state_dir)  # a CA key rotation cut short: finished before the key loads
    id_file = directory / f"{role.value}.id"
    if id_file.exists():
        component_id = id_file.read_text().strip()
        if not grammar.COMPONENT_ID.fullmatch(component_id):
            raise keypairs.CredentialError(f"{id_file} holds no valid component id")
    else:
        component_id = f"{role.value}-{uuid.uuid4().hex[:12]}"
        cred.write_atomic(id_file, component_id.encode() + b"\n", mode=0o600)
    key = cred.load_or_create_key(directory / f"{role.value}.key.pem")
    return Identity(component_id, key, keypairs.fingerprint(key.public_key()))


def identity_key(cfg: Config, role: Role) -> Path:
    """Where the key of this host's `role` component is kept (made by the call above)."""
    return cfg.state_dir / "identity" / f"{role.value}.key.pem"


def ensure_cloud_ca(key_dir: Path, identity: Identity) -> x509.Certificate:
    """The CLC's cloud CA: cloud-cert.pem certifies the CLC's own key, made once."""
    cert_path = key_dir / cred.CLOUD_CERT
    if cert_path.exists():
        cert = certificates.load_cert(cert_path)
        if certificates.cert_fingerprint(cert) != identity.fingerprint:
            raise keypairs.CredentialError(f"{cert_path} does not belong to this CLC's key")
        if _self_signed(cert):
            return cert
        # Anyone can certify our public key under our name with a key of their own: such a
        # file is not our CA. Ours is made again (same key, so every pin still holds).
        log.warning("%s certifies this CLC's key but is not signed by it; replacing it", cert_path)
        cert = certificates.create_cloud_ca(identity.key, identity.component_id)
        cred.write_atomic(cert_path, certificates.cert_pem(cert).encode())
        return cert
    cert = certificates.create_cloud_ca(identity.key, identity.component_id)
    cred.write_atomic(key_dir / cred.LAYOUTS[Role.CLC].key, keypairs.key_pem(identity.key))
    cred.write_atomic(cert_path, certificates.cert_pem(cert).encode())
    return cert


def _self_signed(cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def read_or_create_secret(path: Path, fresh: bytes) -> bytes:
    """A root-only secret file, made once (the admin credential, the token master key)."""
    if path.exists():
        return path.read_bytes().strip()
    cred.write_atomic(path, fresh + b"\n")
    return fresh
