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
NC, and each "retrying in N s" an agent logged. `load`, `attempts` and `histogram` turn those
into collection attempts and text bars for a test's output.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import re
import signal
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp

from eucalab.fleet import fleet_addresses, fleet_identities, write_json_atomic
from eucareg.agent.host import Agent
from eucareg.agent.timing import AgentTiming
from eucareg.config.file import Config, from_mapping
from eucareg.core.model import Role
from eucareg.mdns.types import ServiceSpec, SightingHandler
from eucareg.pki import credentials as cred

log = logging.getLogger("eucalab.fallback_fleet")

SAVE_INTERVAL = 0.5  # seconds between writes of the progress file
STOP_BUDGET = 15.0  # seconds all agents of a process together may take to stop
LAG_TICK = 0.02  # seconds between the fleet's probes of its own event loop
LAG_SHOWN = 0.1  # a probe this late is recorded: the fleet itself was stalled then
# What an agent logs when a collection attempt failed (eucareg/agent/component.py).
RETRYING = re.compile(r"collecting credentials of (\S+) failed: .*; retrying in ([0-9.]+) s$", re.S)


class NoMdns:
    """An mDNS backend that publishes nothing and hears nothing: HTTP only."""

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def publish(self, spec: ServiceSpec) -> None:
        return None

    async def withdraw(self, instance: str) -> None:
        return None

    def greet(self, instance: str) -> bool:
        return False

    def watch(self, handler: SightingHandler) -> None:
        return None


@dataclass
class Request:
    """One HTTP request an NC's agent sent; times are time.monotonic()."""

    path: str
    start: float
    registered: bool  # the NC held credentials when it sent it
    end: float | None = None
    status: int | None = None
    retry_after: str | None = None  # the header, as it came
    error: str | None = None


@dataclass
class Node:
    component_id: str
    address: str
    requests: list[Request] = field(default_factory=list)
    delays: list[tuple[float, float]] = field(default_factory=list)  # (logged at, seconds)
    registered_at: float | None = None


class FleetAgent(Agent):
    """An Agent whose HTTP client connects from its NC's own address, traced."""

    def __init__(self, config: Config, *, node: Node, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.node = node
        self._own: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._own is None:
            base = super()._client()  # the agent's own session: its timeouts
            self._own = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(local_addr=(self.node.address, 0)),
                timeout=base.timeout,
                trace_configs=[self._tracer()],
            )
        return self._own

    def registered(self) -> bool:
        comp = self.runtime(Role.NC)
        return comp is not None and comp.registered

    def _tracer(self) -> aiohttp.TraceConfig:
        node = self.node

        async def start(_session: Any, ctx: SimpleNamespace, params: Any) -> None:
            ctx.request = Request(params.url.path, time.monotonic(), self.registered())
            node.requests.append(ctx.request)

        async def end(_session: Any, ctx: SimpleNamespace, params: Any) -> None:
            ctx.request.end = time.monotonic()
            ctx.request.status = params.response.status
            ctx.request.retry_after = params.response.headers.get("Retry-After")

        async def failed(_session: Any, ctx: SimpleNamespace, params: Any) -> None:
            ctx.request.end = time.monotonic()
            exc = params.exception
            ctx.request.error = f"{type(exc).__name__}: {exc}"[:300]

        trace = aiohttp.TraceConfig()
        trace.on_request_start.append(start)
        trace.on_request_end.append(end)
        trace.on_request_exception.append(failed)
        return trace

    async def stop(self) -> None:
        try:
            await super().stop()
        finally:
            if self._own is not None:
                await self._own.close()


class DelayLog(logging.Handler):
    """Records each "retrying in N s" an agent logs, with the monotonic time it said so."""

    def __init__(self, nodes: dict[str, Node]) -> None:
        super().__init__(logging.WARNING)
        self.nodes = nodes

    def emit(self, record: logging.LogRecord) -> None:
        match = RETRYING.match(record.getMessage())
        node = self.nodes.get(match[1]) if match else None
        if match and node is not None:
            node.delays.append((time.monotonic(), float(match[2])))


def node_config(args: argparse.Namespace, index: int, address: str, wait: float) -> Config:
    base = Path(args.work) / "nodes" / f"{index:04d}"
    return from_mapping(
        {
            "address": address,
            "state_dir": str(base / "state"),
            "hook_dir": str(base / "hooks"),
            "fallback_registrar": args.registrar,
            "fallback_after": wait,
            "ca_fingerprint": args.pin,
            # No sshd to probe. The credential files are polled this often where inotify runs
            # out (128 instances per user by default: one per agent).
            "preconditions": {"sshd": False, "recheck_interval": "5s"},
            # HTTP only (NoMdns), but said explicitly: a lab agent never chooses "auto".
            "mdns": {"backend": "zeroconf"},
            "components": {"nc": {"cluster": args.cluster, "installed": True}},
        }
    )


