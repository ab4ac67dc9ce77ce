"""200 NCs falling back to HTTP at once (issue 9; slow, `make test-slow`): their retries spread
out over time, none comes back sooner than it was asked to, and every one is registered once.

One lab host runs the CLC and the CC (cluster1; max_in_flight = 10, the lowest the
configuration allows, so a burst of unauthenticated announcements is partly sent away with
429 and Retry-After); a second host runs 200 real agents (`eucareg.agent.host.Agent`, one NC
each, own state dir, identity and source address), in a few processes
(`eucalab/fallback_fleet.py`). Their mDNS hears nothing, and their `fallback_registrar` is the
CC's registrar, so they announce over HTTP, all at the same moment (a rack booted together:
their `fallback_after` runs out together). At that moment the registrar is being restarted:
every NC is refused at once and backs off. The registrar agent starts again DOWN_FOR seconds
later, while they are spread over their backoff, and sends part of them away (429,
Retry-After) while it catches up.

Every HTTP request of every NC is recorded on the agent side (an aiohttp trace: when it was
sent, what came back, Retry-After included), together with the delay each agent logged after
a failure. The test prints a histogram of the attempts over time and checks that:

- every NC is registered exactly once (registry, events, one `node` hook run each) and holds
  its credentials;
- nobody asked again sooner than the registrar's Retry-After, or sooner than the lower half of
  its backoff step, and each agent's stated delay lies where the design puts it;
- the waits are jittered on the wire: within each backoff step (1, 2, 4 s…) the waits of the
  NCs differ, their interquartile range at least a tenth of the step (a uniform draw from the
  step's upper half gives a quarter; identical waits, loop noise only: 0.005-0.09 s measured),
  and the delays stated after a Retry-After differ too;
- when the registrar is back, they do not come back together: no 250 ms holds more than 30 %
  of the NCs (measured: 14-17 %; with Backoff's random draw replaced by a constant, the fleet
  retries within the same few hundred milliseconds, 66 % of it in one 250 ms, and every
  jitter check above fails as well).

The agents share a few processes: work one does in a thread stalls the others' timers (the
fleet reports its own event-loop stalls), which can only make a retry later, never sooner.
"""

from __future__ import annotations

import collections
import itertools
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from eucalab import fallback_fleet as ff
from eucalab import fallback_fleet_analysis as fa
from eucalab.cloud import LabCloud
from eucalab.cloud_probes import all_registered
from eucalab.errors import LabError
from eucalab.fleet_nodes import fleet_identities, node_id
from eucalab.fleet_progress import read_progress
from eucalab.lab import Lab
from eucalab.process import LabProcess
from eucalab.topology import parse_topology
from eucareg.agent.timing import AgentTiming
from eucareg.core.model import Role
from eucareg.pki import certificates
from eucareg.pki import credentials as cred
from tests.integration.conftest import LabFactory
from tests.integration.test_crash import fleet_key_cache  # noqa: F401  (fixture)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOPOLOGY = "subnet lan 10.77.0.0/16\nhost cloud lan\nhost fleet lan\n"
COUNT = 200
PROCESSES = 4  # agents share a process (and its GIL): a few processes keep its stalls short
FIRST_ADDRESS = "10.77.2.1"
START_BUDGET = 15.0  # seconds from spawning the fleet to its fallback moment (starting: ~4)
DOWN_FOR = 3.0  # seconds after the fallback moment the registrar agent is started again
REGISTER_BUDGET = 120.0  # seconds from the fallback moment for all of them to be registered
BUCKET = 0.25  # seconds per bar of the histogram
FIRST_WAVE = 2.0  # seconds within which every NC made its first attempt
HERD_SHARE = 0.3  # most NCs any bucket may hold once the registrar is back
JITTER_IQR = 0.1  # least interquartile range of the waits within a backoff step, per second
MIN_SAMPLES = 50  # waits a backoff step needs before its spread is judged
EPS = 0.005  # seconds: clock reads on either side of a wait
TIMING = AgentTiming()  # what the agents run with
# What an attempt may fail with here: refused while the registrar restarts, a connection
# broken as it starts, sent away while it catches up. Not a refusal of the NC (403), nor an
# answer the agent could not use.
FAILURES = {"refused", "dropped", "http-429", "http-503"}


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def iqr(values: list[float]) -> float:
    return quantile(values, 0.75) - quantile(values, 0.25)


