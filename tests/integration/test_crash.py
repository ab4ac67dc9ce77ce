"""Registrar crashes in the middle of a registration burst (slow; `make test-slow`).

One lab host runs the CLC and the CC (the CC registers itself through the CLC on the same
host, then registers NCs); a second host runs a fleet of simulated NCs (`eucalab/fleet.py`),
each with its own id, key, address, mDNS service and signed credential collector that keeps
retrying while the registrar is down. The registrar agent is SIGKILLed at seeded random moments
(or made to crash at a named point with `EUCAREG_CRASH_AT`) and restarted with the same
configuration and state directory. At the end every NC must be registered exactly once, hold
credentials the registrar still stands by, and the `node` hook must have run once per NC, plus
at most one re-run marked `EUCAREG_RERUN=1` per crash that interrupted that NC's registration,
never two runs of one NC at the same time.

Set EUCAREG_CRASH_SEED to replay a run; the seed is printed (pytest shows it on failure, or
with -s).
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from eucalab.cloud import LabCloud
from eucalab.cloud_probes import all_registered, registered_components
from eucalab.errors import LabError
from eucalab.fleet_nodes import fleet_addresses, node_id
from eucalab.fleet_progress import read_progress
from eucalab.lab import Lab
from eucalab.process import LabProcess
from eucalab.topology import parse_topology
from eucareg.pki import certificates
from eucareg.pki import credentials as cred

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOPOLOGY = "subnet lan 10.77.0.0/16\nhost cloud lan\nhost fleet lan\n"
FIRST_NC_ADDRESS = "10.77.2.1"
CRASH_EXIT = 86
FAULT_POINTS = ("before-hook", "after-hook", "after-commit", "after-certificate")

# One line when the script starts, one when it ends; $$ is the run's process group (the hook
# runs in a session of its own). The sleep gives each NC a registration that takes a while.
NODE_HOOK = """#!/bin/sh
# crash-test node hook: log start and end of every run, with EUCAREG_RERUN
echo "start $EUCAREG_ID ${{EUCAREG_RERUN:-0}} $$ $(date +%s.%N)" >> {log}
sleep "$(cat {durations}/$EUCAREG_ID 2>/dev/null || echo 0)"
echo "done $EUCAREG_ID ${{EUCAREG_RERUN:-0}} $$ $(date +%s.%N)" >> {log}
"""


@dataclass
class Run:
    """One run of the node hook, from its two log lines."""

    component_id: str
    rerun: bool
    pgid: int
    started: float
    ended: float | None = None


def parse_hook_log(path: Path) -> dict[str, list[Run]]:
    runs: dict[tuple[str, int], Run] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        what, component_id, rerun, pgid, at = line.split()
        key = (component_id, int(pgid))
        if what == "start":
            runs[key] = Run(component_id, rerun == "1", int(pgid), float(at))
        else:
            assert key in runs, f"'done' without 'start' in the hook log: {line}"
            runs[key].ended = float(at)
    by_node: dict[str, list[Run]] = collections.defaultdict(list)
    for run in sorted(runs.values(), key=lambda r: r.started):
        by_node[run.component_id].append(run)
    return by_node


@dataclass
class CrashRig:
    """A CLC+CC registrar host and a fleet host, with the crash bookkeeping."""

    lab: Lab
    cloud: LabCloud
    work: Path
    key_cache: Path
    seed: int
    count: int = 0
    fleet: LabProcess | None = None
    crashes: list[float] = field(default_factory=list)  # when each crashed agent was gone

    @property
    def hook_log(self) -> Path:
        return self.work / "node-hook.log"

    @property
    def durations(self) -> Path:
        return self.work / "durations"

    @property
    def progress_file(self) -> Path:
        return self.work / "fleet.json"

    def ctx(self) -> str:
        return f"seed {self.seed} (replay with EUCAREG_CRASH_SEED={self.seed})"

    def ids(self) -> list[str]:
        return [node_id("fleet", i) for i in range(self.count)]

    def set_hook_durations(self, durations: dict[str, float]) -> None:
        self.durations.mkdir(exist_ok=True)
        for component_id, seconds in durations.items():
            (self.durations / component_id).write_text(f"{seconds:.3f}\n")

    def start_registrar(self, env: dict[str, str] | None = None) -> LabProcess:
        return self.cloud.start("cloud", env=env)

    def wait_cc_registered(self) -> None:
        self.cloud.wait_for("cloud", all_registered({"cc": 1}), timeout=120)

    def ca_fingerprint(self) -> str:
        return certificates.cert_fingerprint(
            certificates.load_cert(self.cloud.key_dir("cloud") / cred.CLOUD_CERT)
        )

    def start_fleet(self, count: int, *, batches: int = 1) -> LabProcess:
        self.count = count
        addresses = fleet_addresses(FIRST_NC_ADDRESS, count)
        self.lab.run(
            "fleet",
            [
                "sh",
                "-c",
                'for a; do ip addr add "$a/16" dev eth0 || exit 1; done',
                "sh",
                *addresses,
            ],
            check=True,
        )
        (self.work / "go").mkdir(exist_ok=True)
        self.fleet = self.lab.spawn(
            "fleet",
            "fleet",
            [
                sys.executable,
                "-m",
                "eucalab.fleet",
                "run",
                f"--count={count}",
                f"--cache={self.key_cache}",
                f"--keys={self.work / 'fleet-keys'}",
                f"--pin={self.ca_fingerprint()}",
                f"--first-address={FIRST_NC_ADDRESS}",
                f"--progress={self.progress_file}",
                f"--batches={batches}",
                f"--go-dir={self.work / 'go'}",
                "--timeout=900",
            ],
        )
        self.fleet.wait_for_log("published batch 0", timeout=120)
        return self.fleet

    def progress(self) -> dict[str, Any]:
        return read_progress(self.progress_file) or {"collected": 0, "nodes": []}

    def wait_collected(self, count: int, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            progress = self.progress()
            if progress["collected"] >= count:
                return progress
            if self.fleet is not None and self.fleet.exited():
                raise LabError(f"the fleet exited early:\n{self.fleet.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                stuck = [
                    (n["component_id"], n["requests"], n["errors"], n["last_error"])
                    for n in progress["nodes"]
                    if n["collected_at"] is None
                ]
                raise LabError(
                    f"{progress['collected']} of {count} NCs collected after {timeout}s "
                    f"({self.ctx()}); not yet: {stuck[:10]}"
                )
            time.sleep(0.5)

    def crash(self) -> float:
        """SIGKILL the registrar agent; the time by which it was certainly gone."""
        code = self.cloud.kill("cloud")
        assert code == -9, f"the agent had already ended with {code} ({self.ctx()})"
        gone = time.time()
        self.crashes.append(gone)
        return gone

    def verify_fleet(self) -> dict[str, str]:
        result = self.lab.run(
            "fleet",
            [
                sys.executable,
                "-m",
                "eucalab.fleet",
                "verify",
                f"--count={self.count}",
                f"--cache={self.key_cache}",
                f"--keys={self.work / 'fleet-keys'}",
                f"--pin={self.ca_fingerprint()}",
                f"--registrar={self.lab.address('cloud')}",
            ],
            timeout=120,
            check=True,
        )
        results: dict[str, str] = json.loads(result.stdout)["results"]
        return results

    def hook_processes_alive(self, pgids: set[int]) -> list[str]:
        """Processes of these hook process groups still alive in the registrar's namespace."""
        netns = os.stat(f"/run/netns/{self.lab.netns('cloud')}").st_ino
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                in_lab = os.stat(entry / "ns" / "net").st_ino == netns
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if in_lab and fields[0] != "Z" and int(fields[2]) in pgids:
                found.append(f"pid {entry.name} (group {fields[2]}): {stat[:80]}")
        return found

    def logs(self) -> str:
        parts = []
        for n in range(1, self.cloud.starts.get("cloud", 0) + 1):
            log = self.lab.workdir / f"cloud-agent{n}.log"
            if log.exists():
                parts.append(f"==== cloud agent start {n}\n{log.read_text()[-2500:]}")
        if self.fleet is not None:
            parts.append(f"==== fleet\n{self.fleet.log_text()[-2500:]}")
        return "\n".join(parts)

    # -- the end state ---------------------------------------------------------------------

    def settle(self, timeout: float = 300) -> list[dict[str, Any]]:
        """Wait until every NC holds credentials and the registry says so; the registry."""
        self.wait_collected(self.count, timeout)

        def done(_status: dict[str, Any]) -> bool:
            rows = [r for r in self.cloud.registry("cloud") if r["role"] == "nc"]
            return len(rows) >= self.count and all(
                r["status"] == "registered" and r["credentials_collected_at"] for r in rows
            )

        self.cloud.wait_for("cloud", done, timeout=120)
        return self.cloud.registry("cloud")

    def check(self) -> dict[str, Any]:
        """Every invariant of a crash run; returns figures for the test output."""
        ctx = self.ctx()
        registry = self.settle()
        ids = set(self.ids())
        nodes = [r for r in registry if r["role"] == "nc"]
        assert sorted(r["component_id"] for r in nodes) == sorted(ids), ctx
        assert len({r["address"] for r in nodes}) == len(ids), ctx
        bad = [(r["component_id"], r["status"]) for r in registry if r["status"] != "registered"]
        assert not bad, f"records not registered: {bad} ({ctx})"
        cc_hook_lines = [
            line for line in self.cloud.hook_log("cloud") if line.startswith("cluster ")
        ]
        assert len(cc_hook_lines) == 1, (cc_hook_lines, ctx)

        events = self.cloud.events("cloud")
        registered_at: dict[str, list[float]] = collections.defaultdict(list)
        first_registering: dict[str, float] = {}
        for e in events:
            if e["kind"] == "registered":
                registered_at[e["component_id"]].append(e["at"])
            if e["kind"] == "registering":
                first_registering.setdefault(e["component_id"], e["at"])
        twice = {cid: ats for cid, ats in registered_at.items() if cid in ids and len(ats) != 1}
        assert not twice, f"NCs without exactly one 'registered' event: {twice} ({ctx})"

        progress = self.progress()
        assert all(n["verify_errors"] == 0 for n in progress["nodes"]), ctx
        verdicts = self.verify_fleet()
        assert verdicts == dict.fromkeys(sorted(ids), "unchanged"), ctx

        runs = parse_hook_log(self.hook_log)
        problems: list[str] = []
        reruns = 0
        interrupted_kills: set[float] = set()
        for cid in sorted(ids):
            mine = runs.get(cid, [])
            window = (first_registering.get(cid, 0.0), registered_at[cid][0])
            crashes_in_flight = [t for t in self.crashes if window[0] < t < window[1]]
            interrupted_kills.update(crashes_in_flight)
            plain = [r for r in mine if not r.rerun]
            marked = [r for r in mine if r.rerun]
            reruns += len(marked)
            if not mine or mine[-1].ended is None:
                problems.append(f"{cid}: no completed run of its hook")
            if len(plain) > 1 or (plain and plain[0] is not mine[0]):
                problems.append(f"{cid}: {len(plain)} unmarked runs (one, the first, expected)")
            if len(marked) > len(crashes_in_flight):
                problems.append(
                    f"{cid}: {len(marked)} re-runs marked EUCAREG_RERUN=1, but only "
                    f"{len(crashes_in_flight)} crash(es) while its registration was in flight"
                )
            for earlier, later in itertools.pairwise(mine):
                if earlier.ended is not None and earlier.ended > later.started:
                    problems.append(
                        f"{cid}: run {earlier.pgid} still ran when run {later.pgid} started"
                    )
        assert not problems, f"hook runs ({ctx}):\n" + "\n".join(problems)
        alive = self.hook_processes_alive({r.pgid for rs in runs.values() for r in rs})
        assert not alive, f"node hooks still running: {alive} ({ctx})"
        last_registered = max(ats[0] for ats in registered_at.values())
        return {
            "crashes": len(self.crashes),
            "crashes_before_last_registration": sum(1 for t in self.crashes if t < last_registered),
            "crashes_interrupting_a_registration": len(interrupted_kills),
            "hook_runs": sum(len(r) for r in runs.values()),
            "marked_reruns": reruns,
        }


