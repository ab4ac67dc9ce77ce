"""Putting a checked archive back on a host: whether it fits this host, what would change, and the
change itself. Every file is first written beside its place (and the registry migrated there);
only then is each current file moved aside into `state_dir/replaced-<time>/` and the new one
renamed into place. Nothing is deleted.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from alembic.util import CommandError

from eucareg.backup.container import BackupError
from eucareg.backup.contents import (
    CONFIG,
    REGISTRY,
    Archive,
    has_place,
    registry_digest,
    target,
)
from eucareg.config.file import SOCKET_FILE, Config
from eucareg.store.owner import holder
from eucareg.store.registry import sqlite_url
from eucareg.store.upgrade import scripts, upgrade

log = logging.getLogger(__name__)

SIDE_FILES = ("-wal", "-shm")  # a registry's journal: never left beside another registry


@dataclass(frozen=True)
class Step:
    name: str  # in the archive
    target: Path
    action: str  # create, replace, or same


@dataclass
class Result:
    steps: list[Step]
    aside: Path | None = None  # where the replaced files went (None: nothing replaced)
    migrated: list[str] = field(default_factory=list)
    config_differs: bool = False

    @property
    def changed(self) -> bool:
        return any(s.action != "same" for s in self.steps)


def check_fits(archive: Archive, cfg: Config) -> None:
    """Refuse a backup of another kind of host, or one whose registry is newer than this code."""
    manifest = archive.manifest
    have = sorted(c.role.value for c in cfg.components)
    if manifest.get("roles") != have:
        raise BackupError(
            f"this backup is of a host with {', '.join(manifest.get('roles') or ['nothing'])}; "
            f"this configuration has {', '.join(have) or 'nothing'}: a backup of another "
            "role cannot make this host what it was. Use the configuration it was made with"
        )
    clusters = {c.role.value: c.cluster for c in cfg.components}
    for comp in manifest.get("components") or []:
        if clusters.get(comp.get("role")) != comp.get("cluster"):
            raise BackupError(
                f"this backup's {comp.get('role')} is of cluster {comp.get('cluster')}; this "
                f"configuration's is of cluster {clusters.get(comp.get('role'))}: a backup of "
                "another cluster cannot make this host what it was"
            )
    for name in sorted(archive.files):
        if not has_place(cfg, name):
            raise BackupError(
                f"the backup holds {name}, which is no file of this host's configuration "
                "(only state_dir's own files, key_dir, and the [dnssd] key files it names); "
                "refusing all of it"
            )
    revision = manifest.get("schema_revision")
    if revision is not None:
        script = scripts()
        try:
            script.get_revision(revision)
        except CommandError:
            raise BackupError(
                f"the backup's registry is at schema revision {revision}, which this eucareg "
                f"does not know (it knows up to {script.get_current_head()}): restore it with "
                f"the eucareg that made it ({manifest.get('eucareg_version')}) or a newer one"
            ) from None


def agent_running(cfg: Config) -> str | None:
    """Why we think an agent runs on this state_dir (its registry lock, or its socket
    answering), or None."""
    pid = holder(cfg.database)
    if pid is not None:
        return f"an agent (pid {pid}) holds {cfg.database}"
    path = cfg.state_dir / SOCKET_FILE
    if path.exists():
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(2)
            try:
                sock.connect(str(path))
            except OSError:
                return None  # a stale socket of a stopped agent
            return f"an agent answers on {path}"
    return None


def plan(archive: Archive, cfg: Config) -> list[Step]:
    """What restoring would do to each file (the registry compared before any migration)."""
    steps = []
    for name, data in sorted(archive.files.items()):
        if name == CONFIG:
            continue
        path = target(cfg, name)
        if not path.exists():
            action = "create"
        elif name == REGISTRY:
            staged = _scratch_copy(path, data)
            try:
                same = registry_digest(staged) == registry_digest(path)
            finally:
                staged.unlink()
            action = "same" if same else "replace"
        else:
            action = "same" if _read(path) == data else "replace"
        steps.append(Step(name, path, action))
    return steps


def apply(archive: Archive, cfg: Config) -> Result:
    """Restore every file; the caller holds the registry's lock (owner.hold)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    staged: dict[str, Path] = {}
    for name in archive.files:
        if name != CONFIG:
            _refuse_links(cfg, target(cfg, name))
    _mkdirs(cfg.state_dir)  # first: its owner is the owner of what is restored
    try:
        for name, data in sorted(archive.files.items()):
            if name != CONFIG:
                staged[name] = _stage(cfg, name, data, archive.entry(name), stamp)
        migrated: list[str] = []
        if REGISTRY in staged:
            migrated = _migrate(staged[REGISTRY])
        steps = [_compare(cfg, name, path) for name, path in staged.items()]
        result = Result(steps, migrated=migrated, config_differs=_config_differs(archive, cfg))
        if not result.changed:
            return result  # the same archive again: nothing to do (a differing config is told)
        _swap(cfg, steps, staged, result, stamp)
        if result.config_differs and result.aside is not None:
            keep = result.aside / CONFIG
            keep.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # 0600 like everything under state_dir (a configuration may name secrets' paths
            # and hold a join token's scope): not the umask's 0644.
            with os.fdopen(_create(keep), "wb") as handle:
                handle.write(archive.files[CONFIG])
        return result
    finally:
        for path in staged.values():
            path.unlink(missing_ok=True)


