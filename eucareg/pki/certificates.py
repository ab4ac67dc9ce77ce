"""Certificates: the self-signed cloud CA, the certificates it (or a CC) issues for components'
own keys, and reading them back. No private key ever leaves the host that made it: a registrar
hands out certificates only (see docs/security.md).
"""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from eucareg.core import renewal
from eucareg.core.model import Role

from . import keypairs
from .names import identity_uri

CA_LIFETIME = datetime.timedelta(seconds=renewal.CA_LIFETIME)
CERT_LIFETIME = datetime.timedelta(seconds=renewal.DEFAULT_LIFETIME)
BACKDATE = datetime.timedelta(minutes=5)  # valid a little before it was made: clocks differ


def _name(common_name: str, unit: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "eucareg"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _when(now: float | None) -> datetime.datetime:
    if now is None:
        return datetime.datetime.now(datetime.UTC)
    return datetime.datetime.fromtimestamp(now, datetime.UTC)


def key_usage(*, encipher: bool, sign_certs: bool) -> x509.KeyUsage:
    """What a certificate's key may do: always sign; a component's key also key exchange
    (TLS with RSA), a CA's (the cloud's, a CC's) also certify others and sign their CRLs."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=encipher,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=sign_certs,
        crl_sign=sign_certs,
        encipher_only=False,
        decipher_only=False,
    )


def create_cloud_ca(
    key: keypairs.PrivateKey,
    cloud_id: str,
    *,
    now: float | None = None,
    lifetime: datetime.timedelta = CA_LIFETIME,
) -> x509.Certificate:
    """The self-signed cloud CA held by the CLC (cloud-cert.pem)."""
    return _cloud_ca(key, _name(f"cloud {cloud_id}", "cloud"), _when(now), lifetime)


def renew_cloud_ca(
    key: keypairs.PrivateKey,
    old: x509.Certificate,
    *,
    now: float | None = None,
    lifetime: datetime.timedelta = CA_LIFETIME,
) -> x509.Certificate:
    """A new cloud-cert.pem for the same key and the same name: every certificate the old one
    signed verifies under it, and every pin (a key fingerprint) still holds."""
    if cert_fingerprint(old) != keypairs.fingerprint(key.public_key()):
        raise keypairs.CredentialError("the cloud CA certificate does not certify this CLC's key")
    return _cloud_ca(key, old.subject, _when(now), lifetime)


def create_cloud_ca_named(
    key: keypairs.PrivateKey, name: x509.Name, *, now: float | None = None
) -> x509.Certificate:
    """A cloud CA for a new key under an existing CA's name (pki/handover.py: rotation)."""
    return _cloud_ca(key, name, _when(now), CA_LIFETIME)


def _cloud_ca(
    key: keypairs.PrivateKey, name: x509.Name, now: datetime.datetime, lifetime: datetime.timedelta
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(
            key_usage(encipher=False, sign_certs=True),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def issue_certificate(
    *,
    issuer_key: keypairs.PrivateKey,
    issuer_cert: x509.Certificate,
    subject_key: keypairs.PublicKey,
    role: Role,
    component_id: str,
    cluster: str | None,
    now: float | None = None,
    lifetime: datetime.timedelta = CERT_LIFETIME,
) -> x509.Certificate:
    """Certify a component's own public key for its role; a CC's certificate may sign NCs.
    `now` (Unix seconds, default the clock) and `lifetime` set its validity."""
    when = _when(now)
    label = f"{role.txt_type} {cluster}" if cluster else role.txt_type
    is_ca = role is Role.CC
    return (
        x509.CertificateBuilder()
        .subject_name(_name(f"{label} {component_id}", role.txt_type))
        .issuer_name(issuer_cert.subject)
        .public_key(subject_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(when - BACKDATE)
        .not_valid_after(when + lifetime)
        .add_extension(
            x509.BasicConstraints(ca=is_ca, path_length=0 if is_ca else None), critical=True
        )
        .add_extension(
            key_usage(encipher=True, sign_certs=is_ca),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(identity_uri(role, cluster, component_id))]
            ),
            critical=False,
        )
        .sign(issuer_key, hashes.SHA256())
    )


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def load_cert_pem(data: str | bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data.encode() if isinstance(data, str) else data)
    except ValueError as exc:
        raise keypairs.CredentialError(f"not a PEM certificate: {exc}") from exc


def load_cert(path: Path) -> x509.Certificate:
    try:
        return load_cert_pem(path.read_bytes())
    except OSError as exc:
        raise keypairs.CredentialError(f"cannot read certificate {path}: {exc}") from exc


_LOADED: dict[Path, tuple[tuple[int, int, int], x509.Certificate]] = {}


def load_cert_cached(path: Path) -> x509.Certificate:
    """load_cert, parsed again only when the file changed (a new inode, size or mtime): a
    registrar hands its CA certificates out with every bundle, a thousand in a burst."""
    try:
        st = path.stat()
    except OSError as exc:
        raise keypairs.CredentialError(f"cannot read certificate {path}: {exc}") from exc
    stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
    held = _LOADED.get(path)
    if held is not None and held[0] == stamp:
        return held[1]
    cert = load_cert(path)
    _LOADED[path] = (stamp, cert)
    return cert


def cert_fingerprint(cert: x509.Certificate) -> str:
    """Fingerprint of the key a certificate certifies (how tokens pin a CA)."""
    public = cert.public_key()
    if not isinstance(public, rsa.RSAPublicKey):
        raise keypairs.CredentialError("certificate key is not RSA")
    return keypairs.fingerprint(public)


def validity(cert: x509.Certificate) -> renewal.Validity:
    """A certificate's validity in Unix seconds (what core/renewal.py decides on)."""
    return renewal.Validity(
        cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()
    )
