"""Attacks on the end of a CA handover in a running CLC (agent/service.py, `_end_overlap_at`,
`_overlap_ended`, `_choose`): once the overlap ends, a client certificate of the old CA must be
refused whatever server name the client sends (none, an IP, the CC's on a CLC-only host, an
unknown one), also on a TLS session resumed from a handshake made during the overlap; and a
connection kept alive across the end, and an agent stopped during the timer, are looked at.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import ssl
import time
from pathlib import Path

import pytest

from eucareg.agent.host import Agent
from eucareg.agent.rotation import MIN_OVERLAP, rotate
from eucareg.core.model import Role
from eucareg.pki import certificates, tls
from eucareg.pki import credentials as cred
from tests.unit.test_agent_fakes import FakeMdns, key, make_config, seed_identity
from tests.unit.test_attack_tls import TIMING, loopback_only
from tests.unit.test_rotation_handover import issue
from tests.unit.test_rotation_overlap_end import client_files

CLC_ID = "clc-00000000c10d"
LEFT = 4.0  # seconds of overlap left when the agent starts
NAMES = [None, "127.0.0.1", tls.SERVER_NAMES[Role.CC], tls.SERVER_NAMES[Role.CLC], "x.invalid"]
REQUEST = b"GET /v1/health HTTP/1.1\r\nHost: clc\r\n\r\n"


def client_context(client: tls.ClientCert) -> ssl.SSLContext:
    """A client presenting `client`'s certificate, not checking the server (only whether the
    server takes our certificate is looked at)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(client.chain, client.key)
    return ctx


def ask(
    port: int,
    ctx: ssl.SSLContext,
    name: str | None,
    session: ssl.SSLSession | None = None,
    sock: ssl.SSLSocket | None = None,
) -> tuple[int, ssl.SSLSocket | None]:
    """The status of GET /v1/health (0: refused), and the connection when it is kept open."""
    try:
        if sock is None:
            raw = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock = ctx.wrap_socket(raw, server_hostname=name, session=session)
        sock.sendall(REQUEST)
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(4096)
            if not data:
                return 0, None
            head += data
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        body = head.split(b"\r\n\r\n", 1)[1]
        while len(body) < length:
            body += sock.recv(4096)
        return int(head.split()[1]), sock
    except (OSError, ssl.SSLError):
        if sock is not None:
            sock.close()
        return 0, None


async def started_clc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Agent, float, tls.ClientCert]:
    """A running CLC whose rotation's overlap ends LEFT seconds from now, and a Walrus client
    certificate of the old CA."""
    loopback_only(monkeypatch)
    state = tmp_path / "state"
    seed_identity(state, Role.CLC, CLC_ID, key(4))
    cfg = dataclasses.replace(make_config(tmp_path, {"clc": {}}), api_port=0)
    first = Agent(cfg, backend=FakeMdns(), timing=TIMING)
    await first.start()
    await first.stop()
    old_cert = certificates.load_cert(cfg.key_dir / cred.CLOUD_CERT)
    made = time.time() - (MIN_OVERLAP - LEFT)
    rotated = await asyncio.to_thread(rotate, state, cfg.key_dir, MIN_OVERLAP, made)
    own, walrus = issue(key(4), old_cert, Role.WALRUS, "walrus-00000000000a")
    agent = Agent(cfg, backend=FakeMdns(), timing=TIMING)
    await agent.start()
    return agent, rotated.overlap_ends, client_files(tmp_path, own, walrus)


async def ended(agent: Agent, ends: float) -> None:
    """Wait (bounded) until the agent has rebuilt its contexts without the handover: the
    contexts replaced, and no end timer armed (a rebuild during the overlap arms one again).
    The event that proves the decision was made, not a fixed sleep."""
    service = agent.service
    assert service is not None
    first = service._contexts[Role.CLC]
    deadline = ends + 15
    while time.time() < deadline:
        if service._contexts.get(Role.CLC) is not first and service._overlap_timer is None:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the overlap's end was not acted on")


async def test_every_server_name_is_refused_an_old_ca_certificate_after_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent, ends, client = await started_clc(tmp_path, monkeypatch)
    try:
        assert agent.service is not None
        port = agent.service.port
        ctx = client_context(client)
        assert time.time() < ends - 1, "the test machine is too slow"
        for name in NAMES:  # during the overlap: taken, whatever the name
            status, sock = await asyncio.to_thread(ask, port, ctx, name)
            assert status == 200, name
            assert sock is not None
            sock.close()
        await ended(agent, ends)
        for name in NAMES:
            status, _ = await asyncio.to_thread(ask, port, ctx, name)
            assert status == 0, f"server name {name!r} still takes an old-CA certificate"
    finally:
        await agent.stop()


async def test_a_connection_kept_alive_across_the_end_is_still_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Documents a limit: the client certificate is checked at the handshake only, so a
    connection opened during the overlap and kept alive (requests within the keep-alive
    timeout, or a long-poll) is served after the end. Requests are signed by the component's
    key as well, so it gives nobody more than the overlap gave: a component that has not
    moved keeps its transport until it reconnects."""
    agent, ends, client = await started_clc(tmp_path, monkeypatch)
    sock: ssl.SSLSocket | None = None
    try:
        assert agent.service is not None
        port = agent.service.port
        status, sock = await asyncio.to_thread(ask, port, client_context(client), None)
        assert status == 200 and sock is not None
        await ended(agent, ends)
        status, sock = await asyncio.to_thread(ask, port, client_context(client), None, None, sock)
        assert status == 200
    finally:
        if sock is not None:
            sock.close()
        await agent.stop()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
async def test_a_session_resumed_after_the_end_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: ssl.TLSVersion
) -> None:
    agent, ends, client = await started_clc(tmp_path, monkeypatch)
    try:
        assert agent.service is not None
        port = agent.service.port
        ctx = client_context(client)
        ctx.maximum_version = version  # TLS 1.3 tickets; TLS 1.2 session ids
        status, sock = await asyncio.to_thread(ask, port, ctx, None)
        assert status == 200 and sock is not None
        session = sock.session  # the tickets came with the response
        sock.close()
        assert session is not None
        await ended(agent, ends)
        # A fresh, full handshake is refused: the end took effect ...
        status, _ = await asyncio.to_thread(ask, port, client_context(client), None)
        assert status == 0
        # ... and so must a resumption of the session made during the overlap.
        status, sock = await asyncio.to_thread(ask, port, ctx, None, session)
        reused = sock.session_reused if sock is not None else False
        if sock is not None:
            sock.close()
        assert status == 0, f"served on a resumed session (reused={reused})"
    finally:
        await agent.stop()


async def test_an_agent_stopped_before_the_end_leaves_no_timer_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent, ends, _ = await started_clc(tmp_path, monkeypatch)
    service = agent.service
    assert service is not None
    timer = service._overlap_timer
    assert timer is not None and not timer.cancelled()
    assert abs(timer.when() - asyncio.get_running_loop().time() - (ends - time.time() + 1)) < 1
    await agent.stop()
    assert timer.cancelled()
    assert service._overlap_task is None  # it never ran, so nothing acts on a closed registrar
    assert service._overlap_timer is timer  # close() cancels it, and leaves it set: harmless
