"""Attacks on the Avahi backend with real avahi-daemons (each on a private system bus) in lab
namespaces: forged D-Bus signals from another local client of the agent's bus, the daemon killed
(SIGKILL) and restarted again and again, a peer's daemon coming and going under a browser that
may keep no more objects than it needs, TXT records no responder of ours would send, and a rogue
that keeps claiming the names we publish.

No test talks to the machine's own system bus or avahi-daemon.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from typing import Any

import pytest

from eucalab.cloud import LabCloud
from eucalab.cloud_probes import registered_components
from eucalab.errors import LabError
from tests.integration.conftest import CloudFactory
from tests.integration.test_avahi_backend import all_registered_ncs, avahi_browse_names, wait_until
from tests.integration.test_lab import avahi_tools  # noqa: F401  (a fixture, used by name)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("avahi_tools")]

Plan = dict[str, dict[str, str | None]]

# -- forged signals on the agent's own bus --------------------------------------------------------

# Another client of the same system bus (any local user may send signals there) sends each other
# client what would, if believed, make it forget avahi-daemon (and later publish everything
# twice), report a service at the attacker's address, and drop its groups. Avahi names its
# objects /ClientN/ServiceResolverM and /ClientN/EntryGroupM, so the paths are easy to guess.
FORGER = """
import asyncio, sys
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

