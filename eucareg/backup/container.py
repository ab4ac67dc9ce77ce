"""The backup file's outer format: a magic line, a JSON header line, then the payload (a tar.gz),
either as it is or sealed with AES-256-GCM under a key made from a passphrase with scrypt.

The header carries the payload's length and SHA-256, so a truncated or damaged file is named as
such before anything is unpacked; with a passphrase the header is authenticated data of the
seal, so no byte of the file can change unnoticed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

MAGIC = b"eucareg-backup 1\n"
MAX_HEADER = 4096
MAX_FILE = 4 * 1024**3  # bytes: refuse to read more than this as one backup
# scrypt: 2**15 x 8 x 1 takes 32 MiB and about 0.1 s; a header may ask for more, up to a bound,
# but never enough to exhaust the machine (the header is read before it is authenticated).
SCRYPT = {"n": 2**15, "r": 8, "p": 1}
SCRYPT_MAX = {"n": 2**20, "r": 16, "p": 4}
MIN_PASSPHRASE = 8


class BackupError(Exception):
    """A backup cannot be written or read; the message says which file and why."""


def _key(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase)


def seal(payload: bytes, passphrase: bytes | None) -> bytes:
    """The whole file's bytes for `payload`."""
    header: dict[str, Any] = {
        "payload_bytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "encryption": None,
    }
    if passphrase is not None:
        salt, nonce = os.urandom(16), os.urandom(12)
        header["encryption"] = {
            "cipher": "AES-256-GCM",
            "kdf": "scrypt",
            **SCRYPT,
            "salt": base64.b64encode(salt).decode(),
            "nonce": base64.b64encode(nonce).decode(),
        }
        key = _key(passphrase, salt, SCRYPT["n"], SCRYPT["r"], SCRYPT["p"])
        # The length and checksum describe the plaintext; the stored bytes are longer by the tag.
        line = json.dumps(header, sort_keys=True).encode() + b"\n"
        return MAGIC + line + AESGCM(key).encrypt(nonce, payload, MAGIC + line)
    return MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + payload


def is_encrypted(path: Path) -> bool:
    return _split(path, _read(path))[0]["encryption"] is not None


def unseal(path: Path, passphrase: bytes | None) -> bytes:
    """The payload of the backup at `path`, checked; BackupError names any problem."""
    data = _read(path)
    header, line, body = _split(path, data)
    enc = header["encryption"]
    if enc is None:
        if passphrase is not None:
            raise BackupError(f"{path}: this backup is not encrypted; leave out --passphrase-file")
        payload = body
    else:
        if passphrase is None:
            raise BackupError(f"{path}: this backup is encrypted; give --passphrase-file")
        payload = _decrypt(path, enc, passphrase, line, body)
    if len(payload) != header["payload_bytes"]:
        raise BackupError(
            f"{path}: truncated or damaged: the header promises {header['payload_bytes']} bytes "
            f"of archive, the file holds {len(payload)}"
        )
    if hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
        raise BackupError(f"{path}: damaged or altered: the archive's SHA-256 does not match")
    return payload


def _read(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_FILE:
            raise BackupError(f"{path}: {size} bytes, larger than any backup ({MAX_FILE})")
        return path.read_bytes()
    except FileNotFoundError:
        raise BackupError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise BackupError(f"{path}: a directory, not a backup file") from None
    except OSError as exc:
        raise BackupError(f"{path}: cannot read: {exc.strerror}") from None


def _split(path: Path, data: bytes) -> tuple[dict[str, Any], bytes, bytes]:
    if not data.startswith(MAGIC):
        raise BackupError(f"{path}: not an eucareg backup (it does not start with {MAGIC!r})")
    end = data.find(b"\n", len(MAGIC), len(MAGIC) + MAX_HEADER)
    if end < 0:
        raise BackupError(f"{path}: truncated or damaged: no complete header")
    line = data[len(MAGIC) : end + 1]
    try:
        header = json.loads(line)
        if not isinstance(header, dict):
            raise ValueError("not an object")
        int(header["payload_bytes"])
        str(header["payload_sha256"])
        encryption = header["encryption"]
        if encryption is not None and not isinstance(encryption, dict):
            raise ValueError("bad encryption")
    except (ValueError, KeyError, TypeError):
        raise BackupError(f"{path}: damaged: its header is not readable") from None
    return header, line, data[end + 1 :]


def _decrypt(path: Path, enc: dict[str, Any], passphrase: bytes, line: bytes, body: bytes) -> bytes:
    try:
        params = {k: int(enc[k]) for k in ("n", "r", "p")}
        salt = base64.b64decode(enc["salt"], validate=True)
        nonce = base64.b64decode(enc["nonce"], validate=True)
        if enc.get("cipher") != "AES-256-GCM" or enc.get("kdf") != "scrypt" or len(nonce) != 12:
            raise ValueError("unknown cipher")
    except (ValueError, KeyError, TypeError):
        raise BackupError(f"{path}: damaged: its encryption header is not readable") from None
    if any(not 1 <= params[k] <= SCRYPT_MAX[k] for k in params) or params["n"] & (params["n"] - 1):
        raise BackupError(f"{path}: damaged: key derivation parameters out of bounds {params}")
    key = _key(passphrase, salt, params["n"], params["r"], params["p"])
    try:
        return AESGCM(key).decrypt(nonce, body, MAGIC + line)
    except InvalidTag:
        raise BackupError(
            f"{path}: wrong passphrase, or the file was truncated or altered (the seal does "
            "not open); nothing was changed"
        ) from None


def read_passphrase(path: Path) -> bytes:
    """A passphrase file's first line (without its newline), at least MIN_PASSPHRASE bytes."""
    try:
        # Only the first line, at most 4 KiB: a pipe (`<(pass show …)`, a FIFO) whose writer
        # stays open, or /dev/zero, must not hang or fill memory.
        with open(path, "rb") as handle:
            raw = handle.readline(4096)
    except OSError as exc:
        raise BackupError(f"--passphrase-file {path}: cannot read: {exc.strerror}") from None
    passphrase = raw.split(b"\n", 1)[0].rstrip(b"\r")
    if b"\0" in passphrase:
        raise BackupError(
            f"--passphrase-file {path}: its first line holds NUL bytes; is it a passphrase file?"
        )
    if len(passphrase) < MIN_PASSPHRASE:
        raise BackupError(
            f"--passphrase-file {path}: the passphrase is {len(passphrase)} bytes; "
            f"use at least {MIN_PASSPHRASE}"
        )
    return passphrase


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to a new file `path`, mode 0600, atomically: a temporary file in the same
    directory, synced, then linked into place; an existing `path` is never replaced."""
    if path.exists() or path.is_symlink():
        raise BackupError(f"{path}: already exists; a backup never overwrites a file")
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise BackupError(f"{path}: cannot write: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(partial, path)  # fails if `path` appeared meanwhile: never overwrite
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except FileExistsError:
        raise BackupError(f"{path}: already exists; a backup never overwrites a file") from None
    except OSError as exc:
        raise BackupError(f"{path}: cannot write: {exc.strerror}") from None
    finally:
        partial.unlink(missing_ok=True)