@pytest.fixture(scope="session")
def fleet_key_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fleet's keys, made once per session (about 35 ms each)."""
    return tmp_path_factory.mktemp("fleet-keys")


@pytest.fixture
def crash_rig(
    lab_factory: Callable[..., Lab], tmp_path: Path, fleet_key_cache: Path
) -> Iterator[CrashRig]:
    seed = int(os.environ.get("EUCAREG_CRASH_SEED") or random.SystemRandom().randrange(2**32))
    print(f"crash test seed: {seed} (replay with EUCAREG_CRASH_SEED={seed})")
    lab = lab_factory(parse_topology(TOPOLOGY))
    work = tmp_path / "crash"
    work.mkdir()
    hooks = {
        "cloud": {
            "node": NODE_HOOK.format(log=work / "node-hook.log", durations=work / "durations")
        }
    }
    cloud = LabCloud(
        lab,
        {"cloud": {"clc": None, "cc": "cluster1"}},
        tmp_path / "cloud",
        settings={"hooks": hooks},
    )
    rig = CrashRig(lab, cloud, work, fleet_key_cache, seed)
    try:
        yield rig
    finally:
        print(rig.logs())


def _durations(rng: random.Random, ids: list[str]) -> dict[str, float]:
    """Short, medium and long hooks, so that crashes find registrations at every stage."""
    out = {}
    for cid in ids:
        kind = rng.random()
        if kind < 0.4:
            out[cid] = rng.uniform(0.0, 0.3)
        elif kind < 0.8:
            out[cid] = rng.uniform(0.3, 1.5)
        else:
            out[cid] = rng.uniform(1.5, 3.0)
    return out


