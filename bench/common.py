"""What the benchmark's parts share: where results go, the cloud they register with, a lab
with that cloud running and converged, and the registrar's RSS and event-loop lag."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from eucalab.cloud import LabCloud
from eucalab.cloud_probes import all_registered
from eucalab.fleet_nodes import fleet_addresses
from eucalab.lab import Lab
from eucalab.topology import parse_topology
from eucareg.pki import certificates
from eucareg.pki import credentials as cred

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
KEY_CACHE = RESULTS / "fleet-keys"  # the fleet's keys, made once (eucalab.fleet_nodes layout)
CLOUD: dict[str, str | None] = {"clc": None, "walrus": None, "cc": "cluster1", "sc": "cluster1"}
FLEET_FIRST_ADDRESS = "10.77.2.1"


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


@contextlib.contextmanager
def cloud_lab(
    work: Path,
    name: str,
    extra_hosts: dict[str, dict[str, str | None]],
    settings: dict[str, Any] | None = None,
) -> Iterator[tuple[Lab, LabCloud]]:
    """A lab with the cloud host (CLC, Walrus, CC, SC, its cluster registered) and the extra
    hosts (those with roles get a plan; the others, an empty one: started by nobody), torn
    down on the way out whatever happened. `settings` go to LabCloud."""
    plan: dict[str, dict[str, str | None]] = {"cloud": CLOUD, **extra_hosts}
    topology = parse_topology(
        "subnet lan 10.77.0.0/16\n" + "\n".join(f"host {h} lan" for h in plan)
    )
    with Lab(topology, work / f"lab-{name}") as lab:
        cloud = LabCloud(lab, plan, work / f"cloud-{name}", settings or {})
        cloud.start("cloud")
        cloud.wait_for("cloud", all_registered({"walrus": 1, "cc": 1, "sc": 1}), timeout=60)
        yield lab, cloud


def cloud_pin(cloud: LabCloud) -> str:
    """The fingerprint of the cloud CA, which NCs pin."""
    return certificates.cert_fingerprint(
        certificates.load_cert(cloud.key_dir("cloud") / cred.CLOUD_CERT)
    )


def add_addresses(lab: Lab, host: str, count: int, first: str = FLEET_FIRST_ADDRESS) -> None:
    """Give a host `count` more addresses (one per simulated NC) on its interface."""
    lab.run(
        host,
        [
            "sh",
            "-c",
            'for a; do ip addr add "$a/16" dev eth0 || exit 1; done',
            "sh",
            *fleet_addresses(first, count),
        ],
        timeout=120,
        check=True,
    )


def python_module(module: str) -> list[str]:
    return [sys.executable, "-m", module]


def wait_until(check: Any, timeout: float, interval: float = 0.05) -> bool:
    """Call check() until it is true or `timeout` seconds passed; whether it became true."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def rss_kib(lab: Lab, cloud: LabCloud, host: str) -> int:
    pid = cloud.agents[host].pid
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def reset_loop_lag(cloud: LabCloud, host: str) -> dict[str, Any]:
    """End the registrar's current loop-lag period (GET /v1/status?lag=reset) and start a new
    one; the answer is the whole status, with the lag of the period that ended."""
    return cloud.api(host, "/v1/status?lag=reset")


def loop_lag(status: dict[str, Any]) -> dict[str, Any]:
    lag: dict[str, Any] = status["registrar"]["loop_lag"]
    return lag
