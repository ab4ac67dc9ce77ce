"""The signatures of signed requests (docs/credentials.md, "Signed requests"): the RSA-PSS
primitive both halves use, and which public keys a request may be signed with. The envelope a
sender signs is in pki/signing.py; the registrar's check of it in api/auth.py.
"""

from __future__ import annotations

import base64

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, padding, rsa

from . import keypairs

# The keys a signed request may be made with (docs/credentials.md, "Signed requests"): RSA of
# 2048 to 4096 bits with e=65537. Smaller keys are weak; larger ones cost the registrar more to
# check than any component needs; other exponents and key types are not what agents make.
REQUEST_KEY_BITS = (2048, 4096)
REQUEST_KEY_EXPONENT = 65537
# base64 of the largest signature such a key makes (512 bytes): longer headers are refused unread.
MAX_SIGNATURE_CHARS = 4 * ((REQUEST_KEY_BITS[1] // 8 + 2) // 3)


class KeyRefused(keypairs.CredentialError):
    """A well-formed public key that signed requests may not use (its type, size or exponent)."""


def load_request_key(pem: str) -> keypairs.PublicKey:
    """The enclosed key of a signed request, if it is one we accept: CredentialError when it is
    not a PEM public key at all, KeyRefused when it is one of another type, size or exponent."""
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except (ValueError, UnsupportedAlgorithm) as exc:  # UnicodeEncodeError is a ValueError
        raise keypairs.CredentialError(f"not a PEM public key: {exc}") from exc
    if not isinstance(key, rsa.RSAPublicKey):
        raise KeyRefused(f"{_kind(key)} keys are not accepted: {_REQUEST_KEY_RULE}")
    low, high = REQUEST_KEY_BITS
    if not low <= key.key_size <= high:
        raise KeyRefused(f"RSA-{key.key_size} is not accepted: {_REQUEST_KEY_RULE}")
    if key.public_numbers().e != REQUEST_KEY_EXPONENT:
        exponent = key.public_numbers().e
        raise KeyRefused(f"RSA exponent {exponent} is not accepted: {_REQUEST_KEY_RULE}")
    return key


def _kind(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC ({key.curve.name})"
    if isinstance(key, dsa.DSAPublicKey):
        return "DSA"
    return type(key).__name__.removesuffix("PublicKey") or "unknown"


_REQUEST_KEY_RULE = (
    f"signed requests need an RSA key of {REQUEST_KEY_BITS[0]}-{REQUEST_KEY_BITS[1]} bits "
    f"with e={REQUEST_KEY_EXPONENT}"
)


def sign(key: keypairs.PrivateKey, body: bytes) -> str:
    signature = key.sign(
        body,
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH),
        hashes.SHA256(),
    )
    return base64.b64encode(signature).decode()


def verify(public_key: keypairs.PublicKey, body: bytes, signature_b64: str) -> bool:
    try:
        signature = base64.b64decode(signature_b64, validate=True)
        public_key.verify(
            signature,
            body,
            padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH),
            hashes.SHA256(),
        )
    except (ValueError, InvalidSignature):
        return False
    return True
