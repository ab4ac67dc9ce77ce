"""eucareg benchmarks: NC registration latency, N NCs at once (with `eucareg status` polled
during the largest burst), HTTP fallback registrations and first credential collections, an
idle NC agent's memory and wake-ups, the registrar's idle RSS and its worst event-loop lag.

Run as root with `make bench` (or `.venv/bin/python -m bench.run`). Everything happens in a
lab of network namespaces that is torn down afterwards; results go to bench/results/. The NCs
announced at once are the lab's fleet of simulated NCs (`eucalab/fleet.py`, also used by the
crash tests); an NC counts only once it holds credentials it verified against its own key and
the pinned cloud CA, and the registrar confirms afterwards that they are current. The parts
live in bench/latency.py, bench/fleet_burst.py (with bench/status_poll.py), bench/slow_hooks.py,
bench/fallback.py (with its load generator bench/httpgen.py), bench/agent_idle.py and
bench/lan.py; this module runs them, keeps their figures, and fails on what a part missed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.agent_idle import bench_agent_idle
from bench.common import RESULTS
from bench.fallback import bench_fallback
from bench.fleet_burst import bench_fleet
from bench.lan import bench_lan
from bench.latency import bench_latency
from bench.slow_hooks import bench_slow_hooks
from eucalab.netns import cleanup_stale

PARTS = ("latency", "fleet", "fallback", "collect", "agent", "lan", "hooks")
DEFAULT_PARTS = ("latency", "fleet", "fallback", "collect", "agent")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=25, help="latency samples (>= 20)")
    parser.add_argument(
        "--fleet",
        type=int,
        nargs="+",
        default=[200, 1000],
        help="NCs announced at once; several sizes run one after another (e.g. 200 1000)",
    )
    parser.add_argument(
        "--status-interval",
        type=float,
        default=0.1,
        help="seconds between GET /v1/status during the largest fleet burst (0: no poller)",
    )
    parser.add_argument(
        "--lan", type=int, default=1000, help="simulated NCs around the real one (--only lan)"
    )
    parser.add_argument(
        "--fallback", type=int, default=1000, help="NCs registering over the HTTP fallback"
    )
    parser.add_argument(
        "--concurrency", type=int, default=100, help="HTTP requests the generator keeps open"
    )
    parser.add_argument(
        "--idle-window",
        type=float,
        default=30.0,
        help="seconds the NC agent's wake-ups are counted",
    )
    parser.add_argument(
        "--only",
        choices=PARTS,
        nargs="+",
        default=None,
        help="run these parts only (fallback and collect are one part: the first collections "
        "are made by the NCs the fallback registered)",
    )
    return parser.parse_args()


def failures(results: dict[str, Any]) -> list[str]:
    """What makes the run fail: an NC without verified credentials, a registration missed."""
    out = []
    for name, part in results.items():
        if name.startswith("fleet_") and (part["missing"] or part["collected_but_not_current"]):
            out.append(
                f"{name}: {len(part['missing'])} of {part['count']} NCs hold no verified "
                f"credentials, {len(part['collected_but_not_current'])} hold stale ones"
            )
        elif name in ("http_fallback", "credentials") and (
            part["missed"] or part.get("duplicated")
        ):
            out.append(f"{name}: {part['missed']} missed, {part.get('duplicated', 0)} duplicated")
    return out


def merged(results: dict[str, Any]) -> dict[str, Any]:
    """This run's results over the parts of earlier runs that it did not repeat (a run of
    `--only fleet --fleet 2000` must not drop the other figures). `measured` says when and
    under which load each part was measured."""
    previous: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        previous = json.loads((RESULTS / "latest.json").read_text())
    stamp = {"when": results["when"], "load_average_at_start": results["load_average_at_start"]}
    measured = dict(previous.get("measured", {}))
    out = {k: v for k, v in previous.items() if isinstance(v, dict) and k != "measured"}
    for key, value in results.items():
        if isinstance(value, dict):
            measured[key] = stamp
        out[key] = value
    out["measured"] = measured
    return out


def main() -> None:
    args = parse_args()
    # SIGTERM (a timeout, Ctrl-C in another form) unwinds like an error: every lab is torn down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parts = set(args.only or DEFAULT_PARTS)
    RESULTS.mkdir(parents=True, exist_ok=True)
    cleanup_stale()
    results: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        # The machine's load when we start: figures from a busy machine are not comparable.
        "load_average_at_start": list(os.getloadavg()),
        "cpus": os.cpu_count(),
    }
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="eucareg-bench-") as tmp:
        work = Path(tmp)
        if "latency" in parts:
            print(f"latency: {args.runs} NCs joining one at a time", flush=True)
            results["latency"] = bench_latency(work, args.runs)
            results["latency"]["nc_median_ms"] = results["latency"]["median_ms"]
        if parts & {"fallback", "collect"}:
            print(f"fallback: {args.fallback} NCs registering over HTTP", flush=True)
            fallback, collected = bench_fallback(work / "fallback", args.fallback, args.concurrency)
            results["http_fallback"], results["credentials"] = fallback, collected
        if "agent" in parts:
            print(f"agent: one NC agent idle for {args.idle_window:g} s", flush=True)
            results["nc_agent"] = bench_agent_idle(work / "agent", args.idle_window)
        if "lan" in parts:
            print(f"lan: one NC agent among {args.lan} NCs powering on", flush=True)
            results[f"lan_{args.lan}"] = bench_lan(work / "lan", args.lan)
        if "hooks" in parts:
            count = max(args.fleet)
            print(f"hooks: {count} NCs at once, a node hook that sleeps 1 s", flush=True)
            results[f"slow_hooks_{count}"] = bench_slow_hooks(work / "hooks", count)
        if "fleet" in parts:
            largest = max(args.fleet)
            for count in args.fleet:
                print(f"fleet: {count} NCs announced at once", flush=True)
                interval = args.status_interval if count == largest else 0.0
                fleet = bench_fleet(work / f"fleet-{count}", count, interval)
                results[f"fleet_{count}"] = fleet
                if "status_during_burst" in fleet:
                    results["status_during_burst"] = fleet["status_during_burst"]
    lags = [
        part["registrar_worst_loop_lag_ms"]
        for part in results.values()
        if isinstance(part, dict) and "registrar_worst_loop_lag_ms" in part
    ]
    results["loop_lag"] = {"max_ms": max(lags) if lags else None}
    results["duration_s"] = round(time.monotonic() - started, 1)
    (RESULTS / "latest.json").write_text(json.dumps(merged(results), indent=2) + "\n")
    print(json.dumps(results, indent=2))
    problems = failures(results)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        sys.exit(1)


if __name__ == "__main__":
    main()