def spawn_fleet(
    lab: Lab, work: Path, cache: Path, pin: str, fallback_at: float
) -> list[LabProcess]:
    per = math.ceil(COUNT / PROCESSES)
    procs = []
    for p, first in enumerate(range(0, COUNT, per)):
        argv = [
            sys.executable,
            "-m",
            "eucalab.fallback_fleet",
            "run",
            f"--count={min(per, COUNT - first)}",
            f"--first-index={first}",
            f"--first-address={FIRST_ADDRESS}",
            f"--registrar=https://{lab.address('cloud')}:8780",
            f"--pin={pin}",
            f"--cache={cache}",
            f"--work={work / f'p{p}'}",
            f"--fallback-at={fallback_at!r}",
            f"--timeout={START_BUDGET + REGISTER_BUDGET + 30:g}",
        ]
        procs.append(lab.spawn("fleet", f"fallback{p}", argv))
    return procs


def wait_registered(work: Path, procs: list[LabProcess], deadline: float) -> None:
    while True:
        progress = [read_progress(work / f"p{p}" / "progress.json") for p in range(len(procs))]
        if all(pr is not None and pr["registered"] == pr["count"] for pr in progress):
            return
        for proc in procs:
            if proc.exited():
                raise LabError(f"{proc.name} exited early:\n{proc.log_text()[-3000:]}")
        if time.monotonic() > deadline:
            stuck = [name for pr in progress if pr for name in pr["unregistered"]]
            raise LabError(f"not all {COUNT} NCs registered in time; not yet: {stuck[:20]}")
        time.sleep(0.5)


def check_registrar(cloud: LabCloud, work: Path, cache: Path, ids: list[str]) -> None:
    """Each NC registered once, collected, one hook run; its credentials on its own disk."""
    rows = {r["component_id"]: r for r in cloud.registry("cloud") if r["role"] == "nc"}
    assert sorted(rows) == sorted(ids), f"{len(rows)} NC records for {len(ids)} NCs"
    bad = [(c, r["status"]) for c, r in rows.items() if r["status"] != "registered"]
    assert not bad, f"not registered: {bad[:10]}"
    uncollected = [c for c, r in rows.items() if not r.get("credentials_collected_at")]
    assert not uncollected, f"registered but never collected: {uncollected[:10]}"
    assert len({r["address"] for r in rows.values()}) == len(ids)
    registered = collections.Counter(
        e["component_id"] for e in cloud.events("cloud", "&kind=registered")
    )
    twice = {c: n for c in ids if (n := registered[c]) != 1}
    assert not twice, f"NCs without exactly one 'registered' event: {twice}"
    hooks = collections.Counter(
        line.split()[1] for line in cloud.hook_log("cloud") if line.startswith("node ")
    )
    assert hooks == collections.Counter(ids), "the node hook did not run once per NC"
    per = math.ceil(COUNT / PROCESSES)
    for i, ident in enumerate(fleet_identities(cache, COUNT)):
        keys = work / f"p{i // per}" / "nodes" / f"{i:04d}" / "state" / "keys"
        assert cred.credentials_present(keys, Role.NC, ident.key), f"{ident.component_id}: {keys}"


def bound(level: int) -> float:
    """The upper bound of the backoff's delay after `level` failures in a row (eucareg.agent.
    timing.Backoff: doubling from retry_base to retry_max)."""
    return min(TIMING.retry_max, TIMING.retry_base * float(2**level))