DBUS = dict(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus")
AVAHI = "org.freedesktop.Avahi"

def sig(to, path, interface, member, signature, body):
    return Message(message_type=MessageType.SIGNAL, destination=to, path=path,
                   interface=interface, member=member, signature=signature, body=body)

async def main():
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    (names,) = (await bus.call(Message(member="ListNames", **DBUS))).body
    (avahi,) = (await bus.call(Message(member="GetNameOwner", signature="s", body=[AVAHI],
                                       **DBUS))).body
    targets = [n for n in names if n.startswith(":") and n not in (avahi, bus.unique_name)]
    for to in targets:
        await bus.send(sig(to, "/org/freedesktop/DBus", "org.freedesktop.DBus", "NameOwnerChanged",
                     "sss", [AVAHI, avahi, ""]))
        await bus.send(sig(to, "/org/freedesktop/DBus", "org.freedesktop.DBus", "NameOwnerChanged",
                     "sss", [AVAHI, "", bus.unique_name]))
        for client in range(1, 9):
            for n in range(1, 17):
                body = [-1, 0, "forged", "_eucalyptus._tcp", "local", "evil.local", 0,
                        "10.66.6.6", 8773, [b"txtvers=1", b"type=node", b"cluster=cluster1"], 0]
                await bus.send(sig(to, f"/Client{client}/ServiceResolver{n}",
                             "org.freedesktop.Avahi.ServiceResolver", "Found",
                             "iissssisqaayu", body))
                await bus.send(sig(to, f"/Client{client}/EntryGroup{n}",
                             "org.freedesktop.Avahi.EntryGroup", "StateChanged", "is",
                             [4, "forged failure"]))
            # A round trip now and then: dbus-fast gives up on a full socket (EAGAIN).
            await bus.call(Message(member="GetId", **DBUS))
        # Last: a server state that would make the agent withdraw and re-publish everything.
        await bus.send(sig(to, "/", "org.freedesktop.Avahi.Server", "StateChanged", "is", [1, ""]))
    await bus.call(Message(member="GetId", **DBUS))  # all sent before we go
    print(bus.unique_name, flush=True)
    bus.disconnect()

asyncio.run(main())
"""


def forge(cloud: LabCloud, host: str) -> str:
    """Send the forged signals to every client of `host`'s bus; the forger's bus name."""
    out = cloud.lab.run(
        host, [sys.executable, "-c", FORGER], env=cloud.lab.avahi_env(host), timeout=30, check=True
    )
    return out.stdout.split()[-1]


def test_forged_avahi_signals_from_another_bus_client_are_ignored(
    cloud_factory: CloudFactory,
) -> None:
    plan: Plan = {"cloud": {"clc": None, "cc": "cluster1"}, "node1": {"nc": "cluster1"}}
    cloud = cloud_factory(plan, mdns_backend="avahi", log_level="debug")
    cloud.start_all()
    cloud.wait_for("cloud", all_registered_ncs(1), timeout=60)
    node1 = f"node-{cloud.component_id('node1', 'nc')}"
    published = {host: cloud.logs(host).count(" runs; publishing ") for host in plan}

    for host in plan:
        forger = forge(cloud, host)
        # Signals from one sender reach us in order: once the last is logged, all were seen.
        cloud.agents[host].wait_for_log(
            f"ignored org.freedesktop.Avahi.Server.StateChanged from {forger}", timeout=20
        )
        logs = cloud.logs(host)
        assert f"ignored org.freedesktop.DBus.NameOwnerChanged from {forger}: not the bus" in logs
        for believed in (
            "avahi-daemon stopped",
            "left the running state",
            "at 10.66.6.6",
            "forged failure",
        ):
            assert believed not in logs, (host, believed)
        assert logs.count(" runs; publishing ") == published[host], host

    # Nothing was published twice (a second copy would be renamed "#2"), and the registrar
    # still has the one NC, at its own address.
    names = avahi_browse_names(cloud, "cloud")
    assert node1 in names and not any(name.endswith("#2") for name in names), names
    rows = [r for r in registered_components(cloud.status("cloud")) if r["role"] == "nc"]
    assert len(rows) == 1
    assert "10.66.6.6" not in json.dumps(cloud.registry("cloud"))


# -- a peer's daemon coming and going: no resolver is leaked ---------------------------------------


@pytest.mark.slow
def test_a_peer_daemon_restarting_again_and_again_leaks_no_resolver(
    cloud_factory: CloudFactory,
) -> None:
    """node1's avahi-daemon allows its agent 7 objects: 2 entry groups, the browser and one
    resolver per service it hears (the CLC's, the CC's and its own) leave 1 spare. The cloud's
    daemon restarts until node1 has heard its services leave and come back 3 times (each a
    new item, so a new resolver). A resolver kept for a service gone would use the spare and then
    hit the limit, which the agent logs ("refuses more objects")."""
    plan: Plan = {"cloud": {"clc": None, "cc": "cluster1"}, "node1": {"nc": "cluster1"}}
    cloud = cloud_factory(
        plan,
        mdns_backend="avahi",
        avahi_options={"node1": {"objects-per-client-max": 7}},
        log_level="debug",
    )
    cloud.start_all()
    cloud.wait_for("cloud", all_registered_ncs(1), timeout=60)
    clc = f"cloud-{cloud.component_id('cloud', 'clc')}"
    agent = cloud.agents["node1"]
    heard = f"avahi browser: new {clc} on interface"
    wait_until(lambda: heard in agent.log_text(), 20, "node1 hears the CLC")
    established = f"avahi: {clc} established as"
    cycles = 0
    # Until the CLC has been heard leaving and coming back 3 times, in 12 restarts at most:
    # with goodbyes heard in about 2 rounds of 3, a fixed 5 rounds gave fewer than 2 one run
    # in 20 (CI saw it); 12 rounds leave that about one in 20,000.
    for round_ in range(1, 13):
        if cycles >= 3:
            break
        # A stopping avahi-daemon's goodbyes do not always reach node1 (measured: in about one
        # round in three, even 10 s after the last announcement); then node1 keeps the cached
        # service and its resolver, which is no leak. Rounds where the goodbye is heard count.
        time.sleep(2)
        before = agent.log_text().count(heard), cloud.logs("cloud").count(established)
        cloud.lab.restart_avahi("cloud")
        wait_until(
            lambda n=before[1]: cloud.logs("cloud").count(established) > n, 30, f"round {round_}"
        )
        with contextlib.suppress(LabError):
            wait_until(lambda n=before[0]: agent.log_text().count(heard) > n, 10, "heard again")
            cycles += 1
    assert cycles >= 2, f"node1 heard the CLC leave and come back only {cycles} times"
    # One more object than there is room for must be refused, so that the check means something.
    assert "refuses more objects for this client" not in agent.log_text()
    assert not agent.exited()
    names = avahi_browse_names(cloud, "node1")
    assert clc in names and not any(name.endswith("#2") for name in names), names


# -- the agent's own daemon killed again and again ------------------------------------------------


@pytest.mark.slow
def test_sigkill_of_the_daemon_again_and_again_keeps_one_registration(
    cloud_factory: CloudFactory,
) -> None:
    plan: Plan = {
        "cloud": {"clc": None, "cc": "cluster1", "sc": "cluster1"},
        "node1": {"nc": "cluster1"},
    }
    cloud = cloud_factory(plan, mdns_backend="avahi", log_level="debug")
    cloud.start_all()
    cloud.wait_for("cloud", all_registered_ncs(1), timeout=60)
    node_id = cloud.component_id("node1", "nc")
    node1 = f"node-{node_id}"
    agents = {host: cloud.agents[host] for host in plan}
    pids = {host: proc.pid for host, proc in agents.items()}
    kills = 5
    for round_ in range(kills):
        host = ("node1", "cloud")[round_ % 2]
        agent = agents[host]
        ups = agent.log_text().count(" runs; publishing ")
        daemon = cloud.lab.avahi(host).daemon
        cloud.lab.kill(daemon, signal.SIGKILL)  # no goodbyes, no clean exit
        agent.wait_for_log("avahi-daemon stopped", timeout=20)
        cloud.lab.restart_avahi(host)
        wait_until(
            lambda a=agent, n=ups: a.log_text().count(" runs; publishing ") > n,
            30,
            f"round {round_}",
        )
    # Heard again, under its own name (no second copy renamed "#2"), by both daemons.
    for host in plan:
        wait_until(lambda h=host: node1 in avahi_browse_names(cloud, h), 30, f"{host} hears node1")
        names = avahi_browse_names(cloud, host)
        assert not any(name.endswith("#2") for name in names), names
    for host, agent in agents.items():
        assert not agent.exited() and agent.pid == pids[host], host  # no crash, no restart
        assert "Traceback" not in agent.log_text(), host
    status = cloud.status("cloud")
    ncs = [r for r in registered_components(status) if r["role"] == "nc"]
    assert [r["component_id"] for r in ncs] == [node_id]
    node_calls = [line for line in cloud.hook_log("cloud") if line.startswith("node ")]
    assert len(node_calls) == 1, node_calls  # registered once, whatever the sightings (L1)


# -- TXT records no eucareg responder sends -------------------------------------------------------

NASTY_TXT: dict[str, list[bytes]] = {
    # 40 strings of 255 bytes: a TXT record of 10 kB, more than one mDNS packet holds.
    "huge": [b"x%02d=" % n + b"v" * 251 for n in range(40)],
    "not-utf8": [b"txtvers=1", b"type=node", b"cluster=\xff\xfe\xfd", b"id=\xc3\x28"],
    "duplicate": [b"txtvers=1", b"type=node", b"type=clc", b"TYPE=cc", b"cluster=a", b"cluster=b"],
    "no-equals": [b"txtvers", b"type", b"=novalue", b"cluster"],
    # A node asking to be registered at a link-local, then a loopback address (lesson L3).
    "link-local": [b"txtvers=1", b"type=node", b"cluster=cluster1", b"addr=fe80::1"],
    "loopback": [b"txtvers=1", b"type=node", b"cluster=cluster1", b"addr=127.0.0.1"],
}


def test_nasty_txt_records_are_heard_without_harm(cloud_factory: CloudFactory) -> None:
    """A rogue publishes instances with nasty TXT records through its own avahi-daemon; the
    CLC's agent (on Avahi) keeps running and keeps its registrations, and `eucareg discover`
    through the Avahi backend (the agent's own browser code) still finds the CLC."""
    plan: Plan = {
        "cloud": {"clc": None, "cc": "cluster1"},
        "node1": {"nc": "cluster1"},
        "rogue": {},
    }
    cloud = cloud_factory(plan, mdns_backend="avahi", log_level="debug")
    cloud.lab.start_avahi("rogue")
    rogues = []
    for name, strings in NASTY_TXT.items():
        head = [b"avahi-publish", b"-s", f"rogue-{name}".encode(), b"_eucalyptus._tcp", b"8773"]
        proc = cloud.lab.spawn(
            "rogue",
            f"rogue-{name}",
            [os.fsdecode(a) for a in [*head, *strings]],
            env=cloud.lab.avahi_env("rogue"),
        )
        rogues.append((name, proc))
    for name, proc in rogues:
        proc.wait_for_log(f"Established under name 'rogue-{name}'", timeout=20)
    cloud.start_all()
    cloud.wait_for("cloud", all_registered_ncs(1), timeout=60)
    agent = cloud.agents["cloud"]
    for name in NASTY_TXT:
        agent.wait_for_log(f"avahi resolver: rogue-{name} on interface", timeout=30)
    assert not agent.exited() and "Traceback" not in agent.log_text()
    clc_id = cloud.component_id("cloud", "clc")
    argv = [sys.executable, "-m", "eucareg", "discover", "clc", "--json"]
    argv += ["--backend", "avahi", "--timeout", "3s"]
    out = cloud.lab.run("node1", argv, env=cloud.agent_env("node1"), timeout=40, check=True)
    (clc,) = json.loads(out.stdout)["clcs"]
    assert clc["component_id"] == clc_id, out.stdout
    rows = registered_components(cloud.status("cloud"))
    assert not any("rogue" in json.dumps(row) for row in rows), rows


# -- a rogue that takes every name we publish, again and again ------------------------------------

# python-zeroconf in the rogue's namespace, without avahi: it hears each name the target takes
# and answers for it too, with the target's own TXT record (a replay) and its own address, and
# without probing, so the established owner is the one that sees the conflict.
SQUATTER = """
import asyncio, socket, sys
from zeroconf import IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

TYPE = "_eucalyptus._tcp.local."
prefix, rounds, address = sys.argv[1], int(sys.argv[2]), sys.argv[3]

async def main():
    zc = AsyncZeroconf(ip_version=IPVersion.V4Only)
    taken, queue = set(), asyncio.Queue()

    def changed(zeroconf, service_type, name, state_change):
        if name.startswith(prefix) and name not in taken:
            queue.put_nowait(name)

    browser = AsyncServiceBrowser(zc.zeroconf, TYPE, handlers=[changed])
    while len(taken) < rounds:
        name = await queue.get()
        if name in taken:
            continue
        info = AsyncServiceInfo(TYPE, name)
        if not await info.async_request(zc.zeroconf, 3000):
            continue
        copy = AsyncServiceInfo(TYPE, name, port=info.port, properties=info.properties,
                                addresses=[socket.inet_aton(address)], server="squatter.local.")
        taken.add(name)
        await (await zc.async_register_service(copy, cooperating_responders=True, strict=False))
        print("squatted", name, flush=True)
    print("done", flush=True)
    await asyncio.sleep(600)
    await browser.async_cancel()

asyncio.run(main())
"""


def test_a_rogue_that_takes_each_new_name_of_ours_gets_nothing_registered(
    cloud_factory: CloudFactory,
) -> None:
    """After node1 is registered, a rogue answers for its instance name with a copy of its TXT
    record (a replay from another address), and for each name Avahi renames ours to, 4 times:
    node1 keeps renaming (L2) and stays registered once, under its TXT id and its own address,
    and the registrar rejects every copy as replayed (L8)."""
    plan: Plan = {
        "cloud": {"clc": None, "cc": "cluster1"},
        "node1": {"nc": "cluster1"},
        "rogue": {},
    }
    cloud = cloud_factory(plan, mdns_backend="avahi", log_level="debug")
    cloud.start_all()
    cloud.wait_for("cloud", all_registered_ncs(1), timeout=60)
    node_id = cloud.component_id("node1", "nc")
    name = f"node-{node_id}"
    rounds = 4
    squatter = cloud.lab.spawn(
        "rogue",
        "squatter",
        [sys.executable, "-c", SQUATTER, name, str(rounds), str(cloud.lab.address("rogue"))],
    )
    squatter.wait_for_log("done", timeout=90)
    agent = cloud.agents["node1"]
    last = f"{name} #{rounds + 1}"
    agent.wait_for_log(f"established as {last!r}", timeout=30)
    assert agent.log_text().count("is taken on the network; publishing it as") >= rounds
    # The registrar has followed node1 to its last name (the proof that it heard the renames).
    # Each copy of the rogue's it resolved is rejected as a replay: its addr= is node1's, its A
    # record the rogue's. (Whether the registrar's daemon resolves the rogue's copies at all
    # depends on its cache: under load in CI it resolved only node1's; so any is a replay.)
    cloud.agents["cloud"].wait_for_log(f"avahi resolver: {last} on interface", timeout=30)
    events = cloud.events("cloud", f"&component={node_id}")
    decided = [e for e in events if e["kind"] in ("rejected", "refused")]
    assert decided == _replays(events), decided
    rows = [r for r in cloud.registry("cloud") if r["role"] == "nc"]
    assert [(r["component_id"], r["status"]) for r in rows] == [(node_id, "registered")], rows
    assert str(cloud.lab.address("rogue")) not in json.dumps(rows)
    node_calls = [line for line in cloud.hook_log("cloud") if line.startswith("node ")]
    assert len(node_calls) == 1, node_calls
    assert not agent.exited() and "Traceback" not in agent.log_text()


def _replays(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["kind"] == "rejected" and e.get("code") == "replayed"]


# -- a flood of instances -------------------------------------------------------------------------

FLOOD = """
import asyncio, socket, sys
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

TYPE = "_eucalyptus._tcp.local."
count, address = int(sys.argv[1]), sys.argv[2]

async def main():
    zc = AsyncZeroconf(ip_version=IPVersion.V4Only)
    for start in range(0, count, 50):  # in batches: each is a probe and an announcement
        infos = [
            AsyncServiceInfo(TYPE, f"flood-{i:04d}.{TYPE}", port=8773,
                             properties={"txtvers": "1", "protovers": "1", "type": "node",
                                         "cluster": "cluster1", "id": f"nc-{i:012x}",
                                         "addr": address},
                             addresses=[socket.inet_aton(address)], server="flood.local.")
            for i in range(start, min(count, start + 50))
        ]
        waits = [await zc.async_register_service(i, cooperating_responders=True) for i in infos]
        await asyncio.gather(*waits)
    print("flooded", count, flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


@pytest.mark.slow
def test_a_flood_of_instances_on_a_daemon_short_of_objects(cloud_factory: CloudFactory) -> None:
    """A rogue announces 300 instances. The registrar's avahi-daemon allows its agent 40
    objects: it resolves what it cannot keep a resolver for once, hears every flooded
    instance, rejects each (no fp=), and still registers the real NC."""
    count = 300
    plan: Plan = {
        "cloud": {"clc": None, "cc": "cluster1"},
        "node1": {"nc": "cluster1"},
        "rogue": {},
    }
    cloud = cloud_factory(
        plan,
        mdns_backend="avahi",
        avahi_options={"cloud": {"objects-per-client-max": 40}},
        log_level="debug",
    )
    flood = cloud.lab.spawn(
        "rogue", "flood", [sys.executable, "-c", FLOOD, str(count), str(cloud.lab.address("rogue"))]
    )
    flood.wait_for_log(f"flooded {count}", timeout=120)
    cloud.start_all()
    cloud.wait_for("cloud", all_registered_ncs(1), timeout=90)
    agent = cloud.agents["cloud"]
    agent.wait_for_log("refuses more objects for this client", timeout=30)
    wait_until(
        lambda: agent.log_text().count("avahi resolver: flood-") >= count, 120, "every flooded one"
    )
    log = agent.log_text()
    assert not agent.exited() and "Traceback" not in log
    # Room was made once, not by every resolution in flight when the daemon first refused
    # (each freeing the same resolvers again: the daemon's UnknownObject, a warning each).
    assert log.count("resolvers for room") == 1, log.count("resolvers for room")
    assert "UnknownObject" not in log
    rows = [r for r in cloud.registry("cloud") if r["role"] == "nc"]
    assert [r["component_id"] for r in rows] == [cloud.component_id("node1", "nc")], rows
    # Our own services are still announced, under their own names.
    names = avahi_browse_names(cloud, "node1")
    assert f"cloud-{cloud.component_id('cloud', 'clc')}" in names
    assert not any(n.endswith("#2") for n in names if not n.startswith("flood-"))
