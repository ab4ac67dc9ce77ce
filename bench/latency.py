"""The latency benchmark: one NC at a time joins a registered cluster, timed from its first
announcement to its credentials on disk (both from its own JSON log); also the registrar's idle
RSS and its worst event-loop lag over the runs."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import CLOUD, loop_lag, reset_loop_lag, rss_kib
from eucalab.cloud import LabCloud
from eucalab.cloud_probes import all_registered
from eucalab.lab import Lab
from eucalab.topology import parse_topology


def log_times(text: str, needles: dict[str, str]) -> dict[str, float]:
    """First timestamp of each needle in an agent's JSON log."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        for name, needle in needles.items():
            if name not in found and needle in entry.get("msg", ""):
                found[name] = float(entry["ts"])
    return found


def wait_log(cloud: LabCloud, host: str, needle: str, timeout: float) -> None:
    cloud.agents[host].wait_for_log(needle, timeout=timeout)


def bench_latency(work: Path, runs: int) -> dict[str, Any]:
    """One NC at a time joins a registered cluster; announcement -> credentials on disk."""
    nodes = [f"node{i}" for i in range(1, runs + 1)]
    plan: dict[str, dict[str, str | None]] = {"cloud": CLOUD}
    plan.update({n: {"nc": "cluster1"} for n in nodes})
    topology = parse_topology(
        "subnet lan 10.77.0.0/16\n" + "\n".join(f"host {h} lan" for h in plan)
    )
    with Lab(topology, work / "lab-latency") as lab:
        cloud = LabCloud(lab, plan, work / "cloud-latency")
        cloud.start("cloud")
        cloud.wait_for("cloud", all_registered({"walrus": 1, "cc": 1, "sc": 1}), timeout=60)
        time.sleep(2.0)
        idle_rss = rss_kib(lab, cloud, "cloud")
        reset_loop_lag(cloud, "cloud")
        samples = []
        for node in nodes:
            cloud.start(node)
            wait_log(cloud, node, "credentials for nc", timeout=30)
            times = log_times(
                cloud.logs(node), {"announce": "announcing nc", "done": "credentials for nc"}
            )
            samples.append(times["done"] - times["announce"])
            cloud.stop(node)  # keep the machine quiet for the next sample
            print(f"  latency run {len(samples):2d}: {samples[-1] * 1000:7.1f} ms", flush=True)
        lag = loop_lag(reset_loop_lag(cloud, "cloud"))
        lag_period = time.time() - lag["since"]
        time.sleep(2.0)
        rss_after = rss_kib(lab, cloud, "cloud")
    return {
        "runs": len(samples),
        "median_ms": statistics.median(samples) * 1000,
        "p90_ms": sorted(samples)[int(len(samples) * 0.9) - 1] * 1000,
        "min_ms": min(samples) * 1000,
        "max_ms": max(samples) * 1000,
        "registrar_idle_rss_kib": idle_rss,
        "registrar_rss_after_runs_kib": rss_after,
        "registrar_worst_loop_lag_ms": lag["worst_ms"],
        "loop_lag_period_s": lag_period,
    }
