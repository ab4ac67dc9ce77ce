"""What a component announces and whether it may: its TXT record and ServiceSpec, the join-token
proof it carries while unregistered, and the preconditions (package installed, sshd answering)
that gate announcing at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from eucareg.config.components import ComponentConfig
from eucareg.config.file import Config
from eucareg.config.values import usable_addresses
from eucareg.core import txt
from eucareg.core.model import AnnouncedState, Role
from eucareg.core.trust import PROOF_MAX_AGE, ParsedToken, make_proof, proof_message
from eucareg.mdns.types import ServiceSpec

from .identity import Identity

SSHD_TIMEOUT = 2.0  # connect, then read the banner, each (docs/configuration.md)


class TokenProver:
    """Makes the token proof an unregistered component announces (`tok=`, `tts=`, `tproof=`)."""

    def __init__(self, token: ParsedToken) -> None:
        self.token = token
        self._stamp = 0  # when the announced proof was made (0: make a new one)
        self._last = 0  # the previous stamp, so a renewed proof always differs

    def renew(self) -> None:
        """Make a new proof next time. A fresh proof makes a fresh TXT record; browsers may not
        report a record that comes back unchanged within seconds."""
        self._stamp = 0

    def proof(self, comp: ComponentConfig, identity: Identity) -> tuple[str, int, str]:
        """(token id, stamp, proof) to announce; the stamp is renewed well within its life."""
        now = int(time.time())
        if now - self._stamp > PROOF_MAX_AGE / 3:
            self._stamp = max(now, self._last + 1)
            self._last = self._stamp
        message = proof_message(
            component_id=identity.component_id,
            fingerprint=identity.fingerprint,
            role=comp.role,
            cluster=comp.cluster,
            address=str(comp.address),
            stamp=self._stamp,
        )
        return self.token.token_id, self._stamp, make_proof(self.token.secret, message)


def instance_name(comp: ComponentConfig, identity: Identity) -> str:
    return f"{comp.role.txt_type}-{identity.component_id}"


def service_spec(
    cfg: Config,
    comp: ComponentConfig,
    identity: Identity,
    *,
    registered: bool,
    api_port: int,
    prover: TokenProver | None,
) -> ServiceSpec:
    """The service one component publishes in its current state (docs/mdns.md)."""
    registered = comp.role is Role.CLC or registered
    is_registered_cc = comp.role is Role.CC and registered
    record = txt.encode(
        role=comp.role,
        component_id=identity.component_id,
        cluster=comp.cluster,
        state=AnnouncedState.REGISTERED if is_registered_cc else AnnouncedState.READY,
        address=comp.address,
        fingerprint=identity.fingerprint,
        api_port=api_port if comp.role is Role.CLC or is_registered_cc else None,
        eucavers=cfg.eucavers,
        token=prover.proof(comp, identity) if prover and not registered else None,
    )
    # A registered CC announces on all its interfaces (design), so offer every address.
    addresses = (
        tuple(sorted({str(comp.address), *map(str, usable_addresses())}))
        if is_registered_cc
        else (str(comp.address),)
    )
    return ServiceSpec(
        instance=instance_name(comp, identity),
        port=api_port,
        txt=record,
        addresses=addresses,
        server=f"eucareg-{str(comp.address).replace('.', '-').replace(':', '-')}.local.",
    )


async def preconditions(cfg: Config, comp: ComponentConfig) -> str | None:
    """Why this component must not announce now, or None when it may."""
    installed = comp.installed
    if installed is not None and not installed.exists():
        return f"not installed ({installed} is missing)"
    if cfg.sshd is not None and not await sshd_answers(*cfg.sshd):
        return f"sshd does not answer on {cfg.sshd[0]}:{cfg.sshd[1]}"
    return None


async def sshd_answers(host: str, port: int, timeout: float = SSHD_TIMEOUT) -> bool:
    """True when an SSH server answers with its banner (the design's "sshd is running")."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError):
        return False
    try:
        banner = await asyncio.wait_for(reader.readline(), timeout)
        # Say who we are, so sshd logs a named probe rather than a mystery connection.
        writer.write(b"SSH-2.0-eucareg-precondition-probe\r\n")
        await writer.drain()
    except (OSError, TimeoutError):
        banner = b""
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return banner.startswith(b"SSH-")
