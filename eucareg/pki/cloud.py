"""The cloud CA certificate as a CLC holds it on disk: genuine only when it certifies the CLC's
key and that key signed it. Shared by the CA's renewal, rotation and the agent's start."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509

from eucareg.pki import certificates, keypairs
from eucareg.pki import credentials as cred


def check_genuine(cert: x509.Certificate, key: keypairs.PrivateKey) -> None:
    """CredentialError unless `cert` certifies `key` and `key` signed it. The first alone is
    not enough: anyone can certify the CLC's public key under its name with another key."""
    if certificates.cert_fingerprint(cert) != keypairs.fingerprint(key.public_key()):
        raise keypairs.CredentialError(f"{cred.CLOUD_CERT} does not certify this CLC's key")
    try:
        cert.verify_directly_issued_by(cert)
    except Exception as exc:  # InvalidSignature, ValueError, TypeError
        raise keypairs.CredentialError(f"{cred.CLOUD_CERT} is not self-signed: {exc}") from exc


def read_held(key_dir: Path, key: keypairs.PrivateKey) -> x509.Certificate:
    """cloud-cert.pem as it is on disk, if it is a self-signed CA certificate of `key`."""
    cert = certificates.load_cert(key_dir / cred.CLOUD_CERT)
    check_genuine(cert, key)
    return cert