BURST_NODES = 50
BURST_KILLS = 12


def test_registrar_killed_again_and_again_during_a_burst_of_50_ncs(crash_rig: CrashRig) -> None:
    rig = crash_rig
    rng = random.Random(rig.seed)
    rig.set_hook_durations(_durations(rng, [node_id("fleet", i) for i in range(BURST_NODES)]))
    rig.start_registrar()
    rig.wait_cc_registered()
    rig.start_fleet(BURST_NODES)
    for _ in range(BURST_KILLS):
        # A seeded moment after the last (re)start: sometimes while the agent still starts up,
        # mostly while hooks run, certificates are issued and answers are on their way.
        time.sleep(rng.uniform(0.3, 2.5))
        rig.crash()
        rig.start_registrar()
    figures = rig.check()
    print(f"crash burst ({rig.ctx()}): {figures}")
    # The crashes really hit the burst, not an idle registrar.
    assert figures["crashes_before_last_registration"] >= 10, (figures, rig.ctx())


def test_crash_harness_with_kills_only_between_registrations(crash_rig: CrashRig) -> None:
    """The harness itself: kills land only while nothing is in flight (each batch of NCs has
    collected its credentials), so any engine that survives a restart passes. A failure here
    is a harness bug, not a crash-safety bug."""
    rig = crash_rig
    batches, per_batch = 10, 5
    rng = random.Random(rig.seed)
    rig.set_hook_durations(_durations(rng, [node_id("fleet", i) for i in range(batches * 5)]))
    rig.start_registrar()
    rig.wait_cc_registered()
    rig.start_fleet(batches * per_batch, batches=batches)
    for batch in range(batches):
        if batch:
            (rig.work / "go" / f"go-{batch}").write_text("")
        rig.wait_collected((batch + 1) * per_batch, timeout=120)
        rig.cloud.wait_for(
            "cloud",
            lambda s, n=(batch + 1) * per_batch: (
                sum(
                    r["role"] == "nc"
                    and r["status"] == "registered"
                    and r["credentials_collected_at"]
                    for r in registered_components(s)
                )
                >= n
            ),
            timeout=60,
        )
        rig.crash()
        rig.start_registrar()
        rig.cloud.wait_for_api("cloud")
    figures = rig.check()
    print(f"harness check ({rig.ctx()}): {figures}")
    assert figures["crashes"] == batches
    assert figures["marked_reruns"] == 0
    assert figures["crashes_interrupting_a_registration"] == 0


