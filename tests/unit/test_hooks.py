"""Hook runs: arguments and environment, outcomes, the journal, and what a misbehaving or
interrupted script leaves behind."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

import pytest

from eucareg.core.model import HookOutcome, HookRun, Record, Role, Status
from eucareg.registrar.hook_processes import group_alive
from eucareg.registrar.hooks import OUTPUT_LIMIT, HookRunner
from tests.factories import ann, record_from


def script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return tmp_path


def record_of(role: Role, cluster: str | None = None) -> Record:
    return record_from(ann(role, cluster), Status.REGISTERING, reason="test")


class Journal:
    def __init__(self) -> None:
        self.runs: list[HookRun] = []

    async def __call__(self, *runs: HookRun) -> None:
        self.runs.extend(runs)


def runner(hooks: Path, timeout: float = 5) -> tuple[HookRunner, Journal]:
    journal = Journal()
    return HookRunner(hooks, timeout, journal), journal


async def test_arguments_and_environment_are_the_documented_ones(tmp_path: Path) -> None:
    nc = record_of(Role.NC, "c1")
    body = 'echo "$@|$EUCAREG_ROLE|$EUCAREG_CLUSTER|$EUCAREG_ID|$EUCAREG_RERUN|$EUCAREG_ATTEMPT"'
    hooks, _ = runner(script(tmp_path, "node", body))
    run = await hooks.run(nc, rerun=True, attempt=3)
    assert run.outcome is HookOutcome.OK and run.exit_code == 0
    assert run.stdout.strip() == (
        f"{nc.address} c1 {nc.component_id} {nc.fingerprint}|nc|c1|{nc.component_id}|1|3"
    )
    assert run.rerun and run.attempt == 3


async def test_the_start_is_journaled_with_its_process_group_before_the_script_runs(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "ran"
    journal = Journal()
    seen: list[bool] = []

    async def journal_checks(run: HookRun) -> None:
        # The script must not have started yet: its group id is only now being made durable.
        seen.append(marker.exists())
        await journal(run)

    script(tmp_path, "walrus", f"touch {marker}")
    gated = HookRunner(tmp_path, 5, journal_checks)
    run = await gated.run(record_of(Role.WALRUS))
    assert run.outcome is HookOutcome.OK and marker.exists()
    assert seen == [False]
    [started] = journal.runs
    assert started.outcome is HookOutcome.RUNNING
    assert started.pgid is not None and started.proc_start is not None
    assert started.run_id == run.run_id and run.pgid == started.pgid


async def test_the_agents_environment_does_not_leak_into_hooks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EUCAREG_SECRET_OF_THE_AGENT", "leaked")
    hooks, _ = runner(script(tmp_path, "walrus", 'echo "[$EUCAREG_SECRET_OF_THE_AGENT]"; env'))
    run = await hooks.run(record_of(Role.WALRUS))
    assert run.stdout.splitlines()[0] == "[]"
    assert "PATH=" in run.stdout


async def test_timeout_keeps_output_and_is_not_held_up_by_an_escaped_child(
    tmp_path: Path,
) -> None:
    # The escaped child keeps stdout open in a session of its own, beyond the group kill.
    hooks, _ = runner(
        script(tmp_path, "walrus", "echo before-the-hang\nsetsid sleep 30 &\nsleep 30"), 0.5
    )
    started = time.monotonic()
    run = await hooks.run(record_of(Role.WALRUS))
    assert run.outcome is HookOutcome.TIMEOUT and run.exit_code is None
    assert "before-the-hang" in run.stdout
    assert "killed after 0.5s" in run.stderr
    assert time.monotonic() - started < 4


async def test_output_is_bounded_to_the_tail(tmp_path: Path) -> None:
    hooks, _ = runner(
        script(tmp_path, "walrus", "head -c 1000000 /dev/zero | tr '\\\\0' x; echo END")
    )
    run = await hooks.run(record_of(Role.WALRUS))
    assert run.outcome is HookOutcome.OK
    assert len(run.stdout) <= OUTPUT_LIMIT and run.stdout.endswith("END\n")


async def test_missing_and_non_executable_scripts(tmp_path: Path) -> None:
    hooks, journal = runner(tmp_path)
    skipped = await hooks.run(record_of(Role.CC, "c1"))
    assert skipped.outcome is HookOutcome.SKIPPED and "no script" in skipped.stderr
    (tmp_path / "storage").write_text("#!/bin/sh\n")
    failed = await hooks.run(record_of(Role.SC, "c1"))
    assert failed.outcome is HookOutcome.FAILED and "not executable" in failed.stderr
    assert journal.runs == []  # nothing started, nothing to journal


async def test_a_value_exec_refuses_is_a_failed_run_not_an_exception(tmp_path: Path) -> None:
    hooks, _ = runner(script(tmp_path, "walrus", "true"))
    poisoned = replace(record_of(Role.WALRUS), reason="x", address="10.0.0.1\x00; rm -rf /")
    run = await hooks.run(poisoned)
    assert run.outcome is HookOutcome.FAILED
    assert "cannot run" in run.stderr


async def test_cancelling_a_run_kills_its_whole_process_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    body = f"sleep 60 & echo $! >> {pids}\necho $$ >> {pids}\nwait"
    hooks, journal = runner(script(tmp_path, "walrus", body), 120)
    task = asyncio.create_task(hooks.run(record_of(Role.WALRUS)))
    deadline = time.monotonic() + 10
    while not (pids.exists() and len(pids.read_text().split()) == 2):
        assert time.monotonic() < deadline, "the hook never started"
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    [started] = journal.runs
    assert started.pgid is not None
    assert not group_alive(started.pgid, started.proc_start)
    for pid in map(int, pids.read_text().split()):
        assert _zombie(pid)


async def test_close_kills_running_hooks(tmp_path: Path) -> None:
    hooks, journal = runner(script(tmp_path, "walrus", "sleep 60"), 120)
    task = asyncio.create_task(hooks.run(record_of(Role.WALRUS)))
    deadline = time.monotonic() + 10
    while not journal.runs:
        assert time.monotonic() < deadline, "the hook never started"
        await asyncio.sleep(0.02)
    started = time.monotonic()
    await hooks.close()
    run = await task
    assert time.monotonic() - started < 3
    assert run.outcome is HookOutcome.FAILED and run.exit_code == -9
    assert run.pgid is not None and not group_alive(run.pgid, run.proc_start)


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


@pytest.mark.parametrize("limit", [1, 2])
async def test_no_more_hooks_run_at_once_than_the_limit(tmp_path: Path, limit: int) -> None:
    """registrar.max_hooks_running: six slow hooks with a limit of N never overlap by more
    than N, and do overlap by N (the limit is not a serialisation)."""
    log = tmp_path / "log"
    hooks_dir = script(tmp_path, "node", f"echo start >> {log}; sleep 0.3; echo end >> {log}")
    hooks = HookRunner(hooks_dir, 5, Journal(), limit)
    runs = await asyncio.gather(*(hooks.run(record_of(Role.NC, "c1")) for _ in range(6)))
    assert all(run.outcome is HookOutcome.OK for run in runs)
    running, most = 0, 0
    for line in log.read_text().split():
        running += 1 if line == "start" else -1
        most = max(most, running)
    assert most == limit


def our_children() -> set[int]:
    """Processes whose parent is this test process (any of its threads), zombies included."""
    found: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        try:
            text = (task / "children").read_text()
        except FileNotFoundError:  # the thread ended meanwhile (a reaper, a worker)
            continue
        found.update(int(pid) for pid in text.split())
    return found


@pytest.mark.parametrize("turns", range(0, 40, 3))
async def test_cancelled_at_any_point_a_run_leaves_no_process_behind(
    tmp_path: Path, turns: int
) -> None:
    """A stop can cancel a run while its process is being started in a worker thread, held
    at the gate, journaled or running: whatever the point, nothing of it survives, no zombie
    is left, and a script that had not been let through the gate never ran."""
    log = tmp_path / "ran"
    hooks, journal = runner(script(tmp_path, "walrus", f"echo ran >> {log}\nexec sleep 30"))
    before = our_children()
    task = asyncio.create_task(hooks.run(record_of(Role.WALRUS)))
    for _ in range(turns):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await hooks.close()
    # The reaper of an abandoned start is a thread of its own: give it a bounded moment.
    for _ in range(500):
        if not our_children() - before:
            break
        await asyncio.sleep(0.02)
    assert our_children() - before == set()
    if not journal.runs:
        assert not log.exists()  # never journaled, so never let through the gate
    for run in journal.runs:
        assert run.pgid is not None and not group_alive(run.pgid, run.proc_start)
