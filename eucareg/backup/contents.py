"""What a backup holds, and the archive (a tar.gz with manifest.json) that holds it: collecting a
host's files for its configuration, and reading an archive back with every file checked against
its manifest before any of it is used.

Names inside the archive say where a file goes on the host restoring it: `state/REL` under its
state_dir, `keys/REL` under its key_dir, `files/ABS` at that absolute path (DNS-SD TSIG keys).
"""

from __future__ import annotations

import datetime
import glob
import hashlib
import io
import json
import os
import socket
import sqlite3
import stat
import tarfile
import tempfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path, PurePosixPath
from typing import Any

import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from eucareg.backup.container import BackupError
from eucareg.config.dnssd import expand_template
from eucareg.config.file import Config
from eucareg.pki import certificates, keypairs
from eucareg.pki import credentials as cred
from eucareg.store.registry import sqlite_url
from eucareg.store.upgrade import schema_state, snapshot_sqlite

FORMAT = 1
REGISTRY = "state/registry.db"
CONFIG = "config/eucareg.toml"
STATE_FILES = ("admin.token", "registrar.key")  # the registrar's secrets (agent/service.py)
MAX_MEMBER = 2 * 1024**3
MAX_MEMBERS = 10_000


@dataclass(frozen=True)
class Member:
    name: str  # inside the archive
    data: bytes
    mode: int
    uid: int
    gid: int


@dataclass(frozen=True)
class Archive:
    manifest: dict[str, Any]
    files: dict[str, bytes]  # name -> content, each checked against the manifest

    def entry(self, name: str) -> dict[str, Any]:
        return next(f for f in self.manifest["files"] if f["name"] == name)


def target(cfg: Config, name: str) -> Path:
    """Where the archive member `name` belongs on the host configured by `cfg`."""
    top, _, rest = name.partition("/")
    if top == "state":
        return cfg.state_dir / rest
    if top == "keys":
        return cfg.key_dir / rest
    if top == "files":
        return Path("/") / rest
    raise BackupError(f"archive member {name!r} has no place on this host")


def has_place(cfg: Config, name: str) -> bool:
    """Whether `name` is a file this host's configuration gives a place: the agent's own files
    in state_dir, anything in key_dir, and only the DNS-SD key files the `[dnssd]` table names
    (a forged archive must not write, as root, wherever it likes)."""
    top, _, rest = name.partition("/")
    if top == "state":
        parts = PurePosixPath(rest).parts
        return rest in ("registry.db", *STATE_FILES) or (len(parts) == 2 and parts[0] == "identity")
    if top == "keys":
        return True
    if top == "files":
        # PurePosixPath.match: `*` (a `{role}` or `{instance}`) is one path component, never
        # `a/b`, so a forged name cannot reach below the directory the table names.
        return any(PurePosixPath(f"/{rest}").match(str(p)) for p in dnssd_patterns(cfg))
    return name == CONFIG


# -- collecting ----------------------------------------------------------------------------------


def collect(cfg: Config, scratch: Path) -> list[Member]:
    """Every file of this host's registrar and components, the registry as a consistent
    snapshot (taken through SQLite's online backup: the agent may be running)."""
    members: list[Member] = []
    if cfg.database.exists():
        snapshot = scratch / "registry.db"
        try:
            snapshot_sqlite(cfg.database, snapshot)
        except sqlite3.Error as exc:
            raise BackupError(f"{cfg.database}: not a readable registry: {exc}") from None
        members.append(_member(REGISTRY, snapshot, like=cfg.database))
    for name in STATE_FILES:
        _add(members, f"state/{name}", cfg.state_dir / name)
    for path in _files_under(cfg.state_dir / "identity"):
        _add(members, f"state/identity/{path.name}", path)
    for path in _files_under(cfg.key_dir, recursive=True):
        _add(members, f"keys/{path.relative_to(cfg.key_dir).as_posix()}", path)
    for path in dnssd_files(cfg):
        _add(members, f"files/{path.as_posix().lstrip('/')}", path)
    if cfg.source is not None and cfg.source.is_file():
        _add(members, CONFIG, cfg.source)
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise BackupError("two files would share one name in the archive: " + ", ".join(names))
    return members


def dnssd_patterns(cfg: Config) -> list[Path]:
    """The TSIG key files the `[dnssd]` table names for this host's components, as glob
    patterns (`{instance}` is `*`), and the prune key's file."""
    d = cfg.dnssd
    if d is None:
        return []
    patterns = [
        Path(expand_template(d.tsig_secret_file, instance="*", role=c.role.value, domain=d.domain))
        for c in cfg.components
    ]
    if d.prune_secret_file is not None:
        patterns.append(d.prune_secret_file)
    return [p.absolute() for p in patterns]


def dnssd_files(cfg: Config) -> list[Path]:
    """The TSIG key files of this host that exist now."""
    found = {Path(p) for pattern in dnssd_patterns(cfg) for p in glob.glob(str(pattern))}
    return sorted(p for p in found if p.is_file())


def _files_under(directory: Path, *, recursive: bool = False) -> list[Path]:
    if not directory.is_dir():
        return []
    entries = directory.rglob("*") if recursive else directory.iterdir()
    # Regular files only: sockets, symlinks and the restore's own leftovers are not state.
    return sorted(
        p
        for p in entries
        if p.is_file()
        and not p.is_symlink()
        and not any(part.startswith(("replaced-", ".")) for part in p.relative_to(directory).parts)
    )


