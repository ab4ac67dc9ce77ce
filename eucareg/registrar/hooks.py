"""Registration hooks: the per-type scripts (walrus, cluster, storage, node) a registrar runs,
journaled so that a crash can neither lose nor silently repeat one.

Each script runs in a session of its own behind a tiny gate: the process exists (so its process
group is known) but execs the script only after that group id is durable in the journal. A gate
whose registrar died first reads EOF and exits without running anything. A later start finds a
journaled run still "running", kills what is left of its group and runs it once more, marked.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import IO

from eucareg.core.model import HookOutcome, HookRun, Record, Role
from eucareg.registrar.faults import crash_point

# Keep what a chatty script prints bounded; the tail is what explains a failure.
OUTPUT_LIMIT = 64 * 1024
# The gate: wait for the go (one line on stdin), then become the script; EOF means "never run".
# The agent runs under umask 077; euca_conf writes files other users read (/etc/eucalyptus,
# the eucalyptus user's keys), so a hook gets the usual 022.
GATE = 'umask 022; read -r _ || exit 111; exec "$0" "$@"'
GATE_NEVER_RAN = 111
SPAWN_AT_ONCE = 4  # hook processes started per event-loop turn, at most
RUNNING_AT_ONCE = 64  # hooks running at the same time, at most; the rest queue
# Variables a hook may need from the agent's environment; nothing else leaks into it.
PASSED_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "HOME")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

Journal = Callable[[HookRun], Awaitable[None]]


def hook_environment(
    record: Record, eucavers: str = "", *, rerun: bool = False, attempt: int = 1
) -> dict[str, str]:
    """The documented environment of a hook (see docs/hooks.md)."""
    return {
        "EUCAREG_EVENT": "register",
        "EUCAREG_ROLE": record.role.value,
        "EUCAREG_TYPE": record.role.txt_type,
        "EUCAREG_CLUSTER": record.cluster or "",
        "EUCAREG_ADDRESS": record.address,
        "EUCAREG_ID": record.component_id,
        "EUCAREG_FINGERPRINT": record.fingerprint,
        "EUCAREG_EUCAVERS": eucavers,
        "EUCAREG_RERUN": "1" if rerun else "0",
        "EUCAREG_ATTEMPT": str(attempt),
    }


def hook_arguments(record: Record) -> list[str]:
    """Positional arguments: ADDRESS CLUSTER ID FINGERPRINT (cluster is '-' when none)."""
    return [record.address, record.cluster or "-", record.component_id, record.fingerprint]


def script_for(hook_dir: Path, role: Role) -> Path:
    return hook_dir / role.hook_name


class HookRunner:
    """Runs hooks, journals them, and kills every one still running when closed."""

    def __init__(
        self,
        hook_dir: Path,
        timeout: float,
        journal: Journal,
        running: int = RUNNING_AT_ONCE,
    ) -> None:
        self.hook_dir = hook_dir
        self.timeout = timeout
        self._journal = journal
        self._running: dict[int, asyncio.subprocess.Process] = {}
        # Hooks running at once: each holds a few descriptors (output files, its pipe), and a
        # burst of hundreds of slow hooks must not run the registrar out of them; and a site
        # whose hooks call euca_conf may want fewer (registrar.max_hooks_running).
        self._slots = asyncio.Semaphore(running)
        # Starting a process blocks the event loop for a few ms (fork of a large process).
        # A burst of admissions would start a hundred at once in one loop iteration, stalling
        # mDNS and HTTP for a second; a few at a time keeps the loop responsive.
        self._starting = asyncio.Semaphore(SPAWN_AT_ONCE)

    async def run(
        self, record: Record, *, eucavers: str = "", rerun: bool = False, attempt: int = 1
    ) -> HookRun:
        """Run the hook for `record`; script faults become outcomes, never exceptions."""
        script = script_for(self.hook_dir, record.role)
        run = HookRun(
            run_id=uuid.uuid4().hex,
            component_id=record.component_id,
            hook=str(script),
            started_at=time.time(),
            outcome=HookOutcome.RUNNING,
            attempt=attempt,
            rerun=rerun,
        )
        if not script.exists():
            return _finish(
                run, HookOutcome.SKIPPED, None, err=f"no script {script}; nothing to run"
            )
        if not os.access(script, os.X_OK):
            return _finish(run, HookOutcome.FAILED, None, err=f"{script} is not executable")
        env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        env.setdefault("PATH", DEFAULT_PATH)
        env.update(hook_environment(record, eucavers, rerun=rerun, attempt=attempt))
        async with self._slots:
            return await self._spawn_and_run(run, script, record, env)

    async def _spawn_and_run(
        self, run: HookRun, script: Path, record: Record, env: dict[str, str]
    ) -> HookRun:
        # Output goes to unlinked temporary files, not pipes: a child the script leaves running
        # can then hold nothing of ours open, and we keep only the tail of what was written.
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                async with self._starting:
                    proc = await asyncio.create_subprocess_exec(
                        "/bin/sh",
                        "-c",
                        GATE,
                        str(script),
                        *hook_arguments(record),
                        stdin=asyncio.subprocess.PIPE,
                        stdout=out,
                        stderr=err,
                        env=env,
                        cwd=str(self.hook_dir),
                        start_new_session=True,
                    )
            except (OSError, ValueError) as exc:
                # ValueError: a value exec refuses, such as one with a NUL byte.
                return _finish(run, HookOutcome.FAILED, None, err=f"cannot run {script}: {exc}")
            self._running[proc.pid] = proc
            try:
                return await self._gated(run, proc, out, err)
            finally:
                self._running.pop(proc.pid, None)

    async def _gated(
        self, run: HookRun, proc: asyncio.subprocess.Process, out: IO[bytes], err: IO[bytes]
    ) -> HookRun:
        started = replace(run, pgid=proc.pid, proc_start=proc_start_time(proc.pid))
        try:
            await self._journal(started)
            crash_point("before-hook")
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
            proc.stdin.close()
            code: int | None = await asyncio.wait_for(proc.wait(), self.timeout)
        except TimeoutError:
            code = None
            kill_group(proc.pid)
            await proc.wait()
        except BaseException as exc:
            # Cancelled (the registrar stops), or the gate broke: the script must not run on.
            kill_group(proc.pid)
            with contextlib.suppress(ProcessLookupError):
                await asyncio.shield(proc.wait())
            await _gone(started)
            if not isinstance(exc, Exception):
                raise  # a stop: the journal row stays "running", and a restart re-runs it
            # Finish the journaled run itself, so no "running" row is left behind.
            return _finish(started, HookOutcome.FAILED, None, err=f"the hook broke: {exc!r}")
        crash_point("after-hook")
        stdout, stderr = _tail_of(out), _tail_of(err)
        if code is None:
            note = stderr + f"\nkilled after {self.timeout:g}s".encode()
            return _finish(started, HookOutcome.TIMEOUT, None, stdout, note)
        return _finish(
            started, HookOutcome.OK if code == 0 else HookOutcome.FAILED, code, stdout, stderr
        )

    async def close(self) -> None:
        """Kill every running hook's whole process group, and wait for the scripts to end."""
        procs = list(self._running.values())
        for proc in procs:
            kill_group(proc.pid)
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                await proc.wait()
            # SIGKILL reaches the rest of the group asynchronously: wait until it took.
            await _gone(HookRun("", "", "", 0.0, HookOutcome.RUNNING, pgid=proc.pid))


def _finish(
    run: HookRun, outcome: HookOutcome, code: int | None, out: bytes = b"", err: bytes | str = b""
) -> HookRun:
    return replace(
        run,
        outcome=outcome,
        exit_code=code,
        duration=time.time() - run.started_at,
        stdout=_tail(out),
        stderr=err if isinstance(err, str) else _tail(err),
    )


def _tail(data: bytes) -> str:
    return data[-OUTPUT_LIMIT:].decode("utf-8", errors="replace")


def _tail_of(handle: IO[bytes]) -> bytes:
    size = handle.seek(0, os.SEEK_END)
    handle.seek(max(0, size - OUTPUT_LIMIT))
    return handle.read()


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


async def _gone(run: HookRun, wait: float = 3.0) -> bool:
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
    return await _gone(run, wait)
