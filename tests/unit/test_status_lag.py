"""The registrar's event-loop lag in GET /v1/status (`registrar.loop_lag`): the worst delay since
the registrar started or since the last `?lag=reset`, over HTTP against a real registrar whose
loop the test blocks on purpose.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.unit.test_api_harness import CC_SETTINGS, Harness, eventually, served

BLOCK = 0.6  # seconds the test holds the event loop


@pytest.fixture
async def cc(tmp_path: Path) -> AsyncIterator[Harness]:
    async with served(tmp_path, CC_SETTINGS) as harness:
        yield harness


def block_the_loop() -> None:
    """Hold the loop the registrar runs on (the test's own), as a slow synchronous step would."""
    time.sleep(BLOCK)


async def test_status_reports_the_loop_lag_since_the_start(cc: Harness) -> None:
    status, answer = await cc.get("/v1/status")
    assert status == 200
    lag = answer["registrar"]["loop_lag"]
    assert set(lag) == {"worst_ms", "last_ms", "since", "interval_ms"}
    assert lag["since"] == cc.registrar.started_at
    assert lag["interval_ms"] == 50
    assert 0 <= lag["worst_ms"] < BLOCK * 1000
    assert 0 <= lag["last_ms"] <= lag["worst_ms"]


async def test_a_blocked_loop_shows_as_the_worst_lag_until_reset(cc: Harness) -> None:
    block_the_loop()
    await eventually(lambda: cc.registrar.lag.worst >= BLOCK * 0.9, "the lag to be measured")
    # A plain read does not reset.
    for _ in range(2):
        status, answer = await cc.get("/v1/status")
        assert status == 200
        assert answer["registrar"]["loop_lag"]["worst_ms"] >= BLOCK * 900
    # The reset answers with the period that ends, then a new period begins.
    before_reset = time.time()
    status, answer = await cc.get("/v1/status", lag="reset")
    assert status == 200
    ended = answer["registrar"]["loop_lag"]
    assert ended["worst_ms"] >= BLOCK * 900
    assert ended["since"] == cc.registrar.started_at
    status, answer = await cc.get("/v1/status")
    assert status == 200
    fresh = answer["registrar"]["loop_lag"]
    assert fresh["worst_ms"] < BLOCK * 900
    assert before_reset <= fresh["since"] <= time.time()
    # The status tree itself is unchanged by the reset.
    assert set(answer) == {"registrar", "local", "tree", "errors", "warnings", "legacy", "mdns"}


async def test_head_does_not_reset_and_a_bad_value_is_refused(cc: Harness) -> None:
    block_the_loop()
    await eventually(lambda: cc.registrar.lag.worst >= BLOCK * 0.9, "the lag to be measured")
    status, _ = await cc.admin("HEAD", "/v1/status", params={"lag": "reset"})
    assert status == 200
    assert cc.registrar.lag.worst >= BLOCK * 0.9
    status, answer = await cc.get("/v1/status", lag="now")
    assert status == 400
    assert answer == {"error": "lag must be reset, got 'now'", "code": "invalid-query"}
    assert cc.registrar.lag.worst >= BLOCK * 0.9


async def test_an_unauthenticated_reset_is_refused_and_resets_nothing(cc: Harness) -> None:
    block_the_loop()
    await eventually(lambda: cc.registrar.lag.worst >= BLOCK * 0.9, "the lag to be measured")
    status, _ = await cc.admin("GET", "/v1/status", token=None, params={"lag": "reset"})
    assert status == 401
    assert cc.registrar.lag.worst >= BLOCK * 0.9
