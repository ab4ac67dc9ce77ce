"""HTTP fallback registrations and first credential collections (issue 8's figures).

N simulated NCs on one lab host (an address each) register purely over the signed HTTP
fallback, POST /v1/announce on the CC's registrar, in its open install window; no mDNS at all.
The load generator is bench/httpgen.py. A registration counts only once the registrar's own
registry (GET /v1/registry) shows the NC `registered`: its `node` hook ran and the record was
committed. The rate is from the first request sent to the last `registered_at`; the registrar's
CPU (utime+stime of its agent process, /proc/PID/stat, sampled every 20 ms) over the same span,
divided by the registrations. Then the same NCs, all registered, collect their first credentials
(certificate issued, bundle verified by the generator), and the same is measured for that.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from bench.common import (
    FLEET_FIRST_ADDRESS,
    KEY_CACHE,
    ROOT,
    add_addresses,
    cloud_lab,
    cloud_pin,
    load_average,
    python_module,
    wait_until,
)
from bench.procstat import Cpu, CpuSampler, cpu, percentiles
from eucalab.cloud import LabCloud
from eucalab.lab import Lab

GEN_HOST = "gen"
HOOK_WAIT = 120.0  # seconds the hooks may take after the last answer
# The node hook in batches, as issue 8 measures the fallback (docs/hooks.md, "Batches"): the
# lab's counting hook, one line per member, and a result per member.
COUNTING_BATCH = """#!/bin/sh
while IFS='	' read -r address cluster id _rest; do
    echo "node $id $address $cluster" >> {log}
    echo "ok $id" >> "$EUCAREG_RESULTS"
