"""Writing the Eucalyptus key files a registrar sent (opt-in, `[eucalyptus] deliver_keys`) into
Eucalyptus's key directory, as `euca_conf` would have copied them: owned by the `eucalyptus`
user, private ones 0600, each atomically, and only the files that differ from what is there.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import logging
import os
import pwd
import re
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eucareg.config.eucalyptus import EucalyptusKeys, overlap
from eucareg.core.model import Role
from eucareg.pki import eucafiles as ef

log = logging.getLogger(__name__)

STATES = ("ready", "missing", "invalid", "off")
# A digest as the registrar's request schema takes it back (api/bodies.py EUCA_DIGEST).
DIGEST = re.compile(r"[a-z0-9]{1,16}:[0-9a-f]{1,64}", re.ASCII)
_NAMES = frozenset(n for names in ef.NEEDS.values() for n in names)


class EucaKeysError(Exception):
    """The files cannot be written here (no such user, an unusable directory), and why."""


@dataclass(frozen=True)
class Delivery:
    """The `eucalyptus` object of a credential answer, checked for shape."""

    state: str
    reason: str
    digest: str
    files: Mapping[str, bytes]


def parse(raw: Any, role: Role) -> Delivery:
    """The registrar's `eucalyptus` object; ValueError naming what is wrong. Only the names
    `role` is given are accepted: a name is never a path."""
    if not isinstance(raw, dict):
        raise ValueError("eucalyptus is not an object")
    state, reason, digest, files = (raw.get(k) for k in ("state", "reason", "digest", "files"))
    if state not in STATES:
        raise ValueError(f"eucalyptus.state is {str(state)[:20]!r}")
    if not isinstance(reason, str) or not isinstance(digest, str):
        raise ValueError("eucalyptus.reason or .digest is not a string")
    if not DIGEST.fullmatch(digest):
        raise ValueError(f"eucalyptus.digest {digest[:80]!r} is not a digest")
    if not isinstance(files, dict):
        raise ValueError("eucalyptus.files is not an object")
    allowed = set(ef.NEEDS.get(role, ()))
    decoded: dict[str, bytes] = {}
    for name, data in files.items():
        if name not in allowed or not isinstance(data, str):
            raise ValueError(
                f"eucalyptus.files names {str(name)[:40]!r}, not a {role.value}'s file"
            )
        try:
            decoded[name] = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"eucalyptus.files[{name}] is not base64") from None
    if state == "ready" and ef.digest(decoded) != digest:
        raise ValueError("eucalyptus.digest does not match its files")
    return Delivery(state, reason[:500], digest, decoded)


def owner(user: str) -> tuple[int, int]:
    """The uid and primary gid of `user`, resolved when the files are written."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise EucaKeysError(
            f"user {user!r} does not exist on this host: Eucalyptus's packages create it; "
            "install them, or name the right user in eucalyptus.user"
        ) from None
    return entry.pw_uid, entry.pw_gid


def _directory(keys_dir: Path, uid: int, gid: int) -> int:
    """Eucalyptus's key directory, opened: made 0700 for the user if missing (as `euca_conf
    --setup` does); an existing one is used as it is, but never through a symbolic link. Every
    file is then reached through this descriptor: the `eucalyptus` user owns the directory
    above and could swap this one for a link to /etc between a check and a write by name."""
    if not os.path.lexists(keys_dir):
        keys_dir.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        with contextlib.suppress(FileExistsError):  # made meanwhile: used as it is
            os.mkdir(keys_dir, ef.DIR_MODE)
            os.chown(keys_dir, uid, gid, follow_symlinks=False)
    try:
        return os.open(keys_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise EucaKeysError(
                f"{keys_dir} is not a directory (a symbolic link, or a file)"
            ) from None
        raise


def _same(dir_fd: int, name: str, data: bytes, mode: int, uid: int, gid: int) -> bool:
    """Whether `name` already holds `data` (its owner and mode then put right, through the
    file opened, never by name). A link, a FIFO or a second name of another file (a hard
    link) is never read or changed: it is "not the same", and replaced by the rename."""
    try:
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENXIO):
            return False
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size != len(data):
            return False
        with os.fdopen(fd, "rb", closefd=False) as handle:
            if handle.read(len(data) + 1) != data:
                return False
        if (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) != (uid, gid, mode):
            os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
        return True
    finally:
        os.close(fd)