@pytest.mark.parametrize("point", FAULT_POINTS)
def test_fault_points(crash_rig: CrashRig, point: str) -> None:
    """EUCAREG_CRASH_AT=<point> makes the registrar exit 86 there; restarted without it, it
    must finish every registration as if nothing had happened (at most a marked re-run)."""
    rig = crash_rig
    rng = random.Random(rig.seed)
    rig.set_hook_durations({node_id("fleet", i): rng.uniform(0.1, 0.6) for i in range(5)})
    rig.start_registrar()
    rig.wait_cc_registered()
    # The CC is registered and holds its certificate: the crash point can only be reached by
    # one of the NCs.
    rig.cloud.stop("cloud")
    agent = rig.start_registrar(env={"EUCAREG_CRASH_AT": point})
    rig.cloud.wait_for_api("cloud")
    rig.start_fleet(5)
    deadline = time.monotonic() + 120
    code = None
    while code is None and time.monotonic() < deadline:
        code = agent.wait_exit(0.5)
        if code is None and rig.progress()["collected"] == 5:
            pytest.fail(
                f"every NC registered, but the registrar never crashed at {point}: "
                "is EUCAREG_CRASH_AT implemented?"
            )
    assert code == CRASH_EXIT, f"registrar exit status {code}, expected {CRASH_EXIT} ({point})"
    assert "crashing on purpose" in agent.log_text()
    rig.cloud.kill("cloud")  # reap it
    rig.crashes.append(time.time())
    rig.start_registrar()
    figures = rig.check()
    print(f"fault point {point} ({rig.ctx()}): {figures}")
    runs = parse_hook_log(rig.hook_log)
    marked = sum(r.rerun for node_runs in runs.values() for r in node_runs)
    if point in ("before-hook", "after-hook"):
        # The hook of the NC that reached the point was journaled but its outcome never
        # committed: it must run again, marked.
        assert marked >= 1, runs
