"""Attacks on hook output read from pipes on the event loop (registrar/hook_output.py, hooks.py):
floods while many hooks run (the loop must stay responsive), a script that closes its stdout,
a daemon left holding the pipes, bytes that are not UTF-8, tails at exactly the limit, and
the runner closed during a flood.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

from eucareg.core.model import HookOutcome, Role
from eucareg.registrar.hook_processes import group_alive
from eucareg.registrar.hooks import OUTPUT_LIMIT, HookRunner
from tests.unit.test_hooks import Journal, record_of, script
from tests.unit.test_hooks_output import alive, fds

FLOOD = (
    "timeout {secs} tr '\\0' o </dev/zero & timeout {secs} tr '\\0' e </dev/zero >&2 & wait; exit 0"
)


def pipes() -> int:
    return sum(target.startswith("pipe:") for target in fds().values())


class Ticker:
    """The longest gap between ticks of a task that asks to run every 10 ms."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(0.01)
            now = loop.time()
            self.worst = max(self.worst, now - last)
            last = now

    async def stop(self) -> float:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        return self.worst


async def test_floods_on_both_streams_among_fifty_hooks_leave_the_loop_responsive(
    tmp_path: Path,
) -> None:
    flooders = [record_of(Role.WALRUS) for _ in range(3)]
    others = [record_of(Role.WALRUS) for _ in range(50)]
    cases = "|".join(r.component_id for r in flooders)
    body = (
        f'case "$EUCAREG_ID" in {cases}) {FLOOD.format(secs=1.5)};;\n'
        '*) echo "quiet $EUCAREG_ID"; sleep 1; echo done >&2;; esac'
    )
    runner = HookRunner(script(tmp_path, "walrus", body), 20, Journal(), running=64)
    before = pipes()
    ticker = Ticker()
    started = time.monotonic()
    runs = await asyncio.wait_for(asyncio.gather(*(runner.run(r) for r in flooders + others)), 15)
    took = time.monotonic() - started
    worst = await ticker.stop()
    await runner.close()
    assert worst < 1.0, f"the loop stalled for {worst:.2f} s"
    for run in runs[: len(flooders)]:
        assert run.outcome is HookOutcome.OK, run
        assert run.stdout == "o" * OUTPUT_LIMIT
        assert run.stderr == "e" * OUTPUT_LIMIT
    for run, record in zip(runs[len(flooders) :], others, strict=True):
        assert run.outcome is HookOutcome.OK, run
        assert run.stdout == f"quiet {record.component_id}\n" and run.stderr == "done\n"
    assert took < 10
    assert pipes() == before


async def test_a_script_that_closes_its_stdout_and_runs_on_is_waited_for(tmp_path: Path) -> None:
    body = "exec 1>&-; echo still here >&2; sleep 0.5; echo bye >&2; exit 3"
    runner = HookRunner(script(tmp_path, "walrus", body), 5, Journal())
    before = pipes()
    started = time.monotonic()
    run = await asyncio.wait_for(runner.run(record_of(Role.WALRUS)), 10)
    assert time.monotonic() - started >= 0.5  # its end decides, not its stdout's
    assert run.outcome is HookOutcome.FAILED and run.exit_code == 3
    assert run.stdout == "" and run.stderr == "still here\nbye\n"
    await runner.close()
    assert pipes() == before


