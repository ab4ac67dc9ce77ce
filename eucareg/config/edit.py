"""Changing the operator's configuration file from a command (`eucareg join`): the keys are set
with tomlkit, so comments and layout survive, and the result is checked by the one parser
before it replaces the file, atomically, with its mode kept.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import tomlkit
from tomlkit.exceptions import TOMLKitError
from tomlkit.items import Table

from eucareg.config.file import Config, from_mapping
from eucareg.config.values import ConfigError
from eucareg.core.model import Role


def joined(text: str, url: str, tokens: Mapping[Role, str]) -> str:
    """`text` with `fallback_registrar = url` and each `components.ROLE.token` set; ConfigError
    when the file is not TOML, lacks one of the components, or the result would not load."""
    try:
        doc = tomlkit.parse(text)
    except TOMLKitError as exc:
        raise ConfigError(f"not valid TOML: {exc}") from None
    doc["fallback_registrar"] = url
    components = doc.get("components")
    for role, token in tokens.items():
        table = components.get(role.value) if isinstance(components, Table) else None
        if not isinstance(table, Table):
            raise ConfigError(f"components.{role.value}: this host has no {role.value} to join")
        table["token"] = token
    out = tomlkit.dumps(doc)
    check(out)
    return out


def check(text: str) -> Config:
    """The configuration `text` would be, or ConfigError (what `eucareg agent` would say)."""
    try:
        return from_mapping(tomlkit.parse(text).unwrap())
    except TOMLKitError as exc:
        raise ConfigError(f"not valid TOML: {exc}") from None


def replace_file(path: Path, text: str, *, secret: bool = False) -> Path:
    """Write `text` over `path` atomically (a crash leaves the old file or the new one), with
    the old file's mode, less any access for group and others when `text` holds a `secret`;
    the old content is kept beside it as PATH.bak. A symlinked `path` is written through to
    the file it names (returned)."""
    path = path.resolve()
    mode = path.stat().st_mode & 0o7777
    if secret:
        mode &= ~0o077  # (the old content may hold a token too: so does the copy)
    _write_atomic(path.with_name(path.name + ".bak"), path.read_bytes(), mode)
    _write_atomic(path, text.encode("utf-8"), mode)
    return path


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """A new file in `path`'s directory, renamed over `path`: whatever `path` was (a planted
    symlink too), it is replaced, never written through."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
