"""The Eucalyptus key files a registrar serves with a component's credentials (opt-in,
`[eucalyptus] deliver_keys`): read from this host's Eucalyptus key directory, checked before
they are served, cached by the files' stat, and watched while components wait for a change.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import hashlib
import logging
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eucareg.core.model import Role
from eucareg.pki import eucafiles as ef

log = logging.getLogger(__name__)

POLL = 2.0  # how often a set components are waiting on is looked at again (a few stat calls)
READY, MISSING, INVALID, OFF = "ready", "missing", "invalid", "off"
# The answer to a component that asks when this registrar does not deliver (it stops asking
# only when its own configuration changes; the fixed digest keeps its watch from returning).
OFF_REASON = (
    "this registrar does not deliver Eucalyptus's key files "
    "(eucalyptus.deliver_keys is off in its configuration)"
)

Signature = tuple[tuple[int, int, int, int] | None, ...]


@dataclass(frozen=True)
class EucaSet:
    """What a registrar has for one component: `ready` with the files, or why not."""

    state: str
    reason: str
    files: Mapping[str, bytes] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        if self.state == READY:
            return ef.digest(self.files)
        return f"{self.state}:" + hashlib.sha256(self.reason.encode()).hexdigest()[:32]

    def answer(self) -> dict[str, Any]:
        """The `eucalyptus` object of a credential answer (files in base64: euca.p12 is
        binary)."""
        return {
            "state": self.state,
            "reason": self.reason,
            "digest": self.digest,
            "files": {n: base64.b64encode(d).decode() for n, d in sorted(self.files.items())},
        }


OFF_SET = EucaSet(OFF, OFF_REASON)


def _stat(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode


def signature(role: Role, cluster: str | None, keys_dir: Path) -> Signature:
    """The stat of every file of the set: a set is read again only when this changes."""
    try:
        found = ef.sources(role, cluster, keys_dir)
    except ef.EucaFilesError:
        return ()
    return tuple(_stat(s.path) for s in found)


def _read(path: Path) -> bytes:
    """A regular file's bytes (not through a symbolic link), at most MAX_FILE + 1 of them."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ef.EucaFilesError(f"{path} is not a regular file")
        if st.st_nlink != 1:
            # A second name of another file: whoever can write the (eucalyptus-owned) key
            # directory could have linked /etc/shadow as vtunpass, which no check parses.
            raise ef.EucaFilesError(f"{path} has {st.st_nlink} names (a hard link); not served")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read(ef.MAX_FILE + 1)
    finally:
        os.close(fd)


def read_set(role: Role, cluster: str | None, keys_dir: Path) -> EucaSet:
    """Read and check the files `role` needs from this host (blocking)."""
    try:
        found = ef.sources(role, cluster, keys_dir)
    except ef.EucaFilesError as exc:
        return EucaSet(INVALID, str(exc))
    files: dict[str, bytes] = {}
    for source in found:
        try:
            files[source.name] = _read(source.path)
        except FileNotFoundError:
            if source.required:
                return EucaSet(MISSING, f"{source.path} does not exist yet{_who(role)}")
        except ef.EucaFilesError as exc:
            return EucaSet(INVALID, str(exc))
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return EucaSet(INVALID, f"{source.path} is a symbolic link; not served")
            return EucaSet(INVALID, f"cannot read {source.path}: {exc.strerror}")
    try:
        ef.check(role, cluster, files)
    except ef.EucaFilesError as exc:
        return EucaSet(INVALID, f"Eucalyptus's key files in {keys_dir} are refused: {exc}")
    return EucaSet(READY, f"{', '.join(sorted(files))} from {keys_dir}", files)


def _who(role: Role) -> str:
    """Who makes the missing file, for the reason a component is given."""
    if role is Role.NC:
        return " (the CC has it once `euca_conf --register-cluster` on the CLC synced it)"
    if role is Role.CC:
        return " (`euca_conf --register-cluster` on the CLC creates it)"
    return " (Eucalyptus creates it when the CLC first starts)"


@dataclass
class _Cached:
    signature: Signature
    value: EucaSet


class EucaKeySource:
    """This host's Eucalyptus key files, per (role, cluster): read and checked in a thread when
    their stat changes, and polled every POLL seconds while someone waits on them."""

    def __init__(self, keys_dir: Path, poll: float = POLL) -> None:
        self.keys_dir = keys_dir
        self.poll = poll
        self._cache: dict[tuple[Role, str | None], _Cached] = {}
        self._events: dict[tuple[Role, str | None], asyncio.Event] = {}
        self._watchers: dict[tuple[Role, str | None], int] = {}
        self._poller: asyncio.Task[None] | None = None
        self._reading: dict[tuple[Role, str | None], asyncio.Lock] = {}

    async def current(self, role: Role, cluster: str | None) -> EucaSet:
        key = (role, cluster if role is Role.CC or role is Role.NC else None)
        sig = signature(role, key[1], self.keys_dir)  # a few lstat calls: on the loop
        cached = self._cache.get(key)
        if cached is not None and cached.signature == sig:
            return cached.value
        async with self._reading.setdefault(key, asyncio.Lock()):
            cached = self._cache.get(key)
            if cached is not None and cached.signature == sig:
                return cached.value
            value = await asyncio.to_thread(read_set, role, key[1], self.keys_dir)
            previous = cached.value if cached is not None else None
            self._cache[key] = _Cached(sig, value)
        if previous is None or previous.digest != value.digest:
            if value.state != READY:
                log.warning("Eucalyptus key files for %s: %s", _label(key), value.reason)
            event = self._events.pop(key, None)
            if event is not None:
                event.set()
        return value

    @contextlib.contextmanager
    def watching(self, role: Role, cluster: str | None) -> Iterator[asyncio.Event]:
        """An event set when the set for (role, cluster) changes; polled while held."""
        key = (role, cluster if role in (Role.CC, Role.NC) else None)
        self._watchers[key] = self._watchers.get(key, 0) + 1
        event = self._events.setdefault(key, asyncio.Event())
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll())
        try:
            yield event
        finally:
            left = self._watchers.pop(key) - 1
            if left:
                self._watchers[key] = left

    async def _poll(self) -> None:
        """Look at each watched set every `poll` seconds; end when nobody watches."""
        while self._watchers:
            await asyncio.sleep(self.poll)
            for role, cluster in list(self._watchers):
                try:
                    await self.current(role, cluster)
                except Exception:  # a bug must not stop the watch of every other set
                    log.exception("checking Eucalyptus key files for %s failed", role.value)

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        for event in self._events.values():
            event.set()


def _label(key: tuple[Role, str | None]) -> str:
    role, cluster = key
    return f"{role.value} of cluster {cluster}" if cluster else role.value
