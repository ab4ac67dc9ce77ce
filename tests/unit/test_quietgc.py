"""Full garbage collections wait for a quiet registrar (eucareg/registrar/quietgc.py)."""

from __future__ import annotations

import asyncio
import gc

import pytest

from eucareg.registrar import quietgc
from eucareg.registrar.quietgc import QuietCollector


def pending(count: int) -> None:
    """Exactly `count` collections of the middle generation since the last full one."""
    gc.collect()
    for _ in range(count):
        gc.collect(1)


async def test_full_collections_are_due_when_quiet_or_overdue_and_only_with_garbage() -> None:
    now = [1000.0]
    busy = [1000.0]
    collector = QuietCollector(lambda: busy[0], lambda: now[0])
    pending(quietgc.PENDING)
    assert not collector.due()  # busy this very moment, and the last one was just now
    now[0] += quietgc.QUIET
    assert collector.due()  # quiet long enough
    busy[0] = now[0]
    assert not collector.due()
    now[0] = collector.last_full + quietgc.FULL_EVERY
    busy[0] = now[0]
    assert collector.due()  # busy, but overdue
    pending(quietgc.PENDING - 1)
    assert not collector.due()  # too little happened since the last one


async def test_the_automatic_full_collection_is_off_while_it_runs_and_back_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(quietgc, "CHECK", 0.01)
    before = gc.get_threshold()
    first = QuietCollector(lambda: 0.0)
    second = QuietCollector(lambda: 0.0)  # two registrars in one process
    first.start()
    second.start()
    assert gc.get_threshold() == (before[0], before[1], quietgc.NEVER)
    pending(quietgc.PENDING)
    for _ in range(500):  # bounded: the quiet collector takes over within a few checks
        if first.full_collections or second.full_collections:
            break
        await asyncio.sleep(0.01)
    assert first.full_collections + second.full_collections >= 1
    assert gc.get_count()[2] < quietgc.PENDING
    await first.stop()
    assert gc.get_threshold()[2] == quietgc.NEVER  # the second still runs
    await second.stop()
    await second.stop()  # twice is harmless
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
