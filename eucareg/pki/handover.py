"""The signed handover from one cloud CA key to the next (`eucareg ca rotate`): a cross-certificate,
signed by the old key, that certifies the new key under the CLC's name for the overlap. With the
old CA certificate it travels as cloud-handover.pem; docs/credentials.md, "Replacing the CA key".
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from eucareg.core.model import Role

from . import certificates, keypairs, names

log = logging.getLogger(__name__)

HANDOVER = "cloud-handover.pem"  # in key_dir and in bundles: the cross-certificate, then the old CA
MAX_HANDOVER_BYTES = 16384  # two certificates; anything longer is not ours
MAX_OVERLAP = 366 * 86400.0  # `ca rotate --overlap` at most: no cross-certificate lasts longer


@dataclass(frozen=True)
class Handover:
    """The old cloud CA (`old`, self-signed) and the cross-certificate (`cross`) by which its
    key hands over to the new one until `cross` ends."""

    cross: x509.Certificate
    old: x509.Certificate

    @property
    def old_fingerprint(self) -> str:
        return certificates.cert_fingerprint(self.old)

    @property
    def new_fingerprint(self) -> str:
        return certificates.cert_fingerprint(self.cross)

    @property
    def ends(self) -> float:
        return self.cross.not_valid_after_utc.timestamp()

    def current(self, now: float) -> bool:
        v = certificates.validity(self.cross)
        return v.not_before - certificates.BACKDATE.total_seconds() <= now < v.not_after

    def certs(self) -> list[x509.Certificate]:
        return [self.cross, self.old]

    def pem(self) -> str:
        return certificates.cert_pem(self.cross) + certificates.cert_pem(self.old)


def successor(new_key: keypairs.PrivateKey, old: x509.Certificate, now: float) -> x509.Certificate:
    """The new self-signed cloud CA certificate: the new key, under the old one's name (the
    CLC's), so that everything that reads the name still finds the same CLC."""
    return certificates.create_cloud_ca_named(new_key, old.subject, now=now)


