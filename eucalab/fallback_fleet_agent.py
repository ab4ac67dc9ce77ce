"""One NC agent of a fallback fleet (fallback_fleet.py): the real agent, heard over HTTP only,
whose HTTP client connects from the NC's own address and traces every request; its
configuration, its seeded identity, and the retry delays it logs.
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp

from eucareg.agent.host import Agent
from eucareg.config.file import Config, from_mapping
from eucareg.core.model import IPAddress, Role
from eucareg.mdns.types import ServiceSpec, SightingHandler
from eucareg.pki import credentials as cred
from eucareg.pki import keypairs

# What an agent logs when a collection attempt failed (eucareg/agent/collector.py).
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

    def _client(self, address: IPAddress) -> aiohttp.ClientSession:
        if self._own is None:
            base = super()._client(address)  # the agent's own session: its timeouts
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


def seed_identity(state_dir: Path, component_id: str, key: keypairs.PrivateKey) -> None:
    """The identity an agent makes at its first start, with a cached key (no RSA generation)."""
    directory = state_dir / "identity"
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    state_dir.chmod(0o700)
    (directory / "nc.id").write_text(component_id + "\n")
    cred.write_atomic(directory / "nc.key.pem", keypairs.key_pem(key))
