"""The agent's HTTP clients, one per address its components announce. Each connects from that
address when the host holds it: a registrar checks the source of a fallback request made
without a join token against the address announced, and on a multi-homed host the kernel's
choice of source (by route) may be another of the host's addresses.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from eucareg.core.model import IPAddress

log = logging.getLogger(__name__)

# Linux: bind the address now and the port at connect(), so that binding first does not use
# up ephemeral ports per address rather than per destination. (24 is Linux's number only.)
IP_BIND_ADDRESS_NO_PORT: int | None = getattr(
    socket, "IP_BIND_ADDRESS_NO_PORT", 24 if sys.platform.startswith("linux") else None
)
NONLOCAL_BIND = {4: "/proc/sys/net/ipv4/ip_nonlocal_bind", 6: "/proc/sys/net/ipv6/ip_nonlocal_bind"}


def nonlocal_bind(version: int) -> bool:
    """Whether this namespace lets bind() take addresses it does not hold (keepalived and
    haproxy hosts turn it on for floating addresses): then a bind that works proves nothing."""
    try:
        return Path(NONLOCAL_BIND[version]).read_text().strip() != "0"
    except OSError:
        return False


def route_source_is(address: IPAddress) -> bool:
    """Whether the route to `address` leaves from `address` itself, as it does for an address
    assigned here (a UDP connect chooses the route and sends nothing)."""
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((str(address), 9))
            return bool(ipaddress.ip_address(probe.getsockname()[0]) == address)
    except (OSError, ValueError):
        return False


def socket_factory(address: IPAddress) -> Callable[[tuple[Any, ...]], socket.socket]:
    """Sockets for aiohttp's connections (its `socket_factory`), bound to `address` when the
    destination is of its family and the host holds it. A destination of the other family
    cannot be reached from it, and a link-local address needs an interface that a bare address
    does not name: those, and an address the host lacks (behind NAT, or gone), connect from
    the address the route picks, as they did before; such a component needs a join token."""
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    bindable = not address.is_link_local
    warned: set[int] = set()

    def make(addr_info: tuple[Any, ...]) -> socket.socket:
        sock_family, kind, proto = addr_info[0], addr_info[1], addr_info[2]
        sock = socket.socket(sock_family, kind, proto)
        if sock_family != family or not bindable:
            return sock
        # An older kernel refuses it: bind() then picks the port now, which works all the same.
        if IP_BIND_ADDRESS_NO_PORT is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        try:
            if nonlocal_bind(address.version) and not route_source_is(address):
                raise OSError(errno.EADDRNOTAVAIL, "not an address of this host (non-local bind)")
            sock.bind((str(address), 0))
        except OSError as exc:
            if (code := exc.errno or 0) not in warned:  # once per cause, not per connection
                warned.add(code)
                log.warning(
                    "cannot send HTTP requests from %s (%s): they leave from the address "
                    "the route picks, which a registrar accepts only with a join token",
                    address,
                    exc.strerror or exc,
                )
        return sock

    return make


class Sessions:
    """One aiohttp session per component address, made at first use, closed together."""

    def __init__(self, timeout: aiohttp.ClientTimeout) -> None:
        self.timeout = timeout
        self._by_address: dict[IPAddress, aiohttp.ClientSession] = {}
        self._closing = False

    def for_address(self, address: IPAddress) -> aiohttp.ClientSession:
        if self._closing:
            raise RuntimeError("the agent's HTTP clients are closed")
        session = self._by_address.get(address)
        if session is None:
            connector = aiohttp.TCPConnector(socket_factory=socket_factory(address))
            session = aiohttp.ClientSession(connector=connector, timeout=self.timeout)
            self._by_address[address] = session
        return session

    @property
    def closed(self) -> bool:
        """Closed, every session made with it too."""
        return self._closing and all(s.closed for s in self._by_address.values())

    async def close(self) -> None:
        self._closing = True
        for session in self._by_address.values():
            await session.close()
