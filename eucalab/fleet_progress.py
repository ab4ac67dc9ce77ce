"""The fleet's progress: what each simulated NC did, the registrar endpoint they follow, and the
JSON progress file (replaced atomically) that tests and benchmarks read while the fleet runs."""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from eucareg.agent.locate import Endpoint


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
    # used from then on is the load generator's cost of the burst (bench/fleet_burst.py reports
    # it).
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
