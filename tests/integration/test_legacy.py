"""Legacy announcements over the wire: an avahi-daemon on another lab host publishes what
Ubuntu 10.04 (an SC, `cluster1 storage`, with txtvers/protovers/eucavers/type) and 9.10 (the
CC, `Eucalyptus cluster controller`, no TXT data) published, with plain `avahi-publish`. An
eucareg CLC reports each as one `legacy` event, lists both in its status while they are
heard, and registers neither; a goodbye takes one out of status, and its return is listed
again without a second event.

Every wait is for the event or the status that shows the outcome, never a fixed sleep.
"""

from __future__ import annotations

from typing import Any

import pytest

from eucalab.cloud import LabCloud
from eucalab.lab import Lab
from eucalab.process import LabProcess
from tests.integration.conftest import CloudFactory
from tests.integration.test_lab import avahi_tools  # noqa: F401  (a fixture, used by name)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("avahi_tools")]

SERVICE = "_eucalyptus._tcp"
SC_1004 = "cluster1 storage"
CC_910 = "Eucalyptus cluster controller"
SC_ARGV = [SC_1004, SERVICE, "8773", "txtvers=1", "protovers=1", "eucavers=1.6.2", "type=storage"]


def publish(lab: Lab, host: str, name: str, argv: list[str], instance: str) -> LabProcess:
    """`avahi-publish -s ...` on `host` until the lab stops (or the test stops it)."""
    proc = lab.spawn(host, name, ["avahi-publish", "-s", *argv], env=lab.avahi_env(host))
    proc.wait_for_log(f"Established under name '{instance}'", timeout=30)
    return proc


def legacy_events(cloud: LabCloud) -> list[dict[str, Any]]:
    return cloud.events("cloud", "&kind=legacy")


def test_old_eucalyptus_announcements_are_reported_and_not_registered(
    cloud_factory: CloudFactory,
) -> None:
    cloud = cloud_factory({"cloud": {"clc": None}, "oldcloud": {}})
    lab = cloud.lab
    cloud.start("cloud")
    cloud.wait_for_api("cloud")  # the lab opens an install window: it registers none of this
    lab.start_avahi("oldcloud")
    old = str(lab.address("oldcloud"))

    sc = publish(lab, "oldcloud", "sc1004", SC_ARGV, SC_1004)
    publish(lab, "oldcloud", "cc910", [CC_910, SERVICE, "8774"], CC_910)

    events = cloud.wait_for_events(
        "cloud",
        lambda evs: {e["code"] for e in evs} >= {"legacy-10.04", "legacy-9.10"},
        "&kind=legacy",
        timeout=60,
    )
    by_code = {e["code"]: e for e in events}
    storage, controller = by_code["legacy-10.04"], by_code["legacy-9.10"]
    assert (storage["component_id"], storage["role"], storage["cluster"]) == (
        f"instance:{SC_1004}",
        "sc",
        "cluster1",
    )
    assert storage["address"] == old
    assert "Eucalyptus 10.04 sc of cluster cluster1" in storage["reason"]
    assert "install eucareg there" in storage["reason"]
    assert "eucareg import" in storage["reason"]
    assert (controller["component_id"], controller["role"], controller["cluster"]) == (
        f"instance:{CC_910}",
        "cc",
        None,
    )
    assert controller["address"] == old
    assert "Eucalyptus 9.10 cc" in controller["reason"]

    status = cloud.wait_for("cloud", lambda s: len(s["legacy"]) == 2, timeout=30)
    assert {
        (c["kind"], c["role"], c["cluster"], c["address"], c["instance"]) for c in status["legacy"]
    } == {
        ("10.04", "sc", "cluster1", old, SC_1004),
        ("9.10", "cc", None, old, CC_910),
    }
    # Not registered, not misread: no record, no rejected event, nothing in the tree.
    assert cloud.registry("cloud") == []
    assert cloud.events("cloud", "&kind=rejected") == []
    assert status["tree"]["walrus"] == [] and status["tree"]["clusters"] == []

    assert len(legacy_events(cloud)) == 2

    # A goodbye (avahi-publish stopped) takes the SC out of status; the CC stays.
    lab.stop(sc)
    status = cloud.wait_for("cloud", lambda s: len(s["legacy"]) == 1, timeout=30)
    assert [c["instance"] for c in status["legacy"]] == [CC_910]

    # Back again, saying the same: listed again, and not reported a second time.
    publish(lab, "oldcloud", "sc1004b", SC_ARGV, SC_1004)
    cloud.wait_for("cloud", lambda s: len(s["legacy"]) == 2, timeout=30)
    assert len(legacy_events(cloud)) == 2
    assert cloud.registry("cloud") == []
