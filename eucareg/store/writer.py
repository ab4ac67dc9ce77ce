"""The store's one writer thread: transitions queue up, and each batch commits in a single
transaction (group commit), off the event loop that serves mDNS and HTTP.

A transition's future resolves only once its batch is durable; the registrar carries out the
transition's effects after that, never before. A failed commit fails every future of its batch.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass

from eucareg.core.transitions import Write
from eucareg.store.registry import Store

log = logging.getLogger(__name__)

MAX_BATCH = 512


@dataclass
class _Item:
    change: Write
    future: asyncio.Future[None]


class Writer:
    """Serialises every write of one registrar; FIFO, so a flush waits for all before it."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.commits = 0  # transactions committed (for benchmarks and tests)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="eucareg-writer", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None

    def commit(self, change: Write) -> asyncio.Future[None]:
        """Queue a change; the returned future resolves when it is durable."""
        if self._loop is None or self._thread is None:
            raise RuntimeError("the writer is not started")
        future: asyncio.Future[None] = self._loop.create_future()
        self._queue.put(_Item(change, future))
        return future

    async def flush(self) -> None:
        """Wait until everything queued so far is durable."""
        await self.commit(Write())

    async def close(self) -> None:
        if self._thread is None:
            return
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            real = [item.change for item in batch if not item.change.empty]
            error: BaseException | None = None
            try:
                if real:
                    self.store.apply(real)
                    self.commits += 1
            except Exception as exc:  # handed to every waiter; the registrar decides
                log.exception("commit of %d transition(s) failed", len(real))
                error = exc
            for item in batch:
                self._settle(item.future, error)

    def _settle(self, future: asyncio.Future[None], error: BaseException | None) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        def settle() -> None:
            if future.done():
                return
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

        loop.call_soon_threadsafe(settle)
