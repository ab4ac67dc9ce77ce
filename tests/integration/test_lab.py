"""Tests for eucalab.lab: description parsing (no root needed) and real namespace labs."""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence

import pytest

from eucalab.errors import LabError
from eucalab.lab import Lab
from eucalab.netns import cleanup_stale
from eucalab.process import LabProcess
from eucalab.topology import parse_topology

LabFactory = Callable[..., Lab]

MDNS_GROUP = "224.0.0.251"
MDNS_PORT = 5353

# Listens for one datagram (joining a group on the given interface address unless group
# is "-"), prints "ready" once bound, then "got <payload> <source>" or "timeout".
RECEIVER = """
import socket, sys
group, port, iface, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", port))
if group != "-":
    mreq = socket.inet_aton(group) + socket.inet_aton(iface)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
s.settimeout(timeout)
print("ready", flush=True)
try:
    data, addr = s.recvfrom(2048)
    print("got", data.decode(), addr[0], flush=True)
except socket.timeout:
    print("timeout", flush=True)
"""

# Deliberately no IP_MULTICAST_IF: multicast must work through the lab's 224.0.0.0/4 route.
SENDER = """
import socket, sys
dest, port, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
s.sendto(payload.encode(), (dest, port))
"""


def netns_names() -> set[str]:
    out = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def pid_gone(pid: int, timeout: float = 5.0) -> bool:
    """True once ``pid`` no longer runs (a zombie awaiting its reaper counts as gone)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def start_receivers(
    lab: Lab, hosts: Sequence[str], group: str, port: int, timeout: float
) -> list[LabProcess]:
    procs = []
    for host in hosts:
        argv = [sys.executable, "-c", RECEIVER, group, str(port), str(lab.address(host))]
        procs.append(lab.spawn(host, f"recv{port}", [*argv, str(timeout)]))
    for p in procs:
        p.wait_for_log("ready")
    return procs


def send(lab: Lab, host: str, dest: str, port: int, payload: str) -> None:
    lab.run(host, [sys.executable, "-c", SENDER, dest, str(port), payload], check=True)


def received(proc: LabProcess, timeout: float = 15.0) -> str:
    proc.popen.wait(timeout=timeout)
    return proc.log_text().strip()


# ---------------------------------------------------------------------------------------------
# parse_topology (no root needed)


def test_parse_topology_assigns_addresses() -> None:
    topo = parse_topology(
        """
        # a comment line
        subnet lan 10.77.1.0/24
        subnet wan 10.77.2.0/24   # trailing comment
        host cloud lan
        host node1 lan 10.77.1.50
        host walrus lan
        host node2 wan
        router r1 lan wan
        """
    )
    assert [(s.name, str(s.network)) for s in topo.subnets] == [
        ("lan", "10.77.1.0/24"),
        ("wan", "10.77.2.0/24"),
    ]
    assert [(h.name, h.subnet, str(h.address)) for h in topo.hosts] == [
        ("cloud", "lan", "10.77.1.10"),
        ("node1", "lan", "10.77.1.50"),
        ("walrus", "lan", "10.77.1.11"),
        ("node2", "wan", "10.77.2.10"),
    ]
    assert [(r.name, r.subnets) for r in topo.routers] == [("r1", ("lan", "wan"))]


def test_parse_topology_auto_addresses_skip_explicit_ones() -> None:
    topo = parse_topology(
        "subnet lan 10.77.1.0/24\nhost a lan\nhost b lan 10.77.1.11\nhost c lan\n"
    )
    assert [str(h.address) for h in topo.hosts] == ["10.77.1.10", "10.77.1.11", "10.77.1.12"]


def test_parse_topology_numbers_routers_on_a_subnet_in_file_order() -> None:
    # s is listed first, so s takes .1 on lan (and is its hosts' gateway) and r takes .2.
    topo = parse_topology(
        "host h lan\nsubnet lan 10.77.1.0/24\nsubnet dmz 10.77.2.0/24\n"
        "router s lan\nrouter r dmz lan\n"
    )
    s, r = topo.routers
    assert [str(s.address_on("lan")), str(r.address_on("lan"))] == ["10.77.1.1", "10.77.1.2"]
    assert str(r.address_on("dmz")) == "10.77.2.1"
    assert topo.gateway("lan") == s.address_on("lan")
    assert [str(h.address) for h in topo.hosts] == ["10.77.1.10"]
    with pytest.raises(LabError, match="not on subnet 'dmz'"):
        s.address_on("dmz")


def test_topology_routes_take_the_fewest_routers() -> None:
    # A ring a-b-c-d-a of four routers, an island e nothing reaches, and f without a router.
    topo = parse_topology(
        "subnet a 10.77.1.0/24\nsubnet b 10.77.2.0/24\nsubnet c 10.77.3.0/24\n"
        "subnet d 10.77.4.0/24\nsubnet e 10.77.5.0/24\nsubnet f 10.77.6.0/24\n"
        "router r1 a b\nrouter r2 b c\nrouter r3 c d\nrouter r4 a d\nrouter r5 e\n"
    )
    r1, r2, _, _, r5 = topo.routers
    as_text = {name: str(hop) for name, hop in topo.routes(r1).items()}
    assert as_text == {"c": "10.77.2.2", "d": "10.77.1.2"}
    as_text = {name: str(hop) for name, hop in topo.routes(r2).items()}
    assert as_text == {"a": "10.77.2.1", "d": "10.77.3.2"}
    assert topo.routes(r5) == {}
    assert str(topo.gateway("d")) == "10.77.4.1"
    assert topo.gateway("f") is None


def test_parse_topology_gives_a_linked_host_an_address_on_each_subnet() -> None:
    topo = parse_topology(
        "subnet front 10.77.1.0/24\nsubnet nodes 10.77.5.0/24\n"
        "host cc front\nlink cc nodes 10.77.5.7\nhost node1 nodes\nlink node1 front\n"
    )
    hosts = {h.name: h for h in topo.hosts}
    assert hosts["cc"].links == (("nodes", ipaddress.IPv4Address("10.77.5.7")),)
    assert hosts["node1"].links == (("front", ipaddress.IPv4Address("10.77.1.11")),)
    assert hosts["node1"].address == ipaddress.IPv4Address("10.77.5.10")


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ("subnet lan 10.77.1.0/24\nhost a dmz\n", 2, "unknown subnet 'dmz'"),
        ("subnet lan 10.77.1.0/24\nrouter r lan dmz\n", 2, "unknown subnet 'dmz'"),
        ("subnet lan 10.77.1.0/24\nhost a lan\nhost a lan\n", 3, "duplicate name 'a'"),
        ("subnet lan 10.77.1.0/24\nhost r lan\nrouter r lan\n", 3, "duplicate name 'r'"),
        ("subnet lan 10.77.1.0/24\nsubnet lan 10.77.2.0/24\n", 2, "duplicate subnet name"),
        ("# c\nsubnet lan 10.77.1.0/33\n", 2, "bad CIDR"),
        ("subnet lan 10.77.1.5/24\n", 1, "bad CIDR"),
        ("subnet lan banana\n", 1, "bad CIDR"),
        ("subnet lan 8.8.8.0/24\n", 1, "not private"),
        ("subnet a 10.77.0.0/16\nsubnet b 10.77.5.0/24\n", 2, "overlaps subnet 'a'"),
        ("subnet lan 10.77.1.0/24\nhost a lan 10.77.2.5\n", 2, "outside subnet 'lan'"),
        ("subnet lan 10.77.1.0/24\nhost a lan 10.77.1.255\n", 2, "broadcast"),
        ("subnet lan 10.77.1.0/24\nhost a lan 10.77.1.x\n", 2, "bad address"),
        ("subnet lan 10.77.1.0/24\nhost a lan 10.77.1.1\nrouter r lan\n", 2, "router 'r'"),
        ("subnet lan 10.77.1.0/24\nhost a lan 10.77.1.9\nhost b lan 10.77.1.9\n", 3, "used"),
        ("subnet lan 10.77.1.0/24\nhost averyveryverylongname lan\n", 2, "too long"),
        ("subnet lan 10.77.1.0/24\nhost Bad-Name lan\n", 2, "invalid host name"),
        ("subnet l-an 10.77.1.0/24\n", 1, "invalid subnet name"),
        ("subnet lan 10.77.1.0/24\nswitch s lan\n", 2, "unknown keyword 'switch'"),
        ("subnet lan 10.77.1.0/24\nhost a\n", 2, "expected 'host NAME SUBNET"),
        ("subnet lan 10.77.1.0/24\nrouter r\n", 2, "expected 'router NAME SUBNET"),
        ("subnet lan\n", 1, "expected 'subnet NAME CIDR'"),
        ("subnet lan 10.77.1.0/24\nrouter r lan lan\n", 2, "twice"),
        (
            "subnet a 10.77.1.0/24\nhost h a 10.77.1.2\nrouter r a\nrouter s a\n",
            2,
            "address 10.77.1.2 is already used by router 's' (line 4)",
        ),
        ("subnet t 10.77.1.0/30\nrouter r t\nrouter s t\nrouter u t\n", 4, "no address left"),
        ("subnet tiny 10.77.1.0/29\nhost a tiny\n", 2, "no free address"),
        ("subnet a 10.77.1.0/24\nlink x a\n", 2, "link names 'x', which is not a host"),
        ("subnet a 10.77.1.0/24\nhost x a\nlink x a\n", 3, "is on subnet 'a' already"),
        ("subnet a 10.77.1.0/24\nhost x a\nlink x\n", 3, "expected 'link HOST SUBNET"),
        ("subnet a 10.77.1.0/24\nhost x a\nlink x b\n", 3, "unknown subnet 'b'"),
        (
            "subnet a 10.77.1.0/24\nsubnet b 10.77.2.0/24\nhost x a\nrouter r a b\nlink r b\n",
            5,
            "link names 'r', which is not a host",
        ),
    ],
)
def test_parse_topology_rejects_bad_descriptions(text: str, line: int, problem: str) -> None:
    with pytest.raises(LabError) as info:
        parse_topology(text)
    message = str(info.value)
    assert message.startswith(f"line {line}:"), message
    assert problem in message, message


# ---------------------------------------------------------------------------------------------
# Namespace labs (root)

ONE_SUBNET = """
subnet lan 10.77.1.0/24
host a lan
host b lan
host c lan
"""

ROUTED = """
subnet lan 10.77.1.0/24
subnet wan 10.77.2.0/24
host a lan
host b lan
host c wan
router r1 lan wan
"""


@pytest.mark.integration
def test_lab_builds_the_described_network(lab_factory: LabFactory) -> None:
    lab = lab_factory(ROUTED)
    addr = lab.run("a", ["ip", "-4", "-o", "addr", "show", "dev", "eth0"], check=True).stdout
    assert "10.77.1.10/24" in addr
    routes = lab.run("a", ["ip", "-4", "route"], check=True).stdout
    assert "default via 10.77.1.1 dev eth0" in routes
    assert "224.0.0.0/4 dev eth0" in routes
    raddr = lab.run("r1", ["ip", "-4", "-o", "addr"], check=True).stdout
    by_dev = {line.split()[1]: line.split()[3] for line in raddr.splitlines()}
    assert by_dev == {"lo": "127.0.0.1/8", "eth0": "10.77.1.1/24", "eth1": "10.77.2.1/24"}
    forward = lab.run("r1", ["cat", "/proc/sys/net/ipv4/ip_forward"], check=True).stdout
    assert forward.strip() == "1"
    bridge = lab.bridge_netns("lan")
    detail = subprocess.run(
        ["ip", "-n", bridge, "-d", "link", "show", "br0"], capture_output=True, text=True
    ).stdout
    assert "mcast_snooping 0" in detail
    assert lab.address("r1", subnet="wan") == ipaddress.IPv4Address("10.77.2.1")
    assert {lab.netns(n) for n in ("a", "b", "c", "r1")} <= netns_names()
    # Nothing from the lab may show up in the root namespace.
    root_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "v-a" not in root_links and "br0" not in root_links


@pytest.mark.integration
def test_multicast_reaches_every_host_on_the_subnet(lab_factory: LabFactory) -> None:
    lab = lab_factory(ONE_SUBNET)
    receivers = start_receivers(lab, ["b", "c"], MDNS_GROUP, MDNS_PORT, timeout=10)
    payload = f"mdns-{uuid.uuid4().hex[:8]}"
    send(lab, "a", MDNS_GROUP, MDNS_PORT, payload)
    for proc in receivers:
        assert received(proc).endswith(f"got {payload} 10.77.1.10"), proc.log_text()


@pytest.mark.integration
def test_unicast_between_hosts_on_one_subnet(lab_factory: LabFactory) -> None:
    lab = lab_factory(ONE_SUBNET)
    [receiver] = start_receivers(lab, ["c"], "-", 9999, timeout=10)
    send(lab, "b", str(lab.address("c")), 9999, "hello-c")
    assert received(receiver).endswith("got hello-c 10.77.1.11")


@pytest.mark.integration
def test_router_forwards_unicast_but_not_multicast(lab_factory: LabFactory) -> None:
    lab = lab_factory(ROUTED)
    [far] = start_receivers(lab, ["c"], "-", 9999, timeout=10)
    send(lab, "a", str(lab.address("c")), 9999, "across")
    # Source address unchanged: the router forwards, it does not NAT.
    assert received(far).endswith("got across 10.77.1.10")

    near, far = start_receivers(lab, ["b", "c"], MDNS_GROUP, MDNS_PORT, timeout=2)
    send(lab, "a", MDNS_GROUP, MDNS_PORT, "local-only")
    assert received(near).endswith("got local-only 10.77.1.10")
    assert received(far).endswith("timeout"), far.log_text()


CHAIN = """
subnet a 10.77.1.0/24
subnet b 10.77.2.0/24
subnet c 10.77.3.0/24
host h1 a
host h2 b
host h3 c
router r1 a b
router r2 b c
"""


@pytest.mark.integration
def test_chained_routers_forward_unicast_but_not_multicast(lab_factory: LabFactory) -> None:
    lab = lab_factory(CHAIN)
    assert lab.address("r2", subnet="b") == ipaddress.IPv4Address("10.77.2.2")
    assert "10.77.3.0/24 via 10.77.2.2 dev eth1" in lab.run("r1", ["ip", "-4", "route"]).stdout
    assert "10.77.1.0/24 via 10.77.2.1 dev eth0" in lab.run("r2", ["ip", "-4", "route"]).stdout
    assert "default via 10.77.3.1 dev eth0" in lab.run("h3", ["ip", "-4", "route"]).stdout
    for src, dst in (("h1", "h3"), ("h3", "h1")):
        [far] = start_receivers(lab, [dst], "-", 9999, timeout=10)
        send(lab, src, str(lab.address(dst)), 9999, f"from-{src}")
        # Source address unchanged across both routers: they forward, they do not NAT.
        assert received(far).endswith(f"got from-{src} {lab.address(src)}"), far.log_text()

    # r1 hears h1's mDNS on a (so it was sent); neither router passes it on.
    r1_on_a = str(lab.address("r1", subnet="a"))
    argv = [sys.executable, "-c", RECEIVER, MDNS_GROUP, str(MDNS_PORT), r1_on_a, "2"]
    near = lab.spawn("r1", "recv-mdns", argv)
    near.wait_for_log("ready")
    beyond = start_receivers(lab, ["h2", "h3"], MDNS_GROUP, MDNS_PORT, timeout=2)
    send(lab, "h1", MDNS_GROUP, MDNS_PORT, "local-only")
    assert received(near).endswith("got local-only 10.77.1.10"), near.log_text()
    for proc in beyond:
        assert received(proc).endswith("timeout"), proc.log_text()


@pytest.mark.integration
def test_run_captures_output_env_and_exit_status(lab_factory: LabFactory) -> None:
    lab = lab_factory(ONE_SUBNET)
    result = lab.run(
        "a", ["sh", "-c", 'echo "$LABVAR"; echo oops >&2; exit 3'], env={"LABVAR": "x1"}
    )
    assert (result.returncode, result.stdout, result.stderr) == (3, "x1\n", "oops\n")
    with pytest.raises(LabError, match="oops"):
        lab.run("a", ["sh", "-c", "echo oops >&2; exit 1"], check=True)
    with pytest.raises(subprocess.TimeoutExpired):
        lab.run("a", ["sleep", "30"], timeout=0.3)
    # Commands really run inside the host's namespace: only its own interfaces are visible.
    links = lab.run("b", ["ip", "-o", "link"], check=True).stdout
    assert [line.split(":")[1].strip().split("@")[0] for line in links.splitlines()] == [
        "lo",
        "eth0",
    ]


@pytest.mark.integration
def test_spawn_logs_and_stop_escalates(lab_factory: LabFactory) -> None:
    lab = lab_factory(ONE_SUBNET)
    proc = lab.spawn("a", "talker", [sys.executable, "-c", "import os; print('hi', os.getpid())"])
    proc.popen.wait(timeout=10)
    assert proc.log == lab.workdir / "a-talker.log"
    assert proc.log_text().startswith("hi ")

    sleeper = lab.spawn("a", "sleeper", ["sleep", "300"])
    assert lab.stop(sleeper) == -15
    stubborn = lab.spawn(
        "a",
        "stubborn",
        [
            sys.executable,
            "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('armed'); time.sleep(300)",
        ],
    )
    stubborn.wait_for_log("armed")
    t0 = time.monotonic()
    assert lab.stop(stubborn, timeout=0.5) == -9
    assert time.monotonic() - t0 < 3


@pytest.mark.integration
def test_teardown_on_exception_removes_namespaces_and_processes(
    lab_factory: LabFactory,
) -> None:
    lab = lab_factory(ROUTED, start=False)
    names: set[str] = set()
    pids: list[int] = []
    with pytest.raises(RuntimeError, match="boom"), lab:
        names = {lab.netns(n) for n in ("a", "b", "c", "r1")} | {
            lab.bridge_netns("lan"),
            lab.bridge_netns("wan"),
        }
        assert names <= netns_names()
        # A spawned process with a child in its process group ...
        group = lab.spawn("a", "group", ["sh", "-c", "sleep 300 & echo $!; wait"])
        group.wait_for_log("\n")
        pids += [group.pid, int(group.log_text().split()[0])]
        # ... and one that escaped into its own session via a finished run().
        escape = (
            "import subprocess; print(subprocess.Popen(['sleep', '300'], "
            "start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)"
        )
        pids.append(int(lab.run("b", [sys.executable, "-c", escape], check=True).stdout))
        assert not any(pid_gone(pid, timeout=0) for pid in pids)
        raise RuntimeError("boom")
    assert not names & netns_names()
    for pid in pids:
        assert pid_gone(pid), f"pid {pid} still running after teardown"
    lab.teardown()  # idempotent
    with pytest.raises(LabError):
        lab.run("a", ["true"])


@pytest.mark.integration
def test_failed_start_removes_what_it_created(lab_factory: LabFactory) -> None:
    prefix = f"eucr{os.getpid()}-f{uuid.uuid4().hex[:4]}"
    squatter = f"{prefix}-b"  # host b's namespace name, taken before the lab starts
    subprocess.run(["ip", "netns", "add", squatter], check=True)
    try:
        lab = lab_factory(ONE_SUBNET, start=False, prefix=prefix)
        with pytest.raises(LabError, match="netns add"):
            lab.start()
        left = {ns for ns in netns_names() if ns.startswith(prefix + "-")}
        # a's namespace and the bridge were created and removed; the squatter is not ours.
        assert left == {squatter}
    finally:
        subprocess.run(["ip", "netns", "del", squatter], check=False)


@pytest.mark.integration
def test_cleanup_stale_removes_only_dead_labs(lab_host: None) -> None:
    finished = subprocess.Popen(["true"])
    finished.wait()
    dead_ns = f"eucrtest{finished.pid}-0-a"
    live_ns = f"eucrtest{os.getpid()}-0-a"
    for ns in (dead_ns, live_ns):
        subprocess.run(["ip", "netns", "add", ns], check=True)
    sleeper = subprocess.Popen(["ip", "netns", "exec", dead_ns, "sleep", "300"])
    try:
        removed = cleanup_stale("eucrtest")
        assert removed == [dead_ns]
        assert sleeper.wait(timeout=5) == -9
        names = netns_names()
        assert dead_ns not in names
        assert live_ns in names
    finally:
        sleeper.kill()
        sleeper.wait()
        for ns in (dead_ns, live_ns):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


# ---------------------------------------------------------------------------------------------
# Avahi and python-zeroconf inside the lab

AVAHI_TOPOLOGY = """
subnet lan 10.77.1.0/24
host alpha lan
host beta lan
host gamma lan
"""

SERVICE = "_eucalyptus._tcp"

ZEROCONF_REGISTER = """
import asyncio, socket, sys
from zeroconf import ServiceInfo
from zeroconf.asyncio import AsyncZeroconf

