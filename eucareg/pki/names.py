"""What a certificate says it is for: the role, cluster and id every certificate we issue names
in its subject alternative name (`urn:eucareg:ROLE:CLUSTER:ID`), read back for TLS peers and
received bundles. Certificates issued before that carry the same in their subject.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

from eucareg.core import grammar
from eucareg.core.model import Role

__all__ = ["URI_PREFIX", "CertIdentity", "cert_identity", "identity_uri"]

URI_PREFIX = "urn:eucareg:"


@dataclass(frozen=True)
class CertIdentity:
    """The component a certificate names: its role, cluster (CC, SC, NC) and id."""

    role: Role
    cluster: str | None
    component_id: str

    def __str__(self) -> str:
        where = f" of cluster {self.cluster}" if self.cluster else ""
        return f"{self.role.value} {self.component_id}{where}"


def identity_uri(role: Role, cluster: str | None, component_id: str) -> str:
    """`urn:eucareg:ROLE:CLUSTER:ID` (CLUSTER is "-" for roles without one): the subject
    alternative name every certificate we issue carries, so that a peer can tell which
    component, of which cluster, a certificate is for (docs/security.md, "TLS")."""
    return f"{URI_PREFIX}{role.value}:{cluster or '-'}:{component_id}"


def cert_identity(cert: x509.Certificate) -> CertIdentity | None:
    """The identity a certificate we issued names, or None when it names none we can read.

    Read from the subject alternative name; certificates issued before it existed name the
    same in their subject (OU is the TXT type, CN is "TYPE [CLUSTER] ID")."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        return None  # a name we cannot read names nobody (never fall back to the subject)
    for uri in uris:
        parts = uri.removeprefix(URI_PREFIX).split(":") if uri.startswith(URI_PREFIX) else []
        if len(parts) == 3:
            return _identity(parts[0], None if parts[1] == "-" else parts[1], parts[2])
    return _identity_from_subject(cert)


def _identity_from_subject(cert: x509.Certificate) -> CertIdentity | None:
    try:
        units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        return None
    if len(units) != 1 or len(names) != 1:
        return None
    words = str(names[0].value).split(" ")
    try:
        role = Role.from_txt_type(str(units[0].value))
    except ValueError:
        return None
    if words[0] != role.txt_type or len(words) not in (2, 3):
        return None
    return _identity(role.value, words[1] if len(words) == 3 else None, words[-1])


def _identity(role_name: str, cluster: str | None, component_id: str) -> CertIdentity | None:
    try:
        role = Role(role_name)
    except ValueError:
        return None
    if not grammar.COMPONENT_ID.fullmatch(component_id):
        return None
    if cluster is not None and not grammar.CLUSTER.fullmatch(cluster):
        return None
    return CertIdentity(role, cluster, component_id)
