"""Attacks on the paced HTTPS port (api/pacing.py): TLS that must stay correct when its
handshakes and reads run in later iterations, clients that vanish, stall or flood while their
work waits, a registrar that shuts down with work queued, and the pacer's own bookkeeping.

Tests headed "Was a defect" failed on the first version of api/pacing.py; the others held.

Most TLS tests keep the pacer's queue busy with a `Pump`: a piece of paced work that takes
a second on a fake clock, so every handshake and read of the site waits for a later iteration,
as in a burst, without the CPU a real burst would take."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from eucareg.api import pacing
from eucareg.api.pacing import PacedTLSSite, Pacer
from eucareg.pki import credentials as cred
from eucareg.pki import keypairs, tls
from tests.unit.test_attack_tls import an_agent
from tests.unit.test_tls import CC_CERT, CC_KEY, CLOUD

pytestmark = pytest.mark.skipif(
    not pacing.SUPPORTED, reason="this Python's asyncio TLS is not pacable"
)

# == Helpers ====================================================================================


class Clock:
    """Time that moves only when work says it took some."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def hog(clock: Clock, wall: float = 0.0) -> Callable[[], None]:
    """Paced work that fills any slice by itself (a second on the fake clock); `wall` seconds
    of real time asleep (no CPU) make the iterations it runs in last that long."""

    def work() -> None:
        clock.now += 1.0
        if wall:
            time.sleep(wall)

    return work


class Pump:
    """Keeps a hog in the pacer's queue in every iteration while active: whatever the site
    queues meanwhile (handshakes, reads) runs an iteration or more later, as in a burst."""

    def __init__(self, pacer: Pacer, clock: Clock, wall: float = 0.0002) -> None:
        self.pacer, self.active, self.runs = pacer, True, 0
        self._hog = hog(clock, wall)
        self._loop = asyncio.get_running_loop()
        self.pacer.run(self._work)

    def _work(self) -> None:
        self.runs += 1
        self._hog()
        if self.active:  # queued from the next callback: this slice is spent by then
            self._loop.call_soon(self.pacer.run, self._work)

    def stop(self) -> None:
        self.active = False