def _write(dir_fd: int, name: str, data: bytes, mode: int, uid: int, gid: int) -> None:
    """Temporary file (owner and mode set before a byte is written), fsync, rename."""
    tmp = f".{name}.{secrets.token_hex(6)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode)
        os.fchown(fd, uid, gid)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def _drop_leftovers(dir_fd: int, name: str) -> None:
    """Temporary files of ours (`.<name>.<random>`) that a crash left between writing and
    renaming: removed before the next write, so none lingers next to Eucalyptus's keys."""
    for entry in os.listdir(dir_fd):
        if not entry.startswith(f".{name}."):
            continue
        try:
            if stat.S_ISREG(os.lstat(entry, dir_fd=dir_fd).st_mode):
                os.unlink(entry, dir_fd=dir_fd)
        except FileNotFoundError:
            pass


def write_files(
    conf: EucalyptusKeys, files: Mapping[str, bytes], own_key_dir: Path | None = None
) -> list[str]:
    """Put `files` into Eucalyptus's key directory (blocking); the names written. A file that
    already holds these bytes is left alone (its owner and mode put right if need be).
    `own_key_dir`, eucareg's own: refused if the two meet once symbolic links are followed
    (the configuration could only compare the paths as written)."""
    keys_dir = conf.keys_dir
    if own_key_dir is not None:
        problem = overlap(Path(os.path.realpath(own_key_dir)), Path(os.path.realpath(keys_dir)))
        if problem is not None:
            raise EucaKeysError(f"through symbolic links, {problem}")
    for name in files:
        if name not in _NAMES:  # a name is never a path, nor a file Eucalyptus does not have
            raise EucaKeysError(f"refusing file name {name!r}")
    uid, gid = owner(conf.user)
    dir_fd = _directory(keys_dir, uid, gid)
    try:
        written: list[str] = []
        for name in sorted(files):
            _drop_leftovers(dir_fd, name)
            data, mode = files[name], ef.mode_of(name)
            if not _same(dir_fd, name, data, mode, uid, gid):
                _write(dir_fd, name, data, mode, uid, gid)
                written.append(name)
        if written:
            os.fsync(dir_fd)
        return written
    finally:
        os.close(dir_fd)


@dataclass
class EucaKeys:
    """A component's side of the delivery: what it was last given (the digest it sends with
    each request) and what became of it."""

    conf: EucalyptusKeys
    role: Role
    cluster: str | None
    own_key_dir: Path | None = None  # eucareg's key_dir, which these files must never touch
    digest: str = ""  # the registrar's digest of the set last received; "" for none
    state: str = "unknown"
    reason: str = "not asked yet"
    written: list[str] = field(default_factory=list)

    def receive(self, raw: Any) -> None:
        """Act on an answer's `eucalyptus` object (blocking: checks and writes files). The
        digest is kept whatever happens, so an unchanged set does not end the next watch."""
        if raw is None:
            # A registrar that ignores the question (one before this feature): ask again later.
            self.state, self.reason = "off", "the registrar sent no Eucalyptus key files"
            return
        try:
            delivery = parse(raw, self.role)
        except ValueError as exc:
            self.state, self.reason = "invalid", f"unusable answer: {exc}"
            log.warning("Eucalyptus key files for %s: %s", self.role.value, self.reason)
            return
        first = delivery.digest != self.digest
        self.digest = delivery.digest
        if delivery.state != "ready":
            self.state, self.reason = delivery.state, delivery.reason
            if first:
                log.warning("Eucalyptus key files for %s: %s", self.role.value, delivery.reason)
            return
        self._write(delivery, first)

    def _write(self, delivery: Delivery, first: bool) -> None:
        try:
            # Checked here too: a registrar that proved itself may still hold a broken set.
            ef.check(self.role, self.cluster, delivery.files)
            written = write_files(self.conf, delivery.files, self.own_key_dir)
        except (ef.EucaFilesError, EucaKeysError, OSError) as exc:
            self.state, self.reason = "failed", str(exc)
            log.error(
                "cannot write Eucalyptus key files to %s: %s", self.conf.keys_dir, self.reason
            )
            return
        self.state, self.written = "written", written
        self.reason = f"{', '.join(sorted(delivery.files))} in {self.conf.keys_dir}"
        if written or first:
            log.info(
                "Eucalyptus key files for %s: %s (%s)",
                self.role.value,
                self.reason,
                f"wrote {', '.join(written)}" if written else "unchanged",
            )
