"""Keys, the cloud CA, certificates in the Eucalyptus layout, and signed requests."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509

from eucareg.core.model import Role
from eucareg.pki import certificates, keypairs, signatures
from eucareg.pki import credentials as cred


@pytest.fixture(scope="module")
def cloud() -> tuple[keypairs.PrivateKey, x509.Certificate]:
    key = keypairs.generate_key()
    return key, certificates.create_cloud_ca(key, "test")


def test_key_is_created_once_with_0600(tmp_path: Path) -> None:
    path = tmp_path / "id" / "nc.key.pem"
    first = cred.load_or_create_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = cred.load_or_create_key(path)
    assert keypairs.fingerprint(first.public_key()) == keypairs.fingerprint(again.public_key())


def test_node_chain_cloud_to_cluster_to_node_verifies_and_writes_layout(
    tmp_path: Path, cloud: tuple[keypairs.PrivateKey, x509.Certificate]
) -> None:
    cloud_key, cloud_cert = cloud
    cc_key, nc_key = keypairs.generate_key(), keypairs.generate_key()
    cluster_cert = certificates.issue_certificate(
        issuer_key=cloud_key,
        issuer_cert=cloud_cert,
        subject_key=cc_key.public_key(),
        role=Role.CC,
        component_id="cc-000000000001",
        cluster="c1",
    )
    node_cert = certificates.issue_certificate(
        issuer_key=cc_key,
        issuer_cert=cluster_cert,
        subject_key=nc_key.public_key(),
        role=Role.NC,
        component_id="nc-000000000001",
        cluster="c1",
    )
    bundle = {
        "cloud-cert.pem": certificates.cert_pem(cloud_cert),
        "cluster-cert.pem": certificates.cert_pem(cluster_cert),
        "node-cert.pem": certificates.cert_pem(node_cert),
    }
    files = cred.verify_bundle(bundle, Role.NC, nc_key)
    keys = tmp_path / "keys"
    assert not cred.credentials_present(keys, Role.NC, nc_key)
    cred.write_credentials(keys, Role.NC, files)
    assert sorted(p.name for p in keys.iterdir()) == cred.required_files(Role.NC)
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in keys.iterdir())
    assert cred.credentials_present(keys, Role.NC, nc_key)
    # A partial layout (a file lost) is not "registered" (lesson L9).
    (keys / "node-pk.pem").unlink()
    assert not cred.credentials_present(keys, Role.NC, nc_key)


def test_bundle_for_another_key_or_from_another_ca_is_refused(
    cloud: tuple[keypairs.PrivateKey, x509.Certificate],
) -> None:
    cloud_key, cloud_cert = cloud
    mine, theirs = keypairs.generate_key(), keypairs.generate_key()
    cert_for_theirs = certificates.issue_certificate(
        issuer_key=cloud_key,
        issuer_cert=cloud_cert,
        subject_key=theirs.public_key(),
        role=Role.WALRUS,
        component_id="walrus-00000001",
        cluster=None,
    )
    bundle = {
        "cloud-cert.pem": certificates.cert_pem(cloud_cert),
        "walrus-cert.pem": certificates.cert_pem(cert_for_theirs),
    }
    with pytest.raises(keypairs.CredentialError, match="does not certify"):
        cred.verify_bundle(bundle, Role.WALRUS, mine)
    rogue_key = keypairs.generate_key()
    rogue_ca = certificates.create_cloud_ca(rogue_key, "rogue")
    bundle["cloud-cert.pem"] = certificates.cert_pem(rogue_ca)
    with pytest.raises(keypairs.CredentialError, match="not signed"):
        cred.verify_bundle(bundle, Role.WALRUS, theirs)
    with pytest.raises(keypairs.CredentialError, match="lacks"):
        cred.verify_bundle({"cloud-cert.pem": bundle["cloud-cert.pem"]}, Role.WALRUS, theirs)


def test_signatures_verify_only_for_the_signed_body_and_key() -> None:
    key, other = keypairs.generate_key(), keypairs.generate_key()
    body = b'{"component_id": "nc-1"}'
    signature = signatures.sign(key, body)
    assert signatures.verify(key.public_key(), body, signature)
    assert not signatures.verify(key.public_key(), body + b" ", signature)
    assert not signatures.verify(other.public_key(), body, signature)
    assert not signatures.verify(key.public_key(), body, "not base64!")


def test_a_cached_certificate_is_parsed_again_only_when_its_file_changed(tmp_path: Path) -> None:
    path = tmp_path / "cloud-cert.pem"
    first = certificates.create_cloud_ca(keypairs.generate_key(), "first")
    second = certificates.create_cloud_ca(keypairs.generate_key(), "second")
    cred.write_atomic(path, certificates.cert_pem(first).encode())
    held = certificates.load_cert_cached(path)
    assert held == first and certificates.load_cert_cached(path) is held
    cred.write_atomic(path, certificates.cert_pem(second).encode())  # a new inode, as on renewal
    assert certificates.load_cert_cached(path) == second
    path.unlink()
    with pytest.raises(keypairs.CredentialError, match="cannot read certificate"):
        certificates.load_cert_cached(path)
