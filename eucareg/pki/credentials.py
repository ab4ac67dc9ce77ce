"""Keys and credentials: component key pairs, the cloud CA, and the Eucalyptus key layout.

Each component's certificate certifies the key pair the component made itself, so no private key
ever leaves the host that made it: registrars hand out certificates only (see docs/security.md).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, padding, rsa
from cryptography.x509.oid import NameOID

from eucareg.core import renewal
from eucareg.core.model import Role

from .names import CertIdentity, cert_identity, identity_uri

KEY_BITS = 2048  # what Eucalyptus's own tools generate and expect
CA_LIFETIME = datetime.timedelta(seconds=renewal.CA_LIFETIME)
CERT_LIFETIME = datetime.timedelta(seconds=renewal.DEFAULT_LIFETIME)
BACKDATE = datetime.timedelta(minutes=5)  # valid a little before it was made: clocks differ

PrivateKey = rsa.RSAPrivateKey
PublicKey = rsa.RSAPublicKey


class CredentialError(Exception):
    """A key, certificate or bundle is missing, malformed, or does not verify."""


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


# -- keys ------------------------------------------------------------------------------------


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


def load_or_create_key(path: Path) -> PrivateKey:
    """The component's own key pair, made once at first start and kept 0600."""
    if path.exists():
        return load_key(path)
    key = generate_key()
    write_atomic(path, key_pem(key))
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


# -- certificates ----------------------------------------------------------------------------


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
    key: PrivateKey,
    cloud_id: str,
    *,
    now: float | None = None,
    lifetime: datetime.timedelta = CA_LIFETIME,
) -> x509.Certificate:
    """The self-signed cloud CA held by the CLC (cloud-cert.pem)."""
    return _cloud_ca(key, _name(f"cloud {cloud_id}", "cloud"), _when(now), lifetime)


def renew_cloud_ca(
    key: PrivateKey,
    old: x509.Certificate,
    *,
    now: float | None = None,
    lifetime: datetime.timedelta = CA_LIFETIME,
) -> x509.Certificate:
    """A new cloud-cert.pem for the same key and the same name: every certificate the old one
    signed verifies under it, and every pin (a key fingerprint) still holds."""
    if cert_fingerprint(old) != fingerprint(key.public_key()):
        raise CredentialError("the cloud CA certificate does not certify this CLC's key")
    return _cloud_ca(key, old.subject, _when(now), lifetime)


def create_cloud_ca_named(
    key: PrivateKey, name: x509.Name, *, now: float | None = None
) -> x509.Certificate:
    """A cloud CA for a new key under an existing CA's name (pki/handover.py: rotation)."""
    return _cloud_ca(key, name, _when(now), CA_LIFETIME)


