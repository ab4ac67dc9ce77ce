"""Eucalyptus 1.6's own key files (not eucareg's): which of them each component needs, where a
registrar finds them, and whether a set is sound (every PEM parses, each key matches its
certificate, the subjects name the cluster). Pure checks; reading and writing live elsewhere.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from eucareg.core.model import Role

CLOUD_CERT = "cloud-cert.pem"
CLUSTER_CERT = "cluster-cert.pem"
CLUSTER_KEY = "cluster-pk.pem"
NODE_CERT = "node-cert.pem"
NODE_KEY = "node-pk.pem"
VTUNPASS = "vtunpass"
P12 = "euca.p12"
# The password Eucalyptus 1.6 protects euca.p12 with (its own tools open it so).
P12_PASSWORD = b"eucalyptus"
MAX_FILE = 64 * 1024  # a key file is a few KiB; anything larger is not one
# Files only their owner may read; the rest (certificates) are public.
PRIVATE = frozenset({CLUSTER_KEY, NODE_KEY, VTUNPASS, P12})
PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
DIR_MODE = 0o700  # as `euca_conf --setup` makes /var/lib/eucalyptus/keys

# What `euca_conf` copies to each component (Eucalyptus 1.6 tools/euca_conf.in, sync_keys):
# --register-cluster copies keys/<cluster>/{node-cert,cluster-cert,cluster-pk,node-pk}.pem and
# vtunpass, then keys/cloud-cert.pem, to the CC; --register-nodes copies node-cert, cluster-cert,
# node-pk and cloud-cert from the CC's keys/ to each NC; --register-walrus and --register-sc
# copy euca.p12. vtunpass is optional: euca_conf only warns when it is missing.
NEEDS: Mapping[Role, tuple[str, ...]] = {
    Role.CC: (NODE_CERT, CLUSTER_CERT, CLUSTER_KEY, NODE_KEY, VTUNPASS, CLOUD_CERT),
    Role.NC: (NODE_CERT, CLUSTER_CERT, NODE_KEY, CLOUD_CERT),
    Role.WALRUS: (P12,),
    Role.SC: (P12,),
}
OPTIONAL = frozenset({VTUNPASS})


class EucaFilesError(ValueError):
    """A set of Eucalyptus key files that must not be served or written, and why."""


@dataclass(frozen=True)
class Source:
    name: str
    path: Path
    required: bool


def sources(role: Role, cluster: str | None, keys_dir: Path) -> tuple[Source, ...]:
    """Where a registrar's host keeps the files `role` needs: the CLC keeps each cluster's in
    keys/<cluster>/ and its own cloud-cert.pem and euca.p12 in keys/; a CC keeps what its NCs
    need in its own keys/."""
    names = NEEDS.get(role)
    if names is None:
        raise EucaFilesError(f"no Eucalyptus key files are delivered to a {role.value}")
    if role is Role.CC:
        if not cluster or cluster in (".", "..") or "/" in cluster:
            raise EucaFilesError(f"no key directory for cluster {cluster!r}")
        cluster_dir = keys_dir / cluster
        return tuple(
            Source(n, (keys_dir if n == CLOUD_CERT else cluster_dir) / n, n not in OPTIONAL)
            for n in names
        )
    return tuple(Source(n, keys_dir / n, n not in OPTIONAL) for n in names)


def mode_of(name: str) -> int:
    return PRIVATE_MODE if name in PRIVATE else PUBLIC_MODE


def digest(files: Mapping[str, bytes]) -> str:
    """A digest of a set: its names and their bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(files):
        data = files[name]
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return "sha256:" + h.hexdigest()


def check(role: Role, cluster: str | None, files: Mapping[str, bytes]) -> None:
    """Raise EucaFilesError unless `files` is a sound set for `role` in `cluster`: the names
    it needs (no others), each within MAX_FILE, certificates and keys that parse, each key
    the one its certificate certifies, and subjects O=cc-<cluster> / O=nc-<cluster>."""
    names = NEEDS.get(role)
    if names is None:
        raise EucaFilesError(f"no Eucalyptus key files are delivered to a {role.value}")
    unknown = sorted(set(files) - set(names))
    if unknown:
        raise EucaFilesError(f"{unknown[0]} is not a file a {role.value} is given")
    missing = [n for n in names if n not in files and n not in OPTIONAL]
    if missing:
        raise EucaFilesError(f"{missing[0]} is missing")
    for name, data in files.items():
        if len(data) > MAX_FILE:
            raise EucaFilesError(f"{name} is {len(data)} bytes, larger than a key file can be")
        if not data:
            raise EucaFilesError(f"{name} is empty")
    if CLOUD_CERT in files:
        _cert(files, CLOUD_CERT)
    if P12 in files:
        _p12(files[P12])
    for cert_name, key_name, prefix in (
        (CLUSTER_CERT, CLUSTER_KEY, "cc"),
        (NODE_CERT, NODE_KEY, "nc"),
    ):
        if cert_name not in files:
            continue
        cert = _cert(files, cert_name)
        _named(cert, cert_name, f"{prefix}-{cluster}")
        if key_name in files:
            _pair(cert, cert_name, files[key_name], key_name)


def _cert(files: Mapping[str, bytes], name: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(files[name])
    except ValueError as exc:
        raise EucaFilesError(f"{name} is not a PEM certificate: {exc}") from None


def _named(cert: x509.Certificate, name: str, organization: str) -> None:
    found = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
    if organization not in found:
        shown = ", ".join(str(v) for v in found) or "none"
        raise EucaFilesError(
            f"{name} is for O={shown}, not O={organization}: another cluster's key files?"
        )


def _pair(cert: x509.Certificate, cert_name: str, key_data: bytes, key_name: str) -> None:
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError) as exc:
        raise EucaFilesError(f"{key_name} is not an unencrypted PEM private key: {exc}") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise EucaFilesError(f"{key_name} is not the key {cert_name} certifies")


def _p12(data: bytes) -> None:
    try:
        key, cert, _ = pkcs12.load_key_and_certificates(data, P12_PASSWORD)
    except ValueError as exc:
        raise EucaFilesError(
            f"{P12} does not open as a PKCS#12 keystore with Eucalyptus's password: {exc}"
        ) from None
    if key is None or cert is None:
        raise EucaFilesError(f"{P12} holds no key and certificate")
