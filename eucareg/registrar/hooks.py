"""Registration hooks: the per-type scripts (walrus, cluster, storage, node, and their
deregister-* counterparts) a registrar runs, journaled so that a crash can neither lose nor
silently repeat one.

Each script runs in a session of its own behind a tiny gate: the process exists (so its process
group is known) but execs the script only after that group id is durable in the journal. A gate
whose registrar died first reads EOF and exits without running anything. A later start finds a
journaled run still "running", kills what is left of its group and runs it once more, marked.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from eucareg.core.model import HookOutcome, HookRun, Record, Role
from eucareg.registrar.faults import crash_point
from eucareg.registrar.hook_output import HookOutput
from eucareg.registrar.hook_processes import exited, gone, kill_group, proc_start_time

# Keep what a chatty script prints bounded; the tail is what explains a failure.
OUTPUT_LIMIT = 64 * 1024
# The gate: wait for the go (one line on stdin), then become the script; EOF means "never run".
# The agent runs under umask 077; euca_conf writes files other users read (/etc/eucalyptus,
# the eucalyptus user's keys), so a hook gets the usual 022.
GATE = 'umask 022; read -r _ || exit 111; exec "$0" "$@"'
GATE_NEVER_RAN = 111
SPAWN_AT_ONCE = 4  # hook processes being started at once (in worker threads), at most
RUNNING_AT_ONCE = 64  # hooks running at the same time, at most; the rest queue
# Variables a hook may need from the agent's environment; nothing else leaks into it.
PASSED_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "HOME")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Journal(Protocol):
    """Makes runs durable (one transaction for all of them) before their script may start."""

    def __call__(self, *runs: HookRun) -> Awaitable[None]: ...


@dataclass(frozen=True)
class Ended:
    """How a script's process ended: its exit code (None when it was killed at the timeout)
    and the tails of its output, or why it could not run or broke."""

    code: int | None
    stdout: bytes = b""
    stderr: bytes = b""
    broke: str | None = None


REGISTER, DEREGISTER = "register", "deregister"


def hook_environment(
    record: Record,
    eucavers: str = "",
    *,
    rerun: bool = False,
    attempt: int = 1,
    event: str = REGISTER,
) -> dict[str, str]:
    """The documented environment of a hook (see docs/hooks.md)."""
    return {
        "EUCAREG_EVENT": event,
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


def script_for(hook_dir: Path, role: Role, event: str = REGISTER) -> Path:
    """`node` registers a node; `deregister-node` undoes that (docs/hooks.md)."""
    if event == DEREGISTER:
        return hook_dir / f"deregister-{role.hook_name}"
    return hook_dir / role.hook_name


def base_environment() -> dict[str, str]:
    """What a hook inherits from the agent's environment: PATH and the locale, no more."""
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    env.setdefault("PATH", DEFAULT_PATH)
    return env


