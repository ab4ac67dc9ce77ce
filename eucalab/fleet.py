"""A fleet of simulated NCs in one process: N announcements at once, N signed collectors.

Run inside a lab namespace (`python -m eucalab.fleet run …`) by the crash tests and the
benchmarks. Each simulated NC has its own id, RSA key and address (the caller adds the addresses
to the namespace's interface), publishes its own `_eucalyptus._tcp` service and collects its
own credentials with the agent's collection code, so the registrar sees exactly what N real NCs
would send. A collector that fails — the registrar died, the connection broke, an answer was
unusable — retries with a short bounded backoff until it holds credentials or the fleet's time
is up; the bundle it writes was verified against its own key (and the pinned cloud CA).

`run` keeps a JSON progress file up to date (atomically replaced) and, unless told to exit when
done, keeps announcing until SIGTERM, so the registrar still hears its NCs while a test checks
the registry. `verify` asks the registrar, once per NC, whether the certificate the NC holds is
still the current one (a signed watch request that must answer "unchanged").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

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
SAVE_INTERVAL = 0.5  # seconds between writes of the progress file, at least


def node_id(prefix: str, index: int) -> str:
    return f"nc-{prefix}{index:06d}"


def fleet_identities(cache: Path, count: int, prefix: str = "fleet") -> list[Identity]:
    """Ids `nc-<prefix>000000`…, with keys cached in `cache` (generation is ~35 ms each)."""
    cache.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        key = _cached_key(cache / f"{prefix}{i:06d}.pem")
        out.append(Identity(node_id(prefix, i), key, keypairs.fingerprint(key.public_key())))
    return out


def _cached_key(path: Path) -> keypairs.PrivateKey:
    """A key this lab made and cached, loaded without RSA's full validation: that takes
    ~29 ms a key, a minute for a fleet of 2,000, and these keys are our own."""
    if not path.exists():
        return cred.load_or_create_key(path)
    key = serialization.load_pem_private_key(
        path.read_bytes(), password=None, unsafe_skip_rsa_key_validation=True
    )
    if not isinstance(key, rsa.RSAPrivateKey):
        raise keypairs.CredentialError(f"{path} is not an RSA private key")
    return key


def fleet_addresses(first: str, count: int) -> list[str]:
    base = ipaddress.ip_address(first)
    return [str(base + i) for i in range(count)]


@dataclass
class NodeProgress:
    """What one simulated NC did; the fleet's progress file lists these."""

    component_id: str
    address: str
    fingerprint: str
    batch: int
    announced_at: float | None = None
    collected_at: float | None = None
    serial: str | None = None
    requests: int = 0
    errors: int = 0
    verify_errors: int = 0
    last_error: str = ""


@dataclass
class FleetState:
    nodes: dict[str, NodeProgress]
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    endpoint: Endpoint | None = None
    endpoint_seen: asyncio.Event = field(default_factory=asyncio.Event)
    # The fleet's own CPU (user+system seconds, all threads) when it began to publish: what it
    # used from then on is the load generator's cost of the burst (bench/run.py reports it).
    cpu_at_publish_s: float | None = None

    def summary(self) -> dict[str, Any]:
        times = os.times()
        return {
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "cpu_at_publish_s": self.cpu_at_publish_s,
            "cpu_s": times.user + times.system,
            "count": len(self.nodes),
            "collected": sum(1 for n in self.nodes.values() if n.collected_at is not None),
            "nodes": [asdict(n) for n in self.nodes.values()],
        }


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def read_progress(path: Path) -> dict[str, Any] | None:
    """The progress file, or None before the fleet wrote it."""
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data


def _spec(identity: Identity, address: str, cluster: str, index: int) -> ServiceSpec:
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


def _watch_registrar(backend: ZeroconfBackend, state: FleetState, cluster: str) -> None:
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


