"""The pacer (api/pacing.py) on a real event loop with a clock the work itself advances: no
iteration runs more paced work than its slice allows, nothing is lost or reordered, something
always progresses, and what is not paced (the operator) gets its turn between slices. Then
the paced TLS site over real TLS on loopback, many handshakes and requests at once."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from eucareg.api import pacing
from eucareg.api.pacing import MIN_SLICE, PacedTLSSite, Pacer
from eucareg.core.model import Role
from eucareg.pki import credentials as cred
from eucareg.pki import keypairs, tls
from tests.unit.test_tls import CC_CERT, CC_KEY, CLOUD


class Clock:
    """Time that moves only when work says it took some."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Iterations:
    """Counts event-loop iterations: a callback that re-queues itself runs once in each."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.count, self._loop, self._stopped = 0, loop, False
        loop.call_soon(self._tick)

    def _tick(self) -> None:
        self.count += 1
        if not self._stopped:
            self._loop.call_soon(self._tick)

    def stop(self) -> None:
        self._stopped = True


def costly(clock: Clock, cost: float, log: list[tuple[int, int]], it: Iterations, n: int):
    def work() -> None:
        clock.now += cost
        log.append((n, it.count))

    return work


async def settle(pacer: Pacer, limit: int = 10_000) -> None:
    for _ in range(limit):
        if not pacer.waiting:
            break
        await asyncio.sleep(0)
    for _ in range(3):
        await asyncio.sleep(0)


async def test_a_burst_runs_a_slice_per_iteration_in_order_and_all_of_it() -> None:
    loop = asyncio.get_running_loop()
    clock = Clock()
    pacer = Pacer(loop, target=0.010, clock=clock)
    it = Iterations(loop)
    log: list[tuple[int, int]] = []
    for n in range(100):  # 100 handshakes ready in one iteration, 1 ms each
        pacer.run(costly(clock, 0.001, log, it, n))
    assert len(log) == 10  # a full slice at once, the rest deferred
    assert pacer.waiting == 90 and pacer.deferred == 90
    await settle(pacer)
    it.stop()
    assert [n for n, _ in log] == list(range(100))  # nothing lost, nothing reordered
    per_iteration: dict[int, int] = {}
    for _, at in log:
        per_iteration[at] = per_iteration.get(at, 0) + 1
    assert max(per_iteration.values()) <= 10
    assert len(per_iteration) >= 10  # spread over at least ten iterations


async def test_the_operator_runs_between_slices_not_after_the_burst() -> None:
    loop = asyncio.get_running_loop()
    clock = Clock()
    pacer = Pacer(loop, target=0.005, clock=clock)
    it = Iterations(loop)
    log: list[tuple[int, int]] = []
    for n in range(200):
        pacer.run(costly(clock, 0.001, log, it, n))
    operator = loop.create_future()
    # The operator's request becomes ready after the burst did: it must not wait for all of it.
    loop.call_soon(lambda: operator.set_result(len(log)))
    await settle(pacer)
    it.stop()
    assert operator.result() <= 10
    assert len(log) == 200


async def test_a_busy_loop_shrinks_the_slice_to_its_minimum_but_still_progresses() -> None:
    loop = asyncio.get_running_loop()
    clock = Clock()
    pacer = Pacer(loop, target=0.010, clock=clock)
    it = Iterations(loop)
    log: list[tuple[int, int]] = []
    hog_runs = 0

    def hog() -> None:  # unpaced work of 30 ms in every iteration: more than the target
        nonlocal hog_runs
        clock.now += 0.030
        hog_runs += 1
        if pacer.waiting:
            loop.call_soon(hog)

    for n in range(40):
        pacer.run(costly(clock, 0.001, log, it, n))
    loop.call_soon(hog)
    await settle(pacer)
    it.stop()
    assert [n for n, _ in log] == list(range(40))
    assert pacer.allowance == pytest.approx(MIN_SLICE)
    per_iteration: dict[int, int] = {}
    for _, at in log:
        per_iteration[at] = per_iteration.get(at, 0) + 1
    # Once an iteration has shown the hog (the third on), at most MIN_SLICE of paced work per
    # iteration: 2 x 1 ms.
    assert max(list(per_iteration.values())[2:]) <= 2
    assert hog_runs >= 10


async def test_one_piece_of_work_larger_than_any_slice_still_runs_one_per_iteration() -> None:
    loop = asyncio.get_running_loop()
    clock = Clock()
    pacer = Pacer(loop, target=0.010, clock=clock)
    it = Iterations(loop)
    log: list[tuple[int, int]] = []
    for n in range(5):
        pacer.run(costly(clock, 0.050, log, it, n))
    await settle(pacer)
    it.stop()
    assert [n for n, _ in log] == list(range(5))
    assert len({at for _, at in log}) == 5


async def test_requests_wait_their_turn_first_come_first_served_with_callbacks() -> None:
    loop = asyncio.get_running_loop()
    clock = Clock()
    pacer = Pacer(loop, target=0.004, clock=clock)
    order: list[str] = []
    for n in range(6):
        pacer.run(lambda n=n: (order.append(f"h{n}"), setattr(clock, "now", clock.now + 0.001)))

    async def request(n: int) -> None:
        await pacer.turn()
        order.append(f"r{n}")
        clock.now += 0.001

    tasks = [asyncio.create_task(request(n)) for n in range(6)]
    await asyncio.sleep(0)  # the requests ask for their turn: some must wait
    assert pacer.waiting > 0
    for n in range(6, 9):
        pacer.run(lambda n=n: (order.append(f"h{n}"), setattr(clock, "now", clock.now + 0.001)))
    await asyncio.gather(*tasks)
    await settle(pacer)
    assert order.index("h5") < order.index("r0")  # queued before: runs before
    assert order.index("r5") < order.index("h6")  # and the other way round
    assert sorted(order) == sorted([f"h{n}" for n in range(9)] + [f"r{n}" for n in range(6)])


async def test_a_cancelled_request_is_skipped_and_the_rest_proceed() -> None:
    loop = asyncio.get_running_loop()
    clock = Clock()
    pacer = Pacer(loop, target=0.001, clock=clock)
    pacer.request_cost = 1.0  # one request fills any slice: the others wait, one woken at a time
    done: list[int] = []

    async def request(n: int) -> None:
        await pacer.turn()
        done.append(n)

    tasks = [asyncio.create_task(request(n)) for n in range(5)]
    await asyncio.sleep(0)  # the first runs, four wait
    assert done == [0] and pacer.waiting == 4
    tasks[2].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[2], asyncio.CancelledError)
    assert done == [0, 1, 3, 4]
    assert pacer.waiting == 0


async def test_the_cost_of_a_woken_request_is_learned_from_how_long_it_ran() -> None:
    loop = asyncio.get_running_loop()
    clock = Clock()
    pacer = Pacer(loop, target=0.010, clock=clock)
    pacer.run(lambda: setattr(clock, "now", clock.now + 0.020))

    async def request() -> None:
        await pacer.turn()
        clock.now += 0.002  # each runs 2 ms before it awaits anything

    for _ in range(8):
        await asyncio.gather(*(asyncio.create_task(request()) for _ in range(20)))
        await settle(pacer)
    assert pacer.request_cost == pytest.approx(0.002, rel=0.2)


async def test_status_shows_what_the_pacer_holds_and_has_deferred() -> None:
    from eucareg.api.status import pacing_json

    loop = asyncio.get_running_loop()
    clock = Clock()
    pacer = Pacer(loop, target=0.002, clock=clock)
    for _ in range(5):
        pacer.run(lambda: setattr(clock, "now", clock.now + 0.001))
    shown = pacing_json(pacer)
    assert shown is not None
    assert (shown["waiting"], shown["deferred"], shown["target_ms"]) == (3, 3, 2.0)
    await settle(pacer)
    assert pacing_json(pacer)["waiting"] == 0  # type: ignore[index]
    assert pacing_json(None) is None


# The paced TLS site, for real.


async def hello(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response({"got": len(body)})


@pytest.fixture
async def paced_site(tmp_path: Path):
    chain_file, key_file = tmp_path / "chain.pem", tmp_path / "key.pem"
    tls.write_chain(chain_file, [CC_CERT, CLOUD.root])
    cred.write_atomic(key_file, keypairs.key_pem(CC_KEY))
    loop = asyncio.get_running_loop()
    pacer = Pacer(loop, target=0.0005)  # smaller than one handshake: nearly all wait
    app = web.Application()
    pacing.install(app, pacer)
    app.router.add_post("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    context = tls.server_context(chain_file, key_file)
    site = PacedTLSSite(runner, "127.0.0.1", 0, ssl_context=context, pacer=pacer)
    await site.start()
    try:
        yield f"https://127.0.0.1:{site.port}/", pacer
    finally:
        await runner.cleanup()


def client_context() -> ssl.SSLContext:
    return tls.client_context(tls.Expect(Role.CC, cluster="cluster1", root=CLOUD.root))


@pytest.mark.skipif(not pacing.SUPPORTED, reason="this Python's asyncio TLS is not pacable")
async def test_a_hundred_connections_at_once_all_answered_through_the_pacer(paced_site) -> None:
    url, pacer = paced_site
    connector = aiohttp.TCPConnector(limit=0, ssl=client_context(), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def post(n: int) -> int:
            async with session.post(url, data=b"x" * n) as resp:
                assert resp.status == 200
                return int((await resp.json())["got"])

        sizes = [n * 997 for n in range(100)]  # up to ~100 KB: several TLS records each
        assert await asyncio.gather(*(post(n) for n in sizes)) == sizes
    assert pacer.deferred > 100  # handshakes, reads and requests waited their turn
    assert pacer.waiting == 0


@pytest.mark.skipif(not pacing.SUPPORTED, reason="this Python's asyncio TLS is not pacable")
async def test_clients_that_vanish_mid_handshake_leave_the_pacer_working(paced_site) -> None:
    url, pacer = paced_site
    port = int(url.rsplit(":", 1)[1].strip("/"))

    async def vanish(hello_bytes: int) -> None:
        # A TLS client that sends part of (or all of) its ClientHello and goes.
        ctx = client_context()
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx.wrap_bio(incoming, outgoing, server_hostname=None)
        with pytest.raises(ssl.SSLWantReadError):
            obj.do_handshake()
        data = outgoing.read()
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(data[:hello_bytes])
        await writer.drain()
        writer.transport.abort()

    await asyncio.gather(*(vanish(n) for n in [1, 5, 50, 10_000] * 20))
    connector = aiohttp.TCPConnector(ssl=client_context())
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post(url, data=b"ok") as resp,
    ):
        assert (await resp.json()) == {"got": 2}
    for _ in range(200):
        if not pacer.waiting:
            break
        await asyncio.sleep(0.01)
    assert pacer.waiting == 0
