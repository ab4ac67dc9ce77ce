"""Hundreds of real agents falling back to HTTP at once, a few processes of them (issue 9).

`python -m eucalab.fallback_fleet run …`, inside a lab namespace: `--count` agents
(`eucareg.agent.host.Agent`), each running one NC with its own state directory, identity (id
and RSA key from a key cache in the eucalab.fleet layout) and source address (the caller adds
the addresses to the namespace's interface). mDNS is a no-op, so each NC is heard only over
HTTP: `fallback_registrar` is its CC's registrar, and the agent's own code announces
(POST /v1/announce), collects its credentials (POST /v1/credentials), backs off and honours
Retry-After, exactly as `eucareg agent` does. Several such processes (`--first-index`) make
one fleet: every agent of every process falls back at the same moment, `--fallback-at`.

What differs from an agent process is outside the agent's logic:

- The HTTP client: the agent's own session connects from the host's primary address, which the
  registrar refuses for a component announcing another (without a join token, addr= must be
  the request's source). Here each agent's session connects from its NC's address, and carries
  an aiohttp trace recording every request: when it was sent, and what came back (status,
  Retry-After) or why it failed.
- The moment: `fallback_after` (how long mDNS gets the first word) is set so that it runs out
  at `--fallback-at` (a time.monotonic() value, shared by all processes on the machine) for
  every agent: a rack booted together, falling back together.
- Many agents share one process and its GIL. Work an agent does in a thread (an RSA key
  validation when its credentials arrive, ~35 ms) stalls the loop of all the others, so a retry
  timer may fire late. The fleet probes its own event loop and reports when it ran late
  (`stalls`), so that a late retry can be told from an agent's choice; spreading the fleet
  over several processes keeps those stalls short.

While it runs, the process keeps `progress.json` in `--work` up to date (atomically replaced);
on SIGTERM it stops every agent (bounded) and writes `requests.json`: every request of each
NC, and each "retrying in N s" an agent logged. One agent of the fleet is
fallback_fleet_agent.py; `load`, `attempts` and `histogram` (fallback_fleet_analysis.py) turn
those into collection attempts and text bars for a test's output.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from eucalab.fallback_fleet_agent import (
    DelayLog,
    FleetAgent,
    Node,
    NoMdns,
    node_config,
    seed_identity,
)
from eucalab.fleet_nodes import fleet_addresses, fleet_identities
from eucalab.fleet_progress import write_json_atomic
from eucareg.agent.host import Agent
from eucareg.agent.timing import AgentTiming

log = logging.getLogger("eucalab.fallback_fleet")

SAVE_INTERVAL = 0.5  # seconds between writes of the progress file
STOP_BUDGET = 15.0  # seconds all agents of a process together may take to stop
LAG_TICK = 0.02  # seconds between the fleet's probes of its own event loop
LAG_SHOWN = 0.1  # a probe this late is recorded: the fleet itself was stalled then


async def run(args: argparse.Namespace) -> int:
    work = Path(args.work)
    first, count = args.first_index, args.count
    identities = fleet_identities(Path(args.cache), first + count, args.id_prefix)[first:]
    addresses = fleet_addresses(args.first_address, first + count)[first:]
    nodes = {
        ident.component_id: Node(ident.component_id, address)
        for ident, address in zip(identities, addresses, strict=True)
    }
    for i, ident in enumerate(identities):
        seed_identity(work / "nodes" / f"{first + i:04d}" / "state", ident.component_id, ident.key)
    logging.getLogger().addHandler(DelayLog(nodes))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    # Built in one go, each told to wait for mDNS until the fleet's common fallback moment.
    wait = args.fallback_at - time.monotonic()
    if wait <= 0.5:
        print(f"fleet: the fallback moment passed {-wait:.1f} s ago; start the fleet sooner")
        return 2
    agents = [
        FleetAgent(
            node_config(args, first + i, address, wait),
            node=node,
            backend=NoMdns(),
            # The worst case on purpose: every agent falls back at the very same moment.
            timing=AgentTiming(fallback_spread=0.0),
        )
        for i, (address, node) in enumerate(zip(addresses, nodes.values(), strict=True))
    ]
    started: list[FleetAgent] = []
    stalls: list[tuple[float, float]] = []  # (when, seconds late): the fleet's own lag

    def summary() -> dict[str, Any]:
        return {
            "fallback_at": args.fallback_at,
            "wall_offset": time.time() - time.monotonic(),  # our clock to the registrar's
            "count": count,
            "started": len(started),
            "registered": sum(1 for a in agents if a.registered()),
            "unregistered": [a.node.component_id for a in agents if not a.registered()][:20],
        }

    probe = asyncio.create_task(_probe_lag(stalls))
    try:

        async def start(agent: FleetAgent) -> None:
            await agent.start()
            started.append(agent)

        await asyncio.gather(*(start(a) for a in agents))
        print(
            f"started {len(started)} agents; they fall back in "
            f"{args.fallback_at - time.monotonic():.1f} s",
            flush=True,
        )
        deadline = loop.time() + args.timeout
        done = False
        while not stop.is_set() and loop.time() < deadline:
            for agent in agents:
                if agent.node.registered_at is None and agent.registered():
                    agent.node.registered_at = time.monotonic()
            write_json_atomic(work / "progress.json", summary())
            if not done and all(a.registered() for a in agents):
                print(f"all {len(agents)} registered", flush=True)
                done = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SAVE_INTERVAL)
        if not stop.is_set():
            print("fleet: time is up", flush=True)
    finally:
        probe.cancel()
        stopped = await _stop_all(started)
        result = {
            **summary(),
            "stopped_cleanly": stopped,
            "requests": {cid: [asdict(r) for r in n.requests] for cid, n in nodes.items()},
            "delays": {cid: n.delays for cid, n in nodes.items()},
            "registered_at": {cid: n.registered_at for cid, n in nodes.items()},
            "stalls": stalls,
        }
        write_json_atomic(work / "progress.json", summary())
        write_json_atomic(work / "requests.json", result)
        print("fleet stopped", flush=True)
    return 0


async def _probe_lag(stalls: list[tuple[float, float]]) -> None:
    while True:
        asked = time.monotonic()
        await asyncio.sleep(LAG_TICK)
        late = time.monotonic() - asked - LAG_TICK
        if late >= LAG_SHOWN:
            stalls.append((asked, late))


async def _stop_all(agents: Sequence[Agent]) -> int:
    """Stop every agent at once, all within STOP_BUDGET; how many stopped cleanly."""
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(a.stop() for a in agents), return_exceptions=True), STOP_BUDGET
        )
    except TimeoutError:
        log.warning("the agents did not stop within %.0f s", STOP_BUDGET)
        return 0
    for result in results:
        if isinstance(result, BaseException):
            log.warning("an agent did not stop cleanly: %r", result)
    return sum(1 for r in results if not isinstance(r, BaseException))


def add_addresses_argv(first: str, count: int, prefix_len: int, device: str = "eth0") -> list[str]:
    """The command that gives a lab host the fleet's addresses (run it in the host's netns)."""
    return [
        "sh",
        "-c",
        f'for a; do ip addr add "$a/{prefix_len}" dev {device} || exit 1; done',
        "sh",
        *fleet_addresses(first, count),
    ]


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m eucalab.fallback_fleet", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("--count", type=int, required=True, help="NCs in this process")
    p.add_argument("--first-index", type=int, default=0, help="this process's first NC")
    p.add_argument("--first-address", required=True, help="the address of NC 0")
    p.add_argument("--registrar", required=True, help="fallback_registrar: https://ADDRESS:PORT")
    p.add_argument("--pin", required=True, help="the cloud CA's fingerprint (ca_fingerprint)")
    p.add_argument("--cluster", default="cluster1")
    p.add_argument("--cache", required=True, help="key cache (eucalab.fleet layout)")
    p.add_argument("--id-prefix", default="fleet", help="ids are nc-<prefix>000000, …")
    p.add_argument("--work", required=True, help="state dirs, progress.json, requests.json")
    p.add_argument(
        "--fallback-at", type=float, required=True, help="time.monotonic() to fall back at"
    )
    p.add_argument("--timeout", type=float, default=240.0)
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(
        stream=sys.stdout,
        level=logging.WARNING,
        format="%(created).3f %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("eucareg").setLevel(logging.INFO)
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
