"""The agent's HTTP clients connect from the address their components announce, when the host
holds it, so that a registrar checking a request's source sees that address on a multi-homed
host (tests/integration/test_routed.py has the lab case); and fall back to the route's choice
otherwise. Real sockets on loopback: every 127/8 address is this host's."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from eucareg.agent.sessions import Sessions, socket_factory

TIMEOUT = aiohttp.ClientTimeout(total=10)


async def _remote(request: web.Request) -> web.Response:
    return web.Response(text=request.remote or "")


@pytest.fixture
async def echo() -> AsyncIterator[dict[str, int]]:
    """An HTTP server answering with the address each request came from, on 127.0.0.1 and,
    where the host has IPv6, on ::1."""
    app = web.Application()
    app.router.add_get("/", _remote)
    runner = web.AppRunner(app)
    await runner.setup()
    ports: dict[str, int] = {}
    try:
        for host in ("127.0.0.1", "::1"):
            try:
                site = web.TCPSite(runner, host, 0)
                await site.start()
            except OSError:
                continue  # no IPv6 on this host
            server = site._server
            assert isinstance(server, asyncio.Server)
            ports[host] = server.sockets[0].getsockname()[1]
        yield ports
    finally:
        await runner.cleanup()


async def seen_from(session: aiohttp.ClientSession, host: str, port: int) -> str:
    url = f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"
    # A new connection each time: the source is chosen per connection.
    async with session.get(url, headers={"Connection": "close"}) as answer:
        return await answer.text()


async def test_requests_leave_from_the_announced_address(echo: dict[str, int]) -> None:
    sessions = Sessions(TIMEOUT)
    try:
        for address in ("127.0.0.2", "127.0.0.3"):
            session = sessions.for_address(ipaddress.ip_address(address))
            assert await seen_from(session, "127.0.0.1", echo["127.0.0.1"]) == address
    finally:
        await sessions.close()


async def test_an_address_the_host_lacks_leaves_from_the_routes_choice_said_once(
    echo: dict[str, int], caplog: pytest.LogCaptureFixture
) -> None:
    sessions = Sessions(TIMEOUT)
    caplog.set_level(logging.WARNING, logger="eucareg.agent.sessions")
    try:
        session = sessions.for_address(ipaddress.ip_address("192.0.2.7"))  # TEST-NET-1
        seen = [await seen_from(session, "127.0.0.1", echo["127.0.0.1"]) for _ in range(3)]
        assert seen == ["127.0.0.1"] * 3
        [warning] = [r.getMessage() for r in caplog.records]
        assert "cannot send HTTP requests from 192.0.2.7" in warning
        assert "join token" in warning
    finally:
        await sessions.close()


async def test_a_link_local_address_is_not_bound(
    echo: dict[str, int], caplog: pytest.LogCaptureFixture
) -> None:
    sessions = Sessions(TIMEOUT)
    caplog.set_level(logging.WARNING, logger="eucareg.agent.sessions")
    try:
        session = sessions.for_address(ipaddress.ip_address("169.254.7.7"))
        assert await seen_from(session, "127.0.0.1", echo["127.0.0.1"]) == "127.0.0.1"
        assert caplog.records == []  # not tried, so nothing to warn of
    finally:
        await sessions.close()


async def test_a_registrar_of_the_other_family_is_still_reached(echo: dict[str, int]) -> None:
    if "::1" not in echo:
        pytest.skip("this host has no IPv6 loopback")
    sessions = Sessions(TIMEOUT)
    try:
        v4 = sessions.for_address(ipaddress.ip_address("127.0.0.2"))
        assert await seen_from(v4, "::1", echo["::1"]) == "::1"
        v6 = sessions.for_address(ipaddress.ip_address("::1"))
        assert await seen_from(v6, "::1", echo["::1"]) == "::1"
        assert await seen_from(v6, "127.0.0.1", echo["127.0.0.1"]) == "127.0.0.1"
    finally:
        await sessions.close()


async def test_one_session_per_address_all_closed_and_none_made_after(
    echo: dict[str, int],
) -> None:
    sessions = Sessions(TIMEOUT)
    a, b = ipaddress.ip_address("127.0.0.2"), ipaddress.ip_address("127.0.0.3")
    first = sessions.for_address(a)
    assert sessions.for_address(a) is first and sessions.for_address(b) is not first
    assert not sessions.closed
    await sessions.close()
    assert sessions.closed and first.closed
    with pytest.raises(RuntimeError, match="closed"):
        sessions.for_address(a)


def test_binding_first_does_not_take_a_port_per_address() -> None:
    """IP_BIND_ADDRESS_NO_PORT: a socket bound to an address has no port until it connects
    (so binding first does not use up ephemeral ports per address)."""
    make = socket_factory(ipaddress.ip_address("127.0.0.2"))
    with make((socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 80))) as sock:
        assert sock.getsockname() == ("127.0.0.2", 0)
