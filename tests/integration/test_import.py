"""Upgrading a 10.04 cloud (issue 10, part 4), end to end in a lab: a 1.6.2 front end laid
out in a temporary directory (eucalyptus.conf with NODES, eucalyptus-ipaddr.conf, the key
directory with keys made here, the `euca_conf --list-*` output, the upstart jobs), `eucareg
import --dry-run` (nothing changes), `eucareg import` (recorded, the legacy jobs stopped
through a fake initctl), then the eucareg agents of the imported components start with new
identities at the imported addresses and take their registrations over: no hook runs for
any of them, nothing is registered twice, and a component that was not imported still
registers the normal way, with its hook. Every wait is for the event that shows the outcome.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from eucalab.cloud import LabCloud
from tests.integration.conftest import CloudFactory
from tests.integration.test_cloud import assert_credentials_everywhere
from tests.unit.test_import_sources import make_clc_keys

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PLAN: dict[str, dict[str, str | None]] = {
    "cloud": {"clc": None, "walrus": None, "cc": "cluster1", "sc": "cluster1"},
    "node1": {"nc": "cluster1"},  # registered in Eucalyptus: imported
    "node2": {"nc": "cluster1"},  # new: registers the normal way
}
JOBS = ("uec-component-listener", "eucalyptus-cc-publication", "eucalyptus-walrus-publication")


def old_front_end(root: Path, front: str, node: str) -> Path:
    """A 1.6.2 front end's files under `root`; returns the `euca_conf --list-*` output file."""
    conf = root / "etc/eucalyptus"
    conf.mkdir(parents=True)
    # NODES names a node the listing does not: shown, not imported (the listing is the truth).
    (conf / "eucalyptus.conf").write_text(
        f'EUCALYPTUS="/"\nCC_PORT="8774"\nNODES="{node} 10.77.1.250"\n'
    )
    (conf / "eucalyptus-ipaddr.conf").write_text(
        f'CLOUD_IP_ADDR="{front}"\nWALRUS_IP_ADDR="{front}"\nCC_IP_ADDR="{front}"\n'
        f'SC_IP_ADDR="{front}"\n'
    )
    make_clc_keys(root, ["cluster1"])
    init = root / "etc/init"
    init.mkdir(parents=True)
    for name in (*JOBS, "eucalyptus-cloud", "ssh"):
        (init / f"{name}.conf").write_text("exec true\n")
    listing = root / "euca-list.txt"
    listing.write_text(
        f"registered walruses:\n   walrus  {front}\n"
        f"registered clusters:\n   cluster1  {front}\n"
        f"registered storage controllers:\n   cluster1  {front}\n"
        f"registered nodes:\n   {node}  cluster1   i-4493083A\n"
    )
    return listing


def fake_initctl(bin_dir: Path, log: Path) -> dict[str, str]:
    bin_dir.mkdir(parents=True)
    script = bin_dir / "initctl"
    script.write_text(f'#!/bin/sh\necho "initctl $*" >> {log}\n')
    script.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}"}


def identity(cloud: LabCloud, host: str, role: str, timeout: float = 30.0) -> str:
    """A component's id, once its agent has made its identity (bounded wait)."""
    path = cloud.host_dir(host) / "state" / "identity" / f"{role}.id"
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"no identity for {role} on {host}"
        time.sleep(0.1)
    return path.read_text().strip()


def run_import(
    cloud: LabCloud, env: dict[str, str], *args: str, host: str = "cloud"
) -> tuple[int, dict[str, Any]]:
    argv = [sys.executable, "-m", "eucareg", "import", *args, "--json"]
    argv += ["--config", str(cloud.host_dir(host) / "eucareg.toml")]
    done = cloud.lab.run(host, argv, env=env, timeout=60)
    assert done.stdout.strip(), done.stderr
    return done.returncode, json.loads(done.stdout)


