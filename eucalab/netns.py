"""Network namespaces through ip(8): add one, kill what runs in one, delete one, and remove
the leftovers of labs whose process died (cleanup_stale), all by namespace name and PID."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence

from eucalab.errors import LabError
from eucalab.process import KILL_WAIT, POLL

__all__ = [
    "add_netns",
    "cleanup_stale",
    "delete_netns",
    "ip",
    "ip_binary",
    "kill_netns_processes",
]

_PID_MAX_LIMIT = 1 << 22
_IP_TIMEOUT = 10.0


def ip_binary() -> str:
    found = shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin:/usr/bin:/bin")
    if found is None:
        raise LabError("the 'ip' command (iproute2) is not installed")
    return found


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [ip_binary(), *args]
    try:
        result = subprocess.run(
            cmd, capture_output=True, text=True, errors="replace", timeout=_IP_TIMEOUT
        )
    except subprocess.TimeoutExpired:
        raise LabError(f"{' '.join(cmd)} timed out after {_IP_TIMEOUT}s") from None
    if check and result.returncode != 0:
        raise LabError(f"{' '.join(cmd)} failed: {result.stderr.strip()}")
    return result


def add_netns(ns: str, sysctls: Sequence[str], created: list[str]) -> None:
    """Add namespace ``ns`` with its loopback up and ``sysctls`` set; it goes on ``created``
    as soon as it exists, so a failure further on still gets it removed."""
    ip("netns", "add", ns)
    created.append(ns)
    ip("-n", ns, "link", "set", "lo", "up")
    result = subprocess.run(
        [ip_binary(), "netns", "exec", ns, "sysctl", "-q", "-w", *sysctls],
        capture_output=True,
        text=True,
        timeout=_IP_TIMEOUT,
    )
    if result.returncode != 0:
        raise LabError(f"sysctl in {ns} failed: {result.stderr.strip()}")


def _list_netns() -> list[str]:
    out = ip("netns", "list").stdout
    # Lines look like "name" or "name (id: 3)".
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _netns_pids(ns: str) -> list[int]:
    result = ip("netns", "pids", ns, check=False)
    if result.returncode != 0:
        return []
    return [int(tok) for tok in result.stdout.split() if tok.isdigit()]


def kill_netns_processes(ns: str, timeout: float = KILL_WAIT) -> list[int]:
    """SIGKILL whatever still runs in one of our namespaces; return PIDs left alive."""
    deadline = time.monotonic() + timeout
    pids = _netns_pids(ns)
    while pids:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() >= deadline:
            break
        time.sleep(POLL)
        # Killed processes drop out of the list once they are zombies (no ns links left).
        pids = _netns_pids(ns)
    return pids


def delete_netns(ns: str) -> str | None:
    """Delete a namespace; return an error message, or None (also when already gone)."""
    result = ip("netns", "del", ns, check=False)
    if result.returncode == 0 or not os.path.exists(f"/run/netns/{ns}"):
        return None
    return f"ip netns del {ns}: {result.stderr.strip()}"


def cleanup_stale(prefix_base: str = "eucr") -> list[str]:
    """Delete lab namespaces whose creating process is gone; return the names removed.

    Only names of the form ``{prefix_base}{pid}-...`` are considered, and only when that PID
    is not alive. Processes still inside such a namespace are killed first.
    """
    pattern = re.compile(rf"{re.escape(prefix_base)}(\d+)-")
    removed: list[str] = []
    for ns in _list_netns():
        m = pattern.match(ns)
        if m is None:
            continue
        pid = int(m.group(1))
        # Out-of-range numbers cannot come from a PID, so such a name is not one of ours.
        if not 0 < pid <= _PID_MAX_LIMIT or _pid_alive(pid):
            continue
        kill_netns_processes(ns)
        if delete_netns(ns) is None:
            removed.append(ns)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
