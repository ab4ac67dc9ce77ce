"""A burst of 100 NCs announced at once, in `make test`: each registered exactly once, each
holding credentials the registrar confirms, one hook run each. No timing is asserted: the
figures of larger bursts live in `make bench` (docs/performance.md)."""

from __future__ import annotations

import pytest

from tests.integration.test_crash import CrashRig, crash_rig, fleet_key_cache  # noqa: F401

pytestmark = pytest.mark.integration

BURST = 100


def test_a_burst_of_100_ncs_registers_each_exactly_once(crash_rig: CrashRig) -> None:  # noqa: F811
    rig = crash_rig
    rig.start_registrar()
    rig.wait_cc_registered()
    rig.start_fleet(BURST)
    figures = rig.check()  # every NC registered once, verified current, hooks completed once
    assert figures["hook_runs"] == BURST, figures
    assert figures["marked_reruns"] == 0 and figures["crashes"] == 0, figures
    progress = rig.progress()
    assert progress["collected"] == BURST
    assert sum(n["requests"] for n in progress["nodes"]) >= BURST