def test_an_imported_cloud_is_adopted_with_no_hook_and_new_components_still_register(
    cloud_factory: CloudFactory, tmp_path: Path
) -> None:
    installed = tmp_path / "eucalyptus-installed"  # the front end's roles wait for it
    waiting = {role: str(installed) for role in ("walrus", "cc", "sc")}
    cloud = cloud_factory(PLAN, trust="manual", installed={"cloud": waiting})
    lab = cloud.lab
    front, node1 = str(lab.address("cloud")), str(lab.address("node1"))
    root = tmp_path / "frontend"
    listing = old_front_end(root, front, node1)
    log = tmp_path / "initctl.log"
    env = fake_initctl(tmp_path / "bin", log)
    cloud.start("cloud")
    cloud.wait_for_api("cloud")
    before = cloud.registry("cloud")

    # 1. The dry run shows the plan and changes nothing: no record, no job stopped.
    code, plan = run_import(
        cloud, env, "--root", str(root), "--list-file", str(listing), "--dry-run"
    )
    assert code == 0, plan
    assert [(r["role"], r["action"]) for r in plan["plan"]] == [
        ("walrus", "import"),
        ("cc", "import"),
        ("sc", "import"),
        ("nc", "import"),
    ]
    assert any("10.77.1.250" in w and "not imported" in w for w in plan["warnings"])
    assert cloud.registry("cloud") == before and not log.exists()

    # 2. The import records them, runs no hook, and stops and disables the legacy jobs.
    code, done = run_import(cloud, env, "--root", str(root), "--list-file", str(listing), "--yes")
    assert code == 0, done
    assert done["imported"] == 4
    assert sorted(j["name"] for j in done["legacy_jobs"]) == sorted(JOBS)
    assert all(j["ok"] for j in done["legacy_jobs"])
    assert sorted(log.read_text().splitlines()) == sorted(f"initctl stop {j}" for j in JOBS)
    for job in JOBS:
        assert (root / f"etc/init/{job}.override").read_text() == "manual\n"
    assert not (root / "etc/init/eucalyptus-cloud.override").exists()
    imported = {r["component_id"] for r in done["plan"]}
    assert len(imported) == 4
    assert cloud.hook_runs("cloud") == [] and cloud.hook_log("cloud") == []

    # 3. The eucareg agents come up with new identities at the imported addresses.
    installed.write_text("")
    cloud.start("node1")
    cloud.start("node2")
    adopters = {identity(cloud, "cloud", r) for r in ("walrus", "cc", "sc")}
    adopters.add(identity(cloud, "node1", "nc"))
    events = cloud.wait_for_events(
        "cloud",
        lambda evs: {e["component_id"] for e in evs} >= adopters,
        "&kind=adopted",
        timeout=120,
    )
    assert all("imported from Eucalyptus" in e["reason"] for e in events)

    # 4. The component nobody imported waits for the operator (no install window), then
    #    registers the normal way: its hook runs, once.
    newcomer = identity(cloud, "node2", "nc")
    cloud.wait_for_event("cloud", newcomer, "pending", timeout=60)
    cloud.cli("cloud", "approve", newcomer)
    cloud.wait_for_event("cloud", newcomer, "registered", timeout=60)

    # No hook ran for an imported component; the newcomer's ran once.
    runs = cloud.hook_runs("cloud")
    assert {r["component_id"] for r in runs} == {newcomer}, runs
    hooked = collections.Counter(line.split()[1] for line in cloud.hook_log("cloud"))
    assert hooked == {newcomer: 1}
    # Nothing registered twice: one record per role and address, the imported ones gone.
    rows = [r for r in cloud.registry("cloud") if r.get("status") == "registered"]
    slots = collections.Counter((r["role"], r["address"]) for r in rows)
    assert all(n == 1 for n in slots.values()), slots
    assert {r["component_id"] for r in rows} >= adopters | {newcomer}
    assert not imported & {r["component_id"] for r in cloud.registry("cloud")}
    assert all(r["admitted_by"] == "imported" for r in rows if r["component_id"] in adopters)

    # Every adopter collects its eucareg credentials with its own key (and the newcomer too).
    deadline = time.monotonic() + 60
    while not cloud.credentials_complete():
        assert time.monotonic() < deadline, "credentials missing on some host"
        time.sleep(0.2)
    assert_credentials_everywhere(cloud)

    # 5. Importing again changes nothing.
    code, again = run_import(
        cloud, env, "--root", str(root), "--list-file", str(listing), "--yes", "--keep-legacy-jobs"
    )
    assert code == 0 and again["imported"] == 0, again
    assert {r["action"] for r in again["plan"]} == {"already-registered"}


def test_each_cc_imports_its_own_nodes(cloud_factory: CloudFactory, tmp_path: Path) -> None:
    """The CLC imports the Walrus, the CC and the SC, and lists the NC as its CC's; the CC
    on its own host imports the NC from the same listing. Each registrar's components are
    adopted there, with no hook on either."""
    installed = tmp_path / "eucalyptus-installed"
    plan: dict[str, dict[str, str | None]] = {
        "cloud": {"clc": None, "walrus": None},
        "cc1": {"cc": "cluster1", "sc": "cluster1"},
        "node1": {"nc": "cluster1"},
    }
    waiting = {
        "cloud": {"walrus": str(installed)},
        "cc1": {"cc": str(installed), "sc": str(installed)},
    }
    cloud = cloud_factory(plan, trust="manual", installed=waiting)
    lab = cloud.lab
    front, cc_host = str(lab.address("cloud")), str(lab.address("cc1"))
    node = str(lab.address("node1"))
    root = tmp_path / "frontend"
    listing = old_front_end(root, front, node)
    listing.write_text(
        f"registered walruses:\n   walrus  {front}\n"
        f"registered clusters:\n   cluster1  {cc_host}\n"
        f"registered storage controllers:\n   cluster1  {cc_host}\n"
        f"registered nodes:\n   {node}  cluster1\n"
    )
    env = fake_initctl(tmp_path / "bin", tmp_path / "initctl.log")
    for host in ("cloud", "cc1"):
        cloud.start(host)
        cloud.wait_for_api(host)
    args = ("--root", str(root), "--list-file", str(listing), "--yes", "--keep-legacy-jobs")
    code, on_clc = run_import(cloud, env, *args)
    assert code == 0, on_clc
    assert [r["action"] for r in on_clc["plan"]] == ["import", "import", "import", "elsewhere"]
    code, on_cc = run_import(cloud, env, *args, host="cc1")
    assert code == 0, on_cc
    assert [r["action"] for r in on_cc["plan"]] == ["elsewhere"] * 3 + ["import"]

    installed.write_text("")
    cloud.start("node1")
    on_cloud = {identity(cloud, "cloud", "walrus")}
    on_cloud |= {identity(cloud, "cc1", r) for r in ("cc", "sc")}
    nc = identity(cloud, "node1", "nc")
    cloud.wait_for_events(
        "cloud", lambda evs: {e["component_id"] for e in evs} >= on_cloud, "&kind=adopted", 120
    )
    cloud.wait_for_events(
        "cc1", lambda evs: {e["component_id"] for e in evs} >= {nc}, "&kind=adopted", 120
    )
    for host in ("cloud", "cc1"):
        assert cloud.hook_runs(host) == [] and cloud.hook_log(host) == []
    deadline = time.monotonic() + 60
    while not cloud.credentials_complete():
        assert time.monotonic() < deadline, "credentials missing on some host"
        time.sleep(0.2)