def _cloud_ca(
    key: PrivateKey, name: x509.Name, now: datetime.datetime, lifetime: datetime.timedelta
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
    issuer_key: PrivateKey,
    issuer_cert: x509.Certificate,
    subject_key: PublicKey,
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
        raise CredentialError(f"not a PEM certificate: {exc}") from exc


def load_cert(path: Path) -> x509.Certificate:
    try:
        return load_cert_pem(path.read_bytes())
    except OSError as exc:
        raise CredentialError(f"cannot read certificate {path}: {exc}") from exc


_LOADED: dict[Path, tuple[tuple[int, int, int], x509.Certificate]] = {}


def load_cert_cached(path: Path) -> x509.Certificate:
    """load_cert, parsed again only when the file changed (a new inode, size or mtime): a
    registrar hands its CA certificates out with every bundle, a thousand in a burst."""
    try:
        st = path.stat()
    except OSError as exc:
        raise CredentialError(f"cannot read certificate {path}: {exc}") from exc
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
        raise CredentialError("certificate key is not RSA")
    return fingerprint(public)


def validity(cert: x509.Certificate) -> renewal.Validity:
    """A certificate's validity in Unix seconds (what core/renewal.py decides on)."""
    return renewal.Validity(
        cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()
    )


def _check_signed_by(cert: x509.Certificate, issuer: x509.Certificate, what: str) -> None:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise CredentialError(f"{what} is not signed by {issuer.subject.rfc4514_string()}") from exc


# -- bundles ---------------------------------------------------------------------------------


def verify_bundle(
    files: Mapping[str, str],
    role: Role,
    own_key: PrivateKey,
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
        raise CredentialError(f"bundle lacks {', '.join(sorted(missing))}")
    cloud = load_cert_pem(files[CLOUD_CERT])
    own = load_cert_pem(files[layout.cert])
    own_public = own.public_key()
    if not isinstance(own_public, rsa.RSAPublicKey) or fingerprint(own_public) != fingerprint(
        own_key.public_key()
    ):
        raise CredentialError(f"{layout.cert} does not certify this component's key")
    _check_signed_by(cloud, cloud, CLOUD_CERT)
    if layout.issuer:
        issuer = load_cert_pem(files[layout.issuer])
        _check_signed_by(issuer, cloud, layout.issuer)
        _check_signed_by(own, issuer, layout.cert)
    else:
        _check_signed_by(own, cloud, layout.cert)
    if expect is not None:
        named = cert_identity(own)
        if named != expect:
            raise CredentialError(f"{layout.cert} names {named or 'no component'}, not {expect}")
        if layout.issuer:
            by = cert_identity(issuer)
            if by is None or by.role is not Role.CC or by.cluster != expect.cluster:
                raise CredentialError(
                    f"{layout.issuer} is {by or 'no component'}, not a CC of cluster "
                    f"{expect.cluster}: it may not certify this node"
                )
    out = {name: files[name].encode() for name in expected}
    out[layout.key] = key_pem(own_key)
    return out


def write_credentials(key_dir: Path, role: Role, files: Mapping[str, bytes]) -> None:
    """Write a verified bundle; the role's own certificate goes last, as the 'registered' mark."""
    own_cert = LAYOUTS[role].cert
    for name in sorted(files):
        if name != own_cert:
            write_atomic(key_dir / name, files[name])
    write_atomic(key_dir / own_cert, files[own_cert])


def check_current(files: Mapping[str, bytes], now: float) -> None:
    """CredentialError unless every certificate among `files` is valid at `now` (give or take
    BACKDATE for clocks that differ)."""
    skew = BACKDATE.total_seconds()
    for name, data in sorted(files.items()):
        if not name.endswith("-cert.pem"):
            continue
        v = validity(load_cert_pem(data))
        if not v.not_before - skew <= now < v.not_after:
            raise CredentialError(
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
    for name in sorted(changed, key=lambda n: n == own_cert):
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


def credentials_present(key_dir: Path, role: Role, own_key: PrivateKey) -> bool:
    """Key presence, as the design defines registration: every file there, certifying our key."""
    layout = LAYOUTS[role]
    if not all((key_dir / name).is_file() for name in required_files(role)):
        return False
    try:
        own = load_cert(key_dir / layout.cert)
        stored_key = load_key(key_dir / layout.key)
    except CredentialError:
        return False
    own_public = own.public_key()
    mine = fingerprint(own_key.public_key())
    return (
        isinstance(own_public, rsa.RSAPublicKey)
        and fingerprint(own_public) == mine
        and fingerprint(stored_key.public_key()) == mine
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


# -- signed requests -------------------------------------------------------------------------

# The keys a signed request may be made with (docs/credentials.md, "Signed requests"): RSA of
# 2048 to 4096 bits with e=65537. Smaller keys are weak; larger ones cost the registrar more to
# check than any component needs; other exponents and key types are not what agents make.
REQUEST_KEY_BITS = (2048, 4096)
REQUEST_KEY_EXPONENT = 65537
# base64 of the largest signature such a key makes (512 bytes): longer headers are refused unread.
MAX_SIGNATURE_CHARS = 4 * ((REQUEST_KEY_BITS[1] // 8 + 2) // 3)


class KeyRefused(CredentialError):
    """A well-formed public key that signed requests may not use (its type, size or exponent)."""


def load_request_key(pem: str) -> PublicKey:
    """The enclosed key of a signed request, if it is one we accept: CredentialError when it is
    not a PEM public key at all, KeyRefused when it is one of another type, size or exponent."""
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except (ValueError, UnsupportedAlgorithm) as exc:  # UnicodeEncodeError is a ValueError
        raise CredentialError(f"not a PEM public key: {exc}") from exc
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


def sign(key: PrivateKey, body: bytes) -> str:
    signature = key.sign(
        body,
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH),
        hashes.SHA256(),
    )
    return base64.b64encode(signature).decode()


def verify(public_key: PublicKey, body: bytes, signature_b64: str) -> bool:
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
