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

from eucareg.config.file import Config, ConfigError, from_mapping
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


def replace_file(path: Path, text: str) -> None:
    """Write `text` over `path` atomically (a crash leaves the old file or the new one), with
    the old file's mode; the old content is kept beside it as PATH.bak."""
    mode = path.stat().st_mode & 0o7777
    backup = path.with_name(path.name + ".bak")
    backup.write_bytes(path.read_bytes())
    os.chmod(backup, mode)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
