"""Throwaway network labs for integration tests and demos: a short text description becomes
namespaces, bridges and veths on this machine, processes run inside them, and teardown
removes everything again by name and PID."""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType

__all__ = [
    "AvahiDaemon",
    "Host",
    "Lab",
    "LabCommandError",
    "LabError",
    "LabProcess",
    "Router",
    "Subnet",
    "Topology",
    "cleanup_stale",
    "parse_topology",
]

# Names end up inside namespace and interface names ("v-" + name must fit IFNAMSIZ-1 = 15),
# and become avahi host names, so only DNS-safe characters without '-' (the separator).
MAX_NAME_LEN = 12
_NAME_RE = re.compile(r"[a-z][a-z0-9]*\Z")
_PREFIX_RE = re.compile(r"[a-z][a-z0-9-]{0,23}\Z")
_PROC_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
_PRIVATE_NETS = tuple(
    ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
)
_FIRST_AUTO_HOST = 10
_MCAST_NET = "224.0.0.0/4"
# Unix socket paths are limited to 108 bytes including the terminator.
_MAX_SOCKET_PATH = 100

_PID_MAX_LIMIT = 1 << 22
_IP_TIMEOUT = 10.0
_KILL_WAIT = 5.0
_POLL = 0.02

_lab_counter = itertools.count()
# waitid() si_code values of a child ended by a signal (si_status is then the signal).
_KILLED_CODES = (os.CLD_KILLED, os.CLD_DUMPED)


class LabError(Exception):
    """A lab description is invalid, or building/using the lab failed."""


class LabCommandError(LabError, subprocess.CalledProcessError):
    """A ``check=True`` command exited non-zero; a CalledProcessError with stderr in str()."""

    def __str__(self) -> str:
        stderr = self.stderr if isinstance(self.stderr, str) else ""
        tail = stderr.strip()[-2000:]
        msg = f"command {list(self.cmd)!r} exited with status {self.returncode}"
        return f"{msg}: {tail}" if tail else msg


@dataclass(frozen=True)
class Subnet:
    name: str
    network: ipaddress.IPv4Network


@dataclass(frozen=True)
class Host:
    name: str
    subnet: str
    address: ipaddress.IPv4Address
    # Further interfaces (`link` lines): (subnet, address). A host never forwards, and its
    # default route goes via its first subnet's router only.
    links: tuple[tuple[str, ipaddress.IPv4Address], ...] = ()


@dataclass(frozen=True)
class Router:
    name: str
    subnets: tuple[str, ...]
    # Parallel to subnets: the n-th router on a subnet (file order) holds its .n address.
    addresses: tuple[ipaddress.IPv4Address, ...]

    def address_on(self, subnet: str) -> ipaddress.IPv4Address:
        if subnet not in self.subnets:
            raise LabError(f"router {self.name!r} is not on subnet {subnet!r}")
        return self.addresses[self.subnets.index(subnet)]


@dataclass(frozen=True)
class Topology:
    subnets: tuple[Subnet, ...]
    hosts: tuple[Host, ...]
    routers: tuple[Router, ...]

    def gateway(self, subnet: str) -> ipaddress.IPv4Address | None:
        """Where hosts on ``subnet`` send everything off-subnet: its first router (.1)."""
        for r in self.routers:
            if subnet in r.subnets:
                return r.address_on(subnet)
        return None

    def routes(self, router: Router) -> dict[str, ipaddress.IPv4Address]:
        """Next hop from ``router`` to each subnet it is not on but can reach.

        A breadth-first search over subnets joined by routers, so the next hop (a neighbour
        router's address on a shared subnet) lies on a path through the fewest routers; ties
        go to the router and subnet listed first. Unreachable subnets are left out.
        """
        hops: dict[str, ipaddress.IPv4Address | None] = dict.fromkeys(router.subnets)
        queue = deque(router.subnets)
        while queue:
            subnet = queue.popleft()
            for other in self.routers:
                if other.name == router.name or subnet not in other.subnets:
                    continue
                hop = hops[subnet]
                if hop is None:  # a subnet of ``router`` itself: the neighbour is the hop
                    hop = other.address_on(subnet)
                for far in other.subnets:
                    if far not in hops:
                        hops[far] = hop
                        queue.append(far)
        return {subnet: hop for subnet, hop in hops.items() if hop is not None}


