"""A hook's output, read from pipes while it runs: the tail of each stream is kept exactly, a
flood costs a bounded amount while it lasts, a child the script leaves writing holds nothing
up, and no descriptor is left behind whichever way a run ends."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import stat
import time
from dataclasses import replace
from pathlib import Path
from typing import IO, ClassVar

import pytest

from eucareg.core.model import HookOutcome, Role, Status
from eucareg.registrar import hooks
from eucareg.registrar.batch import Member, run_batch
from eucareg.registrar.hook_output import CHUNK, HookOutput
from eucareg.registrar.hooks import OUTPUT_LIMIT, HookRunner
from tests.factories import ann, record_from
from tests.unit.test_api_harness import eventually
from tests.unit.test_hooks import Journal, record_of, runner, script

OUT = "".join(f"{n}\n" for n in range(1, 100001))  # `seq 1 100000`: 588,895 bytes
ERR = "".join(f"{n}\n" for n in range(1, 300000, 3))  # `seq 1 3 300000`
BOTH = "seq 1 100000 & seq 1 3 300000 >&2; wait"


class Spy(HookOutput):
    """The real capture, remembered so that a test can see what it holds while a hook runs."""

    seen: ClassVar[list[HookOutput]] = []

    def __init__(self, stdout: IO[bytes], stderr: IO[bytes], limit: int) -> None:
        super().__init__(stdout, stderr, limit)
        Spy.seen.append(self)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[HookOutput]:
    seen: list[HookOutput] = []
    monkeypatch.setattr(Spy, "seen", seen)
    monkeypatch.setattr(hooks, "HookOutput", Spy)
    return seen


def fds() -> dict[str, str]:
    """This process's open descriptors and what each is (a pipe shows as pipe:[inode])."""
    found: dict[str, str] = {}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the directory's own, closed by now
            found[fd] = os.readlink(f"/proc/self/fd/{fd}")
    return found


def alive(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2] != "Z"


async def test_the_tail_kept_is_exactly_the_last_bytes_of_each_stream(tmp_path: Path) -> None:
    assert len(OUT) > 4 * OUTPUT_LIMIT and len(ERR) > 4 * OUTPUT_LIMIT
    runs, _ = runner(script(tmp_path, "walrus", BOTH))
    run = await runs.run(record_of(Role.WALRUS))
    assert run.outcome is HookOutcome.OK and run.exit_code == 0
    assert run.stdout == OUT[-OUTPUT_LIMIT:]
    assert run.stderr == ERR[-OUTPUT_LIMIT:]


async def test_a_short_output_is_kept_whole(tmp_path: Path) -> None:
    runs, _ = runner(script(tmp_path, "walrus", "printf out; printf err >&2; exit 4"))
    run = await runs.run(record_of(Role.WALRUS))
    assert (run.outcome, run.exit_code, run.stdout, run.stderr) == (
        HookOutcome.FAILED,
        4,
        "out",
        "err",
    )


async def test_a_hook_killed_at_the_timeout_keeps_its_tails_and_the_note(tmp_path: Path) -> None:
    runs, _ = runner(script(tmp_path, "walrus", f"{BOTH}\nexec sleep 60"), 2)
    started = time.monotonic()
    run = await runs.run(record_of(Role.WALRUS))
    assert run.outcome is HookOutcome.TIMEOUT and run.exit_code is None
    assert run.stdout == OUT[-OUTPUT_LIMIT:]
    assert run.stderr == (ERR + "\nkilled after 2s")[-OUTPUT_LIMIT:]
    assert time.monotonic() - started < 10


async def test_a_child_left_writing_does_not_hold_the_run_up(tmp_path: Path) -> None:
    """The script starts a child that floods its stdout (the same pipe) and ignores SIGPIPE,
    and exits: the run is recorded at once with what was written; once our end is closed the
    child's writes fail (it notes that in `broke`), and nothing of ours blocks or breaks."""
    pidfile, wrote, broke = tmp_path / "child", tmp_path / "wrote", tmp_path / "broke"
    body = (
        "( trap '' PIPE; echo child-floods; : > \"$1\"\n"
        f'  while :; do echo child-floods || : > "{broke}"; done ) &\n'
        f'echo $! >> "{pidfile}"\n'
        'while [ ! -e "$1" ]; do sleep 0.01; done\n'
        "echo script-done >&2\n"
    )
    runs, _ = runner(script(tmp_path, "walrus", body), 60)
    # The hook's first argument is the address: here the file the child creates once it wrote.
    walrus = replace(record_of(Role.WALRUS), address=str(wrote))
    try:
        started = time.monotonic()
        run = await asyncio.wait_for(runs.run(walrus), 20)
        assert time.monotonic() - started < 10
        assert run.outcome is HookOutcome.OK and run.exit_code == 0
        assert run.stderr == "script-done\n"
        assert "child-floods\n" in run.stdout and len(run.stdout) <= OUTPUT_LIMIT
        await eventually(broke.exists, "the child's writes to the closed pipe failing")
        [child] = map(int, pidfile.read_text().split())
        assert alive(child)  # still writing: it was neither waited for nor killed
        wrote.unlink()
        again = await asyncio.wait_for(runs.run(walrus), 20)
        assert again.outcome is HookOutcome.OK
        assert again.stderr == "script-done\n"
    finally:
        for pid in pidfile.read_text().split() if pidfile.exists() else ():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        await runs.close()


