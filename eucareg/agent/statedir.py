"""The agent's state directory: private to the agent, or the agent does not start.

It holds private keys, the admin token, the master key and the registry (with hook output).
The agent runs under umask 077; this module makes the directory 0700 and its files 0600, and
refuses a directory that another user owns or that others may write.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

AGENT_UMASK = 0o077


class StateDirError(Exception):
    """The state directory cannot be trusted; the message says why and what to do."""


def secure_state_dir(path: Path, *, uid: int | None = None) -> list[str]:
    """Create or check `path` for the agent's private state; return what was tightened.

    Raises StateDirError when the directory (or one of its files) belongs to another user or
    is writable by others: someone else could then replace keys or the registry under us.
    Looser read permissions of our own (0755, a 0644 database from an older version) are
    tightened, and each one reported.
    """
    uid = os.geteuid() if uid is None else uid
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(path)
    except OSError as exc:
        raise StateDirError(f"state_dir {path}: cannot create it: {exc.strerror}") from None
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise StateDirError(f"state_dir {path}: not a directory (a symlink or a file)")
    _check_owner(path, info, uid)
    tightened: list[str] = []
    if stat.S_IMODE(info.st_mode) != 0o700:
        tightened.append(f"{path}: {stat.S_IMODE(info.st_mode):04o} -> 0700")
        os.chmod(path, 0o700)
    for entry in sorted(path.rglob("*")):
        try:
            entry_info = os.lstat(entry)
        except FileNotFoundError:
            continue  # removed while we looked (an old WAL file): nothing to secure
        if stat.S_ISLNK(entry_info.st_mode):
            continue  # not followed: its target is not ours to change
        _check_owner(entry, entry_info, uid)
        mode = stat.S_IMODE(entry_info.st_mode)
        if mode & 0o077:
            # Keys and the registry are secret; the key layout's public certificates are
            # world-readable by design only when an operator copies them out.
            wanted = mode & 0o700
            tightened.append(f"{entry}: {mode:04o} -> {wanted:04o}")
            os.chmod(entry, wanted)
    for change in tightened:
        log.warning("state_dir was readable by others; tightened %s", change)
    return tightened


def _check_owner(path: Path, info: os.stat_result, uid: int) -> None:
    if info.st_uid != uid:
        raise StateDirError(
            f"state_dir {path} belongs to uid {info.st_uid}, not to this agent (uid {uid}); "
            "another user could replace its keys: fix its owner or choose another state_dir"
        )
    if stat.S_IMODE(info.st_mode) & 0o022:
        raise StateDirError(
            f"state_dir {path} is writable by others (mode "
            f"{stat.S_IMODE(info.st_mode):04o}); someone could replace its keys or registry. "
            f"Check what changed it, then: chmod go-w {path}"
        )
