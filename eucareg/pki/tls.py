"""TLS for the registrar API: the contexts a registrar serves with, and the check a component
makes of a registrar inside the TLS handshake, before one byte of its request is sent. The
rules, and the trust-on-first-use case, are in docs/security.md ("TLS and pinning").
"""

from __future__ import annotations

import asyncio.sslproto
import datetime
import functools
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from eucareg.core.model import Role

from . import certificates, handover, keypairs, names
from . import credentials as cred

log = logging.getLogger(__name__)

# The name a client asks for (TLS SNI), so that a host running the CLC and a CC on one port
# answers each with the certificate of the registrar it wants.
SERVER_NAMES = {Role.CLC: "clc.eucareg.invalid", Role.CC: "cc.eucareg.invalid"}
ATTRIBUTE = "eucareg_expect"  # where a client context keeps what it expects of its peer


class UntrustedRegistrar(ssl.SSLCertVerificationError):
    """The peer is not the registrar we expect; the handshake is aborted with this reason.

    An ssl.SSLError, because asyncio's TLS transport turns only those into a failed handshake;
    aiohttp then raises ClientConnectorCertificateError, whose `certificate_error` is this."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "untrusted registrar"


@dataclass(frozen=True)
class Expect:
    """Whom a component accepts as its registrar.

    `root` is the cloud CA certificate the component holds (its pin once registered); `pin`
    the CA key fingerprint a token or the configuration names. With neither, the first
    registrar to answer is believed (trust on first use), and only its role is checked."""

    role: Role  # CLC, or CC for a node
    cluster: str | None = None  # a CC must be of this cluster
    component_id: str | None = None  # the id announced over mDNS; None for the fallback URL
    root: x509.Certificate | None = None
    pin: str | None = None

    @property
    def pinned(self) -> bool:
        return self.root is not None or self.pin is not None


def check_registrar(chain: list[x509.Certificate], expect: Expect, now: datetime.datetime) -> None:
    """Raise UntrustedRegistrar unless `chain` (as the peer sent it, its own certificate first)
    is a registrar `expect` accepts.

    Its certificate must be signed directly by the pinned cloud CA, or, after `eucareg ca
    rotate`, directly by the new CA key a cross-certificate signed by the pinned key certifies
    (pki/handover.py): a chain through a CC's cluster certificate (itself a CA) is never
    accepted, so no registered CC can vouch for another registrar. It must name the expected
    role, cluster and id, and be valid now."""
    if not chain:
        raise UntrustedRegistrar("the registrar presented no certificate")
    leaf = chain[0]
    named = names.cert_identity(leaf)
    if named is None or named.role is not expect.role:
        raise UntrustedRegistrar(
            f"the registrar's certificate names {named or 'no component'}, "
            f"not a {expect.role.value}"
        )
    if expect.role is Role.CC and named.cluster != expect.cluster:
        raise UntrustedRegistrar(f"the registrar's certificate names {named}")
    if expect.component_id is not None and named.component_id != expect.component_id:
        raise UntrustedRegistrar(
            f"the registrar's certificate names {named}, but {expect.component_id} announced "
            "that address"
        )
    if not expect.pinned:
        return
    # The leaf too: the CLC's certificate is the cloud CA itself (the handshake proved its key).
    root = expect.root or _pinned_in(chain, expect.pin)
    if root is None:
        raise UntrustedRegistrar(
            f"the registrar does not show the cloud CA we pin ({expect.pin}): a rogue registrar?"
        )
    # After `eucareg ca rotate`, the CA key we pin may have handed over to a new one: then the
    # registrar's certificate is signed by the new key, which a cross-certificate in the chain,
    # signed by our key, certifies (one step only, never through a CC's certificate).
    if not _signed_by(leaf, root) and not _signed_by_handover(leaf, chain[1:], root, now):
        raise UntrustedRegistrar(
            f"the registrar's certificate ({named}) is not signed by our cloud CA "
            f"{certificates.cert_fingerprint(root)}: a rogue registrar?"
        )
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        raise UntrustedRegistrar(f"the registrar's certificate ({named}) is not valid now")


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except Exception:  # InvalidSignature, ValueError, TypeError: all mean "not by issuer"
        return False
    return True


def _signed_by_handover(
    leaf: x509.Certificate,
    certs: list[x509.Certificate],
    root: x509.Certificate,
    now: datetime.datetime,
) -> bool:
    """Whether `leaf` is signed by a key that a cross-certificate among `certs`, signed by
    `root`'s key and valid now, hands the cloud CA over to."""
    return any(
        handover.vouches(cert, root, now.timestamp()) and _signed_by(leaf, cert) for cert in certs
    )