def seed_identity(state_dir: Path, component_id: str, key: cred.PrivateKey) -> None:
    """The identity an agent makes at its first start, with a cached key (no RSA generation)."""
    directory = state_dir / "identity"
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    state_dir.chmod(0o700)
    (directory / "nc.id").write_text(component_id + "\n")
    cred.write_atomic(directory / "nc.key.pem", cred.key_pem(key))


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


# -- analysis (in the test process) ----------------------------------------------------------


def load(paths: Iterable[Path]) -> dict[str, Any]:
    """The requests.json of each process of one fleet, merged."""
    merged: dict[str, Any] = {"requests": {}, "delays": {}, "registered_at": {}, "stalls": []}
    for path in paths:
        data = json.loads(path.read_text())
        if merged.setdefault("fallback_at", data["fallback_at"]) != data["fallback_at"]:
            raise ValueError(f"{path}: another fleet's fallback moment")
        merged.setdefault("wall_offset", data["wall_offset"])
        for key in ("requests", "delays", "registered_at"):
            merged[key].update(data[key])
        merged["stalls"].extend(data["stalls"])
    return merged


@dataclass
class Attempt:
    """One collection attempt of an NC not yet registered: an announcement and, if that was
    taken, a credential request. Times in seconds from the fallback moment."""

    component_id: str
    index: int  # 0: the NC's first attempt
    start: float  # when its announcement was sent
    end: float  # when its last request ended
    outcome: str  # "ok", "refused", "unreachable", "dropped", "http-429", …, "error"
    retry_after: float | None = None  # seconds the registrar asked for, when it sent us away
    logged_delay: float | None = None  # the wait the agent said it would make after it

    @property
    def failed(self) -> bool:
        return self.outcome != "ok"


def attempts(result: dict[str, Any]) -> dict[str, list[Attempt]]:
    """Each NC's attempts before it was registered, in order."""
    t0 = float(result["fallback_at"])
    out: dict[str, list[Attempt]] = {}
    for cid, requests in result["requests"].items():
        mine: list[Attempt] = []
        for req in requests:
            if req["registered"]:
                continue
            if req["path"] == "/v1/announce":
                mine.append(Attempt(cid, len(mine), req["start"] - t0, req["start"] - t0, "ok"))
            elif not mine:
                continue
            current = mine[-1]
            current.end = (req["end"] if req["end"] is not None else req["start"]) - t0
            if current.outcome == "ok":
                current.outcome = outcome(req)
                if req["status"] in (429, 503) and req["retry_after"] is not None:
                    with contextlib.suppress(ValueError):
                        current.retry_after = float(req["retry_after"])
        delays = sorted((at - t0, d) for at, d in result["delays"].get(cid, []))
        for attempt, after in zip(mine, [*mine[1:], None], strict=True):
            until = after.start if after is not None else math.inf
            said = [d for at, d in delays if attempt.end - 0.001 <= at <= until]
            if attempt.failed and said:
                attempt.logged_delay = said[0]
        out[cid] = mine
    return out


DROPPED = ("ServerDisconnectedError", "ClientOSError", "TimeoutError", "ServerTimeoutError")


def outcome(req: dict[str, Any]) -> str:
    """What one request came to, in a word."""
    error = req["error"]
    if error is not None:
        if error.startswith("CancelledError"):
            return "ok"  # the agent dropped it (its state changed): not a failure
        if "No route to host" in error or "unreachable" in error:
            return "unreachable"
        if "Connect call failed" in error or "Connection refused" in error:
            return "refused"
        if error.startswith(DROPPED):
            return "dropped"  # the connection broke, or nothing came back in time
        return "error"
    status = int(req["status"])
    return "ok" if status < 300 else f"http-{status}"


def histogram(
    items: Iterable[Attempt],
    width: float,
    *,
    label: Callable[[Attempt], str] = lambda a: a.outcome,
    bar: int = 50,
    marks: dict[float, str] | None = None,
) -> str:
    """Text bars: attempts per `width` seconds from the fallback moment, split by `label`;
    `marks` notes events (seconds: text) against the bucket they fall in."""
    items = list(items)
    if not items:
        return "(no attempts)"
    buckets: dict[int, list[Attempt]] = {}
    for a in items:
        buckets.setdefault(math.floor(a.start / width), []).append(a)
    peak = max(len(b) for b in buckets.values())
    kinds = sorted({label(a) for a in items})
    notes: dict[int, list[str]] = {}
    for at, text in (marks or {}).items():
        notes.setdefault(math.floor(at / width), []).append(text)
    first = min([*buckets, *notes])
    last = max([*buckets, *notes])
    lines = [f"  {'from':>7}  {'':{bar}}  {'n':>4}  " + "  ".join(kinds)]
    for k in range(first, last + 1):
        mine = buckets.get(k, [])
        shown = "#" * math.ceil(len(mine) * bar / peak) if mine else ""
        split = "  ".join(
            f"{sum(1 for a in mine if label(a) == kind):>{len(kind)}}" for kind in kinds
        )
        note = f"  <- {'; '.join(notes[k])}" if k in notes else ""
        lines.append(f"  {k * width:+7.2f}s {shown:{bar}}  {len(mine):>4}  {split}{note}")
    return "\n".join(lines)


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
