"""The engine as its collaborators see it (intake, deciding, effects, admin, desk, ...): what they
use of the registrar that wires them, and of each other through it. They name these protocols and
never engine.py, so the engine stands above all of them and no import climbs back up to it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol

from eucareg.core.legacy import LegacyComponent
from eucareg.core.model import Announcement, Decision, Event, HookRun, Record
from eucareg.core.transitions import Timing, Transition
from eucareg.core.trust import TrustSettings
from eucareg.core.txt import Rejected
from eucareg.core.view import RegistrarSettings
from eucareg.mdns.types import Sighting
from eucareg.registrar.batch import Batcher
from eucareg.registrar.hooks import HookRunner
from eucareg.registrar.memory import Memory
from eucareg.registrar.presence import Online, Presence
from eucareg.registrar.timers import Timers
from eucareg.registrar.wakeups import Wakeups
from eucareg.store.writer import Writer


class RegisteringPort(Protocol):
    """Registering (registering.py): a component's registration hook, run once."""

    async def run(self, component_id: str, *, rerun: bool) -> None: ...

    def held(self, component_id: str) -> contextlib.AbstractAsyncContextManager[None]: ...


class IntakePort(Protocol):
    """Intake (intake.py): a live announcement whose lease ran out."""

    def lease_ended(self, component_id: str) -> None: ...


class DeregisteringPort(Protocol):
    """Deregistering (deregistering.py): a deregistered component's deregister hook."""

    def start(self, record: Record) -> None: ...

    def outcome(self, component_id: str) -> asyncio.Future[HookRun] | None: ...


class NoticesPort(Protocol):
    """Notices (notices.py): what is only reported, once, as an event."""

    def refused(self, ann: Announcement, decision: Decision) -> None: ...

    def rejected(self, sighting: Sighting, rejected: Rejected) -> None: ...

    def heard_legacy(self, heard: LegacyComponent) -> None: ...


class Engine(Protocol):
    """The registrar engine (engine.py's Registrar), as its collaborators use it."""

    # Written by the effects: when the last burst of transitions came (quietgc.py reads it).
    busy_at: float

    # What it was made with, and the state it holds (read-only to the collaborators: the
    # engine alone replaces them; they change what these hold).
    @property
    def clock(self) -> Callable[[], float]: ...
    @property
    def settings(self) -> RegistrarSettings: ...
    @property
    def timing(self) -> Timing: ...
    @property
    def master_key(self) -> bytes: ...
    @property
    def hook_dir(self) -> Path: ...
    @property
    def memory(self) -> Memory: ...
    @property
    def trust(self) -> TrustSettings: ...
    @property
    def stopping(self) -> bool: ...
    @property
    def started_at(self) -> float: ...

    # Its parts.
    @property
    def writer(self) -> Writer: ...
    @property
    def hooks(self) -> HookRunner: ...
    @property
    def batcher(self) -> Batcher: ...
    @property
    def timers(self) -> Timers: ...
    @property
    def wakeups(self) -> Wakeups: ...
    @property
    def presence(self) -> Presence: ...
    @property
    def live(self) -> dict[str, Announcement]: ...
    @property
    def proven(self) -> set[tuple[str, str]]: ...
    @property
    def online_ids(self) -> Online: ...
    @property
    def legacy(self) -> dict[str, LegacyComponent]: ...

    # The other collaborators, as far as one uses another.
    @property
    def registering(self) -> RegisteringPort: ...
    @property
    def intake(self) -> IntakePort: ...
    @property
    def deregistering(self) -> DeregisteringPort: ...
    @property
    def notices(self) -> NoticesPort: ...

    # What it fronts.
    def decide(
        self, ann: Announcement, *, fresh: bool = False, retry: bool = False
    ) -> Decision: ...

    def redecide(self, component_id: str, *, fresh: bool = False, retry: bool = False) -> None: ...

    def reconsider(self) -> None: ...

    def key_proven(self, record: Record) -> None: ...

    def maybe_silent(self, component_id: str) -> None: ...

    def step(self, step: Transition) -> Awaitable[None]: ...

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]: ...

    def change_event(self, component_id: str) -> asyncio.Event: ...

    def waiting_on(self, component_id: str) -> contextlib.AbstractContextManager[None]: ...

    def notify(self, component_id: str) -> None: ...

    def notify_all(self) -> None: ...

    async def events(
        self,
        *,
        since_seq: int = 0,
        component_id: str | None = None,
        kind: str | None = None,
        role: str | None = None,
        cluster: str | None = None,
        limit: int = 1000,
    ) -> list[Event]: ...
