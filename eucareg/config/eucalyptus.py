"""The `[eucalyptus]` table: whether eucareg delivers Eucalyptus's own key files (node-pk.pem,
euca.p12, ...) over its authenticated channel, where Eucalyptus keeps them, and whose they are.
Off by default: with it on, private keys cross the network (docs/credentials.md).
"""

from __future__ import annotations

import os.path
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eucareg.core import grammar

DEFAULT_KEYS_DIR = Path("/var/lib/eucalyptus/keys")
DEFAULT_USER = "eucalyptus"
KEYS = {"deliver_keys", "keys_dir", "user"}
# A user name as useradd takes it (and nothing a message or a path could be fooled by).
_USER_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


class EucalyptusConfigError(ValueError):
    """A problem in the `[eucalyptus]` table; the message names the key."""


@dataclass(frozen=True)
class EucalyptusKeys:
    """Delivering Eucalyptus 1.6's key files: a registrar serves them, a component writes
    them, each only when its own configuration says so."""

    deliver: bool = False
    keys_dir: Path = DEFAULT_KEYS_DIR
    user: str = DEFAULT_USER


def parse(value: Any, key_dir: Path) -> EucalyptusKeys:
    """The table (None when absent), checked against eucareg's own `key_dir`: eucareg's files
    carry the same names as Eucalyptus's, so the two directories must never meet."""
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise EucalyptusConfigError(f"eucalyptus: expected a table, got {grammar.shown(value)}")
    unknown = sorted(set(value) - KEYS)
    if unknown:
        name = str(unknown[0])
        shown = name if name.isascii() and name.replace("_", "").isalnum() else grammar.shown(name)
        raise EucalyptusConfigError(
            f"eucalyptus.{shown[:64]}: unknown key (allowed here: {', '.join(sorted(KEYS))})"
        )
    deliver = value.get("deliver_keys", False)
    if not isinstance(deliver, bool):
        raise EucalyptusConfigError(
            f"eucalyptus.deliver_keys: expected true or false, got {grammar.shown(deliver)}"
        )
    keys_dir = _keys_dir(value.get("keys_dir", DEFAULT_KEYS_DIR))
    user = _user(value.get("user", DEFAULT_USER))
    problem = overlap(key_dir, keys_dir)
    if problem is not None:
        raise EucalyptusConfigError(problem)
    return EucalyptusKeys(deliver, keys_dir, user)


def overlap(key_dir: Path, keys_dir: Path) -> str | None:
    """Why eucareg's `key_dir` and Eucalyptus's keys directory may not be used together
    (the same, or one inside the other), or None."""
    ours, theirs = Path(_normal(key_dir)), Path(_normal(keys_dir))
    if ours == theirs:
        relation = "is"
    elif ours.is_relative_to(theirs):
        relation = "is inside"
    elif theirs.is_relative_to(ours):
        relation = "contains"
    else:
        return None
    return (
        f"key_dir: {key_dir} {relation} Eucalyptus's key directory {keys_dir} "
        "(eucalyptus.keys_dir): eucareg's own cloud-cert.pem, node-cert.pem, ... carry the same "
        "names as Eucalyptus's and would overwrite them; give eucareg a key_dir of its own "
        "(the default is state_dir/keys)"
    )


def _normal(path: Path) -> str:
    """The path with `.`, `..` and repeated slashes resolved lexically (symbolic links are
    not followed: the directories may not exist yet). POSIX lets normpath keep a leading `//`
    (it may mean something else); on Linux it is `/`, so `//` is the root and `//var/x` is
    `/var/x`."""
    normal = os.path.normpath(str(path))
    return "/" + normal.lstrip("/") if normal.startswith("//") else normal


def _keys_dir(value: Any) -> Path:
    if isinstance(value, Path):
        return value
    if not isinstance(value, str) or not value or "\0" in value:
        raise EucalyptusConfigError(
            f"eucalyptus.keys_dir: expected a path, got {grammar.shown(value)}"
        )
    path = Path(value)
    if not path.is_absolute():
        raise EucalyptusConfigError(
            f"eucalyptus.keys_dir: {grammar.shown(value)} must be an absolute path"
        )
    if _normal(path) == "/":
        raise EucalyptusConfigError("eucalyptus.keys_dir: / is not a key directory")
    return path


def _user(value: Any) -> str:
    if (
        not isinstance(value, str)
        or not 1 <= len(value) <= 32
        or value[0] == "-"
        or not set(value) <= _USER_CHARS
    ):
        raise EucalyptusConfigError(
            f"eucalyptus.user: expected a user name (letters, digits, _ . -), "
            f"got {grammar.shown(value)}"
        )
    return value
