"""A cloud in the lab: eucareg agents on lab hosts, with configs, hooks and status probes.

The integration tests, the demo and the benchmarks describe which components run on which
host; this module writes each host's config and counting hooks, starts and restarts agents by
PID, and reads the registrar's API from inside the namespaces.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from eucalab.lab import Lab, LabError, LabProcess, Topology, parse_topology
from eucareg.config.file import DEFAULT_API_PORT, SOCKET_FILE
from eucareg.core.model import Role

# role -> cluster (None for roles without one), per host
HostPlan = Mapping[str, str | None]
CloudPlan = Mapping[str, HostPlan]

HOOK_TYPES = ("walrus", "cluster", "storage", "node")

# The design's test topologies (EucalyptusRemoteAutoRegistration, "Test/Demo Plan").
TOPOLOGY_1: dict[str, dict[str, str | None]] = {
    "cloud": {"clc": None, "walrus": None, "cc": "cluster1", "sc": "cluster1"},
    "node1": {"nc": "cluster1"},
    "node2": {"nc": "cluster1"},
}
TOPOLOGY_3: dict[str, dict[str, str | None]] = {
    "clc": {"clc": None},
    "walrus": {"walrus": None},
    "cc": {"cc": "cluster1"},
    "sc": {"sc": "cluster1"},
    "node1": {"nc": "cluster1"},
    "node2": {"nc": "cluster1"},
}
TOPOLOGY_4: dict[str, dict[str, str | None]] = {
    "cloud": {"clc": None, "walrus": None},
    "cc1": {"cc": "cluster1", "sc": "cluster1"},
    "node1": {"nc": "cluster1"},
    "cc2": {"cc": "cluster2", "sc": "cluster2"},
    "node2": {"nc": "cluster2"},
}


def single_lan(hosts: list[str], network: str = "10.77.1.0/24") -> Topology:
    lines = [f"subnet lan {network}"] + [f"host {h} lan" for h in hosts]
    return parse_topology("\n".join(lines))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


T = TypeVar("T")


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

    # -- files ----------------------------------------------------------------------------

    def host_dir(self, host: str) -> Path:
        return self.workdir / host

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

    def key_dir(self, host: str) -> Path:
        return self.host_dir(host) / "state" / "keys"

    def hook_log(self, host: str) -> list[str]:
        path = self.host_dir(host) / "hooks.log"
        return path.read_text().splitlines() if path.exists() else []

    def setting(self, name: str, host: str, default: Any) -> Any:
        """A setting for one host: a plain value applies to all, a dict is per host."""
        value = self.settings.get(name, default)
        if isinstance(value, dict):
            return value.get(host, default)
        return value

    def config_text(self, host: str) -> str:
        """The TOML config a host's agent runs with."""
        base = self.host_dir(host)
        registrar = {"pending_timeout": "10m", "hook_timeout": "20s", "retry_base": "1s"}
        registrar.update(self.settings.get("registrar", {}))
        lines = [
            f"address = {_toml_value(str(self.lab.address(host)))}",
            f"state_dir = {_toml_value(str(base / 'state'))}",
            f"hook_dir = {_toml_value(str(base / 'hooks'))}",
            f"api_port = {DEFAULT_API_PORT}",
            'log_format = "json"',
            f"log_level = {_toml_value(self.setting('log_level', host, 'info'))}",
            *self.setting("top_level", host, []),
            "",
            "[preconditions]",
            f"sshd = {_toml_value(self.setting('sshd', host, False))}",
            f"recheck_interval = {_toml_value(self.settings.get('recheck_interval', '1s'))}",
            "",
            "[registrar]",
            *(f"{k} = {_toml_value(v)}" for k, v in registrar.items()),
        ]
        lines += ["", "[mdns]", f"backend = {_toml_value(self.backend(host))}"]
        lines += self._dnssd_lines(host)
        installed = self.setting("installed", host, {})
        addresses = self.setting("addresses", host, {})
        for role, cluster in self.plan[host].items():
            lines += ["", f"[components.{role}]"]
            if cluster is not None:
                lines.append(f"cluster = {_toml_value(cluster)}")
            if role in addresses:
                lines.append(f"address = {_toml_value(addresses[role])}")
            token = self.setting("tokens", host, {}).get(role)
            if token:
                lines.append(f"token = {_toml_value(token)}")
            lines.append(f"installed = {_toml_value(installed.get(role, True))}")
        return "\n".join(lines) + "\n"

    def backend(self, host: str) -> str:
        """A host's `[mdns] backend`: ``settings["mdns_backend"]`` ("zeroconf" or "avahi",
        for all hosts, or a dict per host), "zeroconf" by default. Never "auto": a lab agent
        must not find the machine's own avahi-daemon (`ip netns exec` leaves the machine's
        system bus reachable) and announce on the real LAN."""
        backend = str(self.setting("mdns_backend", host, "zeroconf"))
        if backend not in ("zeroconf", "avahi"):
            raise LabError(f"mdns_backend for {host!r}: 'zeroconf' or 'avahi', not {backend!r}")
        return backend

    def agent_env(self, host: str) -> dict[str, str]:
        """The environment a host's agent needs besides the lab's: for an Avahi host, the
        private system bus of the avahi-daemon in its namespace (started on first use)."""
        if self.backend(host) != "avahi":
            return {}
        if not self.lab.has_avahi(host):
            self.lab.start_avahi(host, server_options=self.setting("avahi_options", host, {}))
        return self.lab.avahi_env(host)

    def _dnssd_lines(self, host: str) -> list[str]:
        """The `[dnssd]` table from ``settings["dnssd"]``, a mapping of its keys: a plain value
        applies to every host, a dict is per host (a host it leaves out gets no such key);
        an empty result leaves the table out."""
        table = self.settings.get("dnssd") or {}
        pairs = []
        for key, value in table.items():
            if isinstance(value, dict):
                if host not in value:
                    continue
                value = value[host]
            pairs.append(f"{key} = {_toml_value(value)}")
        return ["", "[dnssd]", *pairs] if pairs else []

    def prepare(self, host: str) -> Path:
        """Write a host's config and hooks; returns the config path.

        Every hook type gets the counting script (one line per call in ``hooks.log``) unless
        ``settings["hooks"][host]`` gives that type a script text of its own.
        """
        base = self.host_dir(host)
        hooks = base / "hooks"
        hooks.mkdir(parents=True, exist_ok=True)
        custom = self.setting("hooks", host, {})
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
        config.write_text(self.config_text(host))
        return config

    # -- agents ---------------------------------------------------------------------------

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

    # -- probes ---------------------------------------------------------------------------

    def admin_token(self, host: str) -> str:
        return (self.host_dir(host) / "state" / "admin.token").read_text().strip()

    def api(self, host: str, path: str, timeout: float = 20) -> dict[str, Any]:
        """GET the registrar API as the host's operator, over its operator socket (a file: no
        need to enter the host's namespace)."""
        state = self.host_dir(host) / "state"
        try:
            bearer = f"Bearer {self.admin_token(host)}"
        except FileNotFoundError as exc:
            raise LabError(f"no admin credential on {host} yet") from exc
        conn = http.client.HTTPConnection("localhost", timeout=timeout)
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(str(state / SOCKET_FILE))
            conn.sock = sock
            conn.request("GET", path, headers={"Authorization": bearer})
            response = conn.getresponse()
            raw = response.read()
        except OSError as exc:
            raise LabError(f"GET {path} on {host} failed: {exc}") from exc
        finally:
            conn.close()
        if response.status != 200:
            raise LabError(f"GET {path} on {host} failed: HTTP {response.status} {raw[:300]!r}")
        data: dict[str, Any] = json.loads(raw)
        return data

    def status(self, host: str) -> dict[str, Any]:
        return self.api(host, "/v1/status")

    def events(self, host: str, query: str = "") -> list[dict[str, Any]]:
        return list(self.api(host, f"/v1/events?limit=100000{query}")["events"])

    def registry(self, host: str) -> list[dict[str, Any]]:
        """Every record of a registrar (``GET /v1/registry``), whatever its state."""
        return list(self.api(host, "/v1/registry")["components"])

    def hook_runs(self, host: str, component_id: str = "") -> list[dict[str, Any]]:
        query = f"?component={component_id}" if component_id else ""
        return list(self.api(host, f"/v1/hooks{query}")["hook_runs"])

    def wait_for_events(
        self,
        host: str,
        done: Callable[[list[dict[str, Any]]], bool],
        query: str = "",
        timeout: float = 60,
        interval: float = 0.3,
    ) -> list[dict[str, Any]]:
        """Poll a registrar's events (``query``: e.g. ``"&component=ID"``) until
        ``done(events)``: how a test waits for the decision it then checks."""
        deadline = time.monotonic() + timeout
        last: list[dict[str, Any]] | str = "no answer yet"
        while time.monotonic() < deadline:
            try:
                last = self.events(host, query)
            except (LabError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
                last = str(exc)
            else:
                if done(last):
                    return last
            time.sleep(interval)
        summary = json.dumps(last, indent=1)[-4000:] if isinstance(last, list) else last
        raise LabError(f"events on {host} not reached within {timeout}s; last:\n{summary}")

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

        def match(event: dict[str, Any]) -> bool:
            return bool(
                event["kind"] == kind
                and (code is None or event["code"] == code)
                and event["seq"] > after
            )

        events = self.wait_for_events(
            host,
            lambda evs: any(match(e) for e in evs),
            f"&component={component_id}",
            timeout=timeout,
        )
        return next(e for e in events if match(e))

    def wait_for(
        self,
        host: str,
        done: Callable[[dict[str, Any]], bool],
        timeout: float = 60,
        interval: float = 0.3,
    ) -> dict[str, Any]:
        """Poll a registrar's status until `done(status)`; LabError with the last status."""
        return _poll(f"status on {host}", lambda: self.status(host), done, timeout, interval)

    def expected(self) -> dict[str, int]:
        """How many components of each role the plan registers (the CLC registers itself)."""
        counts: dict[str, int] = {}
        for host_plan in self.plan.values():
            for role in host_plan:
                if role != Role.CLC.value:
                    counts[role] = counts.get(role, 0) + 1
        return counts

    def credentials_complete(self) -> bool:
        from eucareg.pki.credentials import required_files

        for host, host_plan in self.plan.items():
            present = {p.name for p in self.key_dir(host).glob("*.pem")}
            for role in host_plan:
                if not set(required_files(Role(role))) <= present:
                    return False
        return True

    # -- lifecycle helpers (tests) --------------------------------------------------------

    def component_id(self, host: str, role: str) -> str:
        """The id of a host's component, from its identity file (made at its first start,
        or by `eucareg fingerprint`)."""
        return (self.host_dir(host) / "state" / "identity" / f"{role}.id").read_text().strip()

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

    def wait_for_registry(
        self,
        host: str,
        done: Callable[[list[dict[str, Any]]], bool],
        timeout: float = 60,
        interval: float = 0.3,
    ) -> list[dict[str, Any]]:
        """Poll a registrar's flat registry (every record, any status) until ``done``."""
        return _poll(f"registry on {host}", lambda: self.registry(host), done, timeout, interval)


def _poll(
    what: str, fetch: Callable[[], T], done: Callable[[T], bool], timeout: float, interval: float
) -> T:
    """fetch() until done(answer); LabError naming `what` with the last answer otherwise."""
    deadline = time.monotonic() + timeout
    last: T | str = "no answer yet"
    while time.monotonic() < deadline:
        try:
            answer = fetch()
        except (LabError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
            last = str(exc)
        else:
            if done(answer):
                return answer
            last = answer
        time.sleep(interval)
    summary = last if isinstance(last, str) else json.dumps(last, indent=1)[-4000:]
    raise LabError(f"{what} not reached within {timeout}s; last:\n{summary}")


def registered_components(status: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every component row in a status tree, whatever its state."""
    tree = status.get("tree", {})
    rows: list[dict[str, Any]] = list(tree.get("walrus", [])) + list(tree.get("unmatched", []))
    for cluster in tree.get("clusters", []):
        for role in ("cc", "sc", "nc"):
            rows.extend(cluster[role])
    return rows


def all_registered(expected: Mapping[str, int]) -> Callable[[dict[str, Any]], bool]:
    """A status predicate: exactly the expected components, all registered and collected."""

    def check(status: dict[str, Any]) -> bool:
        rows = registered_components(status)
        counts: dict[str, int] = {}
        for row in rows:
            if row["status"] != "registered" or not row.get("credentials_collected_at"):
                return False
            counts[row["role"]] = counts.get(row["role"], 0) + 1
        return counts == dict(expected)

    return check


def publisher_argv(instance: str, txt: Mapping[str, str], addresses: list[str]) -> list[str]:
    """Command that publishes one arbitrary service until killed (spoofs, twins, strays)."""
    argv = [sys.executable, "-m", "eucalab.cloud", "publish", instance]
    argv += [f"--addr={a}" for a in addresses]
    return argv + [f"--txt={k}={v}" for k, v in txt.items()]


async def _publish(instance: str, addresses: list[str], txt: dict[str, str]) -> None:
    from eucareg.mdns.types import ServiceSpec
    from eucareg.mdns.zeroconf_backend import ZeroconfBackend

    backend = ZeroconfBackend()
    await backend.start()
    spec = ServiceSpec(
        instance=instance,
        port=DEFAULT_API_PORT,
        txt=txt,
        addresses=tuple(addresses),
        server=f"lab-{abs(hash(instance)) % 10**8}.local.",
    )
    await backend.publish(spec)
    print(f"published {instance!r}", flush=True)
    await until_terminated()
    await backend.close()


async def until_terminated() -> None:
    """Return on SIGTERM or SIGINT (the lab stops what it spawned with SIGTERM)."""
    import asyncio
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


if __name__ == "__main__":
    import argparse
    import asyncio

    parser = argparse.ArgumentParser(description="Publish one raw _eucalyptus._tcp service.")
    parser.add_argument("command", choices=["publish"])
    parser.add_argument("instance")
    parser.add_argument("--addr", action="append", default=[])
    parser.add_argument("--txt", action="append", default=[], help="KEY=VALUE")
    args = parser.parse_args()
    pairs = dict(item.split("=", 1) for item in args.txt)
    asyncio.run(_publish(args.instance, args.addr, pairs))