def analyse(result: dict[str, Any], restarted: float, out: Path) -> None:
    by_node = fa.attempts(result)
    everything = [a for mine in by_node.values() for a in mine]
    # Back: from the first attempt that reached the restarted registrar (every one before
    # it was refused).
    restored = min(a.start for a in everything if a.outcome != "refused")
    outcomes = collections.Counter(a.outcome for a in everything)
    stalls = sorted(late for at, late in result["stalls"] if at >= result["fallback_at"])
    comeback = [a for a in everything if a.start >= restored]
    buckets = collections.Counter(math.floor(a.start / BUCKET) for a in comeback)
    peak_bucket, peak = buckets.most_common(1)[0] if buckets else (0, 0)
    hist = fa.histogram(
        everything,
        BUCKET,
        marks={
            0.0: "all fall back",
            restarted: "registrar restarted",
            restored: "the first to reach it",
        },
    )

    # The waits, on the wire (the next attempt's start minus the failed one's end), and what
    # each agent said it would wait, by backoff step; and those the registrar asked for.
    waits: dict[float, list[float]] = collections.defaultdict(list)  # step -> waits
    said: dict[float, list[float]] = collections.defaultdict(list)
    asked_waits: dict[float, list[float]] = collections.defaultdict(list)  # Retry-After -> waits
    asked_said: dict[float, list[float]] = collections.defaultdict(list)
    asked_steps: list[tuple[float, float, float]] = []  # (Retry-After, backoff step, stated)
    too_soon: list[str] = []
    unsaid: list[str] = []
    for cid, mine in by_node.items():
        level = 0
        for attempt, after in itertools.pairwise(mine):
            if not attempt.failed:
                level = 0  # a success resets the backoff
                continue
            wait = after.start - attempt.end
            step = bound(level)
            level += 1
            if attempt.logged_delay is None:
                unsaid.append(f"{cid} #{attempt.index}")
            if attempt.retry_after is not None:
                asked_waits[attempt.retry_after].append(wait)
                if attempt.logged_delay is not None:
                    asked_said[attempt.retry_after].append(attempt.logged_delay)
                    asked_steps.append((attempt.retry_after, step, attempt.logged_delay))
                if wait < attempt.retry_after - EPS:
                    too_soon.append(f"{cid} #{after.index}: {wait:.3f} s < Retry-After")
            else:
                waits[step].append(wait)
                if attempt.logged_delay is not None:
                    said[step].append(attempt.logged_delay)
                if wait < step / 2 - EPS:
                    too_soon.append(f"{cid} #{after.index}: {wait:.3f} s < {step / 2:g} s")

    lines = [
        f"{COUNT} NCs fell back at once; the registrar, restarted at +{restarted:.2f} s, "
        f"was reached from +{restored:.2f} s; attempts per {BUCKET:g} s (start of each "
        "announcement):",
        hist,
        "",
        f"attempts: {len(everything)} ({dict(sorted(outcomes.items()))})",
        f"first attempts: all within +{max(m[0].start for m in by_node.values()):.2f} s",
        f"once the registrar was reached: {len(comeback)} attempts over "
        f"{max(a.start for a in comeback) - restored:.1f} s; the busiest {BUCKET:g} s "
        f"(+{peak_bucket * BUCKET:.2f} s) held {peak} ({peak / COUNT:.0%} of the NCs)",
        "waits after a failure without Retry-After (the next attempt's start minus the "
        "failure), by backoff step:",
    ]
    for step, values in sorted(waits.items()):
        lines.append(
            f"  step {step:4g} s: n={len(values):3}  min {min(values):.3f}  "
            f"median {statistics.median(values):.3f}  max {max(values):.3f}  "
            f"IQR {iqr(values):.3f}  (stated: {min(said[step], default=0):.1f}"
            f"..{max(said[step], default=0):.1f})"
        )
    for asked, values in sorted(asked_waits.items()):
        stated = asked_said[asked]
        lines.append(
            f"  Retry-After {asked:g} s: n={len(values):3}  min {min(values):.3f}  "
            f"median {statistics.median(values):.3f}  max {max(values):.3f}  "
            f"(stated: {min(stated, default=0):.1f}..{max(stated, default=0):.1f}, "
            f"IQR {iqr(stated) if stated else 0:.2f})"
        )
    lines.append(
        f"fleet event-loop stalls >= {ff.LAG_SHOWN:g} s after the fallback moment: "
        f"{len(stalls)}, longest {max(stalls, default=0):.2f} s (a retry may fire that late)"
    )
    report = "\n".join(lines)
    (out / "fallback-histogram.txt").write_text(report + "\n")
    print("\n" + report)

    # Every property is checked, and every one violated is named.
    problems: list[str] = []
    # Only the failures this lab makes (no refusal of an NC, no broken request).
    if set(outcomes) - {"ok"} - FAILURES:
        problems.append(f"unexpected outcomes: {outcomes}")
    if outcomes["refused"] < COUNT:
        problems.append("the first wave was not refused as arranged")
    # The first wave was one: every NC asked within FIRST_WAVE of the fallback moment.
    late_first = [c for c, m in by_node.items() if m[0].start > FIRST_WAVE]
    if late_first:
        problems.append(f"first attempts later than +{FIRST_WAVE:g} s: {late_first[:10]}")
    # Nobody came back sooner than asked, or than its backoff allows; each said how long.
    if too_soon:
        problems.append("asked again too soon:\n  " + "\n  ".join(too_soon[:20]))
    if unsaid:
        problems.append(f"failed attempts without a 'retrying in' line: {unsaid[:10]}")
    for step, values in sorted(said.items()):
        wrong = [v for v in values if not step / 2 - 0.05 <= v <= step + 0.05]
        if wrong:
            problems.append(f"step {step:g} s: stated delays {sorted(wrong)[:10]}")
    # After a Retry-After: at least that, spread over half again as much, or over the backoff
    # step when that has grown larger (sent away again and again, an NC still backs off).
    for asked in sorted(asked_said):
        wrong = [
            v
            for a, step, v in asked_steps
            if a == asked and not max(a, step / 2) - 0.05 <= v <= max(a * 1.5, step) + 0.05
        ]
        if wrong:
            problems.append(f"Retry-After {asked:g} s: stated delays {sorted(wrong)[:10]}")
    # Jitter, on the wire: within a backoff step the NCs wait different times.
    judged = {s: v for s, v in waits.items() if len(v) >= MIN_SAMPLES}
    if not judged:
        problems.append(f"no backoff step with {MIN_SAMPLES} waits: {sorted(waits)}")
    for step, values in sorted(judged.items()):
        if iqr(values) < JITTER_IQR * step:
            problems.append(
                f"step {step:g} s: the waits hardly differ (IQR {iqr(values):.3f} s < "
                f"{JITTER_IQR * step:g} s): no jitter"
            )
    for asked, values in sorted(asked_said.items()):
        if len(values) >= MIN_SAMPLES // 2 and iqr(values) < JITTER_IQR * asked:
            problems.append(
                f"Retry-After {asked:g} s: {len(values)} NCs stated nearly the same delay "
                f"({sorted(set(values))}): not spread"
            )
    # The herd: once the registrar is back, they come back spread out.
    if peak > HERD_SHARE * COUNT:
        problems.append(
            f"a herd: {peak} of {COUNT} NCs asked within one {BUCKET:g} s "
            f"(+{peak_bucket * BUCKET:.2f} s) once the registrar was back"
        )
    assert not problems, "\n".join(problems)


