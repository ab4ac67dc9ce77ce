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
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from eucalab.fleet_collect import API_PORT, LONG_POLL, collect, spec, watch_registrar
from eucalab.fleet_nodes import fleet_addresses, fleet_identities
from eucalab.fleet_progress import FleetState, NodeProgress, write_json_atomic
from eucareg.agent.collect import COLLECT_ERRORS, collect_credentials
from eucareg.agent.locate import Endpoint
from eucareg.core.model import Role
from eucareg.mdns.zeroconf_backend import ZeroconfBackend
from eucareg.pki import certificates, tls
from eucareg.pki import credentials as cred

SAVE_INTERVAL = 0.5  # seconds between writes of the progress file, at least


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
    watch_registrar(backend, state, args.cluster)
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
                await backend.publish(spec(ident, addresses[i], args.cluster, i))
                state.nodes[ident.component_id].announced_at = time.time()
            print(f"published batch {batch}: {len(members)} services", flush=True)
            tasks.extend(
                asyncio.create_task(
                    collect(state, ident, session, keys, args.pin, args.cluster, changed)
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
