"""The thin D-Bus layer under the Avahi backend: avahi-daemon's constants, one call helper that
turns D-Bus errors into AvahiError, TXT strings to and from Avahi's `aay`, and the probe that
tells whether the avahi-daemon on a bus runs in our own network namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

log = logging.getLogger(__name__)

AVAHI = "org.freedesktop.Avahi"
SERVER = "org.freedesktop.Avahi.Server"
SERVER2 = "org.freedesktop.Avahi.Server2"  # Avahi 0.8: ...Prepare + Start, race-free
ENTRY_GROUP = "org.freedesktop.Avahi.EntryGroup"
SERVICE_BROWSER = "org.freedesktop.Avahi.ServiceBrowser"
SERVICE_RESOLVER = "org.freedesktop.Avahi.ServiceResolver"
BUS = "org.freedesktop.DBus"
BUS_PATH = "/org/freedesktop/DBus"

IF_UNSPEC = -1
PROTO_INET = 0
PROTO_UNSPEC = -1

# AvahiServerState
SERVER_RUNNING = 2
# AvahiEntryGroupState
GROUP_UNCOMMITED, GROUP_REGISTERING, GROUP_ESTABLISHED, GROUP_COLLISION, GROUP_FAILURE = range(5)
# AvahiPublishFlags
PUBLISH_NO_REVERSE = 16
# AvahiLookupResultFlags: the answer comes from this host's own daemon
LOOKUP_RESULT_LOCAL = 8

# How long one call may take: avahi-daemon answers at once or not at all.
CALL_TIMEOUT = 10.0
PROBE_TIMEOUT = 3.0
PROBE_DEADLINE = 8.0  # the whole probe: an agent's start must not hang on a silent bus
MAX_TXT_STRING = 255  # one TXT string is length-prefixed by one byte (RFC 6763 section 6.1)


class AvahiError(Exception):
    """A D-Bus call to avahi-daemon (or the bus) failed; `name` is the D-Bus error name."""

    def __init__(self, name: str, text: str) -> None:
        super().__init__(f"{name}: {text}" if text else name)
        self.name = name


async def connect(bus_address: str | None) -> MessageBus:
    """The system bus (DBUS_SYSTEM_BUS_ADDRESS, else /run/dbus/system_bus_socket), or the
    given address; OSError-like failures are raised as AvahiError with what was tried."""
    where = bus_address or os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or "the system bus"
    bus: MessageBus | None = None
    try:
        bus = MessageBus(bus_address=bus_address, bus_type=BusType.SYSTEM)
        return await asyncio.wait_for(bus.connect(), PROBE_TIMEOUT)
    except Exception as exc:
        if bus is not None:  # a socket that answered nothing in time is not kept open
            with contextlib.suppress(Exception):
                bus.disconnect()
        raise AvahiError("connect", f"cannot reach {where}: {exc!r}") from exc


async def call(
    bus: MessageBus,
    path: str,
    interface: str,
    member: str,
    signature: str = "",
    body: Iterable[Any] = (),
    *,
    destination: str = AVAHI,
    timeout: float = CALL_TIMEOUT,
) -> list[Any]:
    """One method call; its reply's body, or AvahiError."""
    message = Message(
        destination=destination,
        path=path,
        interface=interface,
        member=member,
        signature=signature,
        body=list(body),
    )
    try:
        reply = await asyncio.wait_for(bus.call(message), timeout)
    except TimeoutError:
        raise AvahiError("timeout", f"{interface}.{member} got no answer in {timeout}s") from None
    except (OSError, EOFError) as exc:
        raise AvahiError("disconnected", f"{interface}.{member}: {exc!r}") from exc
    if reply is None:
        raise AvahiError("disconnected", f"{interface}.{member}: no reply")
    if reply.message_type is MessageType.ERROR:
        text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
        raise AvahiError(reply.error_name or "error", text)
    return list(reply.body)


def too_many_objects(exc: AvahiError) -> bool:
    """avahi-daemon's objects-per-client-max (or clients-max) was reached."""
    return exc.name.endswith("TooManyObjectsError") or exc.name.endswith("TooManyClientsError")


async def add_match(bus: MessageBus, rule: str) -> None:
    await call(bus, BUS_PATH, BUS, "AddMatch", "s", [rule], destination=BUS)


# -- TXT ----------------------------------------------------------------------------------------


def txt_strings(txt: Mapping[str, str]) -> list[bytes]:
    """`key=value` strings as Avahi's AddService takes them (`aay`), in the spec's order, as
    python-zeroconf encodes them; a string over 255 bytes is refused here, by name."""
    out = []
    for key, value in txt.items():
        item = key.encode("utf-8") + b"=" + value.encode("utf-8")
        if len(item) > MAX_TXT_STRING:
            raise ValueError(
                f"TXT string {key}= is {len(item)} bytes; DNS-SD allows {MAX_TXT_STRING}"
            )
        out.append(item)
    return out


