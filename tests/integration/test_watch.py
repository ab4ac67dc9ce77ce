"""Real agents with an hour between re-checks: a cloud still registers itself, and an NC whose
whole key directory is removed notices at once (its file watch, not a timer) and collects the
same credentials again (lesson L9). No timing is asserted, only that it happens.
"""

from __future__ import annotations

import shutil
import time

from tests.integration.conftest import CloudFactory
from tests.integration.test_cloud import converge, hook_calls


def test_an_nc_whose_key_directory_is_removed_collects_its_credentials_again(
    cloud_factory: CloudFactory,
) -> None:
    plan: dict[str, dict[str, str | None]] = {
        "cloud": {"clc": None, "cc": "cluster1"},
        "node1": {"nc": "cluster1"},
    }
    # Nothing is polled in an hour: whatever happens below is driven by events.
    cloud = cloud_factory(plan, recheck_interval="1h")
    cloud.start_all()
    converge(cloud)
    # The files are there; wait until the agent itself has taken them as its registration, or
    # the removal below could land between its write and its own check (CI saw that once).
    cloud.agents["node1"].wait_for_log("is registered", timeout=30)
    keys = cloud.key_dir("node1")
    cert = keys / "node-cert.pem"
    original = cert.read_bytes()
    hooks = hook_calls(cloud)

    shutil.rmtree(keys)
    deadline = time.monotonic() + 60
    while not cert.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cert.read_bytes() == original
    assert hook_calls(cloud) == hooks  # collected again, not registered again
    assert "no longer registered (credentials missing)" in cloud.logs("node1")
