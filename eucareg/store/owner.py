"""Who owns a registry database: the registrar's flock on `<database>.lock` (registry.py,
Store.claim), tested or held by commands that must not run beside an agent (restore, db upgrade).
Stdlib only, like errors.py.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class LockRefused(OSError):
    """The lock file is not one we may open and truncate (a link planted in its place)."""


def lock_path(database: Path) -> Path:
    return database.with_name(database.name + ".lock")


@contextmanager
def hold(database: Path) -> Iterator[str | None]:
    """Hold the registrar's lock for the duration, so no agent starts meanwhile; yields None,
    or the PID (as text) of the agent that holds it now, in which case nothing is held."""
    path = lock_path(database)
    if not path.parent.is_dir():
        yield None  # no state directory yet: no agent can own it
        return
    fd = open_lock(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # an agent's refusal names us
        yield None
    finally:
        os.close(fd)  # drops the flock if we took it


def open_lock(path: Path) -> int:
    """The lock file, never through a symbolic link nor as a second name of another file:
    holding it truncates it (run as root, that would empty whatever a planted link names)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LockRefused(
                f"{path} is a symbolic link (to {os.readlink(path)}), not the registry's lock "
                "file; remove it"
            ) from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise LockRefused(
            f"{path} is not the registry's lock file (not a regular file with one name: "
            f"{st.st_nlink} links); remove it"
        )
    return fd


def holder(database: Path) -> str | None:
    """The PID of the agent that owns `database` now, or None."""
    with hold(database) as pid:
        return pid