def make_cross(
    old_key: keypairs.PrivateKey,
    old: x509.Certificate,
    new: x509.Certificate,
    now: float,
    overlap: float,
) -> x509.Certificate:
    """X: the new CA's key and name, signed by the old key, valid for the overlap only."""
    when = datetime.datetime.fromtimestamp(now, datetime.UTC)
    public = new.public_key()
    if not isinstance(public, keypairs.PublicKey):
        raise keypairs.CredentialError("the new cloud CA certificate does not hold an RSA key")
    return (
        x509.CertificateBuilder()
        .subject_name(new.subject)
        .issuer_name(old.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(when - certificates.BACKDATE)
        .not_valid_after(when + datetime.timedelta(seconds=overlap))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(
            certificates.key_usage(encipher=False, sign_certs=True),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(old_key.public_key()),
            critical=False,
        )
        .sign(old_key, hashes.SHA256())
    )


def parse(data: str | bytes) -> Handover:
    """A cloud-handover.pem: exactly the cross-certificate, then the old CA certificate."""
    raw = data.encode() if isinstance(data, str) else data
    if len(raw) > MAX_HANDOVER_BYTES:
        raise keypairs.CredentialError(f"{HANDOVER} is longer than {MAX_HANDOVER_BYTES} bytes")
    try:
        certs = x509.load_pem_x509_certificates(raw)
    except ValueError as exc:
        raise keypairs.CredentialError(f"{HANDOVER} is not PEM certificates: {exc}") from exc
    if len(certs) != 2:
        raise keypairs.CredentialError(f"{HANDOVER} holds {len(certs)} certificates, not 2")
    return Handover(cross=certs[0], old=certs[1])


def is_cross(cert: x509.Certificate) -> bool:
    """Whether `cert` could be a cross-certificate at all: a CA certificate naming the CLC.
    A CC's certificate is a CA too, but names a CC: it never hands a cloud CA over."""
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (x509.ExtensionNotFound, ValueError):
        return False
    named = names.cert_identity(cert)
    return constraints.ca and named is not None and named.role is Role.CLC


def vouches(cross: x509.Certificate, root: x509.Certificate, now: float) -> bool:
    """Whether `cross` is a current cross-certificate signed by the key of `root`, under
    `root`'s name (a handover never makes the CLC another one)."""
    return (
        cross.subject == root.subject
        and _signed_cross(cross, root)
        and Handover(cross, root).current(now)
    )


def _signed_cross(cross: x509.Certificate, root: x509.Certificate) -> bool:
    if not is_cross(cross):
        return False
    if _too_long(cross):
        return False  # longer than any `ca rotate` makes: not a handover we honour
    try:
        cross.verify_directly_issued_by(root)
    except Exception:  # InvalidSignature, ValueError, TypeError: all mean "not by root"
        return False
    return True


def _too_long(cross: x509.Certificate) -> bool:
    v = certificates.validity(cross)
    return v.not_after - v.not_before > MAX_OVERLAP + 2 * certificates.BACKDATE.total_seconds()


def verify(h: Handover, trusted: str, new: x509.Certificate, now: float) -> None:
    """CredentialError unless `h` moves the key we trust (fingerprint `trusted`) to the key of
    `new` (a self-signed cloud CA of the same name), now."""
    check_signed(h, trusted, new)
    if not h.current(now):
        raise keypairs.CredentialError(
            f"{HANDOVER}: the handover from {trusted} ended at {_iso(h.ends)} (or has not begun)"
        )


def check_signed(h: Handover, trusted: str, new: x509.Certificate) -> None:
    """verify, but for the time: whether the handover is genuine at all."""
    if certificates.cert_fingerprint(h.old) != trusted:
        raise keypairs.CredentialError(
            f"{HANDOVER} hands over from CA {certificates.cert_fingerprint(h.old)}, "
            f"not from {trusted}"
        )
    try:
        h.old.verify_directly_issued_by(h.old)
    except Exception as exc:
        raise keypairs.CredentialError(f"the old CA in {HANDOVER} is not self-signed") from exc
    if _too_long(h.cross):
        raise keypairs.CredentialError(
            f"{HANDOVER}: the cross-certificate is valid longer than {MAX_OVERLAP / 86400:g} days"
        )
    if not _signed_cross(h.cross, h.old):
        raise keypairs.CredentialError(
            f"{HANDOVER}: the cross-certificate is not a CLC CA certificate signed by {trusted}"
        )
    if certificates.cert_fingerprint(h.cross) != certificates.cert_fingerprint(new):
        raise keypairs.CredentialError(
            f"{HANDOVER} certifies CA {certificates.cert_fingerprint(h.cross)}, "
            f"not the one offered ({certificates.cert_fingerprint(new)})"
        )
    if not h.cross.subject == new.subject == h.old.subject:
        raise keypairs.CredentialError(f"{HANDOVER} names another CLC than the new cloud CA")


def load_held(path: Path, current: x509.Certificate, now: float) -> Handover | None:
    """The handover held at `path` if it leads to `current` (the cloud CA held now) and its
    overlap has not ended; None otherwise (blocking)."""
    h = _read_checked(path, current)
    return h if h is not None and h.current(now) else None


def _read_checked(path: Path, current: x509.Certificate) -> Handover | None:
    try:
        h = parse(path.read_bytes())
        check_signed(h, h.old_fingerprint, current)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, keypairs.CredentialError) as exc:
        log.debug("not handing over from %s: %s", path, exc)
        return None
    return h


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


_HELD: dict[Path, tuple[tuple[int, int, int, str], Handover | None]] = {}


def load_held_cached(path: Path, current: x509.Certificate, now: float) -> Handover | None:
    """load_held, read and verified again only when the file or `current` changed: a CC hands
    the handover on with every bundle, a thousand in a burst."""
    try:
        st = path.stat()
    except OSError:
        return None
    stamp = (st.st_ino, st.st_size, st.st_mtime_ns, certificates.cert_pem(current))
    held = _HELD.get(path)
    if held is None or held[0] != stamp:
        held = (stamp, _read_checked(path, current))
        _HELD[path] = held
    found = held[1]
    return found if found is not None and found.current(now) else None
