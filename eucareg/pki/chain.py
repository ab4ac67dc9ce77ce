"""The digest of a credential bundle's chain: its files other than the component's own
certificate (cloud-cert.pem, cluster-cert.pem, cloud-handover.pem). A component sends the one
it holds with its watch; the registrar answers at once when its chain differs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from eucareg.core.model import Role
from eucareg.pki.credentials import LAYOUTS


def chain_digest(files: Mapping[str, str], role: Role) -> str:
    """64 hex digits naming the bundle's files other than `role`'s own certificate. Lengths
    prefix each name and content, so no two different sets of files give the same input."""
    own = LAYOUTS[role].cert
    digest = hashlib.sha256()
    for name in sorted(files):
        if name != own:
            digest.update(f"{len(name)}:{name}{len(files[name])}:{files[name]}".encode())
    return digest.hexdigest()
