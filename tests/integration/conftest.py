"""Fixtures for tests that build network-namespace labs (root and iproute2 required)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from eucalab.cloud import LabCloud
from eucalab.lab import Lab
from eucalab.netns import cleanup_stale
from eucalab.plans import single_lan
from eucalab.topology import Topology, parse_topology

LabFactory = Callable[..., Lab]


def _why_no_lab() -> str | None:
    if os.geteuid() != 0:
        return "lab tests need root (network namespaces)"
    if shutil.which("ip") is None:
        return "lab tests need the 'ip' command (iproute2)"
    return None


def netns_names() -> set[str]:
    out = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.fixture(scope="session")
def lab_host() -> None:
    """Skip unless this machine can build labs; clear namespaces left by crashed runs once."""
    reason = _why_no_lab()
    if reason is not None:
        pytest.skip(reason)
    cleanup_stale()


@pytest.fixture
def lab_factory(lab_host: None, tmp_path: Path) -> Iterator[LabFactory]:
    """Create labs under tmp_path; every one is torn down after the test, pass or fail.

    Call as ``lab_factory(description_or_topology, start=True, prefix=None)``.
    """
    labs: list[Lab] = []

    def make(topology: str | Topology, *, start: bool = True, prefix: str | None = None) -> Lab:
        topo = parse_topology(topology) if isinstance(topology, str) else topology
        lab = Lab(topo, tmp_path / f"lab{len(labs)}", prefix=prefix)
        labs.append(lab)
        if start:
            lab.start()
        return lab

    yield make

    errors: list[BaseException] = []
    for lab in reversed(labs):
        try:
            lab.teardown()
        except Exception as exc:
            errors.append(exc)
    leaked = sorted(ns for ns in netns_names() for lab in labs if ns.startswith(lab.prefix + "-"))
    if errors:
        raise errors[0]
    assert not leaked, f"lab namespaces left behind: {leaked}"


CloudFactory = Callable[..., LabCloud]


@pytest.fixture
def cloud_factory(lab_factory: LabFactory, tmp_path: Path) -> Iterator[CloudFactory]:
    """Build a LabCloud on a one-LAN lab: ``cloud_factory(plan, **settings)``.

    Settings go to LabCloud (e.g. ``trust="manual"`` for no install window). The agents' logs
    are printed after the test, which pytest shows when it fails.
    """
    clouds: list[LabCloud] = []

    def make(plan: dict[str, dict[str, str | None]], **settings: Any) -> LabCloud:
        lab = lab_factory(single_lan(list(plan)))
        cloud = LabCloud(lab, plan, tmp_path / f"cloud{len(clouds)}", settings=settings)
        clouds.append(cloud)
        return cloud

    yield make
    for cloud in clouds:
        for host, proc in cloud.agents.items():
            print(f"==== {host} ({proc.log.name})\n{proc.log_text()[-3000:]}")