def _swap(
    cfg: Config, steps: list[Step], staged: dict[str, Path], result: Result, stamp: str
) -> None:
    """Set each replaced file aside and rename its new one into place. On any failure every
    rename done so far is undone, so the host is left as it was, never half restored with
    a secret missing (an agent would make a new one)."""
    moves: list[tuple[Path, Path]] = []  # (from, to), in the order done
    try:
        for step in steps:
            if step.action == "same":
                continue
            for path, name in _replaced(step):
                if path.exists() or path.is_symlink():
                    result.aside = result.aside or _aside_dir(cfg, stamp)
                    moves.append((path, _move_aside(path, result.aside / name, stamp)))
            os.rename(staged[step.name], step.target)
            moves.append((staged[step.name], step.target))
    except BaseException:
        for source, dest in reversed(moves):
            try:
                os.rename(dest, source)
            except OSError as exc:
                log.error("restore: could not move %s back to %s: %s", dest, source, exc)
        if result.aside is not None:
            _remove_empty(result.aside)
            result.aside = None
        raise


def _replaced(step: Step) -> list[tuple[Path, str]]:
    """The files a step replaces: its own, and a registry's journal (left beside the restored
    registry, SQLite would replay it into it)."""
    found = [(step.target, step.name)]
    if step.name == REGISTRY:
        found += [
            (step.target.with_name(step.target.name + suffix), step.name + suffix)
            for suffix in SIDE_FILES
        ]
    return found


def _remove_empty(directory: Path) -> None:
    for path in sorted(directory.rglob("*"), reverse=True):
        if path.is_dir():
            path.rmdir()
    directory.rmdir()


def _stage(cfg: Config, name: str, data: bytes, entry: dict[str, object], stamp: str) -> Path:
    """Write a file beside its place (same filesystem, so the final rename is atomic)."""
    path = target(cfg, name)
    _mkdirs(path.parent)
    staged = path.with_name(f".{path.name}.restore-{stamp}")
    mode = int(str(entry.get("mode", "0600")), 8) & 0o777
    if not name.startswith("files/"):
        mode &= 0o700  # state_dir and key_dir files are the agent's alone (agent/statedir.py)
    fd = _create(staged)
    try:
        os.fchmod(fd, mode)
        if os.geteuid() == 0:
            uid, gid = _owner(cfg, name, entry)
            os.fchown(fd, uid, gid)
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    finally:
        os.close(fd)
    return staged


