"""Event-loop lag: how late a short timer fires. The registrar shares its loop with mDNS and
HTTP, so this is the delay every announcement and request may have suffered."""

from __future__ import annotations

import asyncio
import time

INTERVAL = 0.05


class LagMonitor:
    def __init__(self) -> None:
        self.worst = 0.0  # seconds, since start or the last reset
        self.last = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag")

    def reset(self) -> float:
        worst, self.worst = self.worst, 0.0
        return worst

    async def _run(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(INTERVAL)
            self.last = max(0.0, time.monotonic() - before - INTERVAL)
            self.worst = max(self.worst, self.last)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