async def test_a_daemon_left_writing_into_the_pipes_holds_nothing_up(tmp_path: Path) -> None:
    """The script starts a daemon (its own session, SIGPIPE ignored: it writes on, into
    errors) that keeps both pipes and floods them, and exits at once: the run is recorded
    promptly, with a bounded tail, and none of our descriptors stays open."""
    pidfile = tmp_path / "daemon.pid"
    body = (
        "setsid sh -c 'trap \"\" PIPE; while :; do printf x; printf y >&2; done' &\n"
        f"echo $! > {pidfile}; echo started; exit 0"
    )
    runner = HookRunner(script(tmp_path, "walrus", body), 5, Journal())
    before = pipes()
    pid = 0
    try:
        started = time.monotonic()
        run = await asyncio.wait_for(runner.run(record_of(Role.WALRUS)), 10)
        took = time.monotonic() - started
        pid = int(pidfile.read_text())
        assert alive(pid)  # it still runs, and writes
        assert run.outcome is HookOutcome.OK and run.exit_code == 0
        assert took < 3
        assert len(run.stdout) <= OUTPUT_LIMIT and len(run.stderr) <= OUTPUT_LIMIT
        assert "started\n" in run.stdout or set(run.stdout) <= {"x"}
        await runner.close()
        assert pipes() == before
    finally:
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def test_output_that_is_not_utf8_is_stored_with_replacement_characters(
    tmp_path: Path,
) -> None:
    body = "printf 'a\\377\\376\\000b\\200'; printf '\\303' >&2"
    runner = HookRunner(script(tmp_path, "walrus", body), 5, Journal())
    run = await runner.run(record_of(Role.WALRUS))
    await runner.close()
    assert run.outcome is HookOutcome.OK
    assert run.stdout == "a\ufffd\ufffd\x00b\ufffd"  # the NUL is kept as it is
    assert run.stderr == "\ufffd"


async def test_a_tail_cut_inside_a_character_starts_with_a_replacement(tmp_path: Path) -> None:
    """Cut at a byte count, a multi-byte character at the cut is lost (one U+FFFD): cosmetic."""
    count = OUTPUT_LIMIT // 2  # two bytes each, then one more byte: one over the limit
    body = "i=0; s=''; while [ $i -lt 64 ]; do s=\"$s\"'é'; i=$((i+1)); done\n" + (
        f"yes \"$s\" | tr -d '\\n' | head -c {2 * count}; printf z"
    )
    runner = HookRunner(script(tmp_path, "walrus", body), 5, Journal())
    run = await runner.run(record_of(Role.WALRUS))
    await runner.close()
    assert run.stdout == "\ufffd" + "é" * (count - 1) + "z"


async def test_exactly_the_limit_is_kept_whole_and_one_byte_more_drops_the_first(
    tmp_path: Path,
) -> None:
    for extra, expected in ((0, "a" * OUTPUT_LIMIT), (1, "a" * OUTPUT_LIMIT)):
        body = (
            f"{{ printf {'b' if extra else ''}; head -c {OUTPUT_LIMIT} /dev/zero | tr '\\0' a; }}"
            " | tee /dev/stderr"
        )
        if not extra:
            body = f"head -c {OUTPUT_LIMIT} /dev/zero | tr '\\0' a | tee /dev/stderr"
        hooks = tmp_path / f"hooks{extra}"
        hooks.mkdir()
        runner = HookRunner(script(hooks, "walrus", body), 5, Journal())
        run = await runner.run(record_of(Role.WALRUS))
        await runner.close()
        assert run.outcome is HookOutcome.OK, run
        assert run.stdout == expected and run.stderr == expected


async def test_closing_the_runner_during_floods_ends_them_promptly(tmp_path: Path) -> None:
    journal = Journal()
    runner = HookRunner(script(tmp_path, "walrus", FLOOD.format(secs=30)), 60, journal, running=16)
    before = pipes()
    tasks = [asyncio.ensure_future(runner.run(record_of(Role.WALRUS))) for _ in range(10)]
    for _ in range(500):  # until all ten are started (journaled with their groups)
        if len(journal.runs) == 10:
            break
        await asyncio.sleep(0.01)
    assert len(journal.runs) == 10
    groups = [(run.pgid, run.proc_start) for run in journal.runs]
    ticker = Ticker()
    started = time.monotonic()
    await asyncio.wait_for(runner.close(), 5)
    runs = await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert time.monotonic() - started < 5
    assert await ticker.stop() < 1.0
    assert all(run.outcome is not HookOutcome.RUNNING for run in runs)
    assert all(len(run.stdout) <= OUTPUT_LIMIT for run in runs)
    assert not any(pgid is not None and group_alive(pgid, start) for pgid, start in groups)
    assert pipes() == before