# ---------------------------------------------------------------------------------------------
# Parsing


def _check_name(lineno: int, kind: str, name: str) -> None:
    if len(name) > MAX_NAME_LEN:
        raise LabError(
            f"line {lineno}: {kind} name {name!r} is too long "
            f"({len(name)} > {MAX_NAME_LEN} characters)"
        )
    if not _NAME_RE.match(name):
        raise LabError(
            f"line {lineno}: invalid {kind} name {name!r}: "
            "use lowercase letters and digits, starting with a letter"
        )


def _router_address(
    lineno: int, name: str, subnet: str, network: ipaddress.IPv4Network, rank: int
) -> ipaddress.IPv4Address:
    """Address of the ``rank``-th router (from 1, file order) on a subnet: .1, .2, ..."""
    address = network.network_address + rank
    if address >= network.broadcast_address:
        raise LabError(
            f"line {lineno}: no address left in subnet {subnet!r} ({network}) for router {name!r}"
        )
    return address


def parse_topology(text: str) -> Topology:
    """Parse a lab description (``subnet``/``host``/``router`` lines, ``#`` comments).

    Routers on a subnet take .1, .2, ... in file order (the first one is its hosts' gateway);
    hosts without an explicit address take .10, .11, ... skipping addresses already taken.
    """
    lines: list[tuple[int, list[str]]] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        tokens = raw.split("#", 1)[0].split()
        if tokens:
            lines.append((lineno, tokens))

    # Subnets first, so hosts and routers may refer to subnets declared further down.
    subnets: dict[str, tuple[int, ipaddress.IPv4Network]] = {}
    for lineno, tokens in lines:
        kind = tokens[0]
        if kind not in ("subnet", "host", "router", "link"):
            raise LabError(
                f"line {lineno}: unknown keyword {kind!r} (expected subnet, host, router or link)"
            )
        if kind != "subnet":
            continue
        if len(tokens) != 3:
            raise LabError(f"line {lineno}: expected 'subnet NAME CIDR'")
        _, name, cidr = tokens
        _check_name(lineno, "subnet", name)
        if name in subnets:
            raise LabError(
                f"line {lineno}: duplicate subnet name {name!r} "
                f"(first defined on line {subnets[name][0]})"
            )
        try:
            network = ipaddress.IPv4Network(cidr, strict=True)
        except ValueError as exc:
            raise LabError(f"line {lineno}: bad CIDR {cidr!r}: {exc}") from None
        if "/" not in cidr:
            raise LabError(f"line {lineno}: bad CIDR {cidr!r}: missing /prefix length")
        if network.prefixlen > 30:
            raise LabError(f"line {lineno}: subnet {cidr} is too small (need /30 or larger)")
        # The hard rule is private addresses only, even though they never leave the lab.
        if not any(network.subnet_of(p) for p in _PRIVATE_NETS):
            raise LabError(
                f"line {lineno}: subnet {cidr} is not private "
                "(must be inside 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16)"
            )
        for other, (other_line, other_net) in subnets.items():
            if network.overlaps(other_net):
                raise LabError(
                    f"line {lineno}: subnet {cidr} overlaps subnet {other!r} "
                    f"({other_net}, line {other_line})"
                )
        subnets[name] = (lineno, network)

    nodes: dict[str, int] = {}  # host and router names share one namespace -> line

    def claim(lineno: int, kind: str, name: str) -> None:
        _check_name(lineno, kind, name)
        if name in nodes:
            raise LabError(
                f"line {lineno}: duplicate name {name!r} (first defined on line {nodes[name]})"
            )
        nodes[name] = lineno

    def known_subnet(lineno: int, kind: str, name: str, subnet: str) -> None:
        if subnet not in subnets:
            raise LabError(f"line {lineno}: unknown subnet {subnet!r} for {kind} {name!r}")

    # Shape and names in file order, so a duplicate is reported on its second occurrence.
    for lineno, tokens in lines:
        if tokens[0] == "router" and len(tokens) < 3:
            raise LabError(f"line {lineno}: expected 'router NAME SUBNET [SUBNET...]'")
        if tokens[0] == "host" and len(tokens) not in (3, 4):
            raise LabError(f"line {lineno}: expected 'host NAME SUBNET [ADDRESS]'")
        if tokens[0] == "link" and len(tokens) not in (3, 4):
            raise LabError(f"line {lineno}: expected 'link HOST SUBNET [ADDRESS]'")
        if tokens[0] not in ("subnet", "link"):
            claim(lineno, tokens[0], tokens[1])

    # Routers before hosts: router addresses must be reserved before explicit host addresses
    # are checked against them, whatever the line order.
    routers: list[Router] = []
    used: dict[ipaddress.IPv4Address, str] = {}
    routers_on: dict[str, int] = {}  # subnet -> routers seen on it so far
    for lineno, tokens in lines:
        if tokens[0] != "router":
            continue
        name, rsubnets = tokens[1], tokens[2:]
        for sn in rsubnets:
            known_subnet(lineno, "router", name, sn)
        if len(set(rsubnets)) != len(rsubnets):
            raise LabError(f"line {lineno}: router {name!r} lists a subnet twice")
        addresses: list[ipaddress.IPv4Address] = []
        for sn in rsubnets:
            routers_on[sn] = routers_on.get(sn, 0) + 1
            own = _router_address(lineno, name, sn, subnets[sn][1], routers_on[sn])
            used[own] = f"router {name!r} (line {lineno})"
            addresses.append(own)
        routers.append(Router(name=name, subnets=tuple(rsubnets), addresses=tuple(addresses)))

    host_lines: list[tuple[int, str, str, str, ipaddress.IPv4Address | None]] = []
    host_names = {t[1] for _, t in lines if t[0] == "host"}
    linked: set[tuple[str, str]] = set()
    for lineno, tokens in lines:
        if tokens[0] not in ("host", "link"):
            continue
        kind, name, sn = tokens[0], tokens[1], tokens[2]
        known_subnet(lineno, kind, name, sn)
        if kind == "link":
            if name not in host_names:
                raise LabError(f"line {lineno}: link names {name!r}, which is not a host")
            if (name, sn) in linked or any(
                t[0] == "host" and t[1] == name and t[2] == sn for _, t in lines
            ):
                raise LabError(f"line {lineno}: host {name!r} is on subnet {sn!r} already")
            linked.add((name, sn))
        network = subnets[sn][1]
        explicit: ipaddress.IPv4Address | None = None
        if len(tokens) == 4:
            try:
                explicit = ipaddress.IPv4Address(tokens[3])
            except ValueError:
                raise LabError(f"line {lineno}: bad address {tokens[3]!r}") from None
            if explicit not in network:
                raise LabError(
                    f"line {lineno}: address {explicit} is outside subnet {sn!r} ({network})"
                )
            if explicit in (network.network_address, network.broadcast_address):
                raise LabError(
                    f"line {lineno}: address {explicit} is the network or broadcast "
                    f"address of subnet {sn!r}"
                )
            if explicit in used:
                raise LabError(
                    f"line {lineno}: address {explicit} is already used by {used[explicit]}"
                )
            used[explicit] = f"host {name!r} (line {lineno})"
        host_lines.append((lineno, kind, name, sn, explicit))

    hosts: list[Host] = []
    links: dict[str, list[tuple[str, ipaddress.IPv4Address]]] = {}
    next_auto: dict[str, int] = {}
    for lineno, kind, name, sn, explicit in host_lines:
        address = explicit
        if address is None:
            network = subnets[sn][1]
            offset = next_auto.get(sn, _FIRST_AUTO_HOST)
            while True:
                candidate = network.network_address + offset
                if candidate >= network.broadcast_address:
                    raise LabError(
                        f"line {lineno}: no free address left in subnet {sn!r} ({network}) "
                        f"for host {name!r}"
                    )
                offset += 1
                if candidate not in used:
                    break
            next_auto[sn] = offset
            used[candidate] = f"host {name!r} (line {lineno})"
            address = candidate
        if kind == "link":
            links.setdefault(name, []).append((sn, address))
        else:
            hosts.append(Host(name=name, subnet=sn, address=address))
    hosts = [replace(h, links=tuple(links.get(h.name, ()))) for h in hosts]

    return Topology(
        subnets=tuple(Subnet(name=n, network=net) for n, (_, net) in subnets.items()),
        hosts=tuple(hosts),
        routers=tuple(routers),
    )


