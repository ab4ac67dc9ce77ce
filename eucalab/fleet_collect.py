"""What each simulated NC of the fleet does: announce its own `_eucalyptus._tcp` service, follow
the cluster's registered CC, and collect its credentials with the agent's collection code."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from pathlib import Path

import aiohttp

from eucalab.fleet_progress import FleetState
from eucareg.agent.collect import COLLECT_ERRORS, Outcome, collect_credentials
from eucareg.agent.identity import Identity
from eucareg.agent.locate import Endpoint
from eucareg.core import txt
from eucareg.core.model import AnnouncedState, Announcement, Role
from eucareg.mdns.types import ServiceSpec, Sighting
from eucareg.mdns.zeroconf_backend import ZeroconfBackend
from eucareg.pki import certificates, keypairs, tls
from eucareg.pki import credentials as cred

API_PORT = 8780
LONG_POLL = 25.0
RETRY_FIRST = 0.2
RETRY_MAX = 2.0
# A "pending" answer that came back this fast was not a long poll: pause before asking again.
QUICK_ANSWER = 0.2


def spec(identity: Identity, address: str, cluster: str, index: int) -> ServiceSpec:
    return ServiceSpec(
        instance=f"node-{identity.component_id}",
        port=API_PORT,
        txt=txt.encode(
            role=Role.NC,
            component_id=identity.component_id,
            cluster=cluster,
            state=AnnouncedState.READY,
            address=ipaddress.ip_address(address),
            fingerprint=identity.fingerprint,
            api_port=None,
            eucavers="3.4",
        ),
        addresses=(address,),
        server=f"fleet-{identity.component_id}.local.",
    )


def watch_registrar(backend: ZeroconfBackend, state: FleetState, cluster: str) -> None:
    """Follow the cluster's registered CC: its (re)announcements give the endpoint to use."""

    def on_sighting(sighting: Sighting) -> None:
        ann = txt.decode(sighting.instance, sighting.txt, sighting.addresses)
        if (
            isinstance(ann, Announcement)
            and ann.role is Role.CC
            and ann.cluster == cluster
            and ann.state is AnnouncedState.REGISTERED
            and ann.api_port
        ):
            state.endpoint = Endpoint(
                str(ann.address), ann.api_port, ann.component_id, ann.fingerprint
            )
            state.endpoint_seen.set()

    backend.watch(on_sighting)


async def collect(
    state: FleetState,
    identity: Identity,
    session: aiohttp.ClientSession,
    keys: Path,
    pin: str | None,
    cluster: str,
    changed: asyncio.Event,
) -> None:
    """Ask until the registrar hands over a bundle that verifies; survive registrar crashes."""
    node = state.nodes[identity.component_id]
    delay = RETRY_FIRST
    while True:
        await state.endpoint_seen.wait()
        endpoint = state.endpoint
        assert endpoint is not None
        node.requests += 1
        asked = time.monotonic()
        try:
            outcome = await collect_credentials(
                session,
                identity,
                Role.NC,
                endpoint,
                keys / identity.component_id,
                wait=LONG_POLL,
                expect=tls.Expect(Role.CC, cluster, endpoint.component_id, pin=pin),
            )
        except keypairs.CredentialError as exc:
            node.verify_errors += 1
            node.errors += 1
            node.last_error = f"bundle refused: {exc}"
        except COLLECT_ERRORS as exc:
            node.errors += 1
            node.last_error = str(exc) or type(exc).__name__
        else:
            if outcome is Outcome.WRITTEN:
                cert = certificates.load_cert(
                    keys / identity.component_id / cred.LAYOUTS[Role.NC].cert
                )
                node.serial = format(cert.serial_number, "x")
                node.collected_at = time.time()
                changed.set()
                return
            delay = RETRY_FIRST
            if time.monotonic() - asked >= QUICK_ANSWER:
                continue
        changed.set()
        await asyncio.sleep(delay)
        delay = min(RETRY_MAX, delay * 2)