def _pinned_in(certs: list[x509.Certificate], pin: str | None) -> x509.Certificate | None:
    """The self-signed CA certificate in the peer's chain whose key is `pin`."""
    for cert in certs:
        try:
            if certificates.cert_fingerprint(cert) == pin:
                cert.verify_directly_issued_by(cert)
                return cert
        except Exception:  # any fault means "not the pinned CA": try the next
            continue
    return None


class _CheckedObject(ssl.SSLObject):
    """An SSLObject whose handshake also runs check_registrar (the ssl module has no verify
    callback; asyncio drives every handshake through do_handshake)."""

    def do_handshake(self) -> None:
        super().do_handshake()
        expect: Expect | None = getattr(self.context, ATTRIBUTE, None)
        if expect is None:
            return
        try:
            check_registrar(_peer_chain(self), expect, datetime.datetime.now(datetime.UTC))
        except UntrustedRegistrar:
            raise
        except Exception as exc:
            # A certificate OpenSSL takes but we cannot read (odd encodings, name types, key
            # types): a refusal like any other. Anything but an SSLError here would escape
            # asyncio's handshake as a crash, and let a crafted decoy kill the agent.
            raise UntrustedRegistrar(
                f"the registrar sent a certificate we cannot use: {type(exc).__name__}: {exc}"
            ) from exc


_DER = ssl._ssl.ENCODING_DER  # type: ignore[attr-defined]  # Certificate.public_bytes: DER


def _peer_chain(obj: ssl.SSLObject) -> list[x509.Certificate]:
    # Python 3.13 makes get_unverified_chain public; 3.11 and 3.12 have it on _sslobj.
    getter: Any = getattr(obj, "get_unverified_chain", None)
    if getter is None:
        getter = obj._sslobj.get_unverified_chain  # type: ignore[attr-defined]
    chain = getter() or []
    out: list[x509.Certificate] = []
    for cert in chain:
        der = cert if isinstance(cert, bytes) else cert.public_bytes(_DER)
        out.append(x509.load_der_x509_certificate(der))
    return out


@dataclass(frozen=True)
class ClientCert:
    """A registered component's certificate chain and key, presented as its TLS client
    certificate; `serial` tells two versions of the same files apart (context cache)."""

    chain: Path
    key: Path
    serial: str


@functools.lru_cache(maxsize=256)
def client_context(expect: Expect, client: ClientCert | None = None) -> ssl.SSLContext:
    """A context that accepts exactly the registrar `expect` describes.

    OpenSSL's own chain check is off: we check the chain ourselves, in the handshake, because
    we must refuse chains OpenSSL accepts (through a cluster CA) and pin a bare key
    fingerprint. The handshake still proves the peer holds its certificate's key. Cached: one
    context per expectation lets aiohttp reuse connections, and never mixes two of them."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.sslobject_class = _CheckedObject
    setattr(ctx, ATTRIBUTE, expect)
    if client is not None:
        ctx.load_cert_chain(client.chain, client.key)
    return ctx


def server_context(
    chain_file: Path,
    key_file: Path,
    client_ca: x509.Certificate | None = None,
    also_trusted: x509.Certificate | None = None,
) -> ssl.SSLContext:
    """A registrar's context: its certificate, then the cloud CA (and, while a CA key hands
    over, the cross-certificate and the old CA), so that a component pinning only the CA key
    finds the CA certificate in the chain. With `client_ca`, a client may present a
    certificate (registered components do), which must chain to that CA, or during a
    handover to `also_trusted` (the old CA); what it names is read with peer_identity."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # No session tickets: a resumed session skips the client certificate's check, and every
    # context shares one session id context, so a ticket taken during a CA handover would
    # carry an old-CA certificate past its end. A component's handshakes are few (its
    # connections are long-polls); resumption would save little.
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    ctx.load_cert_chain(chain_file, key_file)
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.load_verify_locations(cadata=certificates.cert_pem(client_ca))
        if also_trusted is not None:
            ctx.load_verify_locations(cadata=certificates.cert_pem(also_trusted))
    return ctx