def txt_properties(strings: Iterable[bytes]) -> dict[bytes, bytes | None]:
    """Avahi's TXT strings as python-zeroconf parses a TXT record: split at the first '=', the
    first occurrence of a key wins, a key without '=' has no value (RFC 6763 section 6.4)."""
    properties: dict[bytes, bytes | None] = {}
    for raw in strings:
        key, sep, value = bytes(raw).partition(b"=")
        if key not in properties:
            properties[key] = value if sep else None
    return properties


def decode_txt(strings: Iterable[bytes]) -> dict[str, str]:
    """TXT keys and values as text, by the zeroconf backend's rules: keys ASCII and lowered,
    values UTF-8; undecodable or value-less keys are dropped, not guessed."""
    out: dict[str, str] = {}
    for key, value in txt_properties(strings).items():
        if value is None:
            continue
        try:
            out[key.decode("ascii").lower()] = value.decode("utf-8")
        except UnicodeDecodeError:
            continue
    return out


# -- which namespace ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """Whether the Avahi backend may be used here, and why (logged, shown by status)."""

    usable: bool
    reason: str


def same_netns(pid: int, proc: Path = Path("/proc")) -> Probe:
    """Whether process `pid` shares our network namespace; undeterminable counts as no."""
    try:
        theirs = os.readlink(proc / str(pid) / "ns" / "net")
        ours = os.readlink(proc / "self" / "ns" / "net")
    except OSError as exc:
        return Probe(False, f"cannot tell avahi-daemon (pid {pid})'s network namespace: {exc}")
    if theirs != ours:
        return Probe(
            False,
            f"avahi-daemon (pid {pid}) runs in another network namespace ({theirs}, ours "
            f"{ours}); it would announce on that namespace's network, not ours",
        )
    return Probe(True, f"avahi-daemon (pid {pid}) runs in this network namespace")


async def probe(bus_address: str | None = None, proc: Path = Path("/proc")) -> Probe:
    """Whether an avahi-daemon owns org.freedesktop.Avahi on the system bus (or the given one),
    runs in our network namespace (`ip netns exec` leaves the host's bus reachable) and answers
    as avahi-daemon; within PROBE_DEADLINE, whatever the bus does."""
    try:
        return await asyncio.wait_for(_probe(bus_address, proc), PROBE_DEADLINE)
    except TimeoutError:
        return Probe(False, f"the system bus did not answer the probe in {PROBE_DEADLINE:.0f}s")


async def _probe(bus_address: str | None, proc: Path) -> Probe:
    try:
        bus = await connect(bus_address)
    except AvahiError as exc:
        return Probe(False, f"no system bus: {exc}")
    try:
        try:
            await call(
                bus,
                BUS_PATH,
                BUS,
                "GetNameOwner",
                "s",
                [AVAHI],
                destination=BUS,
                timeout=PROBE_TIMEOUT,
            )
        except AvahiError as exc:
            return Probe(False, f"avahi-daemon is not running on the bus ({exc.name})")
        try:
            (pid,) = await call(
                bus,
                BUS_PATH,
                BUS,
                "GetConnectionUnixProcessID",
                "s",
                [AVAHI],
                destination=BUS,
                timeout=PROBE_TIMEOUT,
            )
        except AvahiError as exc:
            return Probe(False, f"cannot learn avahi-daemon's process id from the bus: {exc}")
        where = same_netns(int(pid), proc)
        if not where.usable:
            return where
        return await _is_avahi(bus, where)
    finally:
        bus.disconnect()


async def _is_avahi(bus: MessageBus, where: Probe) -> Probe:
    """Whether the owner of org.freedesktop.Avahi answers as avahi-daemon does: any process
    allowed to own that name could, and then nothing we publish would be announced."""
    try:
        (version,) = await call(bus, "/", SERVER, "GetVersionString", timeout=PROBE_TIMEOUT)
        (state,) = await call(bus, "/", SERVER, "GetState", timeout=PROBE_TIMEOUT)
        if not isinstance(version, str) or not isinstance(state, int):
            raise AvahiError("reply", f"GetVersionString/GetState gave {version!r}, {state!r}")
    except (AvahiError, ValueError) as exc:
        return Probe(
            False,
            f"the owner of {AVAHI} on the bus does not answer as avahi-daemon ({exc}); "
            f"{where.reason}",
        )
    return Probe(True, where.reason)
