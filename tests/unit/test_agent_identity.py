"""The CLC's cloud CA at start: made once, kept while it is ours, and never taken from a file
that merely certifies our key under our name."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from eucareg.agent.identity import Identity, ensure_cloud_ca
from eucareg.pki import certificates, keypairs
from eucareg.pki import credentials as cred


def clc(tmp_path: Path) -> Identity:
    key = keypairs.generate_key()
    return Identity("clc-000000000001", key, keypairs.fingerprint(key.public_key()))


def test_made_once_and_kept(tmp_path: Path) -> None:
    ident = clc(tmp_path)
    first = ensure_cloud_ca(tmp_path, ident)
    again = ensure_cloud_ca(tmp_path, ident)
    assert first.serial_number == again.serial_number
    assert certificates.cert_fingerprint(first) == ident.fingerprint


def test_a_file_certifying_our_key_but_signed_by_another_is_replaced(tmp_path: Path) -> None:
    ident = clc(tmp_path)
    genuine = ensure_cloud_ca(tmp_path, ident)
    rogue = keypairs.generate_key()
    now = datetime.datetime.now(datetime.UTC)
    forged = (
        x509.CertificateBuilder()
        .subject_name(genuine.subject)
        .issuer_name(genuine.subject)
        .public_key(ident.key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .sign(rogue, hashes.SHA256())
    )
    (tmp_path / cred.CLOUD_CERT).write_text(certificates.cert_pem(forged))
    assert certificates.cert_fingerprint(forged) == ident.fingerprint  # the pin alone cannot tell

    served = ensure_cloud_ca(tmp_path, ident)
    served.verify_directly_issued_by(served)  # signed by the CLC's own key
    assert served.serial_number != forged.serial_number
    on_disk = certificates.load_cert(tmp_path / cred.CLOUD_CERT)
    assert on_disk.serial_number == served.serial_number


def test_a_certificate_of_another_key_is_refused(tmp_path: Path) -> None:
    ensure_cloud_ca(tmp_path, clc(tmp_path))
    with pytest.raises(keypairs.CredentialError, match="does not belong to this CLC's key"):
        ensure_cloud_ca(tmp_path, clc(tmp_path))
