"""The processes of hooks: waiting for one to end on the event loop (a pidfd), killing its
whole process group, and finding what of a journaled run's group is still alive after a crash
(from /proc, by group and start time, so that a reused pid is never taken for ours).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from eucareg.core.model import HookRun


async def exited(proc: subprocess.Popen[bytes]) -> int:
    """Wait for `proc` to end, on the loop (a pidfd), and reap it: its exit status."""
    if proc.returncode is not None:
        return proc.returncode
    try:
        pidfd = os.pidfd_open(proc.pid)
    except OSError:
        # No pidfd (Linux before 5.3): a thread waits instead.
        return await asyncio.to_thread(proc.wait)
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_reader(pidfd, _settle, ready)
    try:
        await ready
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    return proc.wait()  # it has ended: this only reaps


def _settle(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


# -- what a crash left behind ----------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, process group, start time in clock ticks) of a process, from /proc."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[2]), int(fields[19])


def proc_start_time(pid: int) -> int | None:
    stat = _stat(pid)
    return None if stat is None else stat[2]


def group_alive(pgid: int, not_before: int | None) -> bool:
    """Whether a live (non-zombie) process of this group started no earlier than its leader
    did. A group id is not reused while any member lives, so such a member is one of ours."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _stat(int(entry.name))
        if stat is None or stat[1] != pgid or stat[0] == "Z":
            continue
        if not_before is None or stat[2] >= not_before:
            return True
    return False


async def gone(run: HookRun, wait: float = 3.0) -> bool:
    """Wait (bounded) until no process of the run's group is alive."""
    if run.pgid is None:
        return True
    deadline = time.monotonic() + wait
    while group_alive(run.pgid, run.proc_start):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def kill_orphaned(run: HookRun, wait: float = 10.0) -> bool:
    """Kill what is left of a journaled run's process group; True once none of it lives."""
    if run.pgid is None:
        return True
    if not group_alive(run.pgid, run.proc_start):
        return True
    kill_group(run.pgid)
    return await gone(run, wait)
