"""The owner of the agent's background tasks. Each runs under a name; one that dies unexpectedly
is logged with its traceback and restarted with backoff, and one that keeps dying fails the
agent, which then stops and exits non-zero instead of running on half-dead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

TaskFactory = Callable[[], Coroutine[Any, Any, None]]


class AgentFailed(Exception):
    """The agent cannot go on (a task keeps dying) or did not stop cleanly; the reason says."""


@dataclass(frozen=True)
class RestartPolicy:
    base: float = 1.0  # delay before the first restart
    max: float = 30.0  # longest delay between restarts
    healthy_after: float = 60.0  # a run this long resets the count and the delay
    max_crashes: int = 5  # this many short runs in a row fail the agent


class Supervisor:
    """Runs named tasks until close(); restarts them when they die, records fatal failures."""

    def __init__(self, policy: RestartPolicy | None = None) -> None:
        self.policy = policy or RestartPolicy()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._closing = False
        self.failed = asyncio.Event()  # set when a task died too often; see `failure`
        self.failure: str | None = None
        self.restarts: dict[str, int] = {}

    def spawn(self, name: str, factory: TaskFactory) -> None:
        """Run `factory()` as task `name`, for the supervisor's whole life."""
        if name in self._tasks:
            raise ValueError(f"a task named {name} already runs")
        self._tasks[name] = asyncio.create_task(self._keep(name, factory), name=name)

    async def _keep(self, name: str, factory: TaskFactory) -> None:
        loop = asyncio.get_running_loop()
        delay, crashes = self.policy.base, 0
        while True:
            started = loop.time()
            try:
                await factory()
            except Exception:
                if self._closing:
                    raise  # failed while being cancelled: close() reports it
                log.exception("task %s failed", name)
            else:
                log.error("task %s returned, but it should run until the agent stops", name)
            if loop.time() - started >= self.policy.healthy_after:
                delay, crashes = self.policy.base, 0
            crashes += 1
            if crashes >= self.policy.max_crashes:
                self.failure = f"task {name} died {crashes} times in a row"
                log.error("%s; the agent gives up", self.failure)
                self.failed.set()
                return
            log.warning("restarting task %s in %.1f s", name, delay)
            self.restarts[name] = self.restarts.get(name, 0) + 1
            await asyncio.sleep(delay)
            delay = min(self.policy.max, delay * 2)

    async def close(self) -> list[str]:
        """Cancel every task and wait for them; each failure met on the way, logged, as text."""
        self._closing = True
        tasks = list(self._tasks.items())
        self._tasks.clear()
        for _, task in tasks:
            task.cancel()
        results = await asyncio.gather(*(t for _, t in tasks), return_exceptions=True)
        problems = []
        for (name, _), result in zip(tasks, results, strict=True):
            if isinstance(result, Exception):
                log.error("task %s failed while stopping", name, exc_info=result)
                problems.append(f"task {name} failed while stopping: {result!r}")
        return problems