def test_200_ncs_falling_back_at_once_spread_their_retries_and_all_register(
    lab_factory: LabFactory,
    tmp_path: Path,
    fleet_key_cache: Path,  # noqa: F811
) -> None:
    began = time.monotonic()
    lab = lab_factory(parse_topology(TOPOLOGY))
    cloud = LabCloud(
        lab,
        {"cloud": {"clc": None, "cc": "cluster1"}},
        tmp_path / "cloud",
        settings={"registrar": {"max_in_flight": 10}},
    )
    work = tmp_path / "fleet"
    ids = [node_id("fleet", i) for i in range(COUNT)]
    procs: list[LabProcess] = []
    try:
        cloud.start("cloud")
        cloud.wait_for("cloud", all_registered({"cc": 1}), timeout=120)
        # Without join tokens, NCs heard over HTTP need mode any (docs/security.md); the lab
        # cloud's install window admits them.
        cloud.cli("cloud", "mode", "any")
        pin = certificates.cert_fingerprint(
            certificates.load_cert(cloud.key_dir("cloud") / cred.CLOUD_CERT)
        )
        lab.run("fleet", ff.add_addresses_argv(FIRST_ADDRESS, COUNT, 16), timeout=120, check=True)
        cloud.stop("cloud")  # restarted while the NCs fall back
        fleet_identities(fleet_key_cache, COUNT)  # made once a session, before the clock runs
        fallback_at = time.monotonic() + START_BUDGET
        procs = spawn_fleet(lab, work, fleet_key_cache, pin, fallback_at)
        for proc in procs:
            proc.wait_for_log("they fall back in", timeout=max(1.0, fallback_at - time.monotonic()))
        spare = fallback_at - time.monotonic()
        assert spare > 0, f"the fleet took over {START_BUDGET:g} s to start"
        setup = time.monotonic() - began
        time.sleep(max(0.0, fallback_at + DOWN_FOR - time.monotonic()))
        cloud.start("cloud")
        restarted = time.monotonic() - fallback_at
        wait_registered(work, procs, fallback_at + REGISTER_BUDGET)
        registered_in = time.monotonic() - fallback_at
        check_registrar(cloud, work, fleet_key_cache, ids)
    finally:
        for proc in procs:
            lab.stop(proc, timeout=30)
    outputs = [work / f"p{p}" / "requests.json" for p in range(len(procs))]
    for proc, path in zip(procs, outputs, strict=True):
        assert path.exists(), f"{proc.name} wrote no requests.json:\n{proc.log_text()[-2000:]}"
    result = fa.load(outputs)
    print(
        f"\nsetup {setup:.1f} s (the fleet ready {spare:.1f} s before falling back); all "
        f"{COUNT} registered {registered_in:.1f} s after falling back; test "
        f"{time.monotonic() - began:.1f} s"
    )
    analyse(result, restarted, tmp_path)
