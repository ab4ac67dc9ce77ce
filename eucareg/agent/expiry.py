"""What an agent says about its own certificate's end when its registrar cannot renew it: once
the certificate is within the renewal margin, every failed request's warning carries the date.
"""

from __future__ import annotations

import asyncio
import datetime
import time
from pathlib import Path

from eucareg.core import renewal
from eucareg.core.model import Role
from eucareg.pki import certificates, keypairs
from eucareg.pki import credentials as cred


def expiry_note(validity: renewal.Validity, now: float) -> str:
    """The note added to a failure once our certificate is within its margin, else "" (pure).
    The agent does not know its registrar's setting: it assumes the default margin, a third
    of the certificate's own lifetime."""
    phase = renewal.phase(validity, renewal.agent_margin(validity), now)
    if phase is renewal.Phase.CURRENT:
        return ""
    until = datetime.datetime.fromtimestamp(validity.not_after, datetime.UTC)
    when = until.strftime("%Y-%m-%d %H:%M:%SZ")
    if phase is renewal.Phase.EXPIRED:
        return f"; our certificate EXPIRED at {when}: renew it (reach the registrar)"
    return f"; our certificate is due for renewal and expires at {when}"


async def held_note(key_dir: Path, role: Role) -> str:
    """expiry_note for the certificate `role` holds in `key_dir` ("" if none is readable)."""
    try:
        cert = await asyncio.to_thread(certificates.load_cert, key_dir / cred.LAYOUTS[role].cert)
    except keypairs.CredentialError:
        return ""
    return expiry_note(certificates.validity(cert), time.time())