async def main() -> None:
    name, addr = sys.argv[1], sys.argv[2]
    info = ServiceInfo(
        "_eucalyptus._tcp.local.", f"{name}._eucalyptus._tcp.local.", port=8774,
        properties={"type": "cc", "cluster": "c2"}, addresses=[socket.inet_aton(addr)],
        server="zc-host.local.",
    )
    azc = AsyncZeroconf(interfaces=[addr])
    await azc.async_register_service(info)
    print("registered", flush=True)
    await asyncio.sleep(120)

asyncio.run(main())
"""

ZEROCONF_RESOLVE = """
import sys
from zeroconf import Zeroconf
zc = Zeroconf(interfaces=[sys.argv[2]])
try:
    info = zc.get_service_info(
        "_eucalyptus._tcp.local.", sys.argv[1] + "._eucalyptus._tcp.local.", timeout=8000
    )
    if info is None:
        sys.exit("not found")
    props = sorted(f"{k}={v}" for k, v in info.decoded_properties.items())
    print(info.port, ",".join(info.parsed_addresses()), " ".join(props))
finally:
    zc.close()
"""


@pytest.fixture
def avahi_tools() -> None:
    path = os.environ.get("PATH", "") + ":/usr/sbin"
    tools = ("avahi-daemon", "avahi-browse", "avahi-publish", "dbus-daemon")
    missing = [t for t in tools if shutil.which(t, path=path) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (apt-get install avahi-daemon avahi-utils dbus)")


def avahi_browse(lab: Lab, host: str, name: str, timeout: float = 10.0) -> list[str]:
    """Resolved avahi-browse record (split on ';') for service ``name``; fails on timeout."""
    deadline = time.monotonic() + timeout
    argv = ["avahi-browse", "-r", "-t", "-p", SERVICE]
    while True:
        result = lab.run(host, argv, env=lab.avahi_env(host), timeout=15)
        for line in result.stdout.splitlines():
            fields = line.split(";")
            if fields[0] == "=" and len(fields) >= 10 and fields[3] == name:
                return fields
        if time.monotonic() >= deadline:
            pytest.fail(f"{name} not seen by avahi-browse on {host}:\n{result.stdout}")
        time.sleep(0.2)


@pytest.mark.integration
def test_avahi_publish_is_browsed_from_another_host(
    lab_factory: LabFactory, avahi_tools: None
) -> None:
    lab = lab_factory(AVAHI_TOPOLOGY)
    daemons = [lab.start_avahi("alpha"), lab.start_avahi("beta")]
    # Each daemon has its own bus, so both could claim org.freedesktop.Avahi.
    assert daemons[0].bus_address != daemons[1].bus_address
    pub = lab.spawn(
        "alpha",
        "publish",
        ["avahi-publish", "-s", "node7", SERVICE, "8773", "type=node", "cluster=c1"],
        env=lab.avahi_env("alpha"),
    )
    pub.wait_for_log("Established under name 'node7'")
    fields = avahi_browse(lab, "beta", "node7")
    assert fields[1:3] == ["eth0", "IPv4"]
    assert fields[6:9] == ["alpha.local", str(lab.address("alpha")), "8773"]
    assert set(fields[9].split()) == {'"type=node"', '"cluster=c1"'}

    lab.teardown()
    for proc in (*(d.daemon for d in daemons), *(d.dbus for d in daemons), pub):
        assert proc.popen.returncode is not None
        assert pid_gone(proc.pid)


@pytest.mark.integration
def test_python_zeroconf_and_avahi_see_each_other(
    lab_factory: LabFactory, avahi_tools: None
) -> None:
    lab = lab_factory(AVAHI_TOPOLOGY)
    lab.start_avahi("beta")
    gamma = str(lab.address("gamma"))
    zc = lab.spawn("gamma", "zeroconf", [sys.executable, "-c", ZEROCONF_REGISTER, "zc1", gamma])
    pub = lab.spawn(
        "beta",
        "publish",
        ["avahi-publish", "-s", "av1", SERVICE, "8775", "type=sc"],
        env=lab.avahi_env("beta"),
    )
    zc.wait_for_log("registered", timeout=15)
    fields = avahi_browse(lab, "beta", "zc1")
    assert fields[6:9] == ["zc-host.local", gamma, "8774"]
    assert set(fields[9].split()) == {'"type=cc"', '"cluster=c2"'}

    pub.wait_for_log("Established under name 'av1'")
    resolved = lab.run("gamma", [sys.executable, "-c", ZEROCONF_RESOLVE, "av1", gamma], timeout=20)
    assert resolved.returncode == 0, resolved.stderr
    assert resolved.stdout.split() == ["8775", str(lab.address("beta")), "type=sc"]


@pytest.mark.integration
def test_avahi_reflector_on_router_relays_between_subnets(
    lab_factory: LabFactory, avahi_tools: None
) -> None:
    lab = lab_factory(ROUTED)
    lab.start_avahi("a")
    lab.start_avahi("c")
    pub = lab.spawn(
        "a", "publish", ["avahi-publish", "-s", "far1", SERVICE, "8773"], env=lab.avahi_env("a")
    )
    pub.wait_for_log("Established under name 'far1'")
    # Without a reflector nothing crosses the router ...
    quiet = lab.run("c", ["avahi-browse", "-t", "-p", SERVICE], env=lab.avahi_env("c"))
    assert "far1" not in quiet.stdout
    # ... with one on the router, the record arrives with a's own address.
    lab.start_avahi("r1", reflector=True)
    fields = avahi_browse(lab, "c", "far1")
    assert fields[7:9] == [str(lab.address("a")), "8773"]