def _owner(cfg: Config, name: str, entry: dict[str, object]) -> tuple[int, int]:
    if name.startswith("files/"):
        return int(str(entry.get("uid", 0))), int(str(entry.get("gid", 0)))
    # The agent's own files belong to whoever owns state_dir: the agent's user on this host.
    info = cfg.state_dir.stat()
    return info.st_uid, info.st_gid


def _create(path: Path) -> int:
    """A new file at `path`, 0600: whatever was planted there (a link, hard or symbolic, to
    another file; a leftover) is removed first, never opened, truncated or chmod-ed."""
    path.unlink(missing_ok=True)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)


def _refuse_links(cfg: Config, path: Path) -> None:
    """Refuse to write `path` through a directory that is a symbolic link below key_dir or
    state_dir (such as state_dir/identity): one planted there would send the files, as root,
    wherever it points. key_dir and state_dir themselves are the configuration's: the agent
    follows a key_dir that is a link, and so does restore."""
    base = cfg.key_dir if path.is_relative_to(cfg.key_dir) else cfg.state_dir
    if not path.is_relative_to(base):
        return  # a [dnssd] key file: its directories are the site's own
    directory = base
    for part in path.parent.relative_to(base).parts:
        directory = directory / part
        if directory.is_symlink():
            raise BackupError(
                f"{directory} is a symbolic link (to {os.readlink(directory)}); restore does not "
                "write through one: remove it (a directory of the agent's is never a link) and "
                "restore again; nothing was changed"
            )


def _mkdirs(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)


def _migrate(staged: Path) -> list[str]:
    """Bring the staged registry to this code's schema, as one file with no journal beside it."""
    engine = sa.create_engine(sqlite_url(staged))
    try:
        done = upgrade(engine, lock_held=True)  # a staged file: no agent owns it
    except (sa.exc.DatabaseError, sqlite3.Error) as exc:
        raise BackupError(f"the backup's registry is not a readable database: {exc}") from None
    finally:
        engine.dispose()
    for copy in staged.parent.glob(staged.name + ".pre-*"):
        copy.unlink()  # the archive itself is the copy from before
    conn = sqlite3.connect(staged)
    try:
        conn.execute("PRAGMA journal_mode=DELETE")  # folds the WAL into the file
    finally:
        conn.close()
    return done


def _compare(cfg: Config, name: str, staged: Path) -> Step:
    path = target(cfg, name)
    if not path.exists():
        return Step(name, path, "create")
    if name == REGISTRY:
        same = registry_digest(staged) == registry_digest(path)
    else:
        same = _read(staged) == _read(path)
    return Step(name, path, "same" if same else "replace")


def _config_differs(archive: Archive, cfg: Config) -> bool:
    saved = archive.files.get(CONFIG)
    if saved is None or cfg.source is None:
        return False
    try:
        return cfg.source.read_bytes() != saved
    except OSError:
        return True


def _aside_dir(cfg: Config, stamp: str) -> Path:
    aside = cfg.state_dir / f"replaced-{stamp}"
    n = 1
    while aside.exists():
        n += 1
        aside = cfg.state_dir / f"replaced-{stamp}.{n}"
    aside.mkdir(mode=0o700, parents=True)
    return aside


def _move_aside(path: Path, to: Path, stamp: str) -> Path:
    """Move `path` to `to` (or, on another filesystem, beside itself); where it went."""
    _mkdirs(to.parent)
    try:
        os.rename(path, to)
        return to
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    # Another filesystem (a key_dir or TSIG key elsewhere): set it aside where it is.
    beside = path.with_name(f"{path.name}.replaced-{stamp}")
    os.rename(path, beside)
    return beside


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BackupError(f"{path}: cannot read: {exc.strerror}") from None


def _scratch_copy(path: Path, data: bytes) -> Path:
    scratch = path.with_name(f".{path.name}.compare-{os.getpid()}")
    fd = _create(scratch)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return scratch
