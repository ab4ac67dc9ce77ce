"""Watching the files a component depends on with Linux inotify (through ctypes, its events read
on the event loop by add_reader), so that an idle agent wakes when one of them changes rather than
on a timer. Where inotify cannot be used the watch says so, and its owner polls instead.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import struct
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

# inotify(7)
IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000

# A name in a watched directory that appears, goes or is renamed: what watches to hold may change.
MOVES = IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
# The watched directory itself went away (IN_IGNORED follows each of these).
GONE = IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT | IN_IGNORED
# A directory on the way to a file (its parent, or an ancestor while it is missing): only names
# coming and going, so that busy neighbours (a registrar's SQLite files) send us nothing.
WAY = MOVES | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR
# The directory holding a file: its contents written in place, too.
HOLDER = WAY | IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE

_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name
_READ_SIZE = 64 * 1024
_ARM_TRIES = 3  # a directory may vanish between our look and add_watch: look again
_fallback_logged = False  # "polling instead" is worth saying once per process, not per component

Event = tuple[int, int, str]  # watch descriptor, mask, name ("" for the directory itself)


class Inotify:
    """One inotify instance: directories watched by path, events read without blocking."""

    def __init__(self) -> None:
        if not sys.platform.startswith("linux"):
            raise OSError(errno.ENOSYS, "inotify is a Linux interface")
        libc = ctypes.CDLL(None, use_errno=True)  # the C library Python itself runs on
        try:
            init, self._add, self._rm = (
                libc.inotify_init1,
                libc.inotify_add_watch,
                libc.inotify_rm_watch,
            )
        except AttributeError:
            raise OSError(errno.ENOSYS, "the C library has no inotify") from None
        init.argtypes = [ctypes.c_int]
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._rm.argtypes = [ctypes.c_int, ctypes.c_int]
        self.fd = _checked(init(os.O_NONBLOCK | os.O_CLOEXEC))

    def add(self, directory: Path, mask: int) -> int:
        """Watch `directory` (the same one again gives the same descriptor)."""
        return _checked(self._add(self.fd, os.fsencode(directory), mask))

    def remove(self, wd: int) -> None:
        # EINVAL when the kernel dropped the watch already (its directory went): nothing to undo.
        self._rm(self.fd, wd)

    def read(self) -> list[Event]:
        """The events queued now (one read: the loop calls again while more are queued)."""
        try:
            data = os.read(self.fd, _READ_SIZE)
        except BlockingIOError:
            return []
        events: list[Event] = []
        offset = 0
        while offset + _EVENT.size <= len(data):
            wd, mask, _cookie, size = _EVENT.unpack_from(data, offset)
            offset += _EVENT.size
            name = data[offset : offset + size].rstrip(b"\0")
            offset += size
            events.append((wd, mask, os.fsdecode(name)))
        return events

    def close(self) -> None:
        os.close(self.fd)


def _checked(result: int) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


class FileWatch:
    """Calls `on_change()` when any of `paths` may have changed: created, written, renamed
    over, deleted, or its directory made, moved or removed (on the event loop, never twice
    for one batch of events).

    Each path's directory is watched, and the directory above it, for the names that matter
    there; while a directory is missing, the deepest ancestor that exists is watched for the
    next name on the way. Any change to those names re-arms the watches, and so does a lost
    event (IN_Q_OVERFLOW), which also counts as a change. When inotify is unavailable or
    fails, `polling` turns true (and `on_change()` is called): the owner must poll.
    """

    def __init__(self, paths: Iterable[Path], on_change: Callable[[], None]) -> None:
        self.paths = sorted({Path(os.path.abspath(p)) for p in paths})
        self._on_change = on_change
        self._inotify: Inotify | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watches: dict[int, tuple[Path, frozenset[str]]] = {}  # wd -> (directory, names)
        self.polling = False
        self.arms = 0  # how often the watches were (re)built

    @property
    def watched(self) -> dict[Path, frozenset[str]]:
        """The directories watched now, each with the names that matter in it."""
        return dict(self._watches.values())

    def start(self) -> None:
        """Begin watching (on the running loop); a failure turns on `polling`, logged once."""
        if not self.paths:
            return  # nothing to watch, nothing to poll
        self._loop = asyncio.get_running_loop()
        try:
            self._inotify = Inotify()
            self._arm()
        except OSError as exc:
            self._fail(exc)
            return
        self._loop.add_reader(self._inotify.fd, self._readable)

    def close(self) -> None:
        inotify, self._inotify = self._inotify, None
        if inotify is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(inotify.fd)
        inotify.close()
        self._watches = {}

    def __enter__(self) -> FileWatch:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _readable(self) -> None:
        if self._inotify is None:
            return
        try:
            events = self._inotify.read()
        except OSError as exc:
            self._fail(exc)
            return
        self.dispatch(events)

    def dispatch(self, events: Iterable[Event]) -> None:
        """Act on a batch of events: re-arm if the watched names moved, then say so once."""
        changed = rearm = False
        for wd, mask, name in events:
            if mask & IN_Q_OVERFLOW:
                changed = rearm = True  # events were lost: anything may have happened
                continue
            watched = self._watches.get(wd)
            if watched is None:
                continue  # a watch we dropped; its last events still arrive
            if mask & GONE:
                changed = rearm = True
            elif name in watched[1]:
                changed = True
                # A rename or deletion may move a watched directory (or replace one by a
                # symlink); re-arming by path is a few syscalls, so it is done for any of them.
                rearm = rearm or bool(mask & MOVES)
        if rearm and self._inotify is not None:
            try:
                self._arm()
            except OSError as exc:
                self._fail(exc)
                return
        if changed:
            self._on_change()

    def _arm(self) -> None:
        """Hold exactly the watches the paths need now (an OSError if that cannot be done)."""
        for attempt in range(_ARM_TRIES):
            try:
                self._arm_once()
                self.arms += 1
                return
            except OSError as exc:
                # Made or removed between our look and add_watch: look again.
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR) or attempt == _ARM_TRIES - 1:
                    raise

    def _arm_once(self) -> None:
        assert self._inotify is not None
        wanted: dict[Path, set[str]] = {}
        masks: dict[Path, int] = {}

        def want(directory: Path, name: str, mask: int) -> None:
            wanted.setdefault(directory, set()).add(name)
            masks[directory] = masks.get(directory, 0) | mask

        for path in self.paths:
            name, directory = path.name, path.parent
            while not directory.is_dir() and directory != directory.parent:
                name, directory = directory.name, directory.parent
            if directory != path.parent:
                want(directory, name, WAY)
                continue
            want(directory, name, HOLDER)
            if directory != directory.parent:
                # The directory itself renamed, removed or swapped for a symlink: seen from above.
                want(directory.parent, directory.name, WAY)
        watches: dict[int, tuple[Path, frozenset[str]]] = {}
        held: dict[int, int] = {}  # wd -> mask
        for directory, names in sorted(wanted.items()):
            mask = masks[directory]
            wd = self._inotify.add(directory, mask)
            if held.get(wd, mask) != mask:  # met again by another path: a mask for both
                mask |= held[wd]
                wd = self._inotify.add(directory, mask)
            held[wd] = mask
            # Two paths may lead to one directory (a symlink, a bind mount): one watch for both.
            _, before = watches.get(wd, (directory, frozenset()))
            watches[wd] = (directory, before | names)
        for wd in self._watches.keys() - watches.keys():
            self._inotify.remove(wd)
        self._watches = watches

    def _fail(self, exc: OSError) -> None:
        global _fallback_logged
        self.close()
        self.polling = True
        if not _fallback_logged:
            _fallback_logged = True
            log.warning(
                "cannot watch %s for changes (%s); re-checking every recheck_interval instead",
                ", ".join(map(str, self.paths)),
                exc.strerror or exc,
            )
        else:
            log.debug("cannot watch %s for changes: %s", self.paths, exc)
        self._on_change()  # the owner waits for us: wake it, so that it starts polling
