"""A fleet of simulated NCs in one process: N announcements at once, N signed collectors.

Run inside a lab namespace by bench/run.py. Each simulated NC has its own id, key pair and
address, publishes its own service and collects its own credentials with the agent's code, so
the registrar sees exactly what N real NCs would send. Prints one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import sys
import time
from pathlib import Path

import aiohttp

from eucareg.agent.host import Endpoint, Identity, collect_credentials
from eucareg.core import txt
from eucareg.core.model import AnnouncedState, Announcement, Role
from eucareg.mdns.types import ServiceSpec, Sighting
from eucareg.mdns.zeroconf_backend import ZeroconfBackend
from eucareg.pki import credentials as cred


def identities(cache: Path, count: int) -> list[Identity]:
    """Keys are cached between runs (RSA generation is not what we measure)."""
    out = []
    cache.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        key = cred.load_or_create_key(cache / f"nc{i:04d}.pem")
        out.append(Identity(f"nc-fleet{i:06d}", key, cred.fingerprint(key.public_key())))
    return out


async def run(args: argparse.Namespace) -> dict[str, object]:
    fleet = identities(Path(args.cache), args.count)
    base = ipaddress.ip_address(args.first_address)
    backend = ZeroconfBackend()
    await backend.start()
    found: asyncio.Future[Endpoint] = asyncio.get_running_loop().create_future()

    def on_sighting(sighting: Sighting) -> None:
        ann = txt.decode(sighting.instance, sighting.txt)
        if (
            isinstance(ann, Announcement)
            and ann.role is Role.CC
            and ann.cluster == args.cluster
            and ann.state is AnnouncedState.REGISTERED
            and ann.api_port
            and not found.done()
        ):
            found.set_result(Endpoint(str(ann.address), ann.api_port, ann.component_id))

    backend.watch(on_sighting)
    endpoint = await asyncio.wait_for(found, 30)
    announced: dict[str, float] = {}
    collected: dict[str, float] = {}

    async def one(index: int, identity: Identity, session: aiohttp.ClientSession) -> None:
        address = base + index
        spec = ServiceSpec(
            instance=f"node-{identity.component_id}",
            port=8780,
            txt=txt.encode(
                role=Role.NC,
                component_id=identity.component_id,
                cluster=args.cluster,
                state=AnnouncedState.READY,
                address=address,
                fingerprint=identity.fingerprint,
                api_port=None,
                eucavers="3.4",
            ),
            addresses=(str(address),),
            server=f"fleet-{index}.local.",
        )
        await backend.publish(spec)
        announced[identity.component_id] = time.time()
        key_dir = Path(args.keys) / identity.component_id
        while not await collect_credentials(session, identity, Role.NC, endpoint, key_dir):
            pass
        collected[identity.component_id] = time.time()

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)
    started = time.time()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.wait_for(
            asyncio.gather(*(one(i, ident, session) for i, ident in enumerate(fleet))),
            args.timeout,
        )
    finished = time.time()
    await backend.close()
    latencies = sorted(collected[i] - announced[i] for i in collected)
    return {
        "count": args.count,
        "registered": len(collected),
        "total_seconds": finished - started,
        "first_announcement_to_last_credentials": max(collected.values()) - min(announced.values()),
        "latency_median": latencies[len(latencies) // 2],
        "latency_max": latencies[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--cluster", default="cluster1")
    parser.add_argument("--first-address", required=True)
    parser.add_argument("--cache", required=True, help="directory for cached fleet keys")
    parser.add_argument("--keys", required=True, help="where the fleet writes credentials")
    parser.add_argument("--timeout", type=float, default=240)
    args = parser.parse_args()
    result = asyncio.run(run(args))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
