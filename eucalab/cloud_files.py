"""The files a lab host's agent runs with: its TOML config (from the cloud's plan and
per-host settings) and its hook scripts, by default one that counts each call in hooks.log."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from eucalab.errors import LabError
from eucalab.lab import Lab
from eucalab.plans import CloudPlan
from eucareg.config.file import DEFAULT_API_PORT

__all__ = [
    "HOOK_TYPES",
    "backend",
    "config_text",
    "dnssd_lines",
    "prepare",
    "setting",
    "toml_value",
]

HOOK_TYPES = ("walrus", "cluster", "storage", "node")


class PlannedCloud(Protocol):
    """What the files are made from (eucalab/cloud.py's LabCloud, which hands itself over): the
    plan, the settings, the lab's addresses and the host directories, and its own answers for a
    host's settings, backend and config, so that each is decided in one place."""

    @property
    def lab(self) -> Lab: ...

    @property
    def plan(self) -> CloudPlan: ...

    @property
    def settings(self) -> Mapping[str, Any]: ...

    def host_dir(self, host: str) -> Path: ...

    def setting(self, name: str, host: str, default: Any) -> Any: ...

    def backend(self, host: str) -> str: ...

    def config_text(self, host: str) -> str: ...


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def setting(cloud: PlannedCloud, name: str, host: str, default: Any) -> Any:
    """A setting for one host: a plain value applies to all, a dict is per host."""
    value = cloud.settings.get(name, default)
    if isinstance(value, dict):
        return value.get(host, default)
    return value


def config_text(cloud: PlannedCloud, host: str) -> str:
    """The TOML config a host's agent runs with."""
    base = cloud.host_dir(host)
    registrar = {"pending_timeout": "10m", "hook_timeout": "20s", "retry_base": "1s"}
    registrar.update(cloud.settings.get("registrar", {}))
    lines = [
        f"address = {toml_value(str(cloud.lab.address(host)))}",
        f"state_dir = {toml_value(str(base / 'state'))}",
        f"hook_dir = {toml_value(str(base / 'hooks'))}",
        f"api_port = {DEFAULT_API_PORT}",
        'log_format = "json"',
        f"log_level = {toml_value(cloud.setting('log_level', host, 'info'))}",
        *cloud.setting("top_level", host, []),
        "",
        "[preconditions]",
        f"sshd = {toml_value(cloud.setting('sshd', host, False))}",
        f"recheck_interval = {toml_value(cloud.settings.get('recheck_interval', '1s'))}",
        "",
        "[registrar]",
        *(f"{k} = {toml_value(v)}" for k, v in registrar.items()),
    ]
    lines += ["", "[mdns]", f"backend = {toml_value(cloud.backend(host))}"]
    lines += dnssd_lines(cloud, host)
    installed = cloud.setting("installed", host, {})
    addresses = cloud.setting("addresses", host, {})
    for role, cluster in cloud.plan[host].items():
        lines += ["", f"[components.{role}]"]
        if cluster is not None:
            lines.append(f"cluster = {toml_value(cluster)}")
        if role in addresses:
            lines.append(f"address = {toml_value(addresses[role])}")
        token = cloud.setting("tokens", host, {}).get(role)
        if token:
            lines.append(f"token = {toml_value(token)}")
        lines.append(f"installed = {toml_value(installed.get(role, True))}")
    return "\n".join(lines) + "\n"


def backend(cloud: PlannedCloud, host: str) -> str:
    """A host's `[mdns] backend`: ``settings["mdns_backend"]`` ("zeroconf" or "avahi",
    for all hosts, or a dict per host), "zeroconf" by default. Never "auto": a lab agent
    must not find the machine's own avahi-daemon (`ip netns exec` leaves the machine's
    system bus reachable) and announce on the real LAN."""
    backend = str(cloud.setting("mdns_backend", host, "zeroconf"))
    if backend not in ("zeroconf", "avahi"):
        raise LabError(f"mdns_backend for {host!r}: 'zeroconf' or 'avahi', not {backend!r}")
    return backend


def dnssd_lines(cloud: PlannedCloud, host: str) -> list[str]:
    """The `[dnssd]` table from ``settings["dnssd"]``, a mapping of its keys: a plain value
    applies to every host, a dict is per host (a host it leaves out gets no such key);
    an empty result leaves the table out."""
    table = cloud.settings.get("dnssd") or {}
    pairs = []
    for key, value in table.items():
        if isinstance(value, dict):
            if host not in value:
                continue
            value = value[host]
        pairs.append(f"{key} = {toml_value(value)}")
    return ["", "[dnssd]", *pairs] if pairs else []


def prepare(cloud: PlannedCloud, host: str) -> Path:
    """Write a host's config and hooks; returns the config path.

    Every hook type gets the counting script (one line per call in ``hooks.log``) unless
    ``settings["hooks"][host]`` gives that type a script text of its own.
    """
    base = cloud.host_dir(host)
    hooks = base / "hooks"
    hooks.mkdir(parents=True, exist_ok=True)
    custom = cloud.setting("hooks", host, {})
    # Custom scripts may add names of their own (a batch script such as node-batch).
    for name in [*HOOK_TYPES, *(n for n in custom if n not in HOOK_TYPES)]:
        script = hooks / name
        script.write_text(
            custom.get(name)
            or (
                "#!/bin/sh\n"
                "# lab hook: record the call, so tests can count registrations\n"
                f'echo "{name} $EUCAREG_ID $EUCAREG_ADDRESS $EUCAREG_CLUSTER" >> '
                f"{base}/hooks.log\n"
            )
        )
        script.chmod(0o755)
    config = base / "eucareg.toml"
    config.write_text(cloud.config_text(host))
    return config
