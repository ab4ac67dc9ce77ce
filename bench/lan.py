"""What a crowded LAN costs one host: a real NC agent (and the registrar) on a LAN where N
simulated NCs power on at once, then stay. Packets and bytes each host received, receive-buffer
drops, and the agent's CPU and memory, during the burst and per minute afterwards.

`python -m bench.lan --count 1000` (as root) prints the figures as JSON; `bench.run --only lan`
puts them in latest.json as `lan_<N>`. docs/performance.md, "A scale limit", uses them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    FLEET_FIRST_ADDRESS,
    KEY_CACHE,
    add_addresses,
    cloud_lab,
    cloud_pin,
    python_module,
)
from bench.procstat import cpu, memory_kib
from eucalab.fleet_nodes import fleet_identities
from eucalab.fleet_progress import read_progress
from eucalab.lab import Lab
from eucalab.process import LabProcess

HOSTS = ("cloud", "node1", "fleet")
KEEPALIVE_SETTLE = 80.0


def counters(lab: Lab, host: str) -> dict[str, int]:
    """UDP datagrams received and dropped for a full receive buffer, and eth0's received
    packets and bytes, in the host's own network namespace."""
    text = lab.run(host, ["cat", "/proc/net/snmp", "/proc/net/dev"], check=True).stdout
    lines = text.splitlines()
    udp = [line.split() for line in lines if line.startswith("Udp:")]
    names, values = udp[0][1:], [int(v) for v in udp[1][1:]]
    snmp = dict(zip(names, values, strict=True))
    dev = next(line for line in lines if line.strip().startswith("eth0:"))
    fields = dev.split(":", 1)[1].split()
    return {
        "udp_in": snmp["InDatagrams"],
        "udp_rcvbuf_errors": snmp["RcvbufErrors"],
        "rx_bytes": int(fields[0]),
        "rx_packets": int(fields[1]),
    }


def memory_mib(pid: int) -> dict[str, float]:
    held = memory_kib(pid)
    return {
        "rss_mib": round(held["rss_kib"] / 1024, 1),
        "uss_mib": round(held["uss_kib"] / 1024, 1),
    }


def snapshot(lab: Lab, pids: dict[str, int]) -> dict[str, Any]:
    return {
        "at": time.monotonic(),
        "net": {host: counters(lab, host) for host in HOSTS},
        "cpu": {name: cpu(pid).own_s for name, pid in pids.items()},
    }


def delta(
    before: dict[str, Any], after: dict[str, Any], per_minute: bool = False
) -> dict[str, Any]:
    seconds = after["at"] - before["at"]
    scale = 60.0 / seconds if per_minute else 1.0
    out: dict[str, Any] = {"seconds": round(seconds, 2)}
    for host in HOSTS:
        out[host] = {
            key: round((after["net"][host][key] - value) * scale, 1)
            for key, value in before["net"][host].items()
        }
    for name, value in before["cpu"].items():
        out[f"{name}_cpu_s"] = round((after["cpu"][name] - value) * scale, 3)
    return out


def wait_progress(path: Path, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = read_progress(path)
        if progress is not None and progress.get("finished_at"):
            return progress
        time.sleep(0.5)
    raise TimeoutError(f"the fleet did not finish within {timeout:g}s ({path})")


def bench_lan(work: Path, count: int, steady: float = 60.0) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    progress_file = work / "fleet.json"
    fleet_identities(KEY_CACHE, count)  # cached keys: making them is not what is measured
    extra: dict[str, dict[str, str | None]] = {"node1": {"nc": "cluster1"}, "fleet": {}}
    with cloud_lab(work, "lan", extra) as (lab, cloud):
        cloud.start("node1")
        cloud.agents["node1"].wait_for_log("credentials for nc", timeout=60)
        add_addresses(lab, "fleet", count)
        pids = {"node_agent": cloud.agents["node1"].pid, "registrar": cloud.agents["cloud"].pid}
        time.sleep(5.0)  # the cloud and node1 settle
        quiet_start = snapshot(lab, pids)
        time.sleep(30.0)
        quiet = delta(quiet_start, snapshot(lab, pids), per_minute=True)
        node_before = memory_mib(pids["node_agent"])
        start = snapshot(lab, pids)
        fleet: LabProcess = lab.spawn(
            "fleet",
            "fleet",
            [
                *python_module("eucalab.fleet"),
                "run",
                f"--count={count}",
                f"--cache={KEY_CACHE}",
                f"--keys={work / 'fleet-credentials'}",
                f"--pin={cloud_pin(cloud)}",
                f"--first-address={FLEET_FIRST_ADDRESS}",
                f"--progress={progress_file}",
                "--timeout=300",
            ],
        )
        try:
            progress = wait_progress(progress_file, 330)
            time.sleep(2.0)
            burst_end = snapshot(lab, pids)
            burst = delta(start, burst_end)
            node_after_burst = memory_mib(pids["node_agent"])
            # The registrar closes the fleet's idle HTTPS connections after aiohttp's 75 s
            # keep-alive: 1,000 connections' worth of FIN and ACK that is not steady state.
            time.sleep(KEEPALIVE_SETTLE)
            steady_start = snapshot(lab, pids)
            time.sleep(steady)
            steady_end = snapshot(lab, pids)
            node_after_steady = memory_mib(pids["node_agent"])
        finally:
            lab.stop(fleet, timeout=30)
        collected = sum(1 for n in progress["nodes"] if n["collected_at"])
    return {
        "count": count,
        "collected": collected,
        "quiet_per_minute": quiet,
        "burst": burst,
        "settle": delta(burst_end, steady_start),
        "steady_per_minute": delta(steady_start, steady_end, per_minute=True),
        "node_agent_memory": {
            "before": node_before,
            "after_burst": node_after_burst,
            "after_steady": node_after_steady,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--steady", type=float, default=60.0, help="seconds of steady state")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="eucareg-bench-lan-") as tmp:
        result = bench_lan(Path(tmp), args.count, args.steady)
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
