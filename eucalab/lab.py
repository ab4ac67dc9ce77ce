"""Throwaway network labs for integration tests and demos: a Topology becomes namespaces on
this machine (eucalab/network.py), processes run inside them, and teardown removes everything
again by name and PID, also after a failed start or an interrupted teardown."""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import itertools
import os
import re
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from eucalab.avahi import AvahiDaemon, AvahiDaemons
from eucalab.errors import LabError
from eucalab.netns import ip_binary
from eucalab.network import Network
from eucalab.process import (
    KILL_WAIT,
    LabProcess,
    kill_group,
    run_to_completion,
    spawn_logged,
    stop_all,
)
from eucalab.topology import Topology

__all__ = ["Lab"]

_PREFIX_RE = re.compile(r"[a-z][a-z0-9-]{0,23}\Z")
_PROC_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")

_lab_counter = itertools.count()


class Lab:
    """A set of namespaces built from a Topology; a context manager that always tears down."""

    def __init__(self, topology: Topology, workdir: Path, *, prefix: str | None = None) -> None:
        if prefix is None:
            # The PID lets cleanup_stale() recognise leftovers of dead labs; the counter keeps
            # two labs in one process apart.
            prefix = f"eucr{os.getpid()}-{next(_lab_counter)}"
        elif not _PREFIX_RE.match(prefix):
            raise LabError(
                f"invalid prefix {prefix!r}: lowercase letters, digits and '-', "
                "starting with a letter, at most 24 characters"
            )
        self.topology = topology
        # Absolute, because paths under it end up in daemon config files.
        self.workdir = Path(workdir).absolute()
        self.prefix = prefix
        self.network = Network(topology, prefix)
        self._procs: list[LabProcess] = []
        self._avahi = AvahiDaemons(self)
        self._started = False
        self._torn_down = False

    # -- context manager -----------------------------------------------------------------------

    def __enter__(self) -> Lab:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.teardown()

    # -- names (eucalab/network.py) ------------------------------------------------------------

    def netns(self, host: str) -> str:
        """Namespace name of a host or router."""
        return self.network.netns(host)

    def bridge_netns(self, subnet: str) -> str:
        """Namespace holding the bridge ``br0`` of a subnet."""
        return self.network.bridge_netns(subnet)

    def address(self, host: str, *, subnet: str | None = None) -> ipaddress.IPv4Address:
        """Address of a host, or of a router on ``subnet`` (optional if it has only one)."""
        return self.network.address(host, subnet=subnet)

    # -- building --------------------------------------------------------------------------------

    def start(self) -> None:
        """Create namespaces, bridges, veths, addresses and routes; undo all of it on failure."""
        if self._started:
            raise LabError("lab already started")
        self._started = True
        self.workdir.mkdir(parents=True, exist_ok=True)
        atexit.register(self._atexit)
        try:
            self.network.build()
        except BaseException as exc:
            try:
                self.teardown()
            except Exception as cleanup_exc:
                exc.add_note(f"teardown after failed start also failed: {cleanup_exc}")
            raise

    # -- processes (eucalab/process.py) --------------------------------------------------------

    def _require_running(self) -> None:
        if not self._started or self._torn_down:
            raise LabError("lab is not running (call start() or use it as a context manager)")

    def run(
        self,
        host: str,
        argv: Sequence[str],
        *,
        timeout: float = 30,
        env: Mapping[str, str] | None = None,
        check: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command to completion inside a host's namespace and capture its text output.

        On timeout the whole process group is killed and subprocess.TimeoutExpired raised;
        with ``check=True`` a non-zero exit raises LabCommandError.
        """
        self._require_running()
        cmd = [ip_binary(), "netns", "exec", self.netns(host), *argv]
        return run_to_completion(cmd, timeout=timeout, env=env, check=check)

    def spawn(
        self,
        host: str,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
    ) -> LabProcess:
        """Start a long-running command in a host's namespace, logging to workdir/<host>-<name>.log.

        The log is truncated if the same host/name was used before.
        """
        self._require_running()
        if not _PROC_NAME_RE.match(name):
            raise LabError(f"invalid process name {name!r}: letters, digits, '_', '.', '-'")
        cmd = [ip_binary(), "netns", "exec", self.netns(host), *argv]
        proc = spawn_logged(host, name, cmd, self.workdir / f"{host}-{name}.log", env)
        self._procs.append(proc)
        return proc

    def stop(self, proc: LabProcess, *, timeout: float = 5) -> int | None:
        """SIGTERM the process group, wait up to ``timeout``, then SIGKILL; return the exit code."""
        stop_all([proc], timeout)
        return proc.popen.returncode

    def kill(self, proc: LabProcess, sig: int = signal.SIGKILL, *, timeout: float = 10) -> int:
        """Send ``sig`` (default SIGKILL: a crash) to the process's group, wait until the
        process has ended and reap it; return its exit status (``-9`` for SIGKILL).

        Unlike stop() there is no SIGTERM first and nothing else in the group is touched
        afterwards; processes that left the group (a hook in a session of its own) run on, as
        they would after a real crash. Teardown still removes them with the namespace.
        """
        return kill_group(proc, sig, timeout)

    # -- avahi (eucalab/avahi.py) ----------------------------------------------------------------

    def start_avahi(
        self,
        host: str,
        *,
        reflector: bool = False,
        timeout: float = 15,
        server_options: Mapping[str, str | int] | None = None,
    ) -> AvahiDaemon:
        """avahi-daemon and a private bus in a host's namespace (AvahiDaemons.start)."""
        self._require_running()
        return self._avahi.start(
            host, reflector=reflector, timeout=timeout, server_options=server_options
        )

    def restart_avahi_bus(self, host: str, *, timeout: float = 15) -> AvahiDaemon:
        """Stop a host's avahi-daemon and its private system bus, then start both again at
        the same bus address: what a restart of the machine's dbus does to its clients."""
        return self._avahi.restart_bus(host, timeout=timeout)

    def stop_avahi(self, host: str) -> None:
        """Stop a host's avahi-daemon (SIGTERM, as systemd would), leaving its bus running."""
        self._avahi.stop(host)

    def restart_avahi(self, host: str, *, timeout: float = 15) -> AvahiDaemon:
        """Start a host's avahi-daemon again on the same private bus (stopping it first if it
        still runs), and wait until it runs: what an operator's `systemctl restart` does."""
        return self._avahi.restart(host, timeout=timeout)

    def has_avahi(self, host: str) -> bool:
        """Whether start_avahi() started an avahi-daemon on ``host`` (it may have exited since)."""
        return self._avahi.has(host)

    def avahi(self, host: str) -> AvahiDaemon:
        return self._avahi.get(host)

    def avahi_env(self, host: str) -> dict[str, str]:
        """Environment for avahi-browse/avahi-publish run via run()/spawn() on ``host``."""
        return self._avahi.env(host)

    # -- teardown --------------------------------------------------------------------------------

    def teardown(self) -> None:
        """Kill every process the lab started, then delete every namespace it created.

        Safe to call repeatedly and after partial failures; raises LabError only if something
        could not be removed.
        """
        if not self._started:
            return
        # Blocks new run()/spawn(). The work below is driven by what is still recorded, not by
        # this flag, so a teardown that was interrupted is finished by the next call (atexit).
        self._torn_down = True
        errors: list[str] = []
        try:
            # Reverse order: each avahi-daemon goes before the bus it is attached to.
            stop_all(list(reversed(self._procs)), timeout=KILL_WAIT)
        except Exception as exc:
            errors.append(f"stopping processes: {exc!r}")
        self._procs.clear()
        self._avahi.daemons.clear()
        errors += self.network.remove()
        self._avahi.remove_tempdirs()
        atexit.unregister(self._atexit)
        if errors:
            raise LabError("teardown incomplete: " + "; ".join(errors))

    def _atexit(self) -> None:
        with contextlib.suppress(Exception):
            self.teardown()