def _add(members: list[Member], name: str, path: Path) -> None:
    if path.is_file():
        members.append(_member(name, path))


def _member(name: str, path: Path, like: Path | None = None) -> Member:
    info = os.stat(like or path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BackupError(f"{path}: cannot read: {exc.strerror}") from None
    return Member(name, data, stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid)


def manifest(cfg: Config, members: list[Member], *, encrypted: bool) -> dict[str, Any]:
    files = {m.name: m.data for m in members}
    revision = None
    if REGISTRY in files:
        revision = _revision(files[REGISTRY])
    ca = files.get("keys/" + cred.CLOUD_CERT)
    components = []
    for comp in cfg.components:
        cid = files.get(f"state/identity/{comp.role.value}.id", b"").decode().strip() or None
        key_pem = files.get(f"state/identity/{comp.role.value}.key.pem")
        fp = _key_fingerprint(key_pem) if key_pem else None
        components.append(
            {
                "role": comp.role.value,
                "cluster": comp.cluster,
                "component_id": cid,
                "fingerprint": fp,
            }
        )
    return {
        "kind": "eucareg-backup",
        "format": FORMAT,
        "eucareg_version": version("eucareg"),
        "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "config": str(cfg.source) if cfg.source else None,
        "schema_revision": revision,
        "roles": sorted(c.role.value for c in cfg.components),
        "components": components,
        "ca_fingerprint": certificates.cert_fingerprint(certificates.load_cert_pem(ca))
        if ca
        else None,
        "encrypted": encrypted,
        "files": [
            {
                "name": m.name,
                "bytes": len(m.data),
                "sha256": hashlib.sha256(m.data).hexdigest(),
                "mode": f"{m.mode:04o}",
                "uid": m.uid,
                "gid": m.gid,
            }
            for m in members
        ],
    }


def _key_fingerprint(pem: bytes) -> str | None:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        return None
    return keypairs.fingerprint(key.public_key()) if isinstance(key, rsa.RSAPrivateKey) else None


def _revision(data: bytes) -> str | None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "registry.db"
        path.write_bytes(data)
        engine = sa.create_engine(sqlite_url(path))
        try:
            return schema_state(engine).current
        finally:
            engine.dispose()


def pack(manifest_: dict[str, Any], members: list[Member]) -> bytes:
    """The tar.gz: manifest.json first, then every member, all 0600 and owned by 0."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in [
            ("manifest.json", json.dumps(manifest_, indent=2).encode() + b"\n"),
            *((m.name, m.data) for m in members),
        ]:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o600, 0
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


# -- reading -------------------------------------------------------------------------------------


def unpack(payload: bytes, source: Path) -> Archive:
    """The archive in `payload`, every member checked against the manifest; BackupError
    names what is wrong (the file is `source`)."""
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(payload), mode="r:gz") as tar:
            for n, info in enumerate(tar):
                if n >= MAX_MEMBERS or not info.isfile() or info.size > MAX_MEMBER:
                    raise BackupError(f"{source}: damaged: member {info.name!r} is not a file")
                _check_name(info.name, source)
                extracted = tar.extractfile(info)
                assert extracted is not None
                if info.name in files:
                    raise BackupError(f"{source}: damaged: {info.name!r} appears twice")
                files[info.name] = extracted.read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BackupError(f"{source}: damaged: the archive does not unpack ({exc})") from None
    try:
        manifest_ = json.loads(files.pop("manifest.json"))
        listed = {f["name"]: f for f in manifest_["files"]}
    except (KeyError, ValueError, TypeError):
        raise BackupError(f"{source}: damaged: no readable manifest.json") from None
    if manifest_.get("kind") != "eucareg-backup" or manifest_.get("format") != FORMAT:
        raise BackupError(f"{source}: not an eucareg backup of format {FORMAT}")
    if set(listed) != set(files):
        missing, extra = sorted(set(listed) - set(files)), sorted(set(files) - set(listed))
        raise BackupError(f"{source}: damaged: missing {missing}, unlisted {extra}")
    for name, data in files.items():
        if hashlib.sha256(data).hexdigest() != listed[name]["sha256"]:
            raise BackupError(f"{source}: damaged: {name} does not match its checksum")
    return Archive(manifest_, files)


def _check_name(name: str, source: Path) -> None:
    path = PurePosixPath(name)
    if name == "manifest.json":
        return
    if (
        path.is_absolute()
        or ".." in path.parts
        or "\0" in name
        or len(path.parts) < 2
        or path.parts[0] not in ("state", "keys", "files", "config")
        or name != path.as_posix()
    ):
        raise BackupError(f"{source}: refused: member name {name!r} would write outside its place")


def registry_digest(path: Path) -> str | None:
    """The SHA-256 of a registry's contents (its SQL dump), or None when there is none: two
    files with the same rows compare equal whatever their pages or journal mode."""
    if not path.exists():
        return None
    conn = sqlite3.connect(path)
    try:
        digest = hashlib.sha256()
        for line in conn.iterdump():
            digest.update(line.encode() + b"\n")
        return digest.hexdigest()
    except sqlite3.DatabaseError:
        return "unreadable"
    finally:
        conn.close()