@pytest.mark.parametrize("fd", [1, 2])
async def test_a_flood_is_bounded_while_the_hook_runs(
    tmp_path: Path, spy: list[HookOutput], fd: int
) -> None:
    pidfile, release = tmp_path / "pid", tmp_path / "release"
    body = (
        f"head -c 30000000 /dev/zero >&{fd}\n"
        f'echo $$ > "{pidfile}"\n'
        f'while [ ! -e "{release}" ]; do sleep 0.05; done'
    )
    runs, _ = runner(script(tmp_path, "walrus", body), 120)
    task = asyncio.create_task(runs.run(record_of(Role.WALRUS)))
    try:
        # The pid is written once all 30 MB went through the pipe: all of it has been read.
        await eventually(lambda: bool(pidfile.exists() and pidfile.read_text()), "the flood", 60)
        pid = int(pidfile.read_text())
        held = os.stat(f"/proc/{pid}/fd/{fd}")
        assert stat.S_ISFIFO(held.st_mode) and held.st_size <= 4 * OUTPUT_LIMIT
        [output] = spy
        assert output.held <= 2 * OUTPUT_LIMIT + CHUNK
    finally:
        release.touch()
        run = await asyncio.wait_for(task, 20)
    assert run.outcome is HookOutcome.OK
    flooded, quiet = (run.stdout, run.stderr) if fd == 1 else (run.stderr, run.stdout)
    assert flooded == "\0" * OUTPUT_LIMIT and quiet == ""


async def test_a_batch_hook_flood_is_bounded_too(tmp_path: Path, spy: list[HookOutput]) -> None:
    pidfile, release = tmp_path / "pid", tmp_path / "release"
    script(
        tmp_path,
        "node-batch",
        "head -c 30000000 /dev/zero >&2\n"
        f'echo $$ > "{pidfile}"\n'
        f'while [ ! -e "{release}" ]; do sleep 0.05; done\n'
        'for a in "$@"; do echo "ok $a"; done > "$EUCAREG_RESULTS"',
    )
    members = [Member(record_from(ann(Role.NC, "c1"), Status.REGISTERING)) for _ in range(3)]
    task = asyncio.create_task(run_batch(HookRunner(tmp_path, 120, Journal()), members))
    try:
        await eventually(lambda: bool(pidfile.exists() and pidfile.read_text()), "the flood", 60)
        [output] = spy
        assert output.held <= 2 * OUTPUT_LIMIT + CHUNK
    finally:
        release.touch()
        runs = await asyncio.wait_for(task, 20)
    assert [r.outcome for r in runs] == [HookOutcome.OK] * 3
    assert all(r.stderr.startswith("\0") for r in runs)


async def test_no_descriptor_is_left_behind_across_many_runs(tmp_path: Path) -> None:
    """Fifty runs ending every way: exit with output on both streams, killed at the timeout,
    refused by exec, and cancelled while running. Our descriptors are as they were."""
    for name in ("quick", "slow", "held"):
        (tmp_path / name).mkdir()
    quick, _ = runner(script(tmp_path / "quick", "walrus", BOTH))
    slow, _ = runner(script(tmp_path / "slow", "walrus", "exec sleep 60"), 0.5)
    held, held_journal = runner(script(tmp_path / "held", "walrus", "exec sleep 60"), 120)
    await quick.run(record_of(Role.WALRUS))  # the loop's and the pools' own, made once
    # What earlier tests left to the collector is closed now, not half-way through this one.
    gc.collect()
    before = fds()
    poisoned = replace(record_of(Role.WALRUS), address="10.0.0.1\x00")
    cancelled = [asyncio.create_task(held.run(record_of(Role.WALRUS))) for _ in range(5)]
    ended = await asyncio.gather(
        *(quick.run(record_of(Role.WALRUS)) for _ in range(35)),
        *(slow.run(record_of(Role.WALRUS)) for _ in range(5)),
        *(quick.run(poisoned) for _ in range(5)),
    )
    await eventually(lambda: len(held_journal.runs) == 5, "the held hooks to start")
    for task in cancelled:
        task.cancel()
    for task in cancelled:
        with pytest.raises(asyncio.CancelledError):
            await task
    outcomes = [run.outcome for run in ended]
    assert outcomes == [HookOutcome.OK] * 35 + [HookOutcome.TIMEOUT] * 5 + [HookOutcome.FAILED] * 5
    assert all(run.stdout == OUT[-OUTPUT_LIMIT:] for run in ended[:35])
    for runs in (quick, slow, held):
        await runs.close()
    # Compared as descriptors, not a count: one of an earlier test closed meanwhile by the
    # collector must not hide one of ours left open.
    left = {fd: what for fd, what in fds().items() if before.get(fd) != what}
    assert left == {}
