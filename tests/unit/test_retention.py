"""History is bounded: old events and finished hook runs are pruned by age and by count (a
running hook's journal row never), and the engine's memory of event-only notes has a cap."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from eucareg.core.model import HookOutcome, HookRun, NewEvent, Role
from eucareg.core.transitions import Prune, Write
from eucareg.mdns.types import Sighting
from eucareg.store.registry import Store, sqlite_url
from tests.factories import ann, sighting
from tests.unit.test_registrar import make_registrar


def event(at: float, n: int) -> NewEvent:
    return NewEvent(at, f"nc-{n:012d}", "nc", "c1", "10.0.0.1", "refused", "test", f"e{n}")


def run(n: int, at: float, outcome: HookOutcome) -> HookRun:
    return HookRun(f"run-{n}", f"nc-{n:012d}", "/hooks/node", at, outcome)


def test_old_and_surplus_history_is_dropped_but_a_running_hook_is_kept(tmp_path: Path) -> None:
    store = Store(sqlite_url(tmp_path / "registry.db"))
    store.apply([Write(events=tuple(event(float(n), n) for n in range(100)))])
    runs = [run(n, float(n), HookOutcome.OK) for n in range(100)]
    runs[3] = run(3, 3.0, HookOutcome.RUNNING)  # old, but its hook may still run
    store.apply([Write(hook_runs=tuple(runs))])
    store.apply([Write(prune=Prune(before=10.0, max_events=1000, max_hook_runs=1000))])
    assert [e.reason for e in store.events()][:2] == ["e10", "e11"]
    assert len(store.events()) == 90
    kept = {r.run_id for r in store.hook_runs()}
    assert "run-3" in kept and "run-4" not in kept and len(kept) == 91
    store.apply([Write(prune=Prune(before=0.0, max_events=25, max_hook_runs=5))])
    assert [e.reason for e in store.events()] == [f"e{n}" for n in range(75, 100)]
    assert {r.run_id for r in store.hook_runs()} == {"run-3", *(f"run-{n}" for n in range(95, 100))}
    store.close()


async def test_a_registrar_prunes_at_start_by_its_retention(tmp_path: Path) -> None:
    seed = Store(sqlite_url(tmp_path / "registry.db"))
    seed.apply([Write(events=(event(1.0, 1), event(2e9, 2)))])  # 1970 and 2033
    seed.close()
    reg = await make_registrar(tmp_path)
    await reg.idle()
    reasons = [e.reason for e in reg.store.events()]
    assert "e1" not in reasons and "e2" in reasons
    await reg.close()


async def test_a_flood_of_unique_bad_announcements_cannot_grow_the_notes(tmp_path: Path) -> None:
    reg = await make_registrar(tmp_path)
    reg.notes.limit = 50
    base = sighting(ann(Role.WALRUS))
    for n in range(200):  # each a different instance with an unusable address
        bad = Sighting(f"flood-{n}", base.change, txt={**base.txt, "addr": "127.0.0.1"})
        reg.on_sighting(bad)
    await reg.idle()
    assert len(reg.notes) == 50
    # Each was news once: the first 100 of the window are written one by one, the rest held
    # for one summary event (written when the window ends, or here at close).
    rejected = [e for e in reg.store.events() if e.kind == "rejected"]
    assert len(rejected) == 100
    await reg.close()
    [summary] = [e for e in reg.store.events() if e.kind == "summary"]
    assert summary.code == "notes-summarised"
    assert summary.reason.startswith("100 more rejected or refused announcements")
    assert "bad-address 100" in summary.reason


async def test_a_flood_of_refusals_becomes_one_summary_event_per_window(tmp_path: Path) -> None:
    reg = await make_registrar(tmp_path)
    reg.notes.per_window, reg.notes.window = 5, 0.3
    base = sighting(ann(Role.WALRUS))
    for n in range(20):
        reg.on_sighting(Sighting(f"flood-{n}", base.change, txt={**base.txt, "fp": "md5:x"}))
    await reg.idle()
    assert len([e for e in reg.store.events() if e.kind == "rejected"]) == 5
    deadline = time.monotonic() + 10
    while not (summaries := [e for e in await reg.events() if e.kind == "summary"]):
        assert time.monotonic() < deadline, "no summary event when the window ended"
        await asyncio.sleep(0.05)
    assert summaries[0].reason.startswith("15 more rejected or refused announcements")
    assert "bad-txt 15" in summaries[0].reason
    await reg.close()
    assert len([e for e in reg.store.events() if e.kind == "summary"]) == 1  # nothing held