async def _collect(
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


async def _wait_for_go(go_dir: Path | None, batch: int, deadline: float) -> None:
    """Batch 0 goes at once; batch k once the controlling test created `go_dir/go-k`."""
    if go_dir is None or batch == 0:
        return
    while True:
        if (go_dir / f"go-{batch}").exists():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"no go for batch {batch}")
        await asyncio.sleep(0.1)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    identities = fleet_identities(Path(args.cache), args.count, args.id_prefix)
    addresses = fleet_addresses(args.first_address, args.count)
    batches = max(1, args.batches)
    per_batch = -(-args.count // batches)
    state = FleetState(
        nodes={
            ident.component_id: NodeProgress(
                ident.component_id, addr, ident.fingerprint, batch=i // per_batch
            )
            for i, (ident, addr) in enumerate(zip(identities, addresses, strict=True))
        }
    )
    progress = Path(args.progress) if args.progress else None
    keys = Path(args.keys)
    go_dir = Path(args.go_dir) if args.go_dir else None
    changed = asyncio.Event()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def save() -> None:
        if progress is not None:
            write_json_atomic(progress, state.summary())

    backend = ZeroconfBackend()
    await backend.start()
    tls.shrink_read_buffers()  # as the agent does: a thousand NCs in one process
    _watch_registrar(backend, state, args.cluster)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=LONG_POLL + 20)
    tasks: list[asyncio.Task[None]] = []

    async def publish_batches(session: aiohttp.ClientSession) -> None:
        times = os.times()
        state.cpu_at_publish_s = times.user + times.system
        for batch in range(batches):
            await _wait_for_go(go_dir, batch, time.monotonic() + args.timeout)
            members = [
                (i, ident)
                for i, ident in enumerate(identities)
                if state.nodes[ident.component_id].batch == batch
            ]
            for i, ident in members:
                await backend.publish(_spec(ident, addresses[i], args.cluster, i))
                state.nodes[ident.component_id].announced_at = time.time()
            print(f"published batch {batch}: {len(members)} services", flush=True)
            tasks.extend(
                asyncio.create_task(
                    _collect(state, ident, session, keys, args.pin, args.cluster, changed)
                )
                for _, ident in members
            )
            changed.set()

    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            publisher = asyncio.create_task(publish_batches(session))
            deadline = loop.time() + args.timeout
            saved_at = 0.0
            while not stop.is_set() and not (publisher.done() and all(t.done() for t in tasks)):
                changed.clear()
                # The progress of 1,000 NCs is 200 KB of JSON: written at most twice a second,
                # or the generator would spend its burst writing it after every answer.
                if loop.time() - saved_at >= SAVE_INTERVAL:
                    save()
                    saved_at = loop.time()
                remaining = deadline - loop.time()
                if remaining <= 0:
                    print("fleet: time is up", flush=True)
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), min(1.0, remaining))
            for task in [publisher, *tasks]:
                task.cancel()
            await asyncio.gather(publisher, *tasks, return_exceptions=True)
            collected = [n.collected_at for n in state.nodes.values()]
            if all(at is not None for at in collected):
                state.finished_at = max(at for at in collected if at is not None)
                print(f"all {len(state.nodes)} collected", flush=True)
            save()
            if not args.exit_when_done:
                # Keep announcing: the registrar must still hear its NCs while it is checked.
                await stop.wait()
    finally:
        await backend.close()
    return state.summary()


async def verify(args: argparse.Namespace) -> dict[str, Any]:
    """Per NC: the key layout on disk certifies its key, and the registrar says the
    certificate it holds is current ("unchanged")."""
    identities = fleet_identities(Path(args.cache), args.count, args.id_prefix)
    keys = Path(args.keys)
    endpoint = Endpoint(args.registrar, API_PORT, "")
    results: dict[str, str] = {}
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for ident in identities:
            key_dir = keys / ident.component_id
            if not cred.credentials_present(key_dir, Role.NC, ident.key):
                results[ident.component_id] = "no valid credentials on disk"
                continue
            cert = certificates.load_cert(key_dir / cred.LAYOUTS[Role.NC].cert)
            try:
                outcome = await collect_credentials(
                    session,
                    ident,
                    Role.NC,
                    endpoint,
                    key_dir,
                    wait=0,
                    have=format(cert.serial_number, "x"),
                    expect=tls.Expect(Role.CC, args.cluster, pin=args.pin),
                )
            except COLLECT_ERRORS as exc:
                results[ident.component_id] = f"error: {exc}"
            else:
                results[ident.component_id] = outcome.value
    return {"results": results}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m eucalab.fleet", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)
    for name in ("run", "verify"):
        p = sub.add_parser(name)
        p.add_argument("--count", type=int, required=True)
        p.add_argument("--id-prefix", default="fleet", help="ids are nc-<prefix>000000, …")
        p.add_argument("--cache", required=True, help="directory for the fleet's keys")
        p.add_argument("--keys", required=True, help="where each NC writes its credentials")
        p.add_argument("--pin", default=None, help="cloud CA fingerprint the NCs accept")
        p.add_argument("--cluster", default="cluster1")
    run_p = sub.choices["run"]
    run_p.add_argument("--first-address", required=True)
    run_p.add_argument("--progress", default=None, help="JSON progress file")
    run_p.add_argument("--timeout", type=float, default=240)
    run_p.add_argument("--exit-when-done", action="store_true")
    run_p.add_argument("--batches", type=int, default=1)
    run_p.add_argument(
        "--go-dir", default=None, help="batch k>0 is announced once the file go-<k> exists here"
    )
    sub.choices["verify"].add_argument("--registrar", required=True, help="the CC's address")
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    result = asyncio.run(run(args) if args.command == "run" else verify(args))
    if args.command == "verify" or args.progress is None:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")


if __name__ == "__main__":
    main()
