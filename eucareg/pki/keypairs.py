"""Key pairs: a component's own RSA key, its PEM forms, and the fingerprint that names it (in
`fp=`, in pins). CredentialError, the error of every check in pki/, starts here, the lowest layer.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

KEY_BITS = 2048  # what Eucalyptus's own tools generate and expect

PrivateKey = rsa.RSAPrivateKey
PublicKey = rsa.RSAPublicKey


class CredentialError(Exception):
    """A key, certificate or bundle is missing, malformed, or does not verify."""


def generate_key() -> PrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_pem(key: PublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def load_public_pem(data: str) -> PublicKey:
    try:
        key = serialization.load_pem_public_key(data.encode())
    except ValueError as exc:
        raise CredentialError(f"not a PEM public key: {exc}") from exc
    if not isinstance(key, rsa.RSAPublicKey):
        raise CredentialError("only RSA public keys are accepted")
    return key


def fingerprint(key: PublicKey) -> str:
    """sha256 over the DER SubjectPublicKeyInfo, as announced in `fp=`."""
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(der).hexdigest()


def load_key(path: Path) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise CredentialError(f"cannot read private key {path}: {exc}") from exc
    if not isinstance(key, rsa.RSAPrivateKey):
        raise CredentialError(f"{path} is not an RSA private key")
    return key
