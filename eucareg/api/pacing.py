"""Pacing for the registrar's HTTPS port: when a rack of components connects at once, their TLS
handshakes (an RSA signature each) and then their requests are spread over event-loop
iterations, a budget per iteration, so the operator's socket, mDNS and timers keep their turn.

asyncio runs every callback that is ready in one iteration. Without pacing, a thousand
ClientHellos arriving together make one iteration of 300-500 ms, and a status request that
arrives meanwhile waits for all of them; with it, an iteration stays near TARGET.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import ssl
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

from aiohttp import web

from eucareg.api.auth import Handler

TARGET = 0.010  # seconds: the event-loop iteration pacing aims for, paced work included
MIN_SLICE = 0.002  # seconds of paced work an iteration may run however busy it is
# What one woken request is first assumed to cost on the loop, until it has been measured.
FIRST_REQUEST_COST = 0.0005


class Pacer:
    """Runs paced work in slices, one per event-loop iteration, the rest first-come
    first-served in the iterations that follow.

    A slice opens with the first paced work of an iteration and closes at the start of the
    next one (a callback queued when it opens): asyncio polls its sockets in between, so
    whatever became ready meanwhile runs before the next slice. A slice may run what the
    last iteration left of `target` after its unpaced work (mDNS, timers, the rest of each
    request), and at least MIN_SLICE: the loop stays near `target` per iteration while the
    burst goes as fast as that allows.

    Two kinds of work wait in one queue, in order: callbacks (`run`), which a slice runs
    itself, and requests (`turn`), which a slice only wakes: they run at the start of the
    next iteration, charged to its slice at their measured cost."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        target: float = TARGET,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._loop, self.target, self._clock = loop, target, clock
        self._queue: deque[Callable[[], None] | asyncio.Future[None]] = deque()
        self.allowance = target  # paced seconds the current slice may run
        self._opened_at: float | None = None
        self._paced = 0.0  # paced seconds charged to the current slice
        self._owed = 0.0  # the estimated cost of requests woken for the next slice
        self._drain_queued = False
        self.request_cost = FIRST_REQUEST_COST  # seconds, a moving average
        # The requests the last drain woke: how many resumed, and when the first one did;
        # measured only when the next drain was queued right behind them.
        self._resumed = 0
        self._first_resume = 0.0
        self._measure = False
        self.deferred = 0  # how many runs had to wait for a later iteration (status, tests)
        self.slices = 0  # how many slices were opened

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def run(self, work: Callable[[], None]) -> None:
        """Run `work` now if this iteration's slice has room and nothing waits before it;
        otherwise queue it for a later iteration."""
        if not self._queue and not self._spent():
            self._charge(work)
            return
        self.deferred += 1
        self._queue.append(work)
        self._queue_drain()

    async def turn(self) -> None:
        """Return when a request may run: at once if this iteration has room and nobody
        waits, else in a later iteration, after everything queued before it."""
        if not self._queue and not self._spent():
            self._paced += self.request_cost
            return
        self.deferred += 1
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._queue.append(waiter)
        self._queue_drain()
        await waiter  # cancelled with its request; the drain skips it then
        self._note_resume()

    def _note_resume(self) -> None:
        # The first woken request to resume opens this iteration's slice.
        if not self._resumed:
            self._first_resume = self._clock()
        self._open()
        self._resumed += 1

    def _learn_cost(self) -> None:
        # Requests a drain wakes resume one after another, and the next drain, queued right
        # behind them, runs when the last has run: from the first resume to now is what
        # they cost together. A cost above the target still lets one through per drain.
        if self._measure and self._resumed:
            sample = min(self.target, (self._clock() - self._first_resume) / self._resumed)
            self.request_cost = 0.7 * self.request_cost + 0.3 * sample
        self._resumed, self._measure = 0, False

    def _charge(self, work: Callable[[], None]) -> None:
        began = self._clock()
        try:
            work()
        finally:
            self._paced += self._clock() - began

    def _spent(self) -> bool:
        self._open()
        return self._paced >= self.allowance

    def _open(self) -> None:
        if self._opened_at is None:
            self._opened_at = self._clock()
            self._paced, self._owed = self._owed, 0.0
            self.slices += 1
            self._loop.call_soon(self._close)

    def _close(self) -> None:
        # The iteration that just ended: what it ran besides paced work sets the next slice.
        if self._opened_at is not None:
            unpaced = max(0.0, self._clock() - self._opened_at - self._paced)
            self.allowance = min(self.target, max(MIN_SLICE, self.target - unpaced))
        self._opened_at = None

    def _queue_drain(self) -> None:
        if not self._drain_queued:
            self._drain_queued = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._drain_queued = False
        self._learn_cost()
        self._open()
        try:
            self._run_slice()
        finally:
            # Queued again even if a callback raised: what waits behind it must not wedge.
            if self._queue:
                self._measure = self._owed > 0
                self._queue_drain()

    def _run_slice(self) -> None:
        progress = False
        # At least one piece of work per iteration, whatever ran before us in it: progress.
        # First come, first served: the first item that does not fit stops the slice.
        while self._queue:
            item = self._queue[0]
            if isinstance(item, asyncio.Future):
                if item.done():  # its request was cancelled meanwhile
                    self._queue.popleft()
                    continue
                if progress and self._owed + self.request_cost > self.allowance:
                    break
                self._queue.popleft()
                item.set_result(None)
                self._owed += self.request_cost
            else:
                # A request woken in this drain runs in the next iteration: a callback
                # behind it waits for the next drain, which runs after it (first come...).
                if progress and (self._paced >= self.allowance or self._owed > 0):
                    break
                self._queue.popleft()
                self._charge_safely(item)
            progress = True

    def _charge_safely(self, work: Callable[[], None]) -> None:
        try:
            self._charge(work)
        except Exception as exc:  # one connection's fault is reported, not everyone's wedge
            self._loop.call_exception_handler(
                {"message": "paced work failed", "exception": exc, "callback": work}
            )


