"""`eucareg discover` on a real LAN of the lab: from a host that runs no agent, it names the
CLC by its announced addr= and fingerprint and cluster1 with its CC registered, leaves out a
decoy whose TXT record is invalid, and exits 1 saying so on a LAN where nobody announces.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import pytest

from eucalab.cloud import LabCloud
from eucalab.cloud_probes import all_registered
from eucalab.lab import Lab
from eucalab.plans import single_lan
from eucalab.publisher import publisher_argv
from tests.integration.conftest import CloudFactory, LabFactory

pytestmark = pytest.mark.integration

PLAN: dict[str, dict[str, str | None]] = {
    "cloud": {"clc": None, "cc": "cluster1"},
    "node1": {"sc": "cluster1", "nc": "cluster1"},
    "probe": {},  # no agent: where an installer would run discover
}


def discover(lab: Lab, host: str, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "eucareg", "discover", *args]
    return lab.run(host, argv, timeout=30)


def identity(cloud: LabCloud, host: str, role: str) -> dict[str, Any]:
    """A component's id and fingerprint, as `eucareg fingerprint` prints them on its host."""
    config = str(cloud.host_dir(host) / "eucareg.toml")
    result = cloud.cli(host, "fingerprint", "--json", "--config", config)
    return next(c for c in json.loads(result.stdout) if c["role"] == role)


def test_discover_names_the_clc_and_the_cluster_and_not_the_decoys(
    cloud_factory: CloudFactory,
) -> None:
    cloud = cloud_factory(PLAN)
    # Decoys on the same LAN, each with one invalid TXT key: a would-be second CLC and a
    # would-be CC of another cluster. A registrar rejects them; discover must not list them.
    node = str(cloud.lab.address("node1"))
    bad_fp = {"txtvers": "1", "protovers": "1", "state": "ready", "addr": node}
    decoys = [
        cloud.lab.spawn(
            "node1",
            "decoy-clc",
            publisher_argv(
                "cloud-decoy",
                {**bad_fp, "type": "cloud", "id": "clc-decoy0000001", "fp": "sha256:x"},
                [node],
            ),
        ),
        cloud.lab.spawn(
            "node1",
            "decoy-cc",
            publisher_argv(
                "cluster-decoy",
                {
                    **bad_fp,
                    "type": "cluster",
                    "cluster": "cluster9",
                    "id": "cc-decoy00000001",
                    "fp": "sha256:" + "ab" * 32,
                    "state": "registered",
                    "port": "0",
                },
                [node],
            ),
        ),
    ]
    for proc in decoys:
        proc.wait_for_log("published", timeout=30)
    cloud.start_all(["cloud", "node1"])
    cloud.wait_for("cloud", all_registered(cloud.expected()), timeout=60)
    # The CC announces "registered" once its credentials are on disk.
    deadline = time.monotonic() + 30
    while not cloud.credentials_complete():
        assert time.monotonic() < deadline, "registered, but key files missing on some host"
        time.sleep(0.2)
    clc = identity(cloud, "cloud", "clc")
    cc = identity(cloud, "cloud", "cc")
    sc = identity(cloud, "node1", "sc")

    found = discover(cloud.lab, "probe", "clc", "--json", "--timeout", "3s")
    assert found.returncode == 0, found.stderr
    data = json.loads(found.stdout)
    assert [c["component_id"] for c in data["clcs"]] == [clc["component_id"]]
    assert data["clcs"][0]["address"] == str(cloud.lab.address("cloud"))
    assert data["clcs"][0]["fingerprint"] == clc["fingerprint"]
    assert data["clcs"][0]["port"] == 8780
    ignored = {i["instance"]: i for i in data["ignored"]}
    assert ignored["cloud-decoy"]["code"] == "bad-txt"
    assert ignored["cloud-decoy"]["reason"].startswith("fp='sha256:x' is not a key fingerprint")
    assert ignored["cluster-decoy"]["code"] == "bad-txt"
    assert ignored["cluster-decoy"]["reason"].startswith("port")

    text = discover(cloud.lab, "probe", "clc", "--timeout", "2s")
    assert text.returncode == 0, text.stderr
    assert clc["fingerprint"] in text.stdout and "decoy" not in text.stdout
    assert "2 announcement(s) with an invalid TXT record ignored" in text.stderr

    found = discover(cloud.lab, "probe", "clusters", "--json", "--timeout", "3s")
    assert found.returncode == 0, found.stderr
    clusters = json.loads(found.stdout)["clusters"]
    assert [c["name"] for c in clusters] == ["cluster1"]
    [cluster1] = clusters
    assert [(c["component_id"], c["registered"]) for c in cluster1["cc"]] == [
        (cc["component_id"], True)
    ]
    assert cluster1["cc"][0]["address"] == str(cloud.lab.address("cloud"))
    assert [s["component_id"] for s in cluster1["sc"]] == [sc["component_id"]]
    assert cluster1["nc_count"] == 1

    text = discover(cloud.lab, "probe", "clusters", "--timeout", "2s")
    assert text.returncode == 0, text.stderr
    row = next(line for line in text.stdout.splitlines() if "cluster1" in line)
    assert f"{cc['component_id']} {cloud.lab.address('cloud')} registered" in row
    assert "cluster9" not in text.stdout


def test_discover_on_a_silent_lan_exits_1_saying_so(lab_factory: LabFactory) -> None:
    lab = lab_factory(single_lan(["probe"]))
    result = discover(lab, "probe", "clc")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == "error: no CLC heard on this LAN within 3s\n"
    result = discover(lab, "probe", "clusters", "--json", "--timeout", "1s")
    assert result.returncode == 1
    assert json.loads(result.stdout) == {"clusters": [], "ignored": [], "listened": 1.0}
    assert result.stderr == "error: no cluster heard on this LAN within 1s\n"
