"""Credentials in the Eucalyptus key directory: which files each role holds (LAYOUTS), the
bundle a registrar sends and its checks, and writing it so that a component never looks
unregistered midway. Files are replaced atomically; the component's own key is made here once.
"""

from __future__ import annotations

import datetime
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import rsa

from eucareg.core.model import Role

from . import certificates, keypairs
from .handover import HANDOVER
from .names import CertIdentity, cert_identity


@dataclass(frozen=True)
class Layout:
    """File names of one role's credentials in the Eucalyptus key directory."""

    cert: str  # this component's own certificate
    key: str  # this component's own private key
    issuer: str | None  # certificate of whoever signed `cert`, when that is not the cloud CA


LAYOUTS: Mapping[Role, Layout] = {
    Role.CLC: Layout("cloud-cert.pem", "cloud-pk.pem", None),
    Role.WALRUS: Layout("walrus-cert.pem", "walrus-pk.pem", None),
    Role.CC: Layout("cluster-cert.pem", "cluster-pk.pem", None),
    Role.SC: Layout("sc-cert.pem", "sc-pk.pem", None),
    Role.NC: Layout("node-cert.pem", "node-pk.pem", "cluster-cert.pem"),
}
CLOUD_CERT = "cloud-cert.pem"


def required_files(role: Role) -> list[str]:
    """Every file a registered component of `role` holds."""
    layout = LAYOUTS[role]
    files = [CLOUD_CERT, layout.cert, layout.key]
    if layout.issuer:
        files.append(layout.issuer)
    return sorted(set(files))


# -- files -----------------------------------------------------------------------------------


def load_or_create_key(path: Path) -> keypairs.PrivateKey:
    """The component's own key pair, made once at first start and kept 0600."""
    if path.exists():
        return keypairs.load_key(path)
    key = keypairs.generate_key()
    write_atomic(path, keypairs.key_pem(key))
    return key


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write a file so that readers see either the old content or all of the new."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# -- bundles ---------------------------------------------------------------------------------


def _check_signed_by(cert: x509.Certificate, issuer: x509.Certificate, what: str) -> None:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise keypairs.CredentialError(
            f"{what} is not signed by {issuer.subject.rfc4514_string()}"
        ) from exc


def verify_bundle(
    files: Mapping[str, str],
    role: Role,
    own_key: keypairs.PrivateKey,
    *,
    expect: CertIdentity | None = None,
) -> dict[str, bytes]:
    """Check a credential bundle received from a registrar; return the files to write.

    The bundle must certify exactly our own key and chain up to the cloud CA in it, so a
    registrar cannot hand us someone else's identity or a certificate it made up. With
    `expect`, our certificate must also name that role, cluster and id; and a node's issuer
    must be the CC of that same cluster (every CC's certificate is a CA: one of another
    cluster must not vouch for our nodes).
    """
    layout = LAYOUTS[role]
    expected = {CLOUD_CERT, layout.cert} | ({layout.issuer} if layout.issuer else set())
    missing = expected - set(files)
    if missing:
        raise keypairs.CredentialError(f"bundle lacks {', '.join(sorted(missing))}")
    cloud = certificates.load_cert_pem(files[CLOUD_CERT])
    own = certificates.load_cert_pem(files[layout.cert])
    own_public = own.public_key()
    mine = keypairs.fingerprint(own_key.public_key())
    if not isinstance(own_public, rsa.RSAPublicKey) or keypairs.fingerprint(own_public) != mine:
        raise keypairs.CredentialError(f"{layout.cert} does not certify this component's key")
    _check_signed_by(cloud, cloud, CLOUD_CERT)
    if layout.issuer:
        issuer = certificates.load_cert_pem(files[layout.issuer])
        _check_signed_by(issuer, cloud, layout.issuer)
        _check_signed_by(own, issuer, layout.cert)
    else:
        _check_signed_by(own, cloud, layout.cert)
    if expect is not None:
        named = cert_identity(own)
        if named != expect:
            raise keypairs.CredentialError(
                f"{layout.cert} names {named or 'no component'}, not {expect}"
            )
        if layout.issuer:
            by = cert_identity(issuer)
            if by is None or by.role is not Role.CC or by.cluster != expect.cluster:
                raise keypairs.CredentialError(
                    f"{layout.issuer} is {by or 'no component'}, not a CC of cluster "
                    f"{expect.cluster}: it may not certify this node"
                )
    out = {name: files[name].encode() for name in expected}
    out[layout.key] = keypairs.key_pem(own_key)
    return out