def unrunnable(script: Path) -> tuple[HookOutcome, str] | None:
    """Why `script` is not run at all: missing (nothing to do), or not executable."""
    if not script.exists():
        if script.is_symlink():
            # A link whose script is gone (a package removed it) is a hook the site meant to
            # run: a failure the operator hears of, not "nothing to run".
            return HookOutcome.FAILED, (
                f"{script} is a symbolic link to {os.readlink(script)}, which does not exist"
            )
        return HookOutcome.SKIPPED, f"no script {script}; nothing to run"
    if not os.access(script, os.X_OK):
        return HookOutcome.FAILED, f"{script} is not executable"
    return None


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
        self._running: dict[int, subprocess.Popen[bytes]] = {}
        # Hooks running at once: each holds a few descriptors (its three pipes), and a
        # burst of hundreds of slow hooks must not run the registrar out of them; and a site
        # whose hooks call euca_conf may want fewer (registrar.max_hooks_running).
        self.slots = asyncio.Semaphore(running)
        # Starting a process blocks the event loop for a few ms (fork of a large process).
        # A burst of admissions would start a hundred at once in one loop iteration, stalling
        # mDNS and HTTP for a second; a few at a time keeps the loop responsive.
        self._starting = asyncio.Semaphore(SPAWN_AT_ONCE)
        self._spawner = ThreadPoolExecutor(SPAWN_AT_ONCE, thread_name_prefix="eucareg-spawn")

    async def run(
        self,
        record: Record,
        *,
        eucavers: str = "",
        rerun: bool = False,
        attempt: int = 1,
        event: str = REGISTER,
    ) -> HookRun:
        """Run the hook for `record` (its registration, or with `event` DEREGISTER its
        deregistration); script faults become outcomes, never exceptions."""
        script = script_for(self.hook_dir, record.role, event)
        run = HookRun(
            run_id=uuid.uuid4().hex,
            component_id=record.component_id,
            hook=str(script),
            started_at=time.time(),
            outcome=HookOutcome.RUNNING,
            attempt=attempt,
            rerun=rerun,
        )
        refused = unrunnable(script)
        if refused is not None:
            return _finish(run, refused[0], None, err=refused[1])
        env = base_environment() | hook_environment(
            record, eucavers, rerun=rerun, attempt=attempt, event=event
        )
        async with self.slots:
            (started,), ended = await self.execute(script, hook_arguments(record), env, (run,))
        return outcome_of(started, ended, self.timeout)

    async def execute(
        self, script: Path, args: list[str], env: dict[str, str], runs: tuple[HookRun, ...]
    ) -> tuple[tuple[HookRun, ...], Ended]:
        """Start `script` behind the gate, journal `runs` with its process group, let it go and
        wait for it (within the timeout). The caller holds a slot."""
        argv = ["/bin/sh", "-c", GATE, str(script), *args]
        try:
            async with self._starting:
                proc = await self._spawn(argv, env)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            # ValueError: a value exec refuses, such as one with a NUL byte.
            return runs, Ended(None, broke=f"cannot run {script}: {exc}")
        self._running[proc.pid] = proc
        assert proc.stdout is not None and proc.stderr is not None
        try:
            # Output comes through pipes read as it is written, not files: a script printing
            # until its timeout then costs the tail of it, not the disk (hook_output).
            with HookOutput(proc.stdout, proc.stderr, OUTPUT_LIMIT) as output:
                return await self._gated(runs, proc, output)
        finally:
            self._running.pop(proc.pid, None)

    async def _spawn(self, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Fork and exec in a worker thread: on the loop, each start of a process about as
        large as the registrar blocked mDNS and HTTP for several ms (40 % of the loop's time
        in a burst of 1,000 NCs)."""
        spawned = asyncio.get_running_loop().run_in_executor(
            self._spawner, _popen, argv, env, self.hook_dir
        )
        try:
            return await asyncio.shield(spawned)
        except asyncio.CancelledError:
            # Started anyway, it waits at the gate: closing its stdin makes it exit unrun.
            spawned.add_done_callback(_abandon)
            raise

    async def _gated(
        self,
        runs: tuple[HookRun, ...],
        proc: subprocess.Popen[bytes],
        output: HookOutput,
    ) -> tuple[tuple[HookRun, ...], Ended]:
        start = proc_start_time(proc.pid)
        started = tuple(replace(run, pgid=proc.pid, proc_start=start) for run in runs)
        try:
            await self._journal(*started)
            crash_point("before-hook")
            assert proc.stdin is not None
            # Three bytes into an empty pipe: this never blocks.
            proc.stdin.write(b"go\n")
            proc.stdin.close()
            code: int | None = await asyncio.wait_for(exited(proc), self.timeout)
        except TimeoutError:
            code = None
            kill_group(proc.pid)
            await exited(proc)
        except BaseException as exc:
            # Cancelled (the registrar stops), or the gate broke: the script must not run on.
            kill_group(proc.pid)
            _close_quietly(proc)
            await asyncio.shield(exited(proc))
            await gone(started[0])
            if not isinstance(exc, Exception):
                raise  # a stop: the journal rows stay "running", and a restart re-runs them
            # Finish the journaled runs themselves, so no "running" row is left behind.
            return started, Ended(None, broke=f"the hook broke: {exc!r}")
        crash_point("after-hook")
        # Once the script has ended: a child it left running holding the pipes is not waited for.
        return started, Ended(code, *output.drain())

    async def close(self) -> None:
        """Kill every running hook's whole process group, and wait for the scripts to end."""
        procs = list(self._running.values())
        for proc in procs:
            kill_group(proc.pid)
        for proc in procs:
            await exited(proc)
            # SIGKILL reaches the rest of the group asynchronously: wait until it took.
            await gone(HookRun("", "", "", 0.0, HookOutcome.RUNNING, pgid=proc.pid))
        # Starts not begun are dropped; one under way (cancelled while a worker forked it)
        # finishes first, and is then let go unrun through its gate and reaped (_abandon):
        # nothing is started behind our back once close() has returned.
        await asyncio.to_thread(self._spawner.shutdown, True, cancel_futures=True)
        await asyncio.sleep(0)  # the done-callbacks (_abandon) of those starts run now


def _popen(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    # The pipes are close-on-exec and Popen closes every other descriptor in the child
    # (close_fds), so no hook inherits another's pipes, started at the same time or not; and
    # Popen closes the child's ends in the registrar once it started (or failed to).
    return subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=str(cwd),
        start_new_session=True,
    )


def _close_quietly(proc: subprocess.Popen[bytes], *, output: bool = False) -> None:
    """Close its stdin (the gate then reads EOF); with `output`, our ends of its output pipes
    too, when nothing reads them."""
    for stream in (proc.stdin, *((proc.stdout, proc.stderr) if output else ())):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def _abandon(spawned: asyncio.Future[subprocess.Popen[bytes]]) -> None:
    """A process whose start was cancelled: let the gate read EOF, and reap it in a thread."""
    if spawned.cancelled() or spawned.exception() is not None:
        return
    proc = spawned.result()
    _close_quietly(proc, output=True)
    threading.Thread(target=proc.wait, name="eucareg-reap", daemon=True).start()


def outcome_of(run: HookRun, ended: Ended, timeout: float, limit: int = OUTPUT_LIMIT) -> HookRun:
    """The finished run, by how its script ended (the exit status decides)."""
    if ended.broke is not None:
        return _finish(run, HookOutcome.FAILED, None, err=ended.broke)
    if ended.code is None:
        note = ended.stderr + f"\nkilled after {timeout:g}s".encode()
        return _finish(run, HookOutcome.TIMEOUT, None, ended.stdout, note, limit)
    outcome = HookOutcome.OK if ended.code == 0 else HookOutcome.FAILED
    return _finish(run, outcome, ended.code, ended.stdout, ended.stderr, limit)


def _finish(
    run: HookRun,
    outcome: HookOutcome,
    code: int | None,
    out: bytes = b"",
    err: bytes | str = b"",
    limit: int = OUTPUT_LIMIT,
) -> HookRun:
    return replace(
        run,
        outcome=outcome,
        exit_code=code,
        duration=time.time() - run.started_at,
        stdout=_tail(out, limit),
        stderr=err if isinstance(err, str) else _tail(err, limit),
    )


def _tail(data: bytes, limit: int = OUTPUT_LIMIT) -> str:
    return data[-limit:].decode("utf-8", errors="replace")