PACER = web.AppKey("pacer", Pacer)


def install(app: web.Application, pacer: Pacer) -> None:
    """Pace the app's requests from the network with `pacer` (the one its TLS site uses)."""
    app[PACER] = pacer
    app.middlewares.append(paced)


@web.middleware
async def paced(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Requests from the network wait their turn in a burst; the operator's socket never."""
    pacer = request.app.get(PACER)
    if pacer is not None and from_network(request):
        await pacer.turn()
    return await handler(request)


def from_network(request: web.Request) -> bool:
    transport = request.transport
    return transport is not None and isinstance(transport.get_extra_info("peername"), tuple)


class PacedTLSProtocol(asyncio.sslproto.SSLProtocol):
    """asyncio's TLS protocol (Python 3.11+), whose handshake steps and reads run through a
    Pacer.

    The handshake costs a private-key signature; a read decrypts and parses a request. Both
    are deferred only while the connection is in the state that called them, and re-check it
    when they run: the peer may have gone, or the handshake timed out, meanwhile. A read is
    paced only as new data arrives: the reads of a closing connection (its flush) run at once,
    so the data still buffered is delivered before it shuts down. One read at most waits per
    connection, and the socket stops being read while more than asyncio's limit of TLS data
    waits in it, exactly as when the read runs at once."""

    def __init__(self, pacer: Pacer, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pacer = pacer
        self._read_queued = False

    @property
    def handshaking(self) -> bool:
        """Not yet handed to the application (aiohttp knows it only after its handshake)."""
        return getattr(self, "_state", None) in (_State.UNWRAPPED, _State.DO_HANDSHAKE)

    def abort(self) -> None:
        transport: Any = self._transport  # a socket transport: it has abort()
        if transport is not None:
            transport.abort()

    def _do_handshake(self) -> None:
        self._pacer.run(self._paced_handshake)

    def _paced_handshake(self) -> None:
        if self._in_state(_State.DO_HANDSHAKE):
            super()._do_handshake()  # type: ignore[misc]

    def buffer_updated(self, nbytes: int) -> None:
        if not self._in_state(_State.WRAPPED):
            super().buffer_updated(nbytes)
            return
        self._incoming.write(self._ssl_buffer_view[:nbytes])  # type: ignore[attr-defined]
        self._control_ssl_reading()  # type: ignore[attr-defined]
        if not self._read_queued:
            self._read_queued = True
            self._pacer.run(self._paced_read)

    def _paced_read(self) -> None:
        self._read_queued = False
        if self._in_state(_State.WRAPPED):
            self._do_read()  # type: ignore[attr-defined]

    def _in_state(self, state: Any) -> bool:
        # typeshed describes the pre-3.11 class: _state and the methods above are 3.11's.
        transport = self._transport
        return (
            getattr(self, "_state", None) is state
            and transport is not None
            and not transport.is_closing()
        )


_State: Any = getattr(asyncio.sslproto, "SSLProtocolState", None)
# The members PacedTLSProtocol relies on (CPython 3.11 to 3.13); without them, no pacing.
SUPPORTED = _State is not None and all(
    hasattr(asyncio.sslproto.SSLProtocol, name)
    for name in ("_do_handshake", "_do_read", "_control_ssl_reading", "buffer_updated")
)


class PacedTLSSite(web.TCPSite):
    """aiohttp's TCP site with TLS through PacedTLSProtocol (asyncio's own TLS otherwise).

    The site makes the TLS layer itself, where asyncio would (loop._make_ssl_transport):
    the raw socket transport carries a PacedTLSProtocol, which hands aiohttp the TLS
    transport once the handshake is done, exactly as with `create_server(ssl=...)`."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str | None = None,
        port: int | None = None,
        *,
        ssl_context: ssl.SSLContext,
        pacer: Pacer | None = None,
        backlog: int = 128,
        reuse_address: bool | None = None,
        handshake_timeout: float = 60.0,
    ) -> None:
        super().__init__(
            runner,
            host,
            port,
            ssl_context=ssl_context,
            backlog=backlog,
            reuse_address=reuse_address,
        )
        self._pacer = pacer
        self._handshake_timeout = handshake_timeout
        # Connections aiohttp does not know yet (their handshake may wait): stop() drops them.
        self._protocols: weakref.WeakSet[PacedTLSProtocol] = weakref.WeakSet()

    @property
    def pacer(self) -> Pacer | None:
        return self._pacer

    async def start(self) -> None:
        # BaseSite.start registers the site with its runner; TCPSite.start would then make a
        # server with asyncio's own TLS, so its parent's is called directly.
        if not SUPPORTED:
            await super().start()  # asyncio's own TLS, unpaced
            return
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        if self._pacer is None:
            self._pacer = Pacer(loop)
        server = self._runner.server
        assert server is not None and self._ssl_context is not None
        pacer, context, timeout = self._pacer, self._ssl_context, self._handshake_timeout

        def protocol() -> asyncio.BaseProtocol:
            made = PacedTLSProtocol(
                pacer,
                loop,
                server(),
                context,
                None,  # no waiter: asyncio's own server path has none for TLS either
                server_side=True,
                ssl_handshake_timeout=timeout,
            )
            self._protocols.add(made)
            return made

        self._server = await loop.create_server(
            protocol,
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
        )
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port

    async def stop(self) -> None:
        """Stop listening, and drop the connections still in their handshake: aiohttp closes
        those it serves, but it does not know these, and a handshake finished later would
        hand a request to an application that has stopped."""
        await super().stop()
        for made in list(self._protocols):
            if made.handshaking:
                made.abort()
