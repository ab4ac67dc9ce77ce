"""TSIG keys for DNS-SD updates: names from the `[dnssd]` templates, secrets from files.

A secret file holds the key's base64 secret, alone or as `tsig-keygen` writes it
(`key "NAME" { algorithm ...; secret "..."; };`). Files are read when a key is first needed and
again whenever they change, so a rotated secret is picked up without a restart.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.name
import dns.tsig

from eucareg.config.dnssd import DnssdConfig, expand_template

MAX_SECRET_FILE = 64 * 1024  # a key clause is ~150 bytes
_SECRET_CLAUSE = re.compile(r'secret\s+"([^"]*)"')


class KeyProblem(Exception):
    """A key cannot be used; the message names the configuration key and the file."""


@dataclass(frozen=True)
class Key:
    name: dns.name.Name
    algorithm: dns.name.Name
    keyring: dict[dns.name.Name, dns.tsig.Key]


class KeyStore:
    """The component keys (one per instance, or one for all) and the prune key of an agent."""

    def __init__(self, config: DnssdConfig) -> None:
        self._config = config
        self._algorithm = dns.name.from_text(config.tsig_algorithm)
        # path -> ((mtime_ns, size), secret); files are small, stat() is cheap
        self._secrets: dict[Path, tuple[tuple[int, int], bytes]] = {}

    def component_key(self, instance: str, role: str) -> Key:
        """The key `instance` (a label, e.g. node-nc-0123456789ab) updates its records with."""
        cfg = self._config
        fill = {"instance": instance, "role": role, "domain": cfg.domain}
        name = expand_template(cfg.tsig_key_name, **fill)
        path = Path(expand_template(cfg.tsig_secret_file, **fill))
        return self._key(name, path, "dnssd.tsig_secret_file")

    def prune_key(self) -> Key | None:
        cfg = self._config
        if cfg.prune_key_name is None or cfg.prune_secret_file is None:
            return None
        return self._key(cfg.prune_key_name, cfg.prune_secret_file, "dnssd.prune_secret_file")

    def _key(self, name: str, path: Path, setting: str) -> Key:
        try:
            key_name = dns.name.from_text(name)
        except dns.exception.DNSException as exc:
            raise KeyProblem(f"{name!r} is not a DNS name: {exc}") from None
        secret = self._secret(path, setting)
        key = dns.tsig.Key(key_name, secret, self._algorithm)
        return Key(key_name, self._algorithm, {key_name: key})

    def _secret(self, path: Path, setting: str) -> bytes:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise KeyProblem(f"{setting}: cannot read {path}: {exc.strerror}") from None
        stamp = (st.st_mtime_ns, st.st_size)
        cached = self._secrets.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        secret = read_secret(path, setting)
        self._secrets[path] = (stamp, secret)
        return secret


def read_secret(path: Path, setting: str) -> bytes:
    """The secret of a key file: a base64 line, or a BIND key clause holding one."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_SECRET_FILE + 1)
    except OSError as exc:
        raise KeyProblem(f"{setting}: cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_SECRET_FILE:
        raise KeyProblem(f"{setting}: {path} is larger than {MAX_SECRET_FILE} bytes; not a key")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise KeyProblem(f"{setting}: {path} is not ASCII text; not a key") from None
    clause = _SECRET_CLAUSE.search(text)
    encoded = (clause.group(1) if clause else text).strip()
    try:
        secret = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        secret = b""
    if not secret:
        raise KeyProblem(
            f"{setting}: {path} holds no base64 secret (expected the secret alone, or "
            'tsig-keygen\'s \'key "NAME" { algorithm ...; secret "..."; };\')'
        )
    return secret