def write_credentials(key_dir: Path, role: Role, files: Mapping[str, bytes]) -> None:
    """Write a verified bundle; the role's own certificate goes last, as the 'registered' mark,
    and a handover first, before the CA it leads to (a CC serves its NCs from these files)."""
    own_cert = LAYOUTS[role].cert
    for name in sorted(files, key=lambda n: (n != HANDOVER, n)):
        if name != own_cert:
            write_atomic(key_dir / name, files[name])
    write_atomic(key_dir / own_cert, files[own_cert])


def check_current(files: Mapping[str, bytes], now: float) -> None:
    """CredentialError unless every certificate among `files` is valid at `now` (give or take
    BACKDATE for clocks that differ)."""
    skew = certificates.BACKDATE.total_seconds()
    for name, data in sorted(files.items()):
        if not name.endswith("-cert.pem"):
            continue
        v = certificates.validity(certificates.load_cert_pem(data))
        if not v.not_before - skew <= now < v.not_after:
            raise keypairs.CredentialError(
                f"{name} in the bundle is not valid now (valid {_iso(v.not_before)} to "
                f"{_iso(v.not_after)}): keeping the credentials we hold"
            )


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def update_credentials(key_dir: Path, role: Role, files: Mapping[str, bytes]) -> list[str]:
    """Write only the files of a verified bundle that differ from those held (a renewal, a
    renewed chain), the role's own certificate last; the names written. Every file stays in
    place throughout, so the component never looks unregistered (key presence)."""
    changed = differing(key_dir, files)
    own_cert = LAYOUTS[role].cert
    for name in sorted(changed, key=lambda n: (n == own_cert, n != HANDOVER)):
        write_atomic(key_dir / name, files[name])
    return sorted(changed)


def differing(key_dir: Path, files: Mapping[str, bytes]) -> dict[str, bytes]:
    """The files of `files` whose content `key_dir` does not hold (missing or other)."""
    return {name: data for name, data in files.items() if _held_bytes(key_dir / name) != data}


def _held_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def credentials_present(key_dir: Path, role: Role, own_key: keypairs.PrivateKey) -> bool:
    """Key presence, as the design defines registration: every file there, certifying our key."""
    layout = LAYOUTS[role]
    if not all((key_dir / name).is_file() for name in required_files(role)):
        return False
    try:
        own = certificates.load_cert(key_dir / layout.cert)
        stored_key = keypairs.load_key(key_dir / layout.key)
    except keypairs.CredentialError:
        return False
    own_public = own.public_key()
    mine = keypairs.fingerprint(own_key.public_key())
    return (
        isinstance(own_public, rsa.RSAPublicKey)
        and keypairs.fingerprint(own_public) == mine
        and keypairs.fingerprint(stored_key.public_key()) == mine
    )


# (device, inode, size, mtime, ctime) of one file, or None when it cannot be stat'ed.
FileStamp = tuple[int, int, int, int, int] | None


def credential_stamp(key_dir: Path, role: Role) -> tuple[FileStamp, ...]:
    """A cheap signature of the files `role` holds (stat only, nothing read or verified).

    write_atomic replaces files by rename, so every rewrite changes the inode; the sizes and
    times catch in-place edits. Equal stamps mean there is nothing to re-verify.
    """
    stamps: list[FileStamp] = []
    for name in required_files(role):
        try:
            st = os.stat(key_dir / name)
        except OSError:
            stamps.append(None)
        else:
            stamps.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(stamps)


def issuer_cert_name(role: Role) -> str:
    """The file holding the certificate that signed `role`'s own one (its registrar's)."""
    return LAYOUTS[role].issuer or CLOUD_CERT
