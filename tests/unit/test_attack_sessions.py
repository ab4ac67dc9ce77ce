"""Attacks on the agent's per-address HTTP clients (agent/sessions.py) and on the order in which
a credential bundle's files are written (agent/collect.py `_accept`). Loopback only; the one
test that needs a host setting (ip_nonlocal_bind) makes it in a network namespace of its own,
holding nothing but its own loopback."""

from __future__ import annotations

import asyncio
import datetime
import gc
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import sys
import textwrap
import warnings
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from eucareg.agent.sessions import Sessions, socket_factory
from eucareg.core.model import Role
from eucareg.pki import credentials as cred
from eucareg.pki import handover

TIMEOUT = aiohttp.ClientTimeout(total=10)


async def _remote(request: web.Request) -> web.Response:
    return web.Response(text=request.remote or "")


async def _serve(ssl_context: ssl.SSLContext | None = None) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_get("/", _remote)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    server = site._server
    assert isinstance(server, asyncio.Server)
    return runner, server.sockets[0].getsockname()[1]


@pytest.fixture
async def plain() -> AsyncIterator[int]:
    runner, port = await _serve()
    try:
        yield port
    finally:
        await runner.cleanup()


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


# --- What holds ---------------------------------------------------------------------------


def test_an_ipv6_address_is_bound_without_a_port_too() -> None:
    """IP_BIND_ADDRESS_NO_PORT is an IPPROTO_IP option, set on AF_INET6 sockets as well: Linux
    honours it there (the port is left to connect())."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    make = socket_factory(ipaddress.ip_address("::1"))
    try:
        sock = make((socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", 80, 0, 0)))
    except OSError:
        pytest.skip("no IPv6 loopback")
    with sock:
        assert sock.getsockname()[:2] == ("::1", 0)


def test_many_bound_sockets_take_no_port_before_connect() -> None:
    """Port exhaustion: a thousand sockets bound to one address still hold no port."""
    make = socket_factory(ipaddress.ip_address("127.0.0.2"))
    socks = [
        make((socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 80))) for _ in range(1000)
    ]
    try:
        assert {s.getsockname() for s in socks} == {("127.0.0.2", 0)}
    finally:
        for s in socks:
            s.close()


async def test_https_leaves_from_the_announced_address(tmp_path: Path) -> None:
    """The agent talks HTTPS with its own contexts: the factory's socket carries TLS as well."""
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    runner, port = await _serve(server_ctx)
    sessions = Sessions(TIMEOUT)
    try:
        session = sessions.for_address(ipaddress.ip_address("127.0.0.5"))
        async with session.get(f"https://127.0.0.1:{port}/", ssl=client_ctx) as answer:
            assert await answer.text() == "127.0.0.5"
    finally:
        await sessions.close()
        await runner.cleanup()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_failed_connections_from_a_bound_address_leak_no_socket() -> None:
    """A connection refused after the factory bound its socket: aiohttp closes the socket
    (no ResourceWarning, no descriptor left), bound or fallen back."""
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    sessions = Sessions(TIMEOUT)
    before = _open_fds()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        try:
            for address in ("127.0.0.2", "192.0.2.7"):  # held; lacked (falls back)
                session = sessions.for_address(ipaddress.ip_address(address))
                for _ in range(20):
                    with pytest.raises(aiohttp.ClientConnectorError):
                        await session.get(f"http://127.0.0.1:{closed_port}/")
        finally:
            await sessions.close()
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
    assert _open_fds() <= before + 2  # the sessions' own loop-side bits, not 40 sockets


async def test_a_v4_component_reaches_a_v4_registrar_by_name(plain: int) -> None:
    """'localhost' may resolve to ::1 first (happy eyeballs): the v4 attempt is still bound."""
    sessions = Sessions(TIMEOUT)
    try:
        session = sessions.for_address(ipaddress.ip_address("127.0.0.9"))
        async with session.get(f"http://localhost:{plain}/") as answer:
            assert await answer.text() == "127.0.0.9"
    finally:
        await sessions.close()


# --- Defects ------------------------------------------------------------------------------

_NONLOCAL_CLIENT = textwrap.dedent(
    """
    import asyncio, ipaddress, sys
    import aiohttp
    from aiohttp import web
    from eucareg.agent.sessions import Sessions

    async def remote(request):
        return web.Response(text=request.remote or "")

    async def main():
        app = web.Application()
        app.router.add_get("/", remote)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        sessions = Sessions(aiohttp.ClientTimeout(total=3))
        session = sessions.for_address(ipaddress.ip_address("192.0.2.7"))  # not held here
        try:
            async with session.get(f"http://127.0.0.1:{port}/") as answer:
                print("SEEN", await answer.text())
        except aiohttp.ClientError as exc:
            print("FAILED", exc)
        finally:
            await sessions.close()
            await runner.cleanup()

    asyncio.run(main())
    """
)


def test_an_address_the_host_lacks_still_connects_when_nonlocal_bind_is_on() -> None:
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if unshare is None or ip is None:
        pytest.skip("needs unshare and ip")
    script = (
        f"{ip} link set lo up && echo 1 > /proc/sys/net/ipv4/ip_nonlocal_bind && "
        f'exec "{sys.executable}" -c "$0"'
    )
    try:
        done = subprocess.run(
            [unshare, "-rn", "sh", "-c", script, _NONLOCAL_CLIENT],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=Path(__file__).resolve().parents[2],
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the client in the namespace hung")
    if done.returncode != 0 or not done.stdout.strip():
        pytest.skip(f"no user+network namespace here: {done.stderr.strip()[-300:]}")
    assert done.stdout.strip() == "SEEN 127.0.0.1"


def test_write_credentials_writes_the_handover_before_the_cloud_ca(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[str] = []
    monkeypatch.setattr(
        cred, "write_atomic", lambda path, data, mode=0o600: written.append(path.name)
    )
    bundle = {
        handover.HANDOVER: b"h",
        cred.CLOUD_CERT: b"ca",
        "cluster-cert.pem": b"own",
        "cluster-pk.pem": b"key",
    }
    cred.write_credentials(tmp_path, Role.CC, bundle)
    assert written[-1] == "cluster-cert.pem"
    assert written.index(handover.HANDOVER) < written.index(cred.CLOUD_CERT)


def test_update_credentials_keeps_the_handover_before_the_cloud_ca(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The renewal path: a stable sort on 'own certificate last' keeps the bundle's order."""
    written: list[str] = []
    monkeypatch.setattr(
        cred, "write_atomic", lambda path, data, mode=0o600: written.append(path.name)
    )
    bundle = {
        handover.HANDOVER: b"h",
        cred.CLOUD_CERT: b"ca",
        "cluster-cert.pem": b"own",
        "cluster-pk.pem": b"key",
    }
    cred.update_credentials(tmp_path, Role.CC, bundle)
    assert written[-1] == "cluster-cert.pem"
    assert written.index(handover.HANDOVER) < written.index(cred.CLOUD_CERT)