@dataclass(frozen=True)
class Peer:
    """The component a verified TLS client certificate names, and the key it certifies."""

    named: names.CertIdentity
    fingerprint: str


def peer_identity(obj: ssl.SSLObject | None) -> Peer | None:
    """Who the client of a server-side connection proved to be, or None.

    OpenSSL has verified the chain to the cloud CA (server_context). As on the client side,
    that is not enough: a CC's certificate is a CA, so only a node of the CC's own cluster
    counts when the chain goes through one; anything else must be signed by the CA itself."""
    if obj is None:
        return None
    try:
        return _peer_identity(obj)
    except Exception:  # a certificate OpenSSL verified but we cannot read names nobody
        return None


def _peer_identity(obj: ssl.SSLObject) -> Peer | None:
    getter: Any = getattr(obj, "get_verified_chain", None)
    if getter is None:
        getter = getattr(obj._sslobj, "get_verified_chain", None)  # type: ignore[attr-defined]
    try:
        chain = [
            x509.load_der_x509_certificate(c if isinstance(c, bytes) else c.public_bytes(_DER))
            for c in (getter() or [])
        ]
    except (ValueError, ssl.SSLError):
        return None
    if not chain:
        return None
    leaf, named = chain[0], names.cert_identity(chain[0])
    if named is None:
        return None
    if len(chain) == 3:
        issuer = names.cert_identity(chain[1])
        if (
            named.role is not Role.NC
            or issuer is None
            or issuer.role is not Role.CC
            or issuer.cluster != named.cluster
        ):
            return None
    elif len(chain) != 2:
        return None  # a CA certificate itself (the CLC's own) or a longer chain
    try:
        return Peer(named, certificates.cert_fingerprint(leaf))
    except keypairs.CredentialError:
        return None


# asyncio gives every TLS connection a read buffer of SSLProtocol.max_size, 256 KiB: with a
# thousand components long-polling a registrar, 250 MiB of buffers. A TLS record carries
# 16 KiB at most, so a smaller buffer costs nothing but a second read of a large body.
TLS_READ_BUFFER = 32 * 1024


def shrink_read_buffers() -> None:
    """Make asyncio's per-connection TLS read buffer TLS_READ_BUFFER (process-wide)."""
    protocol = getattr(asyncio.sslproto, "SSLProtocol", None)
    if protocol is not None and getattr(protocol, "max_size", 0) > TLS_READ_BUFFER:
        protocol.max_size = TLS_READ_BUFFER


def write_chain(path: Path, certs: list[x509.Certificate]) -> None:
    data = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
    cred.write_atomic(path, data)


def load_root(path: Path) -> x509.Certificate | None:
    """The cloud CA certificate held at `path` (a self-signed CA), or None if there is none
    that is usable (logged: an unreadable pin is a problem the operator must see)."""
    if not path.exists():
        return None
    try:
        cert = certificates.load_cert(path)
        cert.verify_directly_issued_by(cert)
        certificates.cert_fingerprint(cert)
    except Exception as exc:  # unreadable, or not a self-signed RSA CA
        log.warning("ignoring %s as a CA pin: %s", path, exc)
        return None
    return cert
