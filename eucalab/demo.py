"""`eucalab demo` (`make demo`): the design's first test topology, assembled in an isolated lab.

CLC+Walrus+CC+SC share one host and each NC has its own; the NCs start first, so the timeline
shows them waiting for their CC and then registering. Everything is torn down at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from eucalab.cloud import LabCloud
from eucalab.cloud_probes import all_registered
from eucalab.errors import LabError
from eucalab.lab import Lab
from eucalab.netns import cleanup_stale
from eucalab.plans import single_lan

USERNS_MARK = "EUCAREG_DEMO_IN_USERNS"


def plan_for(nodes: int) -> dict[str, dict[str, str | None]]:
    plan: dict[str, dict[str, str | None]] = {
        "cloud": {"clc": None, "walrus": None, "cc": "cluster1", "sc": "cluster1"}
    }
    for n in range(1, nodes + 1):
        plan[f"node{n}"] = {"nc": "cluster1"}
    return plan


class Timeline:
    """Merges the agents' JSON logs into one readable, time-ordered stream."""

    def __init__(self, cloud: LabCloud, start: float) -> None:
        self.cloud = cloud
        self.start = start
        self._offsets: dict[Path, int] = {}

    def new_entries(self) -> list[tuple[float, str, str, str]]:
        entries: list[tuple[float, str, str, str]] = []
        for host, proc in self.cloud.agents.items():
            try:
                with proc.log.open("rb") as handle:
                    handle.seek(self._offsets.get(proc.log, 0))
                    data = handle.read()
            except FileNotFoundError:
                continue
            complete = data.rfind(b"\n") + 1
            self._offsets[proc.log] = self._offsets.get(proc.log, 0) + complete
            for line in data[:complete].decode(errors="replace").splitlines():
                entry = _parse(line)
                if entry is not None:
                    entries.append((entry["ts"], host, entry["logger"], entry["msg"]))
        return sorted(entries)

    def print(self, console: Console) -> None:
        for ts, host, logger, msg in self.new_entries():
            what = logger.removeprefix("eucareg.")
            style = _style(msg)
            console.print(
                f"[dim]+{ts - self.start:6.2f}s[/] [bold]{host:8}[/] {what:9} [{style}]{msg}[/]",
                highlight=False,
            )


def _parse(line: str) -> dict[str, Any] | None:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(entry, dict) or "ts" not in entry:
        return None
    return entry


def _style(message: str) -> str:
    for word, style in (
        ("refused", "red"),
        ("failed", "red"),
        ("pending", "yellow"),
        ("registered", "green"),
        ("credentials", "green"),
        ("announcing", "cyan"),
    ):
        if message.startswith(word) or f" {word}" in message[:40]:
            return style
    return "white"


def _in_user_namespace() -> bool:
    """True inside a user namespace (uid_map is not the initial namespace's full identity
    map), so the tmpfs over /run below can only ever hide our own private /run."""
    try:
        fields = Path("/proc/self/uid_map").read_text().split()
    except OSError:
        return False
    return fields[:3] != ["0", "0", "4294967295"]


def _reexec_in_user_namespace(argv: list[str]) -> int:
    """Without root, run the demo in a private user+network+mount namespace (unshare -rnm)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        print("error: the demo needs root, or unshare(1) to run without it", file=sys.stderr)
        return 2
    env = {**os.environ, USERNS_MARK: "1"}
    os.execve(unshare, [unshare, "-rnm", "--", sys.executable, "-m", "eucalab", *argv], env)
    return 2  # not reached


def run_demo(*, as_json: bool, nodes: int, timeout: float) -> int:
    if os.geteuid() != 0 and USERNS_MARK not in os.environ:
        argv = ["demo", "--nodes", str(nodes), "--timeout", str(timeout)]
        return _reexec_in_user_namespace([*argv, "--json"] if as_json else argv)
    if USERNS_MARK in os.environ:
        if not _in_user_namespace():
            print(f"error: {USERNS_MARK} is set outside a user namespace", file=sys.stderr)
            return 2
        # A private mount namespace lets `ip netns` keep its state in a tmpfs of our own.
        os.system("mount -t tmpfs tmpfs /run 2>/dev/null; mkdir -p /run/netns")
    stream = sys.stderr if as_json else sys.stdout
    console = Console(stderr=as_json, width=None if stream.isatty() else 140)
    plan = plan_for(nodes)
    cleanup_stale()
    with tempfile.TemporaryDirectory(prefix="eucareg-demo-") as tmp:
        work = Path(tmp)
        try:
            with Lab(single_lan(list(plan)), work / "lab") as lab:
                return _run(lab, plan, work, console, as_json, timeout)
        except LabError as exc:
            console.print(f"[bold red]demo failed:[/] {exc}")
            return 1


def _run(
    lab: Lab,
    plan: dict[str, dict[str, str | None]],
    work: Path,
    console: Console,
    as_json: bool,
    timeout: float,
) -> int:
    from eucareg.cli.render import render_tree

    cloud = LabCloud(lab, plan, work / "cloud")
    console.rule("[bold]eucalab demo[/]: CLC+Walrus+CC+SC on one host, plus NCs")
    for host, roles in plan.items():
        parts = ", ".join(f"{r} ({c})" if c else r for r, c in roles.items())
        console.print(f"  {host:8} {lab.address(host)!s:12} {parts}", highlight=False)
    console.rule("timeline")
    start = time.time()
    timeline = Timeline(cloud, start)
    # Nodes first: they announce, wait for their CC, and register once it is.
    order = [h for h in plan if h != "cloud"] + ["cloud"]
    for host in order:
        cloud.start(host)
        time.sleep(0.3)
    done = all_registered(cloud.expected())
    deadline = time.monotonic() + timeout
    status: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        timeline.print(console)
        try:
            status = cloud.status("cloud")
        except LabError:
            status = None
        if status is not None and done(status) and cloud.credentials_complete():
            break
        time.sleep(0.3)
    else:
        timeline.print(console)
        console.print(f"[bold red]the cloud did not converge within {timeout:g}s[/]")
        if as_json and status is not None:
            print(json.dumps(status, indent=2, sort_keys=True))
        return 1
    time.sleep(0.2)
    timeline.print(console)
    elapsed = time.time() - start
    console.rule(f"final state after {elapsed:.1f}s")
    if as_json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        console.print(render_tree(status))
        console.print(
            f"\n{sum(cloud.expected().values())} components registered exactly once; "
            f"credentials present on every host. Tearing the lab down."
        )
    return 0