# ---------------------------------------------------------------------------------------------
# Processes


@dataclass
class LabProcess:
    """A long-running process the lab started inside a host namespace."""

    host: str
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def exited(self) -> bool:
        """True once the process has ended (without reaping it; see Lab.stop)."""
        return _exited(self.popen)

    def wait_exit(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` seconds for the process to end; its exit status, or None.

        The process is left unreaped, so Lab.stop/Lab.kill can still signal its group safely.
        """
        if not _wait_exited(self.popen, timeout):
            return None
        if self.popen.returncode is not None:
            return self.popen.returncode
        info = os.waitid(os.P_PID, self.popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info is None:
            return None
        return -info.si_status if info.si_code in _KILLED_CODES else info.si_status

    def wait_for_log(self, needle: str, timeout: float = 10.0) -> None:
        """Wait until ``needle`` appears in the log; LabError on timeout or early exit."""
        deadline = time.monotonic() + timeout
        while True:
            if needle in self.log_text():
                return
            # _exited() rather than poll(): reaping here would make Lab.stop's killpg unsafe.
            if _exited(self.popen):
                raise LabError(
                    f"{self.host}/{self.name} exited before logging {needle!r}:\n"
                    f"{_tail(self.log_text())}"
                )
            if time.monotonic() >= deadline:
                raise LabError(
                    f"{self.host}/{self.name} did not log {needle!r} within {timeout}s:\n"
                    f"{_tail(self.log_text())}"
                )
            time.sleep(_POLL)


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


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _exited(popen: subprocess.Popen[bytes] | subprocess.Popen[str]) -> bool:
    """True once the child has exited, without reaping it.

    Leaving the zombie in place keeps its PID (and so its process-group ID) reserved, which
    makes a following killpg() safe against PID reuse.
    """
    if popen.returncode is not None:
        return True
    try:
        info = os.waitid(os.P_PID, popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True  # reaped elsewhere
    return info is not None


def _wait_exited(popen: subprocess.Popen[bytes] | subprocess.Popen[str], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not _exited(popen):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL)
    return True


def _signal_group(popen: subprocess.Popen[bytes] | subprocess.Popen[str], sig: int) -> None:
    # Only while the leader is unreaped: then the group ID cannot belong to anyone else.
    if popen.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(popen.pid, sig)


def _reap(popen: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        popen.wait(timeout=_KILL_WAIT)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------------
# ip(8) helpers


def _ip_binary() -> str:
    found = shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin:/usr/bin:/bin")
    if found is None:
        raise LabError("the 'ip' command (iproute2) is not installed")
    return found


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [_ip_binary(), *args]
    try:
        result = subprocess.run(
            cmd, capture_output=True, text=True, errors="replace", timeout=_IP_TIMEOUT
        )
    except subprocess.TimeoutExpired:
        raise LabError(f"{' '.join(cmd)} timed out after {_IP_TIMEOUT}s") from None
    if check and result.returncode != 0:
        raise LabError(f"{' '.join(cmd)} failed: {result.stderr.strip()}")
    return result


def _list_netns() -> list[str]:
    out = _ip("netns", "list").stdout
    # Lines look like "name" or "name (id: 3)".
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _netns_pids(ns: str) -> list[int]:
    result = _ip("netns", "pids", ns, check=False)
    if result.returncode != 0:
        return []
    return [int(tok) for tok in result.stdout.split() if tok.isdigit()]


def _kill_netns_processes(ns: str, timeout: float = _KILL_WAIT) -> list[int]:
    """SIGKILL whatever still runs in one of our namespaces; return PIDs left alive."""
    deadline = time.monotonic() + timeout
    pids = _netns_pids(ns)
    while pids:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() >= deadline:
            break
        time.sleep(_POLL)
        # Killed processes drop out of the list once they are zombies (no ns links left).
        pids = _netns_pids(ns)
    return pids


def _delete_netns(ns: str) -> str | None:
    """Delete a namespace; return an error message, or None (also when already gone)."""
    result = _ip("netns", "del", ns, check=False)
    if result.returncode == 0 or not os.path.exists(f"/run/netns/{ns}"):
        return None
    return f"ip netns del {ns}: {result.stderr.strip()}"


def cleanup_stale(prefix_base: str = "eucr") -> list[str]:
    """Delete lab namespaces whose creating process is gone; return the names removed.

    Only names of the form ``{prefix_base}{pid}-...`` are considered, and only when that PID
    is not alive. Processes still inside such a namespace are killed first.
    """
    pattern = re.compile(rf"{re.escape(prefix_base)}(\d+)-")
    removed: list[str] = []
    for ns in _list_netns():
        m = pattern.match(ns)
        if m is None:
            continue
        pid = int(m.group(1))
        # Out-of-range numbers cannot come from a PID, so such a name is not one of ours.
        if not 0 < pid <= _PID_MAX_LIMIT or _pid_alive(pid):
            continue
        _kill_netns_processes(ns)
        if _delete_netns(ns) is None:
            removed.append(ns)
    return removed


# ---------------------------------------------------------------------------------------------
# Config files for avahi


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


# ---------------------------------------------------------------------------------------------
# The lab


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
        self._hosts = {h.name: h for h in topology.hosts}
        self._routers = {r.name: r for r in topology.routers}
        self._subnets = {s.name: s for s in topology.subnets}
        self._namespaces: list[str] = []  # created by us, in creation order
        self._procs: list[LabProcess] = []
        self._avahi: dict[str, AvahiDaemon] = {}
        self._tempdirs: list[Path] = []
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

    # -- names ---------------------------------------------------------------------------------

    def netns(self, host: str) -> str:
        """Namespace name of a host or router."""
        if host not in self._hosts and host not in self._routers:
            raise LabError(f"unknown host or router {host!r}")
        return f"{self.prefix}-{host}"

    def bridge_netns(self, subnet: str) -> str:
        """Namespace holding the bridge ``br0`` of a subnet."""
        if subnet not in self._subnets:
            raise LabError(f"unknown subnet {subnet!r}")
        return f"{self.prefix}-s-{subnet}"

    def address(self, host: str, *, subnet: str | None = None) -> ipaddress.IPv4Address:
        """Address of a host, or of a router on ``subnet`` (optional if it has only one)."""
        if host in self._hosts:
            h = self._hosts[host]
            if subnet is None or subnet == h.subnet:
                return h.address
            for linked, address in h.links:
                if linked == subnet:
                    return address
            raise LabError(f"host {host!r} is not on subnet {subnet!r}")
        if host in self._routers:
            r = self._routers[host]
            if subnet is None:
                if len(r.subnets) != 1:
                    raise LabError(f"router {host!r} has several addresses; pass subnet=")
                subnet = r.subnets[0]
            return r.address_on(subnet)
        raise LabError(f"unknown host or router {host!r}")

    def _attachments(self, node: str) -> list[str]:
        if node in self._hosts:
            host = self._hosts[node]
            return [host.subnet, *(sn for sn, _ in host.links)]
        return list(self._routers[node].subnets)

    # -- building --------------------------------------------------------------------------------

    def start(self) -> None:
        """Create namespaces, bridges, veths, addresses and routes; undo all of it on failure."""
        if self._started:
            raise LabError("lab already started")
        self._started = True
        self.workdir.mkdir(parents=True, exist_ok=True)
        atexit.register(self._atexit)
        try:
            self._build()
        except BaseException as exc:
            try:
                self.teardown()
            except Exception as cleanup_exc:
                exc.add_note(f"teardown after failed start also failed: {cleanup_exc}")
            raise

    def _add_netns(self, ns: str, sysctls: Sequence[str]) -> None:
        _ip("netns", "add", ns)
        # Recorded right away so a failure on the next line still removes it.
        self._namespaces.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        result = subprocess.run(
            [_ip_binary(), "netns", "exec", ns, "sysctl", "-q", "-w", *sysctls],
            capture_output=True,
            text=True,
            timeout=_IP_TIMEOUT,
        )
        if result.returncode != 0:
            raise LabError(f"sysctl in {ns} failed: {result.stderr.strip()}")

    def _build(self) -> None:
        # IPv6 stays off: the project speaks mDNS over IPv4, and v6 link-local traffic
        # (DAD, router solicitations, AAAA records) is only noise in captures and logs.
        no_v6 = ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]
        for subnet in self.topology.subnets:
            brns = self.bridge_netns(subnet.name)
            self._add_netns(brns, no_v6)
            # Without snooping the bridge floods every multicast group to every port, so
            # delivery never depends on IGMP membership state (there is no querier here).
            _ip("-n", brns, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
            _ip("-n", brns, "link", "set", "br0", "up")

        nodes = [h.name for h in self.topology.hosts] + [r.name for r in self.topology.routers]
        for node in nodes:
            ns = self.netns(node)
            is_router = node in self._routers
            self._add_netns(ns, [*no_v6, f"net.ipv4.ip_forward={1 if is_router else 0}"])
            for index, subnet_name in enumerate(self._attachments(node)):
                subnet = self._subnets[subnet_name]
                dev, port = f"eth{index}", f"v-{node}"
                brns = self.bridge_netns(subnet_name)
                # Created directly inside the lab namespaces, so nothing ever appears in the
                # root namespace.
                _ip(*f"-n {ns} link add {dev} type veth peer name {port} netns {brns}".split())
                _ip("-n", brns, "link", "set", port, "master", "br0", "up")
                addr = self.address(node, subnet=subnet_name)
                _ip("-n", ns, "addr", "add", f"{addr}/{subnet.network.prefixlen}", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
            # A fresh namespace has no multicast route; plain sockets would get ENETUNREACH.
            _ip("-n", ns, "route", "add", _MCAST_NET, "dev", "eth0")
            self._add_routes(node, ns)

    def _add_routes(self, node: str, ns: str) -> None:
        """A host's default route via its subnet's first router; a router's static routes to
        the subnets behind other routers. They live in the node's namespace and go with it."""
        if node in self._hosts:
            gateway = self.topology.gateway(self._hosts[node].subnet)
            if gateway is not None:
                _ip("-n", ns, "route", "add", "default", "via", str(gateway))
            return
        for subnet, hop in self.topology.routes(self._routers[node]).items():
            _ip("-n", ns, "route", "add", str(self._subnets[subnet].network), "via", str(hop))

    # -- processes -------------------------------------------------------------------------------

    def _require_running(self) -> None:
        if not self._started or self._torn_down:
            raise LabError("lab is not running (call start() or use it as a context manager)")

    @staticmethod
    def _env(
        env: Mapping[str, str] | None, extra: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        merged = dict(os.environ)
        if env:
            merged.update(env)
        if extra:
            merged.update(extra)
        return merged

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
        cmd = [_ip_binary(), "netns", "exec", self.netns(host), *argv]
        popen = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            env=self._env(env),
            start_new_session=True,
        )
        with popen:
            try:
                out, err = popen.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal_group(popen, signal.SIGKILL)
                try:
                    out, err = popen.communicate(timeout=_KILL_WAIT)
                except subprocess.TimeoutExpired:
                    # Something that escaped the group still holds the pipes; give up on them.
                    out, err = "", ""
                raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
            finally:
                if popen.returncode is None:
                    # Interrupted (e.g. KeyboardInterrupt): do not leave the command behind.
                    _signal_group(popen, signal.SIGKILL)
                    _reap(popen)
        result = subprocess.CompletedProcess(cmd, popen.returncode, out, err)
        if check and result.returncode != 0:
            raise LabCommandError(result.returncode, cmd, out, err)
        return result

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
        cmd = [_ip_binary(), "netns", "exec", self.netns(host), *argv]
        log = self.workdir / f"{host}-{name}.log"
        with log.open("wb") as fh:
            popen = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=self._env(env, {"PYTHONUNBUFFERED": "1"}),
                # Own process group, so stop() can signal the command and its children together.
                start_new_session=True,
            )
        proc = LabProcess(host=host, name=name, popen=popen, log=log)
        self._procs.append(proc)
        return proc

    def stop(self, proc: LabProcess, *, timeout: float = 5) -> int | None:
        """SIGTERM the process group, wait up to ``timeout``, then SIGKILL; return the exit code."""
        self._stop_many([proc], timeout)
        return proc.popen.returncode

    def kill(self, proc: LabProcess, sig: int = signal.SIGKILL, *, timeout: float = 10) -> int:
        """Send ``sig`` (default SIGKILL: a crash) to the process's group, wait until the
        process has ended and reap it; return its exit status (``-9`` for SIGKILL).

        Unlike stop() there is no SIGTERM first and nothing else in the group is touched
        afterwards; processes that left the group (a hook in a session of its own) run on, as
        they would after a real crash. Teardown still removes them with the namespace.
        """
        _signal_group(proc.popen, sig)
        if not _wait_exited(proc.popen, timeout):
            raise LabError(f"{proc.host}/{proc.name} did not end within {timeout}s of signal {sig}")
        _reap(proc.popen)
        code = proc.popen.returncode
        if code is None:
            raise LabError(f"{proc.host}/{proc.name} could not be reaped")
        return code

    def _stop_many(self, procs: Sequence[LabProcess], timeout: float) -> None:
        live = [p for p in procs if not _exited(p.popen)]
        for p in live:
            _signal_group(p.popen, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in live:
            if not _wait_exited(p.popen, max(0.0, deadline - time.monotonic())):
                _signal_group(p.popen, signal.SIGKILL)
                _wait_exited(p.popen, _KILL_WAIT)
        for p in procs:
            # The leader is a zombie at this point, so its group ID is still ours: take down
            # any children it left behind in the group, then reap it.
            _signal_group(p.popen, signal.SIGKILL)
            _reap(p.popen)

    # -- avahi -----------------------------------------------------------------------------------

    def start_avahi(
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
        self._require_running()
        ns = self.netns(host)
        if host in self._avahi:
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
        confdir = self.workdir / f"avahi-{host}"
        confdir.mkdir(parents=True, exist_ok=True)
        socket_path = confdir / "dbus.sock"
        if len(str(socket_path)) > _MAX_SOCKET_PATH:
            short = Path(tempfile.mkdtemp(prefix=f"{ns}-", dir="/tmp"))
            self._tempdirs.append(short)
            socket_path = short / "dbus.sock"
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
        dbus_conf = confdir / "dbus.conf"
        dbus_conf.write_text(_dbus_config(socket_path))
        avahi_conf = confdir / "avahi-daemon.conf"
        interfaces = [f"eth{i}" for i in range(len(self._attachments(host)))]
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
        daemon = self.spawn(
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
            self._wait_avahi_running(avahi, tools["dbus-send"], deadline)
        except BaseException:
            self._stop_many([daemon, dbus], 5)
            raise
        self._avahi[host] = avahi
        return avahi

    def _wait_avahi_running(self, avahi: AvahiDaemon, dbus_send: str, deadline: float) -> None:
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
            if _exited(avahi.daemon.popen):
                raise LabError(
                    f"avahi-daemon on {avahi.host!r} exited:\n{_tail(avahi.daemon.log_text())}"
                )
            result = self.run(avahi.host, get_state, timeout=5, env=avahi.env())
            m = re.search(r"int32\s+(-?\d+)", result.stdout)
            if m is not None:
                state = m.group(1)
                if int(state) == _AVAHI_RUNNING:
                    return
            if time.monotonic() >= deadline:
                raise LabError(
                    f"avahi-daemon on {avahi.host!r} not running in time (state {state}):\n"
                    f"{_tail(avahi.daemon.log_text())}"
                )
            time.sleep(0.05)

    def _start_bus(
        self, host: str, name: str, argv: Sequence[str], socket_path: Path, deadline: float
    ) -> LabProcess:
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
        dbus = self.spawn(host, name, argv)
        while not socket_path.exists():
            if _exited(dbus.popen) or time.monotonic() >= deadline:
                self.stop(dbus)
                raise LabError(
                    f"private dbus-daemon for {host!r} did not start:\n{_tail(dbus.log_text())}"
                )
            time.sleep(_POLL)
        return dbus

    def restart_avahi_bus(self, host: str, *, timeout: float = 15) -> AvahiDaemon:
        """Stop a host's avahi-daemon and its private system bus, then start both again at
        the same bus address: what a restart of the machine's dbus does to its clients."""
        avahi = self.avahi(host)
        self._stop_many([avahi.daemon, avahi.dbus], 5)
        socket_path = Path(avahi.bus_address.removeprefix("unix:path="))
        avahi.restarts += 1
        avahi.dbus = self._start_bus(
            host,
            f"dbus{avahi.restarts + 1}",
            avahi.dbus_argv,
            socket_path,
            time.monotonic() + timeout,
        )
        return self.restart_avahi(host, timeout=timeout)

    def stop_avahi(self, host: str) -> None:
        """Stop a host's avahi-daemon (SIGTERM, as systemd would), leaving its bus running."""
        self.stop(self.avahi(host).daemon)

    def restart_avahi(self, host: str, *, timeout: float = 15) -> AvahiDaemon:
        """Start a host's avahi-daemon again on the same private bus (stopping it first if it
        still runs), and wait until it runs: what an operator's `systemctl restart` does."""
        avahi = self.avahi(host)
        if not _exited(avahi.daemon.popen):
            self.stop(avahi.daemon)
        avahi.restarts += 1
        avahi.daemon = self.spawn(
            host,
            f"avahi{avahi.restarts + 1}",
            ["sh", "-c", _AVAHI_SHELL, "lab-avahi", *avahi.argv],
            env=avahi.env(),
        )
        self._wait_avahi_running(avahi, avahi.dbus_send, time.monotonic() + timeout)
        return avahi

    def has_avahi(self, host: str) -> bool:
        """Whether start_avahi() started an avahi-daemon on ``host`` (it may have exited since)."""
        return host in self._avahi

    def avahi(self, host: str) -> AvahiDaemon:
        if host not in self._avahi:
            raise LabError(f"avahi is not running on {host!r}; call start_avahi first")
        return self._avahi[host]

    def avahi_env(self, host: str) -> dict[str, str]:
        """Environment for avahi-browse/avahi-publish run via run()/spawn() on ``host``."""
        if host not in self._avahi:
            raise LabError(f"avahi is not running on {host!r}; call start_avahi first")
        return self._avahi[host].env()

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
            self._stop_many(list(reversed(self._procs)), timeout=_KILL_WAIT)
        except Exception as exc:
            errors.append(f"stopping processes: {exc!r}")
        self._procs.clear()
        self._avahi.clear()
        while self._namespaces:
            ns = self._namespaces[-1]
            try:
                leftover = _kill_netns_processes(ns)
                if leftover:
                    errors.append(f"processes {leftover} in {ns} survived SIGKILL")
                problem = _delete_netns(ns)
                if problem is not None:
                    errors.append(problem)
            except Exception as exc:
                errors.append(f"removing {ns}: {exc!r}")
            self._namespaces.pop()
        while self._tempdirs:
            shutil.rmtree(self._tempdirs.pop(), ignore_errors=True)
        atexit.unregister(self._atexit)
        if errors:
            raise LabError("teardown incomplete: " + "; ".join(errors))

    def _atexit(self) -> None:
        with contextlib.suppress(Exception):
            self.teardown()