done < "$EUCAREG_BATCH"
"""
REGISTRY_WAIT = 60.0


def _generate(
    lab: Lab, cloud: LabCloud, command: str, count: int, concurrency: int, pin: str
) -> dict[str, Any]:
    argv = [
        *python_module("bench.httpgen"),
        command,
        f"--count={count}",
        f"--cache={KEY_CACHE}",
        f"--first-address={FLEET_FIRST_ADDRESS}",
        f"--registrar={lab.address('cloud')}",
        f"--pin={pin}",
        f"--concurrency={concurrency}",
    ]
    env = {"PYTHONPATH": str(ROOT)}  # bench is not installed: run it from this tree
    result = lab.run(GEN_HOST, argv, timeout=900, env=env, check=True)
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def _node_hooks(cloud: LabCloud, ids: set[str]) -> list[str]:
    return [
        line.split()[1]
        for line in cloud.hook_log("cloud")
        if line.startswith("node ") and line.split()[1] in ids
    ]


def _quarters(started: float, times: list[float]) -> list[float | None]:
    """Registrations per second in each quarter of the run (by count: the first quarter of
    the registrations, …), the first quarter from the first request sent."""
    rates: list[float | None] = []
    previous_index, previous_time = -1, started
    for k in range(1, 5):
        index = math.ceil(k * len(times) / 4) - 1
        if index <= previous_index:
            rates.append(None)
            continue
        span = times[index] - previous_time
        rates.append(round((index - previous_index) / span, 1) if span > 0 else None)
        previous_index, previous_time = index, times[index]
    return rates


def _cpu_ms(before: Cpu, after: Cpu) -> tuple[float, float]:
    return (after.own_s - before.own_s) * 1000, (after.children_s - before.children_s) * 1000


def _generator(gen: dict[str, Any], done: int) -> dict[str, Any]:
    cpu_used = dict(gen["generator_cpu"])
    cpu_used["timed_ms_per_request"] = round(cpu_used["timed_s"] * 1000 / done, 3) if done else None
    cpu_used["concurrency"] = gen["concurrency"]
    return cpu_used


def _answers(results: list[dict[str, Any]]) -> dict[str, Any]:
    statuses: dict[str, int] = {}
    for r in results:
        key = f"{r['http']} {r['status']}".strip()
        statuses[key] = statuses.get(key, 0) + 1
    latencies = [(r["done_at"] - r["sent_at"]) * 1000 for r in results if r["done_at"]]
    return {
        "answers": statuses,
        "retries": sum(r["attempts"] - 1 for r in results),
        "errors": [
            {"component_id": r["component_id"], "http": r["http"], "error": r["error"]}
            for r in results
            if r["error"]
        ][:20],
        "request_latency": percentiles(latencies),
    }


def _registrations(
    lab: Lab, cloud: LabCloud, count: int, concurrency: int, pin: str
) -> dict[str, Any]:
    pid = cloud.agents["cloud"].pid
    idle_before = cpu(pid)
    time.sleep(2.0)
    idle_ms_per_s = (cpu(pid).own_s - idle_before.own_s) * 1000 / 2.0
    out: dict[str, Any] = {"count": count, "load_average_at_start": load_average()}
    cloud.api("cloud", "/v1/status?lag=reset")
    with CpuSampler(pid) as sampler:
        gen = _generate(lab, cloud, "announce", count, concurrency, pin)
        ids = {r["component_id"] for r in gen["results"]}
        # Only NCs the registrar accepted get a hook (a refusal is final: do not wait for it).
        accepted = sum(1 for r in gen["results"] if r["http"] == 200 and r["status"] != "refused")
        hooked = wait_until(lambda: len(_node_hooks(cloud, ids)) >= accepted, HOOK_WAIT)
        time.sleep(0.5)  # the last hook's commit; then ask the registrar (which costs CPU)

        def registered() -> list[dict[str, Any]]:
            return [
                row
                for row in cloud.registry("cloud")
                if row["component_id"] in ids and row["status"] == "registered"
            ]

        rows = registered()
        deadline = time.monotonic() + REGISTRY_WAIT
        while len(rows) < accepted and time.monotonic() < deadline:
            time.sleep(0.5)
            rows = registered()
    lag = cloud.api("cloud", "/v1/status?lag=reset")["registrar"]["loop_lag"]
    started = gen["started_at"]
    times = sorted(row["registered_at"] for row in rows)
    hooks = _node_hooks(cloud, ids)
    out.update(
        {
            "registered": len(rows),
            "missed": count - len(rows),
            "duplicated": len(hooks) - len(set(hooks)),
            "node_hook_runs": len(hooks),
            "hooks_all_ran": hooked,
            "registrar_idle_cpu_ms_per_s": round(idle_ms_per_s, 2),
            "registrar_worst_loop_lag_ms": lag["worst_ms"],
            "answers_per_s": round(count / (gen["finished_at"] - started), 1),
            **_answers(gen["results"]),
            "generator_cpu": _generator(gen, count),
        }
    )
    if times:
        span = times[-1] - started
        _, before = sampler.before(started)
        _, after = sampler.at(times[-1])
        own_ms, hook_ms = _cpu_ms(before, after)
        out.update(
            {
                "first_request_to_last_registered_s": round(span, 3),
                "registrations_per_s": round(len(times) / span, 1),
                "registrations_per_s_by_quarter": _quarters(started, times),
                "registrar_cpu_ms": round(own_ms, 1),
                "registrar_cpu_ms_per_registration": round(own_ms / len(times), 3),
                "hook_processes_cpu_ms_per_registration": round(hook_ms / len(times), 3),
            }
        )
    return out


def _collections(
    lab: Lab, cloud: LabCloud, count: int, concurrency: int, pin: str
) -> dict[str, Any]:
    pid = cloud.agents["cloud"].pid
    out: dict[str, Any] = {"count": count, "load_average_at_start": load_average()}
    cloud.api("cloud", "/v1/status?lag=reset")
    with CpuSampler(pid) as sampler:
        gen = _generate(lab, cloud, "collect", count, concurrency, pin)
    lag = cloud.api("cloud", "/v1/status?lag=reset")["registrar"]["loop_lag"]
    started = gen["started_at"]
    verified = [r for r in gen["results"] if r["status"] == "verified"]
    ids = {r["component_id"] for r in verified}
    marked = sum(
        1
        for row in cloud.registry("cloud")
        if row["component_id"] in ids and row.get("credentials_collected_at")
    )
    out.update(
        {
            "verified": len(verified),
            "missed": count - len(verified),
            "registrar_marked_collected": marked,
            "registrar_worst_loop_lag_ms": lag["worst_ms"],
            **_answers(gen["results"]),
            "generator_cpu": _generator(gen, count),
        }
    )
    if verified:
        last = max(r["done_at"] for r in verified)
        span = last - started
        _, before = sampler.before(started)
        _, after = sampler.at(last)
        own_ms, _ = _cpu_ms(before, after)
        out.update(
            {
                "first_request_to_last_verified_s": round(span, 3),
                "first_collections_per_s": round(len(verified) / span, 1),
                "registrar_cpu_ms_per_collection": round(own_ms / len(verified), 3),
            }
        )
    return out


def bench_fallback(
    work: Path, count: int, concurrency: int = 100
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(http_fallback, credentials): registrations over the fallback, then first collections."""
    log = work / "cloud-fallback" / "cloud" / "hooks.log"  # where LabCloud.hook_log reads
    settings = {
        "hooks": {"cloud": {"node-batch": COUNTING_BATCH.format(log=log)}},
        "registrar": {"batch_hooks": ["node"]},
    }
    with cloud_lab(work, "fallback", {GEN_HOST: {}}, settings) as (lab, cloud):
        pin = cloud_pin(cloud)
        # Without a join token, HTTP announcements need mode any (docs/security.md); the lab
        # cloud's install window (open) admits them.
        cloud.cli("cloud", "mode", "any")
        add_addresses(lab, GEN_HOST, count)
        fallback = _registrations(lab, cloud, count, concurrency, pin)
        print(
            f"  fallback: {fallback.get('registrations_per_s')}/s, "
            f"{fallback.get('registrar_cpu_ms_per_registration')} ms CPU each",
            flush=True,
        )
        credentials = _collections(lab, cloud, count, concurrency, pin)
        print(f"  first collections: {credentials.get('first_collections_per_s')}/s", flush=True)
    return fallback, credentials
