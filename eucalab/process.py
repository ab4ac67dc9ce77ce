"""Processes the lab runs inside its namespaces: commands run to completion, long-running ones
logging to a file (LabProcess), and stopping or killing them by process group, safe against
PID reuse because a group's leader is never reaped before the group has been signalled."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from eucalab.errors import LabCommandError, LabError

__all__ = [
    "KILL_WAIT",
    "POLL",
    "LabProcess",
    "environment",
    "exited",
    "kill_group",
    "run_to_completion",
    "spawn_logged",
    "stop_all",
    "tail",
]

KILL_WAIT = 5.0
POLL = 0.02

# waitid() si_code values of a child ended by a signal (si_status is then the signal).
_KILLED_CODES = (os.CLD_KILLED, os.CLD_DUMPED)


@dataclass
class LabProcess:
    """A long-running process the lab started inside a host namespace."""

    host: str
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def exited(self) -> bool:
        """True once the process has ended (without reaping it; see Lab.stop)."""
        return exited(self.popen)

    def wait_exit(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` seconds for the process to end; its exit status, or None.

        The process is left unreaped, so Lab.stop/Lab.kill can still signal its group safely.
        """
        if not wait_exited(self.popen, timeout):
            return None
        if self.popen.returncode is not None:
            return self.popen.returncode
        info = os.waitid(os.P_PID, self.popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info is None:
            return None
        return -info.si_status if info.si_code in _KILLED_CODES else info.si_status

    def wait_for_log(self, needle: str, timeout: float = 10.0) -> None:
        """Wait until ``needle`` appears in the log; LabError on timeout or early exit."""
        deadline = time.monotonic() + timeout
        while True:
            if needle in self.log_text():
                return
            # exited() rather than poll(): reaping here would make Lab.stop's killpg unsafe.
            if exited(self.popen):
                raise LabError(
                    f"{self.host}/{self.name} exited before logging {needle!r}:\n"
                    f"{tail(self.log_text())}"
                )
            if time.monotonic() >= deadline:
                raise LabError(
                    f"{self.host}/{self.name} did not log {needle!r} within {timeout}s:\n"
                    f"{tail(self.log_text())}"
                )
            time.sleep(POLL)


def tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])


def exited(popen: subprocess.Popen[bytes] | subprocess.Popen[str]) -> bool:
    """True once the child has exited, without reaping it.

    Leaving the zombie in place keeps its PID (and so its process-group ID) reserved, which
    makes a following killpg() safe against PID reuse.
    """
    if popen.returncode is not None:
        return True
    try:
        info = os.waitid(os.P_PID, popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True  # reaped elsewhere
    return info is not None


def wait_exited(popen: subprocess.Popen[bytes] | subprocess.Popen[str], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not exited(popen):
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL)
    return True


def signal_group(popen: subprocess.Popen[bytes] | subprocess.Popen[str], sig: int) -> None:
    # Only while the leader is unreaped: then the group ID cannot belong to anyone else.
    if popen.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(popen.pid, sig)


def reap(popen: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        popen.wait(timeout=KILL_WAIT)


def environment(
    env: Mapping[str, str] | None, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    merged = dict(os.environ)
    if env:
        merged.update(env)
    if extra:
        merged.update(extra)
    return merged


def run_to_completion(
    cmd: list[str], *, timeout: float, env: Mapping[str, str] | None, check: bool
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in a session of its own and capture its text output.

    On timeout the whole process group is killed and subprocess.TimeoutExpired raised;
    with ``check=True`` a non-zero exit raises LabCommandError.
    """
    popen = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        env=environment(env),
        start_new_session=True,
    )
    with popen:
        try:
            out, err = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            signal_group(popen, signal.SIGKILL)
            try:
                out, err = popen.communicate(timeout=KILL_WAIT)
            except subprocess.TimeoutExpired:
                # Something that escaped the group still holds the pipes; give up on them.
                out, err = "", ""
            raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
        finally:
            if popen.returncode is None:
                # Interrupted (e.g. KeyboardInterrupt): do not leave the command behind.
                signal_group(popen, signal.SIGKILL)
                reap(popen)
    result = subprocess.CompletedProcess(cmd, popen.returncode, out, err)
    if check and result.returncode != 0:
        raise LabCommandError(result.returncode, cmd, out, err)
    return result


def spawn_logged(
    host: str, name: str, cmd: list[str], log: Path, env: Mapping[str, str] | None
) -> LabProcess:
    """Start ``cmd`` in a process group of its own, its output to ``log`` (truncated first)."""
    with log.open("wb") as fh:
        popen = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=environment(env, {"PYTHONUNBUFFERED": "1"}),
            # Own process group, so stop_all() can signal the command and its children together.
            start_new_session=True,
        )
    return LabProcess(host=host, name=name, popen=popen, log=log)


def kill_group(proc: LabProcess, sig: int, timeout: float) -> int:
    """Send ``sig`` to the process's group, wait until the process has ended and reap it;
    its exit status. Nothing else in the group is touched afterwards."""
    signal_group(proc.popen, sig)
    if not wait_exited(proc.popen, timeout):
        raise LabError(f"{proc.host}/{proc.name} did not end within {timeout}s of signal {sig}")
    reap(proc.popen)
    code = proc.popen.returncode
    if code is None:
        raise LabError(f"{proc.host}/{proc.name} could not be reaped")
    return code


def stop_all(procs: Sequence[LabProcess], timeout: float) -> None:
    """SIGTERM every live process group, SIGKILL those still there after ``timeout``, then
    reap them all."""
    live = [p for p in procs if not exited(p.popen)]
    for p in live:
        signal_group(p.popen, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in live:
        if not wait_exited(p.popen, max(0.0, deadline - time.monotonic())):
            signal_group(p.popen, signal.SIGKILL)
            wait_exited(p.popen, KILL_WAIT)
    for p in procs:
        # The leader is a zombie at this point, so its group ID is still ours: take down
        # any children it left behind in the group, then reap it.
        signal_group(p.popen, signal.SIGKILL)
        reap(p.popen)
