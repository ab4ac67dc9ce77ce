"""Attacks on the Avahi backend that need no lab: forged D-Bus signals (any local client may send
signals on the system bus), buses that are not what `auto` hopes for (a service that owns
org.freedesktop.Avahi but is not avahi-daemon, one that never answers, a socket that never
speaks, garbage addresses), and nasty avahi-daemon.conf files for eucareg-avahi-limits.

The buses here are private dbus-daemons on unix sockets in tmp_path, never the machine's own.
(With real avahi-daemons in lab namespaces: tests/integration/test_attack_avahi.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.machinery
import importlib.util
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from eucareg.mdns import avahi_dbus as ad
from eucareg.mdns.avahi_backend import AvahiBackend
from eucareg.mdns.choice import ChosenBackend
from eucareg.mdns.types import ServiceSpec, Sighting

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "packaging" / "avahi" / "eucareg-avahi-limits"
FRAGMENT = ROOT / "packaging" / "avahi" / "eucareg-limits.conf"

needs_dbus = pytest.mark.skipif(
    shutil.which("dbus-daemon") is None, reason="dbus-daemon not installed (apt-get install dbus)"
)

# -- forged signals -------------------------------------------------------------------------------

AVAHI_OWNER = ":1.7"
ROGUE = ":1.66"


def signal(
    sender: str, path: str, interface: str, member: str, sig: str, body: list[Any]
) -> Message:
    return Message(
        message_type=MessageType.SIGNAL,
        sender=sender,
        path=path,
        interface=interface,
        member=member,
        signature=sig,
        body=body,
    )


def found(sender: str, path: str, name: str, txt: list[bytes], address: str) -> Message:
    body = [2, 0, name, "_eucalyptus._tcp", "local", "h.local", 0, address, 8773, txt, 0]
    return signal(sender, path, ad.SERVICE_RESOLVER, "Found", "iissssisqaayu", body)


def owner_changed(sender: str, old: str, new: str) -> Message:
    return signal(sender, ad.BUS_PATH, ad.BUS, "NameOwnerChanged", "sss", [ad.AVAHI, old, new])


class Spy:
    """A backend whose parts exist but whose daemon calls are never made: what the signal
    handler does with a message is all that is looked at."""

    def __init__(self) -> None:
        self.backend = AvahiBackend()
        self.sightings: list[Sighting] = []
        self.spawned: list[str] = []
        backend = self.backend
        backend._bus = object()  # type: ignore[assignment]
        backend._owner = AVAHI_OWNER
        backend._running = True
        from eucareg.mdns.avahi_browse import AvahiBrowser, _Item
        from eucareg.mdns.avahi_publish import AvahiPublisher, _Group

        browser = AvahiBrowser(backend._bus, 0, self.sightings.append)  # type: ignore[arg-type]
        publisher = AvahiPublisher(backend._bus, 0, False)  # type: ignore[arg-type]
        backend._browser, backend._publisher = browser, publisher
        # One service heard, with a resolver of ours, and one of ours published.
        key = (2, 0, "node-abc")
        browser.items[key] = _Item(key, "local", resolver="/Client1/ServiceResolver1")
        browser.by_resolver["/Client1/ServiceResolver1"] = key
        spec = ServiceSpec("node-me", 8775, {"role": "nc"}, ("10.0.0.5",), "me.local.")
        publisher.specs["node-me"] = spec
        publisher.groups["node-me"] = _Group("/Client1/EntryGroup1", "node-me", spec)

        def spawn(coro: Any) -> None:
            self.spawned.append(coro.__qualname__)
            coro.close()

        backend._spawn = spawn  # type: ignore[method-assign]
        publisher.spawn = spawn


async def test_a_resolver_found_signal_from_another_client_is_not_a_sighting() -> None:
    spy = Spy()
    forged = found(ROGUE, "/Client1/ServiceResolver1", "node-abc", [b"role=nc"], "10.6.6.6")
    spy.backend._on_message(forged)
    assert spy.sightings == []
    # The same signal from avahi-daemon's own connection is one (so the check above means
    # something).
    spy.backend._on_message(
        found(AVAHI_OWNER, "/Client1/ServiceResolver1", "node-abc", [b"role=nc"], "10.0.0.9")
    )
    assert [(s.instance, s.addresses) for s in spy.sightings] == [("node-abc", ("10.0.0.9",))]


def test_a_forged_name_owner_changed_does_not_make_us_forget_or_publish_twice() -> None:
    """Were it believed, a forged 'Avahi left' would drop every sighting and forget our groups
    (still held by the daemon), and a forged 'Avahi is back' would publish them all again:
    each service twice, the second renamed."""
    spy = Spy()
    spy.backend._on_message(owner_changed(ROGUE, AVAHI_OWNER, ""))
    spy.backend._on_message(owner_changed(ROGUE, "", ROGUE))
    assert spy.backend.running
    assert spy.backend._owner == AVAHI_OWNER
    assert spy.backend._publisher is not None and "node-me" in spy.backend._publisher.groups
    assert spy.sightings == [] and spy.spawned == []
    # From the bus itself, the same signal is believed.
    spy.backend._on_message(owner_changed(ad.BUS, AVAHI_OWNER, ""))
    assert not spy.backend.running and spy.backend._owner is None
    assert spy.backend._publisher.groups == {}


def test_forged_entry_group_and_server_states_are_ignored() -> None:
    spy = Spy()
    for state in (ad.GROUP_COLLISION, ad.GROUP_FAILURE):
        spy.backend._on_message(
            signal(
                ROGUE, "/Client1/EntryGroup1", ad.ENTRY_GROUP, "StateChanged", "is", [state, "x"]
            )
        )
    spy.backend._on_message(signal(ROGUE, "/", ad.SERVER, "StateChanged", "is", [1, ""]))
    assert spy.spawned == [] and spy.backend.running
    assert spy.backend._publisher is not None
    assert spy.backend._publisher.groups["node-me"].retry is None
    # avahi-daemon's own collision is acted on: a rename.
    spy.backend._on_message(
        signal(AVAHI_OWNER, "/Client1/EntryGroup1", ad.ENTRY_GROUP, "StateChanged", "is", [3, ""])
    )
    assert spy.spawned == ["AvahiPublisher._rename"]


async def test_forged_signals_for_unknown_paths_are_not_kept() -> None:
    spy = Spy()
    assert spy.backend._browser is not None
    for n in range(50):
        spy.backend._on_message(
            found(ROGUE, f"/Client1/ServiceResolver{100 + n}", "x", [], "1.2.3.4")
        )
    assert len(spy.backend._browser.early) == 0


# -- a flood against objects-per-client-max --------------------------------------------------------


async def test_a_flood_of_refusals_makes_room_once_and_frees_each_resolver_once() -> None:
    """Found with 300 flooded instances and objects-per-client-max=40 (the lab test in
    tests/integration/test_attack_avahi.py): every resolution in flight when the daemon first
    refused (up to 64) made room, each freeing the same 4 resolvers again (UnknownObject from
    the daemon, and a "freed 4 resolvers" warning each time)."""
    from eucareg.mdns.avahi_browse import AvahiBrowser, _Item

    browser = AvahiBrowser(object(), 0, lambda s: None)  # type: ignore[arg-type]
    for n in range(10):
        key = (2, 0, f"kept-{n}")
        browser.items[key] = _Item(key, "local", resolver=f"/Client0/ServiceResolver{n}")
        browser.items[key].view = ({"type": "node"}, ("10.0.0.9",))  # answered
        browser.by_resolver[f"/Client0/ServiceResolver{n}"] = key
    freed: list[str] = []
    once: list[str] = []

    async def free(path: str) -> None:
        await asyncio.sleep(0)
        freed.append(path)

    async def refuse(args: list[Any]) -> str:
        await asyncio.sleep(0)
        raise ad.AvahiError("org.freedesktop.Avahi.TooManyObjectsError", "Too many objects")

    async def resolve_once(item: _Item, args: list[Any]) -> None:
        once.append(item.key[2])

    browser._free = free  # type: ignore[method-assign]
    browser._new_resolver = refuse  # type: ignore[method-assign]
    browser._resolve_once = resolve_once  # type: ignore[method-assign]
    new = []
    for n in range(30):
        key = (2, 0, f"flood-{n}")
        new.append(browser.items.setdefault(key, _Item(key, "local")))
    await asyncio.gather(*(browser._resolve(item) for item in new))
    assert len(freed) == len(set(freed)) == 4, freed
    assert sorted(once) == sorted(f"flood-{n}" for n in range(30))
    assert len([i for i in browser.items.values() if i.resolver]) == 6
    # Concurrent make_room calls (publishing wants room too) free different resolvers.
    freed.clear()
    results = await asyncio.gather(*(browser.make_room(4) for _ in range(3)))
    assert len(freed) == len(set(freed)) == 6 and results == [True, True, False]


async def test_making_room_never_leaves_a_service_unheard() -> None:
    """Found with the same flood: the agent's own CLC and CC are heard first (Avahi reports a
    local service at once) and got the first resolvers, which had not answered when the daemon
    first refused; making room freed them, and they were never resolved: the registrar never
    heard its own CC, so no NC was registered. Answered resolvers go first now, and one freed
    before it answered is resolved once instead."""
    from eucareg.mdns.avahi_browse import AvahiBrowser, _Item

    browser = AvahiBrowser(object(), 0, lambda s: None)  # type: ignore[arg-type]
    ours = []
    for n, name in enumerate(["cloud-clc-1", "cluster-cc-1", *(f"flood-{i}" for i in range(5))]):
        key = (2, 0, name)
        item = _Item(key, "local", resolver=f"/Client0/ServiceResolver{n}")
        if name.startswith("flood-"):
            item.view = ({"type": "node"}, ("10.0.0.9",))
        else:
            ours.append(item)
        browser.items[key] = item
        browser.by_resolver[item.resolver or ""] = key
    freed: list[str] = []
    once: list[str] = []

    async def free(path: str) -> None:
        freed.append(path)

    async def resolve_once(item: _Item, args: list[Any]) -> None:
        once.append(item.key[2])

    browser._free = free  # type: ignore[method-assign]
    browser._resolve_once = resolve_once  # type: ignore[method-assign]
    assert await browser.make_room(4)
    assert sorted(freed) == [f"/Client0/ServiceResolver{n}" for n in range(2, 6)]
    assert all(item.resolver for item in ours) and once == []
    # With no answered resolver left to free, ours are freed too, and resolved once.
    assert await browser.make_room(4)
    await asyncio.gather(*browser.tasks)
    assert sorted(once) == ["cloud-clc-1", "cluster-cc-1"]


# -- what `auto` makes of strange buses -----------------------------------------------------------


@pytest.fixture
def private_bus(tmp_path: Path) -> Iterator[str]:
    """A dbus-daemon of our own on a unix socket (session policy: any client may own any name)."""
    if shutil.which("dbus-daemon") is None:
        pytest.skip("dbus-daemon not installed (apt-get install dbus)")
    address = f"unix:path={tmp_path}/bus"
    proc = subprocess.Popen(
        ["dbus-daemon", "--session", f"--address={address}", "--nofork", "--print-address=1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once it listens
        assert line.startswith("unix:path="), line
        yield address
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextlib.asynccontextmanager
async def fake_avahi(address: str, *, hang: bool) -> AsyncIterator[MessageBus]:
    """A client that owns org.freedesktop.Avahi and is not avahi-daemon: it answers every
    call with UnknownMethod (dbus-fast's answer for what it does not handle), or never."""
    bus = await MessageBus(bus_address=address).connect()
    if hang:
        bus.add_message_handler(lambda m: m.message_type is MessageType.METHOD_CALL)
    await bus.request_name(ad.AVAHI)
    try:
        yield bus
    finally:
        bus.disconnect()


@pytest.mark.parametrize("hang", [False, True], ids=["unknown-method", "never-answers"])
async def test_auto_refuses_a_service_that_owns_the_avahi_name_but_is_not_avahi(
    private_bus: str, hang: bool
) -> None:
    async with fake_avahi(private_bus, hang=hang):
        started = time.monotonic()
        probe = await ad.probe(private_bus)
        took = time.monotonic() - started
    assert not probe.usable, probe
    assert "does not answer as avahi-daemon" in probe.reason, probe.reason
    assert took < ad.PROBE_DEADLINE + 1


async def test_auto_with_a_fake_avahi_starts_python_zeroconf(
    private_bus: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", private_bus)
    made: list[str] = []

    class Inner:
        def __init__(self, name: str) -> None:
            self.name = name

        async def start(self) -> None:
            made.append(self.name)

        async def close(self) -> None:
            pass

    monkeypatch.setattr("eucareg.mdns.choice.make", lambda name, ipv6: Inner(name))
    async with fake_avahi(private_bus, hang=False):
        chosen = ChosenBackend("auto", ipv6=False)
        await chosen.start()
    assert made == ["zeroconf"]
    assert chosen.describe()["backend"] == "zeroconf"
    assert "does not answer as avahi-daemon" in chosen.reason


@pytest.fixture
def silent_socket(tmp_path: Path) -> Iterator[tuple[str, list[socket.socket]]]:
    """A unix socket that accepts connections and never says a word."""
    path = tmp_path / "silent"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"unix:path={path}", held
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        server.close()


async def test_a_bus_socket_that_never_answers_does_not_hang_the_start(
    silent_socket: tuple[str, list[socket.socket]],
) -> None:
    started = time.monotonic()
    probe = await ad.probe(silent_socket[0])
    assert time.monotonic() - started < ad.PROBE_TIMEOUT + 2
    assert not probe.usable and probe.reason.startswith("no system bus"), probe.reason


@pytest.mark.parametrize(
    "address",
    ["garbage", "unix:", "tcp:host=", "unix:path=/dev/null", "nonsense:foo=bar", "unix:path=\x01"],
)
async def test_garbage_bus_addresses_mean_no_avahi_with_the_address_named(address: str) -> None:
    probe = await asyncio.wait_for(ad.probe(address), ad.PROBE_DEADLINE + 1)
    assert not probe.usable
    assert probe.reason.startswith("no system bus: connect: cannot reach"), probe.reason


async def test_garbage_in_the_environment_gives_zeroconf_under_auto(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", "definitely not an address")
    probe = await asyncio.wait_for(ad.probe(), ad.PROBE_DEADLINE + 1)
    assert not probe.usable and "definitely not an address" in probe.reason


async def test_the_probe_closes_what_it_opened_on_a_silent_socket(
    silent_socket: tuple[str, list[socket.socket]],
) -> None:
    """A socket that never answered is closed when the probe gives up (an agent probes once,
    but `eucareg check-config` and `discover` probe too): the other end sees end of file."""
    address, held = silent_socket
    await ad.probe(address)
    await ad.probe(address)
    assert len(held) == 2

    def closed(conn: socket.socket) -> bool:
        conn.settimeout(2)
        try:
            while conn.recv(4096):
                pass  # what dbus-fast sent before waiting (its AUTH line)
        except TimeoutError:
            return False
        return True

    assert [closed(conn) for conn in held] == [True, True]


# -- eucareg-avahi-limits on nasty files ----------------------------------------------------------


def load() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("eucareg_avahi_limits_attack", str(SCRIPT))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


LIMITS = {"objects-per-client-max": 8192, "cache-entries-max": 16384}


def run(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, str(SCRIPT), "--config", str(config), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def test_keys_and_sections_match_without_regard_to_case_as_avahi_reads_them() -> None:
    """avahi-daemon compares keys and group names with strcasecmp: `Objects-Per-Client-Max=100`
    is the key, and adding a second one would leave which wins to the order of lines."""
    text = (
        "[Server]\nObjects-Per-Client-Max=100\n#cache-entries-max=4096\nCache-Entries-Max=99999\n"
    )
    merged, changes = load().merge(text, LIMITS)
    assert merged == (
        "[Server]\nobjects-per-client-max=8192\n#cache-entries-max=4096\nCache-Entries-Max=99999\n"
    )
    assert changes == ["objects-per-client-max: 100 -> 8192"]


def test_duplicate_keys_are_each_raised_and_a_second_run_changes_nothing() -> None:
    limits = load()
    text = (
        "[server]\nobjects-per-client-max=100\nobjects-per-client-max=99999\n"
        "objects-per-client-max=7\n"
    )
    merged, changes = limits.merge(text, {"objects-per-client-max": 8192})
    assert merged.splitlines()[1:] == [
        "objects-per-client-max=8192",
        "objects-per-client-max=99999",
        "objects-per-client-max=8192",
    ]
    assert len(changes) == 2
    assert limits.merge(merged, {"objects-per-client-max": 8192}) == (merged, [])


def test_crlf_files_keep_their_line_ends(tmp_path: Path) -> None:
    config = tmp_path / "avahi-daemon.conf"
    original = (
        b"# crlf\r\n[server]\r\nuse-ipv4=yes\r\n#cache-entries-max=4096\r\n\r\n[publish]\r\nx=1\r\n"
    )
    config.write_bytes(original)
    assert run(config).returncode == 0
    data = config.read_bytes()
    assert b"\n" not in data.replace(b"\r\n", b""), data  # no bare LF came in
    assert b"\r\ncache-entries-max=16384\r\n" in data
    assert b"\r\nobjects-per-client-max=8192\r\n" in data
    assert b"[publish]\r\nx=1\r\n" in data
    assert run(config, "--check").returncode == 0  # idempotent
    assert (tmp_path / "avahi-daemon.conf.eucareg-bak").read_bytes() == original


def test_a_symlinked_config_keeps_its_link_and_the_target_is_merged(tmp_path: Path) -> None:
    real = tmp_path / "managed" / "avahi-daemon.conf"
    real.parent.mkdir()
    real.write_text("[server]\nuse-ipv4=yes\n")
    link = tmp_path / "etc-avahi-daemon.conf"
    link.symlink_to(real)
    result = run(link)
    assert result.returncode == 0, result.stderr
    assert link.is_symlink() and link.resolve() == real
    assert "objects-per-client-max=8192" in real.read_text().splitlines()
    assert run(link, "--check").returncode == 0


def test_comments_blank_lines_and_no_server_section(tmp_path: Path) -> None:
    config = tmp_path / "avahi-daemon.conf"
    config.write_text("# only comments\n\n; and this\n")
    assert run(config).returncode == 0
    text = config.read_text()
    assert text.startswith("[server]\n") and "# only comments" in text
    assert run(config, "--check").returncode == 0
    empty = tmp_path / "empty.conf"
    empty.write_text("")
    assert run(empty).returncode == 0 and run(empty, "--check").returncode == 0


def test_a_read_only_file_system_is_a_clear_error_and_the_file_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """/etc mounted read-only: no new file can be made next to the config (as root, only a
    read-only mount refuses, so the refusal is the one the kernel gives: EROFS)."""
    limits = load()
    config = tmp_path / "avahi-daemon.conf"
    config.write_text("[server]\n")

    def refuse(**_: Any) -> tuple[int, str]:
        raise OSError(30, "Read-only file system", str(tmp_path))

    monkeypatch.setattr(limits.tempfile, "mkstemp", refuse)
    monkeypatch.setattr(sys, "argv", ["eucareg-avahi-limits", "--config", str(config)])
    assert limits.main() == 2
    err = capsys.readouterr().err
    assert "left as it was" in err and "Read-only file system" in err, err
    assert config.read_text() == "[server]\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".avahi")] == []


def test_a_config_that_is_not_utf8_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "avahi-daemon.conf"
    config.write_bytes(b"[server]\nhost-name=\xff\xfe\n")
    result = run(config)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert str(config) in result.stderr
    assert config.read_bytes() == b"[server]\nhost-name=\xff\xfe\n"
