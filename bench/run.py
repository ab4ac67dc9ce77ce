"""eucareg benchmarks: NC registration latency, 200 NCs at once, the registrar's idle RSS and
its worst event-loop lag while it works.

Run as root with `make bench` (or `.venv/bin/python -m bench.run`). Everything happens in a
lab of network namespaces that is torn down afterwards; results go to bench/results/. The NCs
announced at once are the lab's fleet of simulated NCs (`eucalab/fleet.py`, also used by the
crash tests); an NC counts only once it holds credentials it verified against its own key and
the pinned cloud CA, and the registrar confirms afterwards that they are current.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from eucalab.cloud import LabCloud, all_registered
from eucalab.fleet import fleet_addresses, fleet_identities, read_progress
from eucalab.lab import Lab, cleanup_stale, parse_topology
from eucareg.pki import credentials as cred

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CLOUD: dict[str, str | None] = {"clc": None, "walrus": None, "cc": "cluster1", "sc": "cluster1"}
FLEET_FIRST_ADDRESS = "10.77.2.1"
FLEET_TIMEOUT = 300.0  # seconds the fleet may take before it gives up on missing NCs


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


def reset_loop_lag(cloud: LabCloud, host: str) -> dict[str, Any]:
    """End the registrar's current loop-lag period (GET /v1/status?lag=reset) and start a new
    one; the answer is the whole status, with the lag of the period that ended."""
    return cloud.api(host, "/v1/status?lag=reset")


def loop_lag(status: dict[str, Any]) -> dict[str, Any]:
    lag: dict[str, Any] = status["registrar"]["loop_lag"]
    return lag


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


def fleet_summary(progress: dict[str, Any]) -> dict[str, Any]:
    """Timings of the NCs that hold verified credentials, and the list of those that do not."""
    nodes = progress["nodes"]
    done = [n for n in nodes if n["collected_at"] is not None]
    announced = [n["announced_at"] for n in nodes if n["announced_at"] is not None]
    latencies = sorted(n["collected_at"] - n["announced_at"] for n in done)
    summary: dict[str, Any] = {
        "count": len(nodes),
        "collected": len(done),
        "missing": [
            {
                "component_id": n["component_id"],
                "announced": n["announced_at"] is not None,
                "requests": n["requests"],
                "errors": n["errors"],
                "last_error": n["last_error"],
            }
            for n in nodes
            if n["collected_at"] is None
        ],
        "collector_errors": sum(n["errors"] for n in nodes),
        "requests": sum(n["requests"] for n in nodes),
    }
    if announced:
        summary["announce_spread_s"] = max(announced) - min(announced)
    if done and announced:
        summary["first_announcement_to_last_credentials_s"] = max(
            n["collected_at"] for n in done
        ) - min(announced)
        summary["latency_median_s"] = statistics.median(latencies)
        summary["latency_max_s"] = latencies[-1]
    return summary


def bench_fleet(work: Path, count: int) -> dict[str, Any]:
    """N simulated NCs announce at once from one host; time until all hold verified
    credentials, and the registrar's worst event-loop lag meanwhile."""
    plan: dict[str, dict[str, str | None]] = {"cloud": CLOUD}
    topology = parse_topology("subnet lan 10.77.0.0/16\nhost cloud lan\nhost fleet lan")
    cache = RESULTS / "fleet-keys"
    work.mkdir(parents=True, exist_ok=True)
    keys = work / "fleet-credentials"
    progress_file = work / "fleet.json"
    with Lab(topology, work / "lab-fleet") as lab:
        cloud = LabCloud(lab, plan, work / "cloud-fleet")
        cloud.start("cloud")
        cloud.wait_for("cloud", all_registered({"walrus": 1, "cc": 1, "sc": 1}), timeout=60)
        pin = cred.cert_fingerprint(cred.load_cert(cloud.key_dir("cloud") / cred.CLOUD_CERT))
        # Give every simulated NC a real address of its own on the fleet host.
        lab.run(
            "fleet",
            [
                "sh",
                "-c",
                'for a; do ip addr add "$a/16" dev eth0 || exit 1; done',
                "sh",
                *fleet_addresses(FLEET_FIRST_ADDRESS, count),
            ],
            check=True,
        )
        # Make the keys first (cached between runs): generating them is not what is measured.
        fleet_ids = {ident.component_id for ident in fleet_identities(cache, count)}
        common = [f"--count={count}", f"--cache={cache}", f"--keys={keys}", f"--pin={pin}"]
        fleet_argv = [sys.executable, "-m", "eucalab.fleet"]
        before = loop_lag(reset_loop_lag(cloud, "cloud"))
        lab.run(
            "fleet",
            [
                *fleet_argv,
                "run",
                *common,
                f"--first-address={FLEET_FIRST_ADDRESS}",
                f"--progress={progress_file}",
                f"--timeout={FLEET_TIMEOUT:g}",
                "--exit-when-done",
            ],
            timeout=FLEET_TIMEOUT + 120,
            check=True,
        )
        status = reset_loop_lag(cloud, "cloud")
        lag = loop_lag(status)
        lag_period = time.time() - lag["since"]
        progress = read_progress(progress_file)
        if progress is None:
            raise RuntimeError(f"the fleet left no progress file at {progress_file}")
        fleet = fleet_summary(progress)
        # The registrar's word on each collected NC: the certificate it holds is the current one.
        result = lab.run(
            "fleet",
            [*fleet_argv, "verify", *common, f"--registrar={lab.address('cloud')}"],
            timeout=600,
            check=True,
        )
        verdicts: dict[str, str] = json.loads(result.stdout)["results"]
        fleet["verified_current"] = sum(1 for v in verdicts.values() if v == "unchanged")
        collected = {n["component_id"] for n in progress["nodes"] if n["collected_at"]}
        fleet["collected_but_not_current"] = {
            cid: v for cid, v in verdicts.items() if cid in collected and v != "unchanged"
        }
        fleet["registrar_says_registered"] = sum(
            1
            for cluster in status["tree"]["clusters"]
            for row in cluster["nc"]
            if row["status"] == "registered" and row["component_id"] in fleet_ids
        )
        hooked = [line.split()[1] for line in cloud.hook_log("cloud") if line.startswith("node ")]
        fleet["node_hook_runs"] = len(hooked)
        # The judge's figures (issue 8): counted only from what was verified.
        fleet["missed"] = count - fleet["verified_current"]
        fleet["duplicated"] = len(hooked) - len(set(hooked))
        complete = fleet["missed"] == 0 and not fleet["collected_but_not_current"]
        fleet["all_registered_s"] = (
            fleet.get("first_announcement_to_last_credentials_s") if complete else None
        )
        fleet["registrar_worst_loop_lag_ms"] = lag["worst_ms"]
        fleet["loop_lag_period_s"] = lag_period
        # From the registrar's start until the burst: its own start-up and the cloud's.
        fleet["registrar_worst_loop_lag_before_ms"] = before["worst_ms"]
        fleet["registrar_rss_after_kib"] = rss_kib(lab, cloud, "cloud")
    return fleet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=25, help="latency samples (>= 20)")
    parser.add_argument(
        "--fleet",
        type=int,
        nargs="+",
        default=[200],
        help="NCs announced at once; several sizes run one after another (e.g. 200 1000)",
    )
    parser.add_argument(
        "--only", choices=("latency", "fleet"), default=None, help="run one benchmark only"
    )
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    cleanup_stale()
    results: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        # The machine's load when we start: figures from a busy machine are not comparable.
        "load_average_at_start": list(os.getloadavg()),
    }
    with tempfile.TemporaryDirectory(prefix="eucareg-bench-") as tmp:
        work = Path(tmp)
        if args.only in (None, "latency"):
            print(f"latency: {args.runs} NCs joining one at a time", flush=True)
            results["latency"] = bench_latency(work, args.runs)
            results["latency"]["nc_median_ms"] = results["latency"]["median_ms"]
        if args.only in (None, "fleet"):
            for count in args.fleet:
                print(f"fleet: {count} NCs announced at once", flush=True)
                results[f"fleet_{count}"] = bench_fleet(work / f"fleet-{count}", count)
    lags = [
        part["registrar_worst_loop_lag_ms"]
        for part in results.values()
        if isinstance(part, dict) and "registrar_worst_loop_lag_ms" in part
    ]
    results["loop_lag"] = {"max_ms": max(lags) if lags else None}
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    failed = False
    for name, fleet in results.items():
        if name.startswith("fleet_") and (fleet["missing"] or fleet["collected_but_not_current"]):
            print(
                f"{name}: {len(fleet['missing'])} of {fleet['count']} NCs hold no verified "
                f"credentials, {len(fleet['collected_but_not_current'])} hold stale ones",
                file=sys.stderr,
            )
            failed = True
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
