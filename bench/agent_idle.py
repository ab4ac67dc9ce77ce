"""A real NC agent at rest: its memory and how often it wakes up once registered.

One `eucareg agent` process with an NC component joins the lab cloud as a node would (mDNS,
its own namespace, a fresh identity). Once it wrote its credentials and the registrar shows it
registered, it is left alone for `settle` seconds; then its memory is read from /proc (VmRSS;
USS = Private_Clean + Private_Dirty of /proc/PID/smaps_rollup, what the process alone holds),
and its context switches, voluntary and involuntary, summed over every thread
(/proc/PID/task/*/status), are counted over an idle window of `window` seconds and given per
minute. Each voluntary switch is a thread going to sleep, so one wake-up each; involuntary ones
are preemptions (the machine is shared). A thread that ends during the window takes its counts
with it, so the thread list is compared before and after.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.common import cloud_lab, load_average
from bench.procstat import context_switches, cpu, memory_kib

NODE = "node1"


def _threads(pid: int) -> dict[int, tuple[str, int]]:
    """tid -> (thread name, voluntary + involuntary switches)."""
    out: dict[int, tuple[str, int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            total = 0
            for line in (task / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    total += int(line.split()[1])
        except FileNotFoundError:
            continue
        out[int(task.name)] = (name, total)
    return out


def bench_agent_idle(work: Path, window: float = 30.0, settle: float = 5.0) -> dict[str, Any]:
    with cloud_lab(work, "agent", {NODE: {"nc": "cluster1"}}) as (_lab, cloud):
        proc = cloud.start(NODE)
        proc.wait_for_log("credentials for nc", timeout=60)
        nc_id = cloud.component_id(NODE, "nc")
        cloud.wait_for(
            "cloud",
            lambda status: any(
                row["component_id"] == nc_id and row["status"] == "registered"
                for cluster in status["tree"]["clusters"]
                for row in cluster["nc"]
            ),
            timeout=30,
        )
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        if b"agent" not in cmdline:
            raise RuntimeError(f"pid {proc.pid} is not the agent: {cmdline!r}")
        time.sleep(settle)
        load = load_average()
        memory = memory_kib(proc.pid)
        threads_before = _threads(proc.pid)
        switches_before, cpu_before = context_switches(proc.pid), cpu(proc.pid)
        began = time.monotonic()
        time.sleep(window)
        switches_after, cpu_after = context_switches(proc.pid), cpu(proc.pid)
        elapsed = time.monotonic() - began
        threads_after = _threads(proc.pid)
        memory_after = memory_kib(proc.pid)
        if proc.exited():
            raise RuntimeError(f"the NC agent exited while idle:\n{proc.log_text()[-2000:]}")
        per_min = 60.0 / elapsed
        voluntary = switches_after["voluntary"] - switches_before["voluntary"]
        involuntary = switches_after["involuntary"] - switches_before["involuntary"]
        by_thread = {
            f"{name} ({tid})": round((total - threads_before[tid][1]) * per_min, 1)
            for tid, (name, total) in threads_after.items()
            if tid in threads_before
        }
        log_lines = proc.log_text().count("\n")
    return {
        "load_average_at_start": load,
        "settle_s": settle,
        "window_s": round(elapsed, 2),
        "idle_rss_mib": round(memory["vm_rss_kib"] / 1024, 1),
        "idle_uss_mib": round(memory["uss_kib"] / 1024, 1),
        "idle_pss_mib": round(memory["pss_kib"] / 1024, 1),
        "rss_after_window_mib": round(memory_after["vm_rss_kib"] / 1024, 1),
        "idle_wakeups_per_min": round((voluntary + involuntary) * per_min, 1),
        "voluntary_per_min": round(voluntary * per_min, 1),
        "involuntary_per_min": round(involuntary * per_min, 1),
        "wakeups_per_min_by_thread": by_thread,
        "threads": {
            "before": len(threads_before),
            "after": len(threads_after),
            "ended_during_window": len(set(threads_before) - set(threads_after)),
            "started_during_window": len(set(threads_after) - set(threads_before)),
        },
        "idle_cpu_ms_per_min": round((cpu_after.own_s - cpu_before.own_s) * 1000 * per_min, 1),
        "log_lines_at_end": log_lines,
    }
