"""avahi-daemon in a lab host's namespace, each with a private system bus (dbus-daemon) of
its own: their config files, starting them and waiting until avahi runs, and stopping and
restarting either as an operator or a crash would."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from eucalab.errors import LabError
from eucalab.network import Network
from eucalab.process import POLL, LabProcess, exited, stop_all, tail

__all__ = ["AvahiDaemon", "AvahiDaemons"]

# Unix socket paths are limited to 108 bytes including the terminator.
_MAX_SOCKET_PATH = 100


@dataclass
class AvahiDaemon:
    """An avahi-daemon in one namespace together with its private system bus."""

    host: str
    dbus: LabProcess
    daemon: LabProcess
    bus_address: str
    config: Path
    argv: tuple[str, ...] = ()  # how the daemon was started (restart_avahi starts it again)
    dbus_argv: tuple[str, ...] = ()  # and its bus
    dbus_send: str = "dbus-send"
    restarts: int = 0

    def env(self) -> dict[str, str]:
        return {"DBUS_SYSTEM_BUS_ADDRESS": self.bus_address}


_DBUS_SYSTEM_CONF = Path("/usr/share/dbus-1/system.conf")


def _dbus_config(socket_path: Path) -> str:
    try:
        text = _DBUS_SYSTEM_CONF.read_text()
    except OSError as exc:
        raise LabError(f"cannot read {_DBUS_SYSTEM_CONF} (is dbus installed?): {exc}") from None
    # A private bus must not drop to 'messagebus', fork, write the global pid file, or try to
    # activate services through the setuid helper.
    for pattern in (
        r"<user>.*?</user>",
        r"<fork\s*/>",
        r"<pidfile>.*?</pidfile>",
        r"<syslog\s*/>",
        r"<servicehelper>.*?</servicehelper>",
        r"<standard_system_servicedirs\s*/>",
    ):
        text = re.sub(pattern, "", text, flags=re.DOTALL)
    text, n = re.subn(
        r"<listen>.*?</listen>", f"<listen>unix:path={socket_path}</listen>", text, count=1
    )
    if n != 1:
        raise LabError(f"{_DBUS_SYSTEM_CONF} has no <listen> element to replace")
    # Relative includes are resolved against the config file's own directory, which is now
    # the lab workdir, so point them back at the system location.
    text = text.replace(
        "<includedir>system.d</includedir>",
        f"<includedir>{_DBUS_SYSTEM_CONF.parent / 'system.d'}</includedir>",
    )
    return text


def _avahi_config(
    host: str,
    interfaces: Sequence[str],
    reflector: bool,
    server_options: Mapping[str, str | int] | None = None,
) -> str:
    # host-name must differ per namespace: they all share the machine's hostname.
    return "\n".join(
        [
            "[server]",
            *(f"{key}={value}" for key, value in (server_options or {}).items()),
            f"host-name={host}",
            "domain-name=local",
            "use-ipv4=yes",
            "use-ipv6=no",
            f"allow-interfaces={','.join(interfaces)}",
            "enable-dbus=yes",
            "ratelimit-interval-usec=1000000",
            "ratelimit-burst=1000",
            "",
            "[wide-area]",
            "enable-wide-area=no",
            "",
            "[publish]",
            "publish-hinfo=no",
            "publish-workstation=no",
            "publish-aaaa-on-ipv4=no",
            "",
            "[reflector]",
            f"enable-reflector={'yes' if reflector else 'no'}",
            "",
        ]
    )


# Runs inside `ip netns exec`, whose mount namespace is private: the tmpfs on /run gives this
# daemon its own pid file and socket, and the tmpfs over /etc/avahi/services keeps the
# machine's static service files out of the lab.
_AVAHI_SHELL = (
    "set -e; mount -t tmpfs -o mode=0755 lab-run /run; mkdir -p /run/avahi-daemon; "
    "if [ -d /etc/avahi/services ]; then mount -t tmpfs lab-svc /etc/avahi/services; fi; "
    'exec "$@"'
)

_AVAHI_RUNNING = 2  # AvahiServerState AVAHI_SERVER_RUNNING


class LabHosts(Protocol):
    """What the daemons need of their lab (eucalab/lab.py's Lab, which hands itself over): its
    work directory and network, and processes run, spawned and stopped in a host's namespace."""

    @property
    def workdir(self) -> Path: ...

    @property
    def network(self) -> Network: ...

    def netns(self, host: str) -> str: ...

    def run(
        self, host: str, argv: Sequence[str], *, timeout: float, env: Mapping[str, str] | None
    ) -> subprocess.CompletedProcess[str]: ...

    def spawn(
        self, host: str, name: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None
    ) -> LabProcess: ...

    def stop(self, proc: LabProcess) -> int | None: ...


class AvahiDaemons:
    """The avahi-daemons of one lab, by host; the lab stops their processes at teardown."""

    def __init__(self, lab: LabHosts) -> None:
        self.lab = lab
        self.daemons: dict[str, AvahiDaemon] = {}
        # Short socket directories outside the workdir, removed with the lab.
        self.tempdirs: list[Path] = []

    def remove_tempdirs(self) -> None:
        while self.tempdirs:
            shutil.rmtree(self.tempdirs.pop(), ignore_errors=True)

    def start(
        self,
        host: str,
        *,
        reflector: bool = False,
        timeout: float = 15,
        server_options: Mapping[str, str | int] | None = None,
    ) -> AvahiDaemon:
        """Start avahi-daemon with a private system bus in a host's namespace; wait until running.

        ``reflector=True`` (useful on routers) relays mDNS between the host's interfaces;
        ``server_options`` adds keys to its config's [server] section (e.g. the limits of
        packaging/avahi/eucareg-limits.conf, or a small objects-per-client-max).
        """
        ns = self.lab.netns(host)
        if host in self.daemons:
            raise LabError(f"avahi already started on {host!r}")
        tools: dict[str, str] = {}
        for tool in ("dbus-daemon", "avahi-daemon", "dbus-send"):
            found = shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
            if found is None:
                raise LabError(
                    f"{tool} not found; install with: apt-get install -y avahi-daemon "
                    "avahi-utils dbus"
                )
            tools[tool] = found
        confdir = self.lab.workdir / f"avahi-{host}"
        confdir.mkdir(parents=True, exist_ok=True)
        socket_path = confdir / "dbus.sock"
        if len(str(socket_path)) > _MAX_SOCKET_PATH:
            short = Path(tempfile.mkdtemp(prefix=f"{ns}-", dir="/tmp"))
            self.tempdirs.append(short)
            socket_path = short / "dbus.sock"
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
        dbus_conf = confdir / "dbus.conf"
        dbus_conf.write_text(_dbus_config(socket_path))
        avahi_conf = confdir / "avahi-daemon.conf"
        interfaces = [f"eth{i}" for i in range(len(self.lab.network.attachments(host)))]
        avahi_conf.write_text(_avahi_config(host, interfaces, reflector, server_options))
        bus_address = f"unix:path={socket_path}"
        bus_env = {"DBUS_SYSTEM_BUS_ADDRESS": bus_address}

        # The bus runs inside the namespace too (it does not need to), so that a crashed test
        # run leaves it where `ip netns pids` and cleanup_stale() will find it.
        dbus_argv = [tools["dbus-daemon"], "--nofork", "--nopidfile", f"--config-file={dbus_conf}"]
        deadline = time.monotonic() + timeout
        dbus = self._start_bus(host, "dbus", dbus_argv, socket_path, deadline)

        # --no-drop-root: the 'avahi' user could not reach a bus socket inside a root-only
        # workdir such as pytest's tmp_path (/tmp/pytest-of-root is mode 0700).
        avahi_argv = [tools["avahi-daemon"], "--no-chroot", "--no-rlimits", "--no-drop-root"]
        avahi_argv += ["--no-proc-title", "-f", str(avahi_conf)]
        daemon = self.lab.spawn(
            host, "avahi", ["sh", "-c", _AVAHI_SHELL, "lab-avahi", *avahi_argv], env=bus_env
        )
        avahi = AvahiDaemon(
            host=host,
            dbus=dbus,
            daemon=daemon,
            bus_address=bus_address,
            config=avahi_conf,
            argv=tuple(avahi_argv),
            dbus_send=tools["dbus-send"],
            dbus_argv=tuple(dbus_argv),
        )
        try:
            self._wait_running(avahi, tools["dbus-send"], deadline)
        except BaseException:
            stop_all([daemon, dbus], 5)
            raise
        self.daemons[host] = avahi
        return avahi

    def _wait_running(self, avahi: AvahiDaemon, dbus_send: str, deadline: float) -> None:
        get_state = [
            dbus_send,
            "--system",
            "--print-reply",
            "--reply-timeout=2000",
            "--dest=org.freedesktop.Avahi",
            "/",
            "org.freedesktop.Avahi.Server.GetState",
        ]
        state = "unknown"
        while True:
            if exited(avahi.daemon.popen):
                raise LabError(
                    f"avahi-daemon on {avahi.host!r} exited:\n{tail(avahi.daemon.log_text())}"
                )
            result = self.lab.run(avahi.host, get_state, timeout=5, env=avahi.env())
            m = re.search(r"int32\s+(-?\d+)", result.stdout)
            if m is not None:
                state = m.group(1)
                if int(state) == _AVAHI_RUNNING:
                    return
            if time.monotonic() >= deadline:
                raise LabError(
                    f"avahi-daemon on {avahi.host!r} not running in time (state {state}):\n"
                    f"{tail(avahi.daemon.log_text())}"
                )
            time.sleep(0.05)

    def _start_bus(
        self, host: str, name: str, argv: Sequence[str], socket_path: Path, deadline: float
    ) -> LabProcess:
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
        dbus = self.lab.spawn(host, name, argv)
        while not socket_path.exists():
            if exited(dbus.popen) or time.monotonic() >= deadline:
                self.lab.stop(dbus)
                raise LabError(
                    f"private dbus-daemon for {host!r} did not start:\n{tail(dbus.log_text())}"
                )
            time.sleep(POLL)
        return dbus

    def restart_bus(self, host: str, *, timeout: float = 15) -> AvahiDaemon:
        """Stop a host's avahi-daemon and its private system bus, then start both again at
        the same bus address: what a restart of the machine's dbus does to its clients."""
        avahi = self.get(host)
        stop_all([avahi.daemon, avahi.dbus], 5)
        socket_path = Path(avahi.bus_address.removeprefix("unix:path="))
        avahi.restarts += 1
        avahi.dbus = self._start_bus(
            host,
            f"dbus{avahi.restarts + 1}",
            avahi.dbus_argv,
            socket_path,
            time.monotonic() + timeout,
        )
        return self.restart(host, timeout=timeout)

    def stop(self, host: str) -> None:
        """Stop a host's avahi-daemon (SIGTERM, as systemd would), leaving its bus running."""
        self.lab.stop(self.get(host).daemon)

    def restart(self, host: str, *, timeout: float = 15) -> AvahiDaemon:
        """Start a host's avahi-daemon again on the same private bus (stopping it first if it
        still runs), and wait until it runs: what an operator's `systemctl restart` does."""
        avahi = self.get(host)
        if not exited(avahi.daemon.popen):
            self.lab.stop(avahi.daemon)
        avahi.restarts += 1
        avahi.daemon = self.lab.spawn(
            host,
            f"avahi{avahi.restarts + 1}",
            ["sh", "-c", _AVAHI_SHELL, "lab-avahi", *avahi.argv],
            env=avahi.env(),
        )
        self._wait_running(avahi, avahi.dbus_send, time.monotonic() + timeout)
        return avahi

    def has(self, host: str) -> bool:
        """Whether start_avahi() started an avahi-daemon on ``host`` (it may have exited since)."""
        return host in self.daemons

    def get(self, host: str) -> AvahiDaemon:
        if host not in self.daemons:
            raise LabError(f"avahi is not running on {host!r}; call start_avahi first")
        return self.daemons[host]

    def env(self, host: str) -> dict[str, str]:
        """Environment for avahi-browse/avahi-publish run via run()/spawn() on ``host``."""
        if host not in self.daemons:
            raise LabError(f"avahi is not running on {host!r}; call start_avahi first")
        return self.daemons[host].env()
