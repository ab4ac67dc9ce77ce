"""Eucalyptus 1.6 key directories for tests, made with `cryptography` in the layout the CLC
keeps (keys/cloud-cert.pem, cloud-pk.pem, euca.p12, and keys/<cluster>/ with cluster-* and
node-* pairs, subjects O=cc-<cluster> and O=nc-<cluster>, and vtunpass), and the copies
`euca_conf --register-cluster` leaves on a CC.
"""

from __future__ import annotations

import datetime
import shutil
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from eucareg.pki import eucafiles as ef

CLUSTER_FILES = (ef.CLUSTER_CERT, ef.CLUSTER_KEY, ef.NODE_CERT, ef.NODE_KEY, ef.VTUNPASS)


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pk_pem(key: rsa.RSAPrivateKey) -> bytes:
    """A private key as Eucalyptus 1.6 writes it (PKCS#1, "BEGIN RSA PRIVATE KEY")."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def certificate(key: rsa.RSAPrivateKey, organization: str) -> x509.Certificate:
    """A self-signed certificate as Eucalyptus 1.6 makes them (its subject's O= names it)."""
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "www.eucalyptus.com"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Eucalyptus"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_pair(directory: Path, stem: str, organization: str) -> None:
    key = new_key()
    (directory / f"{stem}-pk.pem").write_bytes(pk_pem(key))
    (directory / f"{stem}-cert.pem").write_bytes(cert_pem(certificate(key, organization)))


def make_clc_keys(keys_dir: Path, clusters: tuple[str, ...] = ("cluster1",)) -> None:
    """The CLC's /var/lib/eucalyptus/keys as Eucalyptus 1.6 leaves it once each cluster is
    registered."""
    keys_dir.mkdir(parents=True, exist_ok=True)
    key = new_key()
    cloud = certificate(key, "Eucalyptus")
    (keys_dir / ef.CLOUD_CERT).write_bytes(cert_pem(cloud))
    (keys_dir / "cloud-pk.pem").write_bytes(pk_pem(key))
    (keys_dir / ef.P12).write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"eucalyptus",
            key,
            cloud,
            None,
            serialization.BestAvailableEncryption(ef.P12_PASSWORD),
        )
    )
    for cluster in clusters:
        add_cluster(keys_dir, cluster)


def add_cluster(keys_dir: Path, cluster: str) -> None:
    """What `euca_conf --register-cluster` makes on the CLC: keys/<cluster>/."""
    directory = keys_dir / cluster
    directory.mkdir(parents=True, exist_ok=True)
    write_pair(directory, "cluster", f"cc-{cluster}")
    write_pair(directory, "node", f"nc-{cluster}")
    (directory / ef.VTUNPASS).write_bytes(b"s3cr3t-vtun-password\n")


def copy_to_cc(clc_keys: Path, cc_keys: Path, cluster: str) -> None:
    """What `euca_conf --register-cluster` copies to the CC's keys/."""
    cc_keys.mkdir(parents=True, exist_ok=True)
    for name in CLUSTER_FILES:
        shutil.copy2(clc_keys / cluster / name, cc_keys / name)
    shutil.copy2(clc_keys / ef.CLOUD_CERT, cc_keys / ef.CLOUD_CERT)
