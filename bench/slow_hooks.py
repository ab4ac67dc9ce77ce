"""The slow-hooks benchmark: the fleet burst (bench/fleet_burst.py) with a node hook as slow as
euca_conf --register-nodes, run once per NC and then batched."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.fleet_burst import bench_fleet

# A node hook as slow as euca_conf --register-nodes: one run per NC, or one per batch.
SLOW_NODE = """#!/bin/sh
sleep 1
echo "node $EUCAREG_ID $EUCAREG_ADDRESS $EUCAREG_CLUSTER" >> {log}
"""
SLOW_BATCH = """#!/bin/sh
sleep 1
while IFS='	' read -r address cluster id _rest; do
    echo "node $id $address $cluster" >> {log}
    echo "ok $id" >> "$EUCAREG_RESULTS"
done < "$EUCAREG_BATCH"
"""


def bench_slow_hooks(work: Path, count: int) -> dict[str, Any]:
    """The fleet burst with a node hook that takes 1 s: one run per NC (at most
    max_hooks_running at once), then batched (registrar.batch_hooks, docs/hooks.md)."""
    out: dict[str, Any] = {}
    for mode in ("single", "batch"):
        log = work / mode / "cloud-fleet" / "cloud" / "hooks.log"
        hooks = {"node": SLOW_NODE.format(log=log)}
        registrar: dict[str, Any] = {}
        if mode == "batch":
            hooks["node-batch"] = SLOW_BATCH.format(log=log)
            registrar = {"batch_hooks": ["node"]}
        settings = {"hooks": {"cloud": hooks}, "registrar": registrar}
        fleet = bench_fleet(work / mode, count, 0.0, settings)
        keys = ("all_registered_s", "missed", "duplicated", "node_hook_runs", "latency_median_s")
        out[mode] = {k: fleet.get(k) for k in keys} | {
            "registrar_worst_loop_lag_ms": fleet["registrar_worst_loop_lag_ms"],
            "load_average_at_start": fleet["load_average_at_start"],
        }
    return out
