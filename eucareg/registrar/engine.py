"""The registrar engine, as the agent and the API hold it: it builds the collaborators that carry
an announcement through (intake.py -> deciding.py -> effects.py -> the store's writer) and those
of the operator and the components (admin.py, desk.py), starts and stops them, and fronts them.
They know it only as ports.py describes it, so nothing below imports this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from eucareg.core.model import Announcement, Decision, Event, HookRun, Record, Role, Status
from eucareg.core.rivals import rival_warnings
from eucareg.core.transitions import EffectKind, Prune, Retention, Timing, Transition, Write
from eucareg.core.trust import Token, TrustSettings
from eucareg.core.view import RegistrarSettings, View
from eucareg.mdns.types import Sighting
from eucareg.registrar.admin import TrustAdmin
from eucareg.registrar.batch import Batcher, Batching
from eucareg.registrar.deciding import Decider
from eucareg.registrar.deregistering import Deregistering
from eucareg.registrar.desk import CredentialAnswer, CredentialDesk, CredentialRefused, Issuer
from eucareg.registrar.effects import Effects
from eucareg.registrar.euca_keys import EucaKeySource
from eucareg.registrar.hooks import RUNNING_AT_ONCE, HookRunner
from eucareg.registrar.intake import Intake
from eucareg.registrar.lag import LagMonitor
from eucareg.registrar.memory import Memory
from eucareg.registrar.notices import Notices
from eucareg.registrar.presence import Presence
from eucareg.registrar.registering import Registering
from eucareg.registrar.renewal import ExpiryReport
from eucareg.registrar.timers import Timers
from eucareg.registrar.wakeups import Wakeups
from eucareg.store.registry import Store
from eucareg.store.writer import Writer

__all__ = [
    "CredentialAnswer",
    "CredentialRefused",
    "Issuer",
    "Registrar",
    "RegistrarSettings",
    "Retention",
    "Timing",
]

log = logging.getLogger(__name__)

PRUNE_EVERY = 600.0  # seconds between history prunes (also one at every start)


def _die(exc: BaseException) -> None:
    """Memory ran ahead of a write that failed: only a restart from the store is safe."""
    log.critical("registry write failed (%s); exiting so a restart resumes from the store", exc)
    os._exit(75)


class Registrar:
    """Holds the live announcements and drives each component through its registration."""

    def __init__(
        self,
        store: Store,
        settings: RegistrarSettings,
        *,
        hook_dir: Path,
        timing: Timing,
        issuer_for: Callable[[Role], Issuer | None],
        self_registered: Callable[[], bool] = lambda: False,
        clock: Callable[[], float] = time.time,
        master_key: bytes = b"",
        on_fatal: Callable[[BaseException], None] = _die,
        retention: Retention | None = None,
        hooks_at_once: int = RUNNING_AT_ONCE,
        batching: Batching | None = None,
        euca_keys: EucaKeySource | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.hook_dir = hook_dir
        self.timing = timing
        self.clock = clock
        self.master_key = master_key
        self.retention = retention or Retention()
        self._prune_handle: asyncio.TimerHandle | None = None
        self.memory = Memory({}, {}, TrustSettings(), {}, set())
        self.writer = Writer(store)
        self.hooks = HookRunner(hook_dir, timing.hook_timeout, self._journal, hooks_at_once)
        self.presence = Presence(clock)
        # The presence's parts, by the names the API, the desk and the tests use.
        self.live = self.presence.live
        self.polling = self.presence.polling
        self.proven = self.presence.proven
        self.online_ids = self.presence.online
        # Source -> decision -> effect -> record: announcements come in through the intake,
        # the decider decides, the effects carry the transitions out once the writer made
        # them durable (see each module).
        self.intake = Intake(self)
        self.decider = Decider(self, self_registered)
        self.effects = Effects(self, on_fatal)
        self.wakeups = Wakeups()
        self.notices = Notices(self)
        # Their parts, by the names the API and the tests use.
        self.notes = self.notices.notes
        self.legacy = self.notices.legacy
        self._changed = self.wakeups.changed
        self._waiters = self.wakeups.waiters
        self._tasks = self.effects.tasks
        self.timers = Timers(clock, self.effects.fire)
        self.batcher = Batcher(self.hooks, batching or Batching(), self.spawn, self._owed)
        self.registering = Registering(self)
        self.stopping = False
        self.started_at = clock()
        self.busy_at = time.monotonic()
        self.lag = LagMonitor()
        self.admin = TrustAdmin(self)
        self.desk = CredentialDesk(self, issuer_for, euca_keys)
        self.expiry = ExpiryReport(self, issuer_for)  # certificates not renewed in time
        self.deregistering = Deregistering(self)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the store into memory and pick up where a previous run stopped; StoreBusy
        when another registrar owns the store."""
        await asyncio.to_thread(self.store.claim)
        snapshot = await asyncio.to_thread(self.store.load)
        self.memory = Memory.from_snapshot(snapshot)
        self.writer.start()
        self.lag.start()
        self.admin.arm_install_close()
        now = self.clock()
        await self.registering.resume(snapshot)
        for record in list(self.memory.records.values()):
            if record.status in (Status.PENDING, Status.AWAITING_KEY) and record.expires_at:
                self.timers.arm(record.component_id, EffectKind.EXPIRE_AT, record.expires_at)
            elif record.status is Status.FAILED:
                retry_at = record.next_retry_at or now
                self.timers.arm(record.component_id, EffectKind.RETRY_AT, retry_at)
        self._prune()
        self.expiry.start()
        await self.writer.flush()

    def _prune(self) -> None:
        """Drop history past its retention, now and every PRUNE_EVERY seconds."""
        keep = self.retention
        before = self.clock() - keep.keep_for
        self.writer.commit(Write(prune=Prune(before, keep.max_events, keep.max_hook_runs)))
        self._prune_handle = asyncio.get_running_loop().call_later(PRUNE_EVERY, self._prune)

    async def close(self) -> None:
        """Stop: cancel timers and work (running hooks' process groups are killed and awaited),
        answer every waiting request, and let the last writes reach the store."""
        self.notices.close()
        self.stopping = True
        if self._prune_handle is not None:
            self._prune_handle.cancel()
        self.timers.close()
        self.expiry.close()
        self.admin.close()
        self.batcher.close()
        await self.effects.close()
        await self.hooks.close()
        self.wakeups.notify_all()
        if self.desk.euca_keys is not None:
            await self.desk.euca_keys.close()
        await self.lag.close()
        await self.writer.close()
        self.store.release()

    async def idle(self) -> None:
        """Wait until every scheduled piece of work is done and durable (tests, benchmarks)."""
        await self.effects.idle()

    # -- read access -------------------------------------------------------------------------

    @property
    def trust(self) -> TrustSettings:
        return self.memory.trust

    def records(self) -> dict[str, Record]:
        return dict(self.memory.records)

    def record(self, component_id: str) -> Record | None:
        return self.memory.records.get(component_id)

    def online(self, component_id: str) -> bool:
        """Whether the component is heard now (announcing, or waiting on a request)."""
        return component_id in self.online_ids

    def tokens(self) -> list[Token]:
        return sorted(self.memory.tokens.values(), key=lambda t: t.created_at)

    async def events(
        self,
        *,
        since_seq: int = 0,
        component_id: str | None = None,
        kind: str | None = None,
        role: str | None = None,
        cluster: str | None = None,
        limit: int = 1000,
    ) -> list[Event]:
        await self.writer.flush()
        return await asyncio.to_thread(
            self.store.events,
            since_seq=since_seq,
            component_id=component_id,
            kind=kind,
            role=role,
            cluster=cluster,
            limit=limit,
        )

    async def hook_runs(self, component_id: str | None = None) -> list[HookRun]:
        await self.writer.flush()
        return await asyncio.to_thread(self.store.hook_runs, component_id)

    def warnings(self) -> list[str]:
        """What contradicts the design's "only one" rules among the components heard now, and
        the certificates of registered components that were not renewed in time."""
        return rival_warnings(self.live.values(), self.settings.own_clc) + self.expiry.warnings()

    def legacy_components(self) -> list[dict[str, str | None]]:
        return self.notices.legacy_components()

    # -- input: announcements (see intake.py) ------------------------------------------------

    def on_sighting(self, sighting: Sighting) -> None:
        """Entry point for the mDNS browser; never blocks, never raises."""
        self.intake.on_sighting(sighting)

    def submit(self, ann: Announcement) -> None:
        self.intake.submit(ann)

    async def fallback(self, ann: Announcement) -> tuple[Decision, Record | None]:
        return await self.intake.fallback(ann)

    def maybe_silent(self, component_id: str) -> None:
        self.intake.maybe_silent(component_id)

    # -- decisions (see deciding.py) ---------------------------------------------------------

    def self_registration_changed(self) -> None:
        """The CC on this host got its credentials: NCs waiting on it may proceed; or renewed
        them: NCs watching theirs get the new chain."""
        self.reconsider()
        self.desk.chain_changed()

    def view(self, ann: Announcement | None = None) -> View:
        return self.decider.view(ann)

    def decide(self, ann: Announcement, *, fresh: bool = False, retry: bool = False) -> Decision:
        return self.decider.decide(ann, fresh=fresh, retry=retry)

    def redecide(self, component_id: str, *, fresh: bool = False, retry: bool = False) -> None:
        self.decider.redecide(component_id, fresh=fresh, retry=retry)

    def reconsider(self) -> None:
        self.decider.reconsider()

    def key_proven(self, record: Record) -> None:
        self.decider.key_proven(record)

    # -- transitions and effects (see effects.py and wakeups.py) -------------------------------

    def step(self, step: Transition) -> Awaitable[None]:
        """Apply a transition now; its effects follow once it is durable (Effects.step)."""
        return self.effects.step(step)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        return self.effects.spawn(coro)

    def change_event(self, component_id: str) -> asyncio.Event:
        return self.wakeups.change_event(component_id)

    def waiting_on(self, component_id: str) -> contextlib.AbstractContextManager[None]:
        return self.wakeups.waiting_on(component_id)

    def notify(self, component_id: str) -> None:
        self.wakeups.notify(component_id)

    def notify_all(self) -> None:
        self.wakeups.notify_all()

    def _owed(self, ran_for: Record) -> bool:
        """Whether the hook started for `ran_for` is still owed: the component's record is
        still that one, registering (not deregistered, replaced or moved meanwhile)."""
        record = self.memory.records.get(ran_for.component_id)
        return (
            record is not None
            and record.status is Status.REGISTERING
            and (record.fingerprint, record.address, record.role, record.cluster)
            == (ran_for.fingerprint, ran_for.address, ran_for.role, ran_for.cluster)
        )

    async def _journal(self, *runs: HookRun) -> None:
        await self.writer.commit(Write(hook_runs=runs))

    # -- the operator and the components (see admin.py and desk.py) ---------------------------

    async def set_mode(self, mode: Any) -> None:
        await self.admin.set_mode(mode)

    async def set_locked(self, tasks: Any, locked: bool) -> None:
        await self.admin.set_locked(tasks, locked)

    async def open_install_window(self, seconds: float) -> float:
        return await self.admin.open_install_window(seconds)

    async def close_install_window(self, reason: str = "closed by the operator") -> None:
        await self.admin.close_install_window(reason)

    def find(self, component_id: str | None, fingerprint: str | None) -> Record:
        return self.admin.find(component_id, fingerprint)

    async def approve(self, record: Record) -> Record:
        return await self.admin.approve(record)

    async def reject(self, record: Record) -> Record:
        return await self.admin.reject(record)

    async def deregister(self, record: Record) -> asyncio.Future[HookRun] | None:
        """Deregister; the outcome of its deregister hook to come, if one is owed."""
        return await self.admin.deregister(record)

    async def create_token(
        self, role: Role, cluster: str | None, ttl: float, uses: int | None, ca_fingerprint: str
    ) -> str:
        return await self.admin.create_token(role, cluster, ttl, uses, ca_fingerprint)

    async def revoke_token(self, token_id: str) -> None:
        await self.admin.revoke_token(token_id)

    async def credentials(
        self,
        component_id: str,
        public_key: Any,
        wait: float,
        have: str | None = None,
        euca: str | None = None,
        chain: str | None = None,
    ) -> CredentialAnswer:
        return await self.desk.credentials(component_id, public_key, wait, have, euca, chain)

    async def mark_collected(self, component_id: str) -> None:
        await self.desk.mark_collected(component_id)
