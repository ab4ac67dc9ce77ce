"""How a component that was sent away comes back: doubling delays drawn at random from their
upper half, so a thousand refused together do not return together, and a registrar's
Retry-After (429, 503) waited out in full. Over real HTTPS on 127.0.0.1 with a scripted
registrar; mDNS is the in-memory fake."""

from __future__ import annotations

import random
import time
from collections import Counter
from typing import Any

import pytest
from aiohttp import web

from eucareg.agent.collect import MAX_RETRY_AFTER, retry_after
from eucareg.agent.timing import Backoff
from tests.unit.test_agent_collect import (  # noqa: F401  (fixtures)
    TIMING,
    StartAgent,
    cloud,
    fresh_requests,
    registrar,
    start_walrus,
    walrus_of,
)
from tests.unit.test_agent_fakes import FakeRegistrar, eventually


def test_delays_double_up_to_the_maximum_each_drawn_from_its_upper_half() -> None:
    backoff = Backoff(1.0, 8.0, rng=random.Random(7).uniform)
    delays = [backoff.next() for _ in range(6)]
    for delay, bound in zip(delays, [1, 2, 4, 8, 8, 8], strict=True):
        assert bound / 2 <= delay <= bound
    backoff.reset()
    assert 0.5 <= backoff.next() <= 1.0


def test_a_registrars_retry_after_is_waited_out_and_spread() -> None:
    backoff = Backoff(1.0, 8.0, rng=random.Random(3).uniform)
    waits = [backoff.next(at_least=20.0) for _ in range(50)]
    assert all(20.0 <= w <= 30.0 for w in waits)
    assert max(waits) - min(waits) > 5.0  # not all at the same moment


def test_two_hundred_components_sent_away_together_come_back_spread_out() -> None:
    rng = random.Random(11)
    first = [Backoff(1.0, 30.0, rng=rng.uniform).next() for _ in range(200)]
    later = [Backoff(1.0, 30.0, rng=rng.uniform).next(at_least=10.0) for _ in range(200)]
    for name, waits, low, width in (("backoff", first, 0.5, 0.05), ("retry-after", later, 10, 0.5)):
        buckets = Counter(int((w - low) / width) for w in waits)
        print(f"{name}: 200 retries in 10 buckets of {width:g} s from {low:g} s")
        for bucket in range(10):
            print(f"  {low + bucket * width:5.2f} s {'#' * buckets[bucket]}")
        # No tenth of the window holds more than a quarter of them: they do not come back
        # together (uniform would be 20 per bucket).
        assert max(buckets.values()) <= 50
        assert len(buckets) == 10


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("2", 2.0),
        (" 5 ", 5.0),
        ("0", 0.0),
        ("999999", MAX_RETRY_AFTER),
        ("-1", None),
        ("1.5", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_headers_are_read_as_seconds_within_bounds(
    header: str | None, seconds: float | None
) -> None:
    assert retry_after(header) == seconds


def refused(seconds: int, status: int = 429) -> Any:
    async def reply(_payload: dict[str, Any]) -> web.StreamResponse:
        return web.json_response(
            {"error": "busy", "code": "rate-limited"},
            status=status,
            headers={"Retry-After": str(seconds)},
        )

    return reply


@pytest.mark.parametrize("status", [429, 503])
async def test_a_component_sent_away_waits_as_long_as_the_registrar_asked(
    start_walrus: StartAgent,  # noqa: F811
    registrar: FakeRegistrar,  # noqa: F811
    status: int,
) -> None:
    registrar.script = [refused(1, status)]
    url = await registrar.start()
    agent, _ = await start_walrus(url)
    walrus = walrus_of(agent)
    await eventually(lambda: len(fresh_requests(registrar)) >= 1)
    sent_away = time.monotonic()
    await eventually(lambda: walrus.registered, timeout=10)
    # Its own backoff would have asked again within TIMING.retry_max (0.1 s).
    assert TIMING.retry_max < 1.0
    assert time.monotonic() - sent_away >= 1.0
    assert len(fresh_requests(registrar)) == 2


def test_sent_away_again_and_again_we_still_back_off() -> None:
    """A registrar that always answers Retry-After: 1 must not gather everyone it turns away
    into the same second: the ranges drawn from grow as the backoff doubles."""
    ranges: list[tuple[float, float]] = []

    def record(low: float, high: float) -> float:
        ranges.append((low, high))
        return low

    backoff = Backoff(1.0, 30.0, rng=record)
    for _ in range(6):
        backoff.next(at_least=1.0)
    assert ranges == [(1.0, 1.5), (1.0, 2.0), (2.0, 4.0), (4.0, 8.0), (8.0, 16.0), (15.0, 30.0)]
    # A long Retry-After is still waited out in full, whatever the backoff's level.
    assert backoff.next(at_least=50.0) == 50.0