class Recording(Pacer):
    """A Pacer that counts how many runs of the TLS layer (handshakes, reads) had to wait
    for a later iteration."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tls_deferred = 0

    def run(self, work: Callable[[], None]) -> None:
        before = self.deferred
        super().run(work)
        if self.deferred > before and isinstance(
            getattr(work, "__self__", None), pacing.PacedTLSProtocol
        ):
            self.tls_deferred += 1


async def settle(pacer: Pacer, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    for _ in range(int(seconds * 1000)):
        if not pacer.waiting or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.001)
    for _ in range(3):
        await asyncio.sleep(0)


def server_files(tmp: Path) -> tuple[Path, Path]:
    chain_file, key_file = tmp / "chain.pem", tmp / "key.pem"
    tls.write_chain(chain_file, [CC_CERT, CLOUD.root])
    cred.write_atomic(key_file, keypairs.key_pem(CC_KEY))
    return chain_file, key_file


def client_ctx(
    version: ssl.TLSVersion | None = None, cert: tuple[Path, Path] | None = None
) -> ssl.SSLContext:
    """A plain TLS client (the server's certificate is not what these tests are about)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    if cert is not None:
        ctx.load_cert_chain(*cert)
    return ctx


def pattern(n: int) -> bytes:
    """n bytes that are not all the same: a reordered or lost record changes their hash."""
    block = bytes(range(256)) * 64
    return (block * (n // len(block) + 1))[:n]


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response({"n": len(body), "sha": hashlib.sha256(body).hexdigest()})


async def numbered(request: web.Request) -> web.Response:
    return web.Response(text=request.match_info["i"])


async def big(request: web.Request) -> web.Response:
    return web.Response(body=pattern(int(request.match_info["n"])))


async def who(request: web.Request) -> web.Response:
    assert request.transport is not None
    obj = request.transport.get_extra_info("ssl_object")
    peer = tls.peer_identity(obj)
    return web.json_response(
        {
            "version": obj.version() if obj else None,
            "peer": str(peer.named) if peer else None,
            "peercert": bool(request.transport.get_extra_info("peercert")),
        }
    )


@dataclasses.dataclass
class Served:
    port: int
    pacer: Recording
    clock: Clock
    runner: web.AppRunner
    errors: list[dict[str, Any]]  # what reached the loop's exception handler
    handled: list[str]  # the paths the handlers saw, in order

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def serve(
    tmp: Path,
    *,
    fake_clock: bool = True,
    client_ca: bool = False,
    handshake_timeout: float = 60.0,
    extra: Callable[[web.Application], None] | None = None,
) -> AsyncIterator[Served]:
    """The paced TLS site on 127.0.0.1, an ephemeral port, with the routes above."""
    loop = asyncio.get_running_loop()
    chain_file, key_file = server_files(tmp)
    clock = Clock()
    pacer = Recording(loop, clock=clock) if fake_clock else Recording(loop)
    app = web.Application(client_max_size=64 << 20)
    pacing.install(app, pacer)
    handled: list[str] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        handled.append(request.path)
        return await handler(request)

    app.middlewares.append(record)
    app.router.add_post("/echo", echo)
    app.router.add_get("/n/{i}", numbered)
    app.router.add_get("/big/{n}", big)
    app.router.add_get("/who", who)
    if extra is not None:
        extra(app)
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: errors.append(context))
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        context = tls.server_context(
            chain_file, key_file, client_ca=CLOUD.root if client_ca else None
        )
        site = PacedTLSSite(
            runner,
            "127.0.0.1",
            0,
            ssl_context=context,
            pacer=pacer,
            handshake_timeout=handshake_timeout,
        )
        served = Served(0, pacer, clock, runner, errors, handled)
        await site.start()
        served.port = site.port
        yield served
    finally:
        await runner.cleanup()
        loop.set_exception_handler(previous)


class BioClient:
    """A TLS client over a plain loopback connection, through memory BIOs: the test decides
    what goes into each TLS record, and when the TCP connection half-closes or resets."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname=None)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.plain = b""

    async def open(self, port: int, handshake: bool = True) -> BioClient:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        if handshake:
            await asyncio.wait_for(self.handshake(), 10)
        return self

    async def handshake(self) -> None:
        assert self.reader is not None
        while True:
            try:
                self.obj.do_handshake()
                await self.flush()
                return
            except ssl.SSLWantReadError:
                await self.flush()
                data = await self.reader.read(65536)
                if not data:
                    raise ConnectionResetError("closed in the handshake") from None
                self.incoming.write(data)

    async def flush(self) -> None:
        assert self.writer is not None
        data = self.outgoing.read()
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def send(self, data: bytes, record: int = 16384, flush_every: int = 1) -> None:
        """`data` in TLS records of `record` bytes, onto TCP every `flush_every` records."""
        for n, at in enumerate(range(0, len(data), record)):
            self.obj.write(data[at : at + record])
            if (n + 1) % flush_every == 0:
                await self.flush()
                await asyncio.sleep(0)
        await self.flush()

    async def receive(self, until: Callable[[bytes], bool], seconds: float = 10.0) -> bytes:
        """Plaintext until `until` says it is enough, or the server closes."""
        assert self.reader is not None
        deadline = time.monotonic() + seconds
        while not until(self.plain):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"received only {self.plain[:200]!r}")
            data = await asyncio.wait_for(self.reader.read(65536), left)
            if not data:
                break
            self.incoming.write(data)
            with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                while True:
                    chunk = self.obj.read(65536)
                    if not chunk:
                        break
                    self.plain += chunk
        return self.plain

    def half_close(self) -> None:
        assert self.writer is not None
        self.writer.write_eof()

    def reset(self) -> None:
        assert self.writer is not None
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()


def responses(raw: bytes) -> list[tuple[int, bytes]]:
    """The (status, body) of each complete HTTP/1.1 response in `raw`, in order."""
    out = []
    while b"\r\n\r\n" in raw:
        head, rest = raw.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(rest) < length:
            break
        out.append((int(lines[0].split()[1]), rest[:length]))
        raw = rest[length:]
    return out


def post(path: str, body: bytes, close: bool = False) -> bytes:
    extra = b"Connection: close\r\n" if close else b""
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n".encode()
        + extra
        + b"\r\n"
        + body
    )


# == 1. TLS stays correct when its work is deferred (holds) ====================================


async def test_a_body_in_hundreds_of_small_records_arrives_whole_and_in_order(
    tmp_path: Path,
) -> None:
    """Holds: 300 KB in 1 KB records, a few records per TCP write, every read deferred."""
    async with serve(tmp_path) as served:
        pump = Pump(served.pacer, served.clock)
        client = await BioClient(client_ctx()).open(served.port)
        try:
            body = pattern(300_000)
            await client.send(post("/echo", body), record=1000, flush_every=3)
            raw = await client.receive(lambda r: len(responses(r)) == 1)
        finally:
            client.close()
            pump.stop()
        [(status, answer)] = responses(raw)
        assert status == 200
        assert json.loads(answer) == {"n": len(body), "sha": hashlib.sha256(body).hexdigest()}
        assert served.pacer.tls_deferred > 10  # the reads did wait their turn
        await settle(served.pacer)
        assert served.pacer.waiting == 0


async def test_pipelined_requests_are_answered_all_and_in_order(tmp_path: Path) -> None:
    """Holds: 40 requests in one write, then 40 more one record each, all deferred."""
    async with serve(tmp_path) as served:
        pump = Pump(served.pacer, served.clock)
        client = await BioClient(client_ctx()).open(served.port)
        try:
            first = b"".join(f"GET /n/{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for i in range(40))
            await client.send(first)
            for i in range(40, 80):
                client.obj.write(f"GET /n/{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            await client.flush()
            raw = await client.receive(lambda r: len(responses(r)) == 80)
        finally:
            client.close()
            pump.stop()
        assert [(s, int(b)) for s, b in responses(raw)] == [(200, i) for i in range(80)]
        assert served.pacer.tls_deferred > 0


async def test_a_keep_alive_connection_serves_many_requests_through_the_pacer(
    tmp_path: Path,
) -> None:
    """Holds: 60 requests, one connection, each body different, each read and request paced."""
    seen: set[int] = set()

    def track(app: web.Application) -> None:
        @web.middleware
        async def transports(request: web.Request, handler: Any) -> web.StreamResponse:
            seen.add(id(request.transport))
            return await handler(request)

        app.middlewares.append(transports)

    async with serve(tmp_path, extra=track) as served:
        pump = Pump(served.pacer, served.clock)
        connector = aiohttp.TCPConnector(limit=1, ssl=client_ctx())
        try:
            async with aiohttp.ClientSession(connector=connector) as session:
                for n in range(60):
                    body = pattern(n * 1531 + 1)
                    async with session.post(served.url + "/echo", data=body) as resp:
                        assert resp.status == 200
                        assert (await resp.json())["sha"] == hashlib.sha256(body).hexdigest()
        finally:
            pump.stop()
        assert len(seen) == 1  # one connection, kept alive
        assert served.pacer.tls_deferred > 60


async def test_a_large_response_to_a_slow_reader_arrives_whole(tmp_path: Path) -> None:
    """Holds: 6 MB out while the client reads slowly (write backpressure) and reads deferred."""
    async with serve(tmp_path) as served:
        pump = Pump(served.pacer, served.clock)
        connector = aiohttp.TCPConnector(ssl=client_ctx())
        try:
            async with (
                aiohttp.ClientSession(connector=connector) as session,
                session.get(served.url + f"/big/{6 << 20}") as resp,
            ):
                digest, got = hashlib.sha256(), 0
                async for chunk in resp.content.iter_chunked(256 << 10):
                    digest.update(chunk)
                    got += len(chunk)
                    await asyncio.sleep(0.005)
        finally:
            pump.stop()
        assert got == 6 << 20
        assert digest.hexdigest() == hashlib.sha256(pattern(6 << 20)).hexdigest()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_a_client_certificate_is_seen_after_a_deferred_handshake(
    tmp_path: Path, version: ssl.TLSVersion
) -> None:
    """Holds: TLS 1.2 and 1.3, the handshake deferred: the request's transport has the
    ssl_object and peercert, and peer_identity names the client."""
    tls.write_chain(tmp_path / "client.pem", [CC_CERT])
    cred.write_atomic(tmp_path / "client-key.pem", keypairs.key_pem(CC_KEY))
    cert = (tmp_path / "client.pem", tmp_path / "client-key.pem")
    async with serve(tmp_path, client_ca=True) as served:
        pump = Pump(served.pacer, served.clock)
        answers = []
        try:
            for ctx in (client_ctx(version, cert), client_ctx(version)):
                connector = aiohttp.TCPConnector(ssl=ctx, force_close=True)
                async with (
                    aiohttp.ClientSession(connector=connector) as session,
                    session.get(served.url + "/who") as resp,
                ):
                    answer = await resp.json()
                answers.append(answer)
        finally:
            pump.stop()
        name = "TLSv1.2" if version is ssl.TLSVersion.TLSv1_2 else "TLSv1.3"
        assert answers == [
            {"version": name, "peer": "cc cc-00000001 of cluster cluster1", "peercert": True},
            {"version": name, "peer": None, "peercert": False},  # no certificate: nobody
        ]
        assert served.pacer.tls_deferred > 2


# == 2. Slow, vanishing and idle clients (holds) ===============================================


async def test_a_slowloris_byte_per_record_is_served_and_holds_up_nobody(tmp_path: Path) -> None:
    """Holds: a request sent one byte per TLS record (and per TCP write) arrives intact;
    meanwhile other clients get their answers, each in well under the slowloris' time."""
    async with serve(tmp_path) as served:
        pump = Pump(served.pacer, served.clock)
        slow = await BioClient(client_ctx()).open(served.port)
        body = pattern(64)
        request = post("/echo", body)

        async def trickle() -> float:
            began = time.monotonic()
            for i in range(len(request)):
                slow.obj.write(request[i : i + 1])
                await slow.flush()
                await asyncio.sleep(0.002)
            await slow.receive(lambda r: len(responses(r)) == 1)
            return time.monotonic() - began

        async def other(n: int) -> float:
            began = time.monotonic()
            connector = aiohttp.TCPConnector(ssl=client_ctx(), force_close=True)
            async with (
                aiohttp.ClientSession(connector=connector) as session,
                session.get(served.url + f"/n/{n}") as resp,
            ):
                assert await resp.text() == str(n)
            return time.monotonic() - began

        try:
            slow_task = asyncio.create_task(trickle())
            await asyncio.sleep(0.05)
            others = [await other(n) for n in range(5)]
            took = await asyncio.wait_for(slow_task, 20)
        finally:
            slow.close()
            pump.stop()
        [(status, answer)] = responses(slow.plain)
        assert status == 200 and json.loads(answer)["sha"] == hashlib.sha256(body).hexdigest()
        assert max(others) < took / 2
        assert served.pacer.tls_deferred > len(request) / 2  # its reads did wait, many times
        await settle(served.pacer)
        assert served.pacer.waiting == 0


@pytest.mark.parametrize("how", ["half-close", "close_notify"])
async def test_a_request_then_eof_while_its_read_waits_reaches_the_handler_whole(
    tmp_path: Path, how: str
) -> None:
    """Holds: a client sends a request and at once half-closes TCP (or sends close_notify)
    while the read of its data waits behind 0.4 s of paced work: the handler gets the whole
    body (a TCP EOF flushes it at once, a close_notify comes with the paced read), never a
    truncated or reordered one, and nothing stays queued.
    (asyncio's TLS has no half-close: the connection then shuts down, paced or not, so the
    answer itself may be lost.)"""
    bodies: list[bytes] = []

    def capture(app: web.Application) -> None:
        async def keep(request: web.Request) -> web.Response:
            bodies.append(await request.read())
            return web.Response(text="ok")

        app.router.add_post("/keep", keep)

    async with serve(tmp_path, extra=capture) as served:
        body = pattern(50_000)
        client = await BioClient(client_ctx()).open(served.port)
        for _ in range(200):
            served.pacer.run(hog(served.clock, wall=0.002))
        try:
            request = post("/keep", body)
            for at in range(0, len(request), 4000):  # records of 4 KB, then one TCP write
                client.obj.write(request[at : at + 4000])
            if how == "close_notify":
                with contextlib.suppress(ssl.SSLWantReadError):
                    client.obj.unwrap()
            assert client.writer is not None
            client.writer.write(client.outgoing.read())
            if how == "half-close":
                client.half_close()
            for _ in range(200):
                if bodies:
                    break
                await asyncio.sleep(0.01)
            if how == "half-close":  # the TCP EOF flushes at once what the read left queued
                assert served.pacer.waiting > 50
        finally:
            client.close()
        assert bodies == [body]
        await settle(served.pacer)
        assert served.pacer.waiting == 0
        assert served.errors == []


async def test_a_reset_while_reads_and_handshakes_wait_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    """Holds: 30 clients reset (RST) with their ClientHello or their request still queued:
    nothing is logged, nothing stays queued, the next client is served."""
    async with serve(tmp_path) as served:
        pump = Pump(served.pacer, served.clock, wall=0.001)

        async def reset_after_request() -> None:
            client = await BioClient(client_ctx()).open(served.port)
            await client.send(post("/echo", pattern(20_000)), record=2000)
            client.reset()

        async def reset_in_handshake() -> None:
            client = await BioClient(client_ctx()).open(served.port, handshake=False)
            with contextlib.suppress(ssl.SSLWantReadError):
                client.obj.do_handshake()
            await client.flush()
            client.reset()

        try:
            await asyncio.gather(*(reset_after_request() for _ in range(15)))
            await asyncio.gather(*(reset_in_handshake() for _ in range(15)))
        finally:
            pump.stop()
        await settle(served.pacer)
        assert served.pacer.waiting == 0
        connector = aiohttp.TCPConnector(ssl=client_ctx())
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get(served.url + "/n/7") as resp,
        ):
            assert await resp.text() == "7"
        assert served.errors == []


async def test_a_handshake_that_waits_past_its_timeout_is_dropped_quietly(tmp_path: Path) -> None:
    """Holds: the handshake timeout (0.3 s) fires while the ClientHello's handshake step is
    still queued (behind 1 s of paced work): the connection is closed at the timeout, the
    queued step then does nothing, nothing is logged."""
    async with serve(tmp_path, handshake_timeout=0.3) as served:
        for _ in range(200):
            served.pacer.run(hog(served.clock, wall=0.005))
        client = await BioClient(client_ctx()).open(served.port, handshake=False)
        began = time.monotonic()
        try:
            with pytest.raises((ConnectionResetError, ssl.SSLError, OSError)):
                await asyncio.wait_for(client.handshake(), 5)
        finally:
            client.close()
        took = time.monotonic() - began
        assert served.pacer.waiting > 0  # closed while the burst still waits
        assert 0.25 < took < 1.5
        await settle(served.pacer)
        assert served.pacer.waiting == 0
        assert served.errors == []


async def test_many_idle_connections_leave_nothing_queued_and_others_are_served(
    tmp_path: Path,
) -> None:
    """Holds: 150 connections that never send a byte each cost one queued handshake step at
    most, which runs and is gone; a real client is served meanwhile."""
    async with serve(tmp_path, handshake_timeout=5.0) as served:
        pump = Pump(served.pacer, served.clock)
        idle = [await asyncio.open_connection("127.0.0.1", served.port) for _ in range(150)]
        try:
            connector = aiohttp.TCPConnector(ssl=client_ctx())
            async with (
                aiohttp.ClientSession(connector=connector) as session,
                session.get(served.url + "/n/1") as resp,
            ):
                assert await resp.text() == "1"
            pump.stop()
            await settle(served.pacer)
            assert served.pacer.waiting == 0
        finally:
            pump.stop()
            for _, writer in idle:
                writer.transport.abort()


async def test_a_client_gone_while_its_request_waits_its_turn_leaves_nothing_queued(
    tmp_path: Path,
) -> None:
    """Holds: 20 requests queued (reads, then turn()), their clients reset: the queue
    empties and nothing is logged."""
    async with serve(tmp_path) as served:
        clients = [await BioClient(client_ctx()).open(served.port) for _ in range(20)]
        for _ in range(100):
            served.pacer.run(hog(served.clock, wall=0.002))
        try:
            for n, client in enumerate(clients):
                await client.send(f"GET /n/{n} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            await asyncio.sleep(0.02)
            assert served.pacer.waiting > 20
        finally:
            for client in clients:
                client.reset()
        await settle(served.pacer)
        assert served.pacer.waiting == 0
        assert served.errors == []


# == 3. The operator (holds) ====================================================================


async def test_the_operator_socket_never_waits_behind_a_burst(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Holds: the agent's pacer holds 200 pieces of work of 20 ms each (4 s of burst, one
    per iteration); a status request on the operator socket is answered at once, and shows
    the pacer still waiting, while a request on the HTTPS port waits its turn."""
    async with an_agent(tmp_path, monkeypatch) as agent:
        service = agent.service
        assert service is not None and service._pacer is not None
        pacer = service._pacer
        for _ in range(200):
            pacer.run(hog(Clock(), wall=0.02))  # 20 ms: each fills a slice by itself
        token = (agent.config.state_dir / "admin.token").read_text().strip()
        connector = aiohttp.UnixConnector(path=str(service.socket_path))
        began = time.monotonic()
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get(
                "http://localhost/v1/status", headers={"Authorization": f"Bearer {token}"}
            ) as resp,
        ):
            assert resp.status == 200
            shown = (await resp.json())["registrar"]["pacing"]
        took = time.monotonic() - began
        assert took < 1.0
        assert shown["waiting"] > 100  # the burst was still there
        assert pacer.waiting > 100
        deferred = pacer.deferred
        https = aiohttp.TCPConnector(ssl=client_ctx())
        async with aiohttp.ClientSession(connector=https) as session:
            url = f"https://127.0.0.1:{service.port}/v1/health"
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
                assert resp.status == 200
        assert pacer.deferred > deferred  # the network's handshake and request did wait


# == 4. Defects ==================================================================================


# Was a defect (fixed): a deferred read skips asyncio's TLS read flow control: the socket keeps
# being read into the protocol's buffer, without bound, while the read waits its turn
async def test_a_connection_cannot_pile_up_unread_tls_data_while_its_read_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """asyncio stops reading a TLS connection's socket once 256 KiB of TLS data wait to be
    decrypted (SSLProtocol._control_ssl_reading, called by _do_read). The paced buffer_updated
    writes what arrived into `_incoming` and queues the read, without that check: while the
    read waits its turn (0.6 s behind a burst here), the connection reads everything the
    client sends. One client streaming a large body buffers tens of MB in the registrar;
    a few hundred do the same in a burst. Then the read decrypts all of it in one callback.
    Fix: after writing to _incoming, call self._control_ssl_reading() (pause the socket past
    the high-water mark; _do_read resumes it), or read at once above the mark."""
    made: list[pacing.PacedTLSProtocol] = []

    class Counted(pacing.PacedTLSProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(pacing, "PacedTLSProtocol", Counted)
    async with serve(tmp_path) as served:
        client = await BioClient(client_ctx()).open(served.port)
        peak = 0

        def burst() -> None:
            nonlocal peak
            served.clock.now += 1.0
            time.sleep(0.002)
            peak = max([peak] + [p._incoming.pending for p in made])  # type: ignore[attr-defined]

        for _ in range(300):
            served.pacer.run(burst)
        total = 24 << 20

        async def stream() -> None:
            assert client.writer is not None
            head = f"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {total}\r\n\r\n"
            client.obj.write(head.encode())
            chunk = pattern(16384)
            for _ in range(total // len(chunk)):
                client.obj.write(chunk)
                client.writer.write(client.outgoing.read())
                await client.writer.drain()

        sender = asyncio.create_task(stream())
        try:
            await settle(served.pacer, seconds=10)
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await sender
            client.close()
        assert peak <= 1 << 20, f"{peak / 2**20:.1f} MiB of TLS data buffered, unread"


# Was a defect (fixed): handshakes still queued when the runner is cleaned up complete
# afterwards, and their requests are served by the app that was shut down
async def test_no_request_is_served_after_the_runner_was_cleaned_up(tmp_path: Path) -> None:
    """runner.cleanup() stops the site (no new connections) and closes the connections aiohttp
    knows of; a connection whose handshake step waits in the pacer is not one of them (aiohttp
    learns of it when the handshake completes). After cleanup the pacer runs the step, the
    handshake completes, and aiohttp serves the request: in the agent, after the registrar
    and the API were closed, and just before the store is (RegistrarService.close). Unpaced,
    a ClientHello that arrived before cleanup is handshaken at once and its connection closed
    by the cleanup. Fix: the site remembers its protocols and aborts those not yet WRAPPED
    when it stops (or the pacer drops a stopped site's work)."""
    cleaned = False
    after: list[str] = []

    def watch(app: web.Application) -> None:
        @web.middleware
        async def late(request: web.Request, handler: Any) -> web.StreamResponse:
            if cleaned:
                after.append(request.path)
            return await handler(request)

        app.middlewares.append(late)

    async with serve(tmp_path, extra=watch) as served:
        for _ in range(300):
            served.pacer.run(hog(served.clock, wall=0.001))

        async def get(n: int) -> Any:
            connector = aiohttp.TCPConnector(ssl=client_ctx(), force_close=True)
            try:
                async with (
                    aiohttp.ClientSession(connector=connector) as session,
                    session.get(served.url + f"/n/{n}", timeout=aiohttp.ClientTimeout(5)) as r,
                ):
                    return r.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                return type(exc).__name__

        clients = [asyncio.create_task(get(n)) for n in range(5)]
        await asyncio.sleep(0.05)  # connected, ClientHellos sent: their handshakes queued
        assert served.pacer.waiting > 100
        await served.runner.cleanup()
        cleaned = True
        results = await asyncio.gather(*clients)
        assert served.errors == []
        assert after == [], f"served after cleanup: {after}, clients got {results}"


# Was a defect (fixed): an exception out of one piece of paced work ends the drain before it  re-
# queues itself: everything queued behind waits until some new work arrives
async def test_one_failing_piece_of_paced_work_does_not_wedge_the_handshakes_behind_it(
    tmp_path: Path,
) -> None:
    """Pacer._drain runs callbacks with no try/except, and re-queues itself only at its end:
    when one raises (the loop logs 'Exception in callback Pacer._drain()'), the work behind
    it stays queued until a new run() or turn() queues a drain. Clients that sent their
    ClientHello and wait for the answer send nothing more: here a client's handshake, queued
    behind the failing work, never completes. Nothing in asyncio's TLS layer raises today
    (it catches SSL errors), but anything that does (an app protocol's connection_made, a
    future change, a MemoryError) takes every queued handshake and request down with it.
    Fix: catch and report each callback's exception in the drain (loop.call_exception_handler)
    and go on, or re-queue the drain in a finally."""
    async with serve(tmp_path) as served:
        for _ in range(100):
            served.pacer.run(hog(served.clock, wall=0.002))

        def fails() -> None:
            raise RuntimeError("one connection's bad luck")

        served.pacer.run(fails)
        client = await BioClient(client_ctx()).open(served.port, handshake=False)
        try:
            await asyncio.wait_for(client.handshake(), 3)
        finally:
            client.close()
        assert [e["exception"].args for e in served.errors] == [("one connection's bad luck",)]


# Was a defect (fixed): once the learned request cost exceeds the slice, one request is woken  per
# drain, so no drain sees two resumes, and the cost is never learned again
async def test_the_learned_cost_of_a_request_comes_back_down_when_requests_get_cheap() -> None:
    """The cost of a woken request is learned only from a drain that woke two or more
    (_learn_cost: `if self._resumed >= 2`). A few slow requests (60 ms before their first
    await: a large body parsed, a GC pause) teach a cost above the 15 ms target; from then
    on each drain wakes one request (its cost fills the slice), so no sample is ever taken
    again: every later burst of requests goes one per iteration, for good, though they now
    take 0.2 ms each. Fix: also learn from a single resume (the time until the next
    iteration's drain), or decay the estimate when a slice ends under budget."""
    loop = asyncio.get_running_loop()
    clock = Clock()
    pacer = Pacer(loop, target=0.015, clock=clock)

    async def request(cost: float) -> None:
        await pacer.turn()
        clock.now += cost

    await asyncio.gather(*(request(0.060) for _ in range(40)))
    # It did learn they were slow (a sample counts at most the target: one per drain).
    assert pacer.request_cost > 0.010
    for _ in range(5):
        await asyncio.sleep(0.005)
        slices = pacer.slices
        await asyncio.gather(*(request(0.0002) for _ in range(100)))
    # 100 requests of 0.2 ms are 20 ms: two or three slices of 15 ms, not a hundred.
    assert pacer.slices - slices <= 10
    assert pacer.request_cost < 0.005


# Was a defect (fixed): every arrival of data queues another read of the same connection:  a
# client trickling bytes holds one queue entry per TCP segment while a burst waits
async def test_a_trickling_connection_holds_one_queued_read_not_one_per_segment(
    tmp_path: Path,
) -> None:
    """The paced buffer_updated queues `_paced_read` each time data arrives, even when a read
    of that connection already waits: the first one reads everything, the others do nothing.
    While a burst is worked through (300 iterations here), 10 clients sending a byte per
    iteration fill the queue with hundreds of entries each; a thousand such clients during a
    long burst hold a million (memory, a `waiting` in status that means nothing, a drain
    that walks them). Fix: one queued read per connection (a flag set when queued, cleared
    when it runs)."""
    async with serve(tmp_path) as served:
        clients = [await BioClient(client_ctx()).open(served.port) for _ in range(10)]
        for _ in range(300):
            served.pacer.run(hog(served.clock, wall=0.001))
        most = 0

        async def trickle(client: BioClient) -> None:
            nonlocal most
            request = b"GET /n/1 HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 200
            for i in range(len(request)):
                client.obj.write(request[i : i + 1])
                await client.flush()
                await asyncio.sleep(0.001)
                per: dict[int, int] = {}
                for item in list(served.pacer._queue):
                    owner = getattr(item, "__self__", None)
                    if isinstance(owner, pacing.PacedTLSProtocol):
                        per[id(owner)] = per.get(id(owner), 0) + 1
                most = max([most, *per.values()])

        try:
            await asyncio.wait_for(asyncio.gather(*(trickle(c) for c in clients)), 20)
        finally:
            for client in clients:
                client.close()
        await settle(served.pacer)
        assert most <= 2, f"one connection held {most} queued reads"


async def test_cleanup_with_work_queued_logs_nothing_and_the_queue_empties(
    tmp_path: Path,
) -> None:
    """Holds: the runner is cleaned up while handshakes, reads and requests wait: no
    exception reaches the loop, the queued work runs (on closed connections: as nothing) and
    the queue empties."""
    async with serve(tmp_path) as served:
        clients = [await BioClient(client_ctx()).open(served.port) for _ in range(10)]
        late = [await BioClient(client_ctx()).open(served.port, handshake=False) for _ in range(10)]
        for _ in range(300):
            served.pacer.run(hog(served.clock, wall=0.001))
        try:
            for client in clients:
                request = post("/echo", pattern(30_000))
                for at in range(0, len(request), 3000):
                    client.obj.write(request[at : at + 3000])
            for client in late:
                with contextlib.suppress(ssl.SSLWantReadError):
                    client.obj.do_handshake()
            for client in clients + late:
                assert client.writer is not None
                client.writer.write(client.outgoing.read())
            await asyncio.sleep(0.02)
            assert served.pacer.waiting > 50
            await served.runner.cleanup()
            for client in clients + late:
                client.close()
            await settle(served.pacer)
        finally:
            for client in clients + late:
                client.close()
        assert served.pacer.waiting == 0
        assert served.errors == []
