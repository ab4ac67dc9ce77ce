"""eucareg benchmarks: NC registration latency, 200 NCs at once, and the registrar's idle RSS.

Run as root with `make bench` (or `.venv/bin/python -m bench.run`). Everything happens in a
lab of network namespaces that is torn down afterwards; results go to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from eucalab.cloud import LabCloud, all_registered
from eucalab.lab import Lab, cleanup_stale, parse_topology

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CLOUD: dict[str, str | None] = {"clc": None, "walrus": None, "cc": "cluster1", "sc": "cluster1"}


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


def rss_kib(lab: Lab, cloud: LabCloud, host: str) -> int:
    pid = cloud.agents[host].pid
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


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
    }


def bench_fleet(work: Path, count: int) -> dict[str, Any]:
    """N simulated NCs announce at once from one host; time until all hold credentials."""
    plan: dict[str, dict[str, str | None]] = {"cloud": CLOUD}
    topology = parse_topology("subnet lan 10.77.0.0/16\nhost cloud lan\nhost fleet lan")
    with Lab(topology, work / "lab-fleet") as lab:
        cloud = LabCloud(lab, plan, work / "cloud-fleet")
        cloud.start("cloud")
        cloud.wait_for("cloud", all_registered({"walrus": 1, "cc": 1, "sc": 1}), timeout=60)
        # Give every simulated NC a real address of its own on the fleet host.
        first = 2 * 256 + 1  # 10.77.2.1 onwards
        for i in range(count):
            n = first + i
            lab.run(
                "fleet",
                ["ip", "addr", "add", f"10.77.{n // 256}.{n % 256}/16", "dev", "eth0"],
                check=True,
            )
        result = lab.run(
            "fleet",
            [
                sys.executable,
                "-m",
                "bench.fleet",
                f"--count={count}",
                f"--first-address=10.77.{first // 256}.{first % 256}",
                f"--cache={ROOT / 'bench' / 'results' / 'fleet-keys'}",
                f"--keys={work / 'fleet-credentials'}",
            ],
            timeout=300,
            check=True,
        )
        fleet: dict[str, Any] = json.loads(result.stdout)
        status = cloud.status("cloud")
        registered = sum(
            1
            for cluster in status["tree"]["clusters"]
            for row in cluster["nc"]
            if row["status"] == "registered"
        )
        hook_runs = sum(1 for line in cloud.hook_log("cloud") if line.startswith("node "))
        fleet["registrar_says_registered"] = registered
        fleet["node_hook_runs"] = hook_runs
        fleet["registrar_rss_after_kib"] = rss_kib(lab, cloud, "cloud")
    return fleet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=25, help="latency samples (>= 20)")
    parser.add_argument("--fleet", type=int, default=200, help="NCs announced at once")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    cleanup_stale()
    with tempfile.TemporaryDirectory(prefix="eucareg-bench-") as tmp:
        work = Path(tmp)
        print(f"latency: {args.runs} NCs joining one at a time", flush=True)
        latency = bench_latency(work, args.runs)
        print(f"fleet: {args.fleet} NCs announced at once", flush=True)
        fleet = bench_fleet(work, args.fleet)
    results = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "latency": latency, "fleet": fleet}
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
