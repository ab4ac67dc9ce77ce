"""A cloud in the lab: eucareg agents for a CloudPlan on a running Lab, started, signalled and
restarted by PID, with their operator's CLI; the files they run with are written by
eucalab/cloud_files.py and the registrars are read through eucalab/cloud_probes.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eucalab import cloud_files, cloud_probes
from eucalab.errors import LabError
from eucalab.lab import Lab
from eucalab.plans import CloudPlan
from eucalab.process import LabProcess

__all__ = ["LabCloud"]


@dataclass
class LabCloud:
    """Agents for a CloudPlan on a running Lab."""

    lab: Lab
    plan: CloudPlan
    workdir: Path
    settings: Mapping[str, Any] = field(default_factory=dict)
    agents: dict[str, LabProcess] = field(default_factory=dict)
    starts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)

    # -- files (eucalab/cloud_files.py) ---------------------------------------------------

    def host_dir(self, host: str) -> Path:
        return self.workdir / host

    def key_dir(self, host: str) -> Path:
        return self.host_dir(host) / "state" / "keys"

    def hook_log(self, host: str) -> list[str]:
        path = self.host_dir(host) / "hooks.log"
        return path.read_text().splitlines() if path.exists() else []

    def setting(self, name: str, host: str, default: Any) -> Any:
        """A setting for one host: a plain value applies to all, a dict is per host."""
        return cloud_files.setting(self, name, host, default)

    def config_text(self, host: str) -> str:
        """The TOML config a host's agent runs with."""
        return cloud_files.config_text(self, host)

    def backend(self, host: str) -> str:
        """A host's `[mdns] backend`: "zeroconf" (the default) or "avahi", never "auto"."""
        return cloud_files.backend(self, host)

    def prepare(self, host: str) -> Path:
        """Write a host's config and hooks; returns the config path."""
        return cloud_files.prepare(self, host)

    # -- agents ---------------------------------------------------------------------------

    def agent_env(self, host: str) -> dict[str, str]:
        """The environment a host's agent needs besides the lab's: for an Avahi host, the
        private system bus of the avahi-daemon in its namespace (started on first use)."""
        if self.backend(host) != "avahi":
            return {}
        if not self.lab.has_avahi(host):
            self.lab.start_avahi(host, server_options=self.setting("avahi_options", host, {}))
        return self.lab.avahi_env(host)

    def fake_sshd(self, host: str, port: int = 2222, *, banner: bool = True) -> LabProcess:
        """A stand-in sshd on the host's loopback: answers with an SSH banner, nothing more.

        With ``banner=False`` it accepts connections but never says anything (an sshd that
        hangs), and logs ``probe N`` when connection N arrives and ``closed N`` when the
        client gives up on it, so a test can see each precondition check happen.
        """
        script = (
            "import socket\n"
            "s = socket.socket()\n"
            "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            f"s.bind(('127.0.0.1', {port}))\n"
            "s.listen()\n"
            "print('listening', flush=True)\n"
            "n = 0\n"
            "while True:\n"
            "    c, _ = s.accept()\n"
            "    n += 1\n"
            + (
                "    c.sendall(b'SSH-2.0-eucareg-lab\\r\\n')\n"
                if banner
                else "    print(f'probe {n}', flush=True)\n"
                "    c.settimeout(60)\n"
                "    while c.recv(4096):\n"
                "        pass\n"
                "    print(f'closed {n}', flush=True)\n"
            )
            + "    c.close()\n"
        )
        name = f"sshd{port}" if banner else f"silentsshd{port}"
        proc = self.lab.spawn(host, name, [sys.executable, "-c", script])
        proc.wait_for_log("listening", timeout=30)
        return proc

    def start(
        self, host: str, *, env: Mapping[str, str] | None = None, prepare: bool = True
    ) -> LabProcess:
        """Start (or restart) a host's agent; ``env`` is added to its environment (for
        example ``EUCAREG_CRASH_AT``). With ``prepare=False`` the host's config is used as it
        stands (a command such as `eucareg join` changed it)."""
        if host in self.agents and not self.agents[host].exited():
            raise LabError(f"agent on {host} is already running")
        config = self.prepare(host) if prepare else self.host_dir(host) / "eucareg.toml"
        # One log per start, so a restart keeps the previous run's log for diagnosis.
        self.starts[host] = self.starts.get(host, 0) + 1
        proc = self.lab.spawn(
            host,
            f"agent{self.starts[host]}",
            [sys.executable, "-m", "eucareg", "agent", "--config", str(config)],
            env={**self.agent_env(host), **(env or {})},
        )
        self.agents[host] = proc
        # An operator installing a cloud opens an install window on each registrar; tests of
        # trust itself set trust="manual" and do it their own way.
        if self.settings.get("trust", "install-window") == "install-window" and (
            self.runs_registrar(host) and self.starts[host] == 1
        ):
            self.open_install_window(host)
        return proc

    def kill(self, host: str, sig: int = signal.SIGKILL) -> int | None:
        """Signal a host's agent without warning (SIGKILL: a crash) and reap it; its exit
        status. Hooks it started run in sessions of their own and are not signalled."""
        proc = self.agents.get(host)
        if proc is None:
            return None
        if proc.exited():
            return proc.wait_exit(0)
        return self.lab.kill(proc, sig)

    def runs_registrar(self, host: str) -> bool:
        return bool({"clc", "cc"} & set(self.plan[host]))

    def cli(self, host: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run `eucareg ARGS` as the host's operator (inside its namespace)."""
        config = str(self.host_dir(host) / "eucareg.toml")
        argv = [sys.executable, "-m", "eucareg", *args]
        if args and args[0] not in ("fingerprint", "check-config", "agent"):
            argv += ["--config", config]
        return self.lab.run(host, argv, timeout=30, check=check, env=self.agent_env(host) or None)

    def wait_for_api(self, host: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.api(host, "/v1/trust")
                return
            except (LabError, subprocess.TimeoutExpired, json.JSONDecodeError):
                proc = self.agents.get(host)
                if proc is not None and proc.exited():
                    # Say why at once, rather than after the whole timeout.
                    raise LabError(
                        f"the agent on {host} exited before its API answered:\n"
                        + proc.log_text()[-3000:]
                    ) from None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def open_install_window(self, host: str, duration: str = "30m") -> None:
        self.wait_for_api(host)
        self.cli(host, "install-mode", "open", "--for", duration)

    def start_all(self, order: list[str] | None = None, gap: float = 0.0) -> None:
        for host in order or list(self.plan):
            self.start(host)
            if gap:
                time.sleep(gap)

    def stop(self, host: str) -> int | None:
        proc = self.agents.get(host)
        if proc is None:
            return None
        return self.lab.stop(proc, timeout=10)

    def restart(self, host: str) -> LabProcess:
        self.stop(host)
        return self.start(host)

    def logs(self, host: str) -> str:
        proc = self.agents.get(host)
        return proc.log_text() if proc else ""

    def terminate(self, host: str, timeout: float = 10.0) -> tuple[int | None, float]:
        """SIGTERM a host's agent (its process group, as systemd would) and wait up to
        ``timeout`` for it to end: (exit status or None if it still runs, seconds it took).

        The agent is left unreaped; ``stop(host)`` afterwards reaps it (and kills it if it
        did not end). Hooks run in sessions of their own and are not signalled here.
        """
        proc = self.agents[host]
        if proc.exited():
            raise LabError(f"agent on {host} is not running")
        began = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)  # safe: the leader is not reaped yet
        code = proc.wait_exit(timeout)
        return code, time.monotonic() - began

    # -- probes (eucalab/cloud_probes.py) ---------------------------------------------------

    def admin_token(self, host: str) -> str:
        return cloud_probes.admin_token(self, host)

    def api(self, host: str, path: str, timeout: float = 20) -> dict[str, Any]:
        """GET the registrar API as the host's operator, over its operator socket."""
        return cloud_probes.api(self, host, path, timeout)

    def status(self, host: str) -> dict[str, Any]:
        return cloud_probes.status(self, host)

    def events(self, host: str, query: str = "") -> list[dict[str, Any]]:
        return cloud_probes.events(self, host, query)

    def registry(self, host: str) -> list[dict[str, Any]]:
        """Every record of a registrar (``GET /v1/registry``), whatever its state."""
        return cloud_probes.registry(self, host)

    def hook_runs(self, host: str, component_id: str = "") -> list[dict[str, Any]]:
        return cloud_probes.hook_runs(self, host, component_id)

    def wait_for_events(
        self,
        host: str,
        done: Callable[[list[dict[str, Any]]], bool],
        query: str = "",
        timeout: float = 60,
        interval: float = 0.3,
    ) -> list[dict[str, Any]]:
        """The registrar's events once ``done(events)`` (cloud_probes.wait_for_events)."""
        return cloud_probes.wait_for_events(self, host, done, query, timeout, interval)

    def wait_for_event(
        self,
        host: str,
        component_id: str,
        kind: str,
        code: str | None = None,
        *,
        after: int = 0,
        timeout: float = 60,
    ) -> dict[str, Any]:
        """The first event of this kind (and code) for a component with seq > ``after``."""
        return cloud_probes.wait_for_event(
            self, host, component_id, kind, code, after=after, timeout=timeout
        )

    def wait_for(
        self,
        host: str,
        done: Callable[[dict[str, Any]], bool],
        timeout: float = 60,
        interval: float = 0.3,
    ) -> dict[str, Any]:
        """Poll a registrar's status until `done(status)`; LabError with the last status."""
        return cloud_probes.wait_for(self, host, done, timeout, interval)

    def wait_for_registry(
        self,
        host: str,
        done: Callable[[list[dict[str, Any]]], bool],
        timeout: float = 60,
        interval: float = 0.3,
    ) -> list[dict[str, Any]]:
        """Poll a registrar's flat registry (every record, any status) until ``done``."""
        return cloud_probes.wait_for_registry(self, host, done, timeout, interval)

    def expected(self) -> dict[str, int]:
        """How many components of each role the plan registers (the CLC registers itself)."""
        return cloud_probes.expected(self)

    def credentials_complete(self) -> bool:
        return cloud_probes.credentials_complete(self)

    def component_id(self, host: str, role: str) -> str:
        """The id of a host's component, from its identity file (made at its first start,
        or by `eucareg fingerprint`)."""
        return cloud_probes.component_id(self, host, role)
