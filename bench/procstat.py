"""What the benchmarks read about a process from /proc: CPU time, memory, context switches.

All of it is read from outside the process (the benchmark's driver is root in the root
namespaces; /proc shows every lab process), so measuring costs the measured process nothing.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # units of utime/stime in /proc/PID/stat (100 here)


@dataclass(frozen=True)
class Cpu:
    """CPU seconds of one process: its own threads (utime+stime), and its reaped children
    (cutime+cstime: hook processes, for a registrar)."""

    own_s: float
    children_s: float


def cpu(pid: int) -> Cpu:
    raw = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    fields = raw[raw.rindex(")") + 2 :].split()
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])  # stat fields 14-17
    return Cpu((utime + stime) / CLOCK_TICKS, (cutime + cstime) / CLOCK_TICKS)


def self_cpu_s() -> float:
    """This process's user+system CPU seconds, all threads (what a generator reports)."""
    times = os.times()
    return times.user + times.system


def _kib_fields(path: Path, names: tuple[str, ...]) -> dict[str, int]:
    found: dict[str, int] = {}
    for line in path.read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in names:
            found[key] = int(rest.split()[0])
    return found


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS, and from smaps_rollup Rss, Pss and USS (Private_Clean + Private_Dirty), KiB."""
    status = _kib_fields(Path(f"/proc/{pid}/status"), ("VmRSS",))
    rollup = _kib_fields(
        Path(f"/proc/{pid}/smaps_rollup"), ("Rss", "Pss", "Private_Clean", "Private_Dirty")
    )
    return {
        "vm_rss_kib": status["VmRSS"],
        "rss_kib": rollup["Rss"],
        "pss_kib": rollup["Pss"],
        "uss_kib": rollup["Private_Clean"] + rollup["Private_Dirty"],
    }


def context_switches(pid: int) -> dict[str, int]:
    """Voluntary and involuntary context switches summed over the process's live threads
    (/proc/PID/task/*/status). A thread that ended took its counts with it."""
    voluntary = involuntary = threads = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            counts = _kib_fields(
                task / "status", ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")
            )
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        voluntary += counts.get("voluntary_ctxt_switches", 0)
        involuntary += counts.get("nonvoluntary_ctxt_switches", 0)
        threads += 1
    return {"voluntary": voluntary, "involuntary": involuntary, "threads": threads}


@dataclass
class CpuSampler:
    """Samples a process's CPU every `interval` seconds in a thread, so that the CPU used up to
    a moment known only afterwards (the last registration's commit) can be looked up."""

    pid: int
    interval: float = 0.02
    limit_s: float = 900.0  # a sampler never runs longer than this
    samples: list[tuple[float, Cpu]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> CpuSampler:
        self.samples.append((time.time(), cpu(self.pid)))
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            self.samples.append((time.time(), cpu(self.pid)))

    def _run(self) -> None:
        deadline = time.monotonic() + self.limit_s
        while not self._stop.wait(self.interval) and time.monotonic() < deadline:
            try:
                self.samples.append((time.time(), cpu(self.pid)))
            except FileNotFoundError:
                return

    def first(self) -> Cpu:
        return self.samples[0][1]

    def before(self, when: float) -> tuple[float, Cpu]:
        """The last sample taken at or before `when` (wall clock), else the first one."""
        found = self.samples[0]
        for sample in self.samples:
            if sample[0] > when:
                break
            found = sample
        return found

    def at(self, when: float) -> tuple[float, Cpu]:
        """The first sample taken at or after `when` (wall clock), else the last one."""
        for taken, value in self.samples:
            if taken >= when:
                return taken, value
        return self.samples[-1]


def percentiles(values: list[float]) -> dict[str, Any]:
    """count, p50, p90, p99 (nearest rank) and max of a list of milliseconds."""
    if not values:
        return {"count": 0, "p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    return {
        "count": len(ordered),
        "p50_ms": round(rank(0.50), 3),
        "p90_ms": round(rank(0.90), 3),
        "p99_ms": round(rank(0.99), 3),
        "max_ms": round(ordered[-1], 3),
    }


def udp_drops(pid: int, port: int = 5353) -> dict[str, int]:
    """Datagrams dropped (receive buffer full) by the UDP sockets on `port` in the network
    namespace of `pid` (/proc/PID/net/udp and udp6 show that namespace's sockets), summed;
    and how many such sockets there are."""
    drops = sockets = 0
    for name in ("udp", "udp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                drops += int(fields[-1])
                sockets += 1
    return {"drops": drops, "sockets": sockets}
