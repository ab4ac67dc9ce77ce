"""The registrar engine: sightings -> pure decisions -> durable transitions -> effects.

One code path serves the CLC (Walrus, CC, SC) and the CC (NC). A decision reads the in-memory
state and its transition is applied to memory before anything else can run, so two concurrent
announcements can never both take one slot or one token use (lesson L1). The transition's write
is queued to the store's writer thread; its effects (hooks, timers, answers) run only once that
write is durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from eucareg.core import legacy
from eucareg.core.decisions import decided
from eucareg.core.legacy import LegacyComponent
from eucareg.core.model import (
    HOLDS_SLOT,
    AnnouncedState,
    Announcement,
    Decision,
    DecisionKind,
    Event,
    HookRun,
    NewEvent,
    Record,
    Role,
    Status,
    announcement_of,
)
from eucareg.core.operations import expired
from eucareg.core.policy import decide
from eucareg.core.registering import key_proven
from eucareg.core.rivals import rival_warnings
from eucareg.core.transitions import (
    Effect,
    EffectKind,
    Prune,
    Retention,
    Timing,
    Transition,
    Write,
)
from eucareg.core.trust import Token, TrustSettings, check_token
from eucareg.core.txt import Rejected, decode
from eucareg.core.view import RegistrarSettings, View
from eucareg.mdns.types import Change as SightingChange
from eucareg.mdns.types import Sighting
from eucareg.registrar.admin import TrustAdmin
from eucareg.registrar.batch import Batcher, Batching
from eucareg.registrar.deregistering import Deregistering
from eucareg.registrar.desk import CredentialAnswer, CredentialDesk, CredentialRefused, Issuer
from eucareg.registrar.euca_keys import EucaKeySource
from eucareg.registrar.hooks import RUNNING_AT_ONCE, HookRunner
from eucareg.registrar.lag import LagMonitor
from eucareg.registrar.memory import Memory
from eucareg.registrar.notes import Notes, refused_event, rejected_event
from eucareg.registrar.presence import Presence
from eucareg.registrar.registering import Registering
from eucareg.registrar.renewal import ExpiryReport
from eucareg.registrar.timers import Timers
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

# Re-decided when something they wait on may have changed.
BLOCKED = frozenset({Status.PENDING, Status.REFUSED, Status.UNMATCHED})
PRUNE_EVERY = 600.0  # seconds between history prunes (also one at every start)
MAX_LEGACY = 1000  # legacy components shown; a flood of names must not grow memory


def _die(exc: BaseException) -> None:
    """Memory ran ahead of a write that failed: only a restart from the store is safe."""
    log.critical("registry write failed (%s); exiting so a restart resumes from the store", exc)
    os._exit(75)


def _fields(ann: Announcement, decision: Decision) -> dict[str, str]:
    """A decision's log fields (the journal keeps them as COMPONENT_ID, ROLE, DECISION_CODE)."""
    return {
        "component_id": ann.component_id,
        "role": ann.role.value,
        "decision_code": decision.code,
    }


def _legacy_event(heard: LegacyComponent, now: float) -> NewEvent:
    """A `legacy` event: like a rejected one, keyed by the instance (there is no id)."""
    return NewEvent(
        at=now,
        component_id=f"instance:{heard.instance}"[:64],
        role=heard.role,
        cluster=heard.cluster,
        address=heard.address,
        kind="legacy",
        code=heard.code,
        reason=legacy.reason(heard),
    )


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
        self._self_registered = self_registered
        self._on_fatal = on_fatal
        self.retention = retention or Retention()
        self._prune_handle: asyncio.TimerHandle | None = None
        self._summary_handle: asyncio.TimerHandle | None = None
        self.memory = Memory({}, {}, TrustSettings(), {}, set())
        self.writer = Writer(store)
        self.hooks = HookRunner(hook_dir, timing.hook_timeout, self._journal, hooks_at_once)
        self.presence = Presence(clock)
        # The presence's parts, by the names the API, the desk and the tests use.
        self.live = self.presence.live
        self.polling = self.presence.polling
        self.proven = self.presence.proven
        self.online_ids = self.presence.online
        self.timers = Timers(clock, self._fire)
        self.notes = Notes()
        # Pre-eucareg components heard now, by instance name: shown, never registered.
        self.legacy: dict[str, LegacyComponent] = {}
        self.batcher = Batcher(self.hooks, batching or Batching(), self.spawn, self._owed)
        self.registering = Registering(self)
        self._changed: dict[str, asyncio.Event] = {}  # woken when a record changes
        self._waiters: dict[str, int] = {}  # requests waiting on each of those events
        self._live_clusters: frozenset[str] | None = None  # while reconsider() runs
        self._tasks: set[asyncio.Task[None]] = set()
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
        held = self.notes.summary(self.clock())
        if held is not None and self.writer.running:
            self.step(Transition(Write(events=(held,))))  # what the window held back
        self.stopping = True
        for handle in (self._prune_handle, self._summary_handle):
            if handle is not None:
                handle.cancel()
        self.timers.close()
        self.expiry.close()
        self.admin.close()
        self.batcher.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, Exception):
                log.error("registrar task failed while stopping: %r", result)
        await self.hooks.close()
        for component_id in list(self._changed):
            self.notify(component_id)
        if self.desk.euca_keys is not None:
            await self.desk.euca_keys.close()
        await self.lag.close()
        await self.writer.close()
        self.store.release()

    async def idle(self) -> None:
        """Wait until every scheduled piece of work is done and durable (tests, benchmarks)."""
        while True:
            while self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
            await self.writer.flush()
            if not self._tasks:
                return

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

    # -- input: sightings --------------------------------------------------------------------

    def on_sighting(self, sighting: Sighting) -> None:
        """Entry point for the mDNS browser; never blocks, never raises."""
        if self.stopping:
            return  # the browser may outlive us by a moment; the store is closed
        if sighting.change is SightingChange.REMOVED:
            self.legacy.pop(sighting.instance, None)
            self._forget_instance(sighting.instance)
            return
        result = decode(
            sighting.instance, sighting.txt, sighting.addresses, self.settings.allowed_ranges
        )
        # Only what decode rejects may be legacy: an eucareg announcement is never misread.
        heard = None
        if isinstance(result, Rejected):
            heard = legacy.classify(sighting.instance, sighting.txt, sighting.addresses)
        if heard is not None:
            self._note_legacy(heard)
            return
        self.legacy.pop(sighting.instance, None)  # the name now says something else
        if isinstance(result, Rejected):
            self._note_rejected(sighting, result)
            return
        if sighting.via != result.source:
            result = replace(result, source=sighting.via)  # browsed in DNS, not multicast
        self.submit(result)

    def submit(self, ann: Announcement) -> None:
        """Track a decoded announcement and decide on it at once."""
        previous_id = self.presence.instances.get(ann.instance)
        if previous_id is not None and previous_id != ann.component_id:
            self._forget_instance(ann.instance)
        fresh = ann.component_id not in self.live
        self.presence.instances[ann.instance] = ann.component_id
        previous = self.live.get(ann.component_id)
        record = self.memory.records.get(ann.component_id)
        spoof = (
            previous is not None
            and record is not None
            and previous.fingerprint == record.fingerprint
            and (
                ann.fingerprint != record.fingerprint
                # A copy of a registered component's announcement under another role or
                # cluster would hide its live "registered as FOO" (and is refused anyway).
                or (
                    record.status in HOLDS_SLOT
                    and (ann.role, ann.cluster) != (record.role, record.cluster)
                    and (previous.role, previous.cluster) == (record.role, record.cluster)
                )
            )
        )
        if not spoof:
            # Someone else announcing a known id with another key must not displace the real
            # announcement (it would hide a live "registered as FOO", for instance).
            self.live[ann.component_id] = ann
        self.decide(ann, fresh=fresh)
        self._moved(ann, previous)

    async def fallback(self, ann: Announcement) -> tuple[Decision, Record | None]:
        """A signed HTTP announcement (the design's registration-service fallback): the
        decision, and the record it left (None when nothing was stored).

        The request was signed by the announced key, so possession is already proven. A
        component we keep a record of is heard for the lease (three report intervals) like a
        live mDNS announcement, so what waits on it (an SC on its CC) moves when it does.
        """
        if self.stopping:
            raise CredentialRefused(503, "the registrar is stopping; announce again shortly")
        key = (ann.component_id, ann.fingerprint)
        self.proven.add(key)
        decision = self.decide(ann, fresh=ann.component_id not in self.live)
        record = self.memory.records.get(ann.component_id)
        if record is None or record.fingerprint != ann.fingerprint:
            # Nothing stored for this key (refused outright, not ours, or another key's id):
            # keep nothing of it in memory either, or a flood of ids would grow it.
            self.proven.discard(key)
        else:
            self.seen(ann.component_id)
            if record.status is Status.AWAITING_KEY:
                self.key_proven(record)  # heard over mDNS first: the request proves the key
                record = self.memory.records.get(ann.component_id)
            if not (decision.event_only and decision.kind is DecisionKind.REFUSE):
                self._lease(ann)
        await self.writer.flush()
        return decision, record

    def _lease(self, ann: Announcement) -> None:
        previous = self.presence.lease(ann)
        self.timers.arm(ann.component_id, EffectKind.LEASE_END, self.clock() + self.timing.lease)
        self._moved(ann, previous)

    def _moved(self, ann: Announcement, previous: Announcement | None) -> None:
        record = self.memory.records.get(ann.component_id)
        if (
            ann.role is Role.CC
            and ann.state is AnnouncedState.REGISTERED
            and (previous is None or previous.state is not AnnouncedState.REGISTERED)
            and record is not None
            and record.status is Status.REGISTERED
            and record.fingerprint == ann.fingerprint
        ):
            # The registered CC now says "registered as FOO": SCs of FOO may stop waiting.
            # (Anyone else saying so changes nothing, and costs no reconsider.)
            self.reconsider()

    def _lease_ended(self, component_id: str) -> None:
        if self.presence.end_lease(component_id):
            log.info("component %s stopped announcing itself over HTTP", component_id)
            self.maybe_silent(component_id)

    def seen(self, component_id: str) -> None:
        self.presence.seen(component_id)

    def _forget_instance(self, instance: str) -> None:
        component_id = self.presence.forget_instance(instance)
        if component_id is not None:
            log.info("component %s withdrew its announcement", component_id)
            self.maybe_silent(component_id)

    def maybe_silent(self, component_id: str) -> None:
        """A source of `component_id` went away (its announcement, or its last open request).
        If none is left, a newcomer refused its address now waits for it to stay silent and
        may replace it then: decide the blocked again, and once more when that time is up."""
        record = self.memory.records.get(component_id)
        if record is None or record.status not in HOLDS_SLOT:
            # Silence matters only for a slot a newcomer may take over (and a flood of
            # unknown ids going quiet must not cost a reconsider each).
            return
        self.seen(component_id)
        if not self.presence.silent(component_id):
            return
        self.reconsider()
        replace_after = self.settings.replace_after
        self.timers.arm(component_id, EffectKind.RECONSIDER, self.clock() + replace_after + 0.05)

    def _note_rejected(self, sighting: Sighting, rejected: Rejected) -> None:
        if not self.notes.first(f"rejected:{sighting.instance}", rejected.reason):
            return
        if self._admit_note(rejected.code):
            log.warning("rejected announcement %r: %s", sighting.instance, rejected.reason)
            event = rejected_event(sighting, rejected, self.clock())
            self.step(Transition(Write(events=(event,))))

    def _note_legacy(self, heard: LegacyComponent) -> None:
        """Show a pre-eucareg component in status, and say so once per instance: as
        _note_rejected, the same instance saying the same again writes nothing."""
        self.legacy.pop(heard.instance, None)
        self.legacy[heard.instance] = heard  # the newest last: the oldest is dropped first
        while len(self.legacy) > MAX_LEGACY:
            del self.legacy[next(iter(self.legacy))]
        what = f"{heard.code}|{heard.role}|{heard.cluster}|{heard.address}|{heard.eucavers}"
        if not self.notes.first(f"legacy:{heard.instance}", what):
            return
        if self._admit_note(heard.code):
            event = _legacy_event(heard, self.clock())
            log.warning("legacy announcement: %s", event.reason)
            self.step(Transition(Write(events=(event,))))

    def legacy_components(self) -> list[dict[str, str | None]]:
        """The legacy components heard now, for GET /v1/status, in a stable order."""
        return [
            {
                "kind": c.kind,
                "role": c.role,
                "cluster": c.cluster,
                "address": c.address,
                "eucavers": c.eucavers,
                "instance": c.instance,
            }
            for c in sorted(self.legacy.values(), key=lambda c: (c.role, c.instance))
        ]

    def self_registration_changed(self) -> None:
        """The CC on this host got its credentials: NCs waiting on it may proceed; or renewed
        them: NCs watching theirs get the new chain."""
        self.reconsider()
        self.desk.chain_changed()

    def reconsider(self) -> None:
        """Decide again for live announcements whose verdict may have changed."""
        # Which clusters are live cannot change while the blocked are decided (a CC becomes
        # registered only when its hook ends): worked out once, not once per waiting SC.
        self._live_clusters = self.live_registered_clusters()
        try:
            for ann in list(self.live.values()):
                record = self.memory.records.get(ann.component_id)
                if record is None or record.status in BLOCKED:
                    self.decide(ann)
        finally:
            self._live_clusters = None

    # -- decisions ---------------------------------------------------------------------------

    def warnings(self) -> list[str]:
        """What contradicts the design's "only one" rules among the components heard now, and
        the certificates of registered components that were not renewed in time."""
        return rival_warnings(self.live.values(), self.settings.own_clc) + self.expiry.warnings()

    def view(self, ann: Announcement | None = None) -> View:
        records = self.memory.records
        now = self.clock()
        verdict = None
        if ann is not None and ann.token_id is not None:
            token = self.memory.tokens.get(ann.token_id)
            verdict = check_token(token, ann, self.master_key, now)
        live_clusters: frozenset[str] = frozenset()
        if ann is None or ann.role is Role.SC:
            cached = self._live_clusters
            live_clusters = self.live_registered_clusters() if cached is None else cached
        return View(
            records=records,
            live_registered_clusters=live_clusters,
            self_registered=self._self_registered(),
            trust=self.memory.trust,
            now=now,
            token=verdict,
            online=self.online_ids,
            last_seen=self.presence.last_seen,
            seen_floor=self.started_at,
            unadmitted=self.memory.unadmitted,
            index=self.memory.index,
        )

    def live_registered_clusters(self) -> frozenset[str]:
        """Clusters whose CC is heard saying "registered as FOO" and is the CC registered here
        as FOO: its record's role, cluster and key, not just what the announcement claims."""
        records = self.memory.records
        return frozenset(
            a.cluster
            for a in self.live.values()
            if a.role is Role.CC
            and a.state is AnnouncedState.REGISTERED
            and a.cluster is not None
            and (rec := records.get(a.component_id)) is not None
            and rec.status is Status.REGISTERED
            and rec.role is Role.CC
            and rec.cluster == a.cluster
            and rec.fingerprint == a.fingerprint
        )

    def decide(self, ann: Announcement, *, fresh: bool = False, retry: bool = False) -> Decision:
        """Decide and apply, with no await in between: see the module docstring."""
        existing = self.memory.records.get(ann.component_id)
        decision = decide(self.view(ann), ann, self.settings, fresh=fresh, retry=retry)
        if decision.event_only:
            self._note(ann, decision)
            return decision
        replaced = self.memory.records.get(decision.replaces) if decision.replaces else None
        step = decided(
            existing,
            ann,
            decision,
            now=self.clock(),
            timing=self.timing,
            proven=(ann.component_id, ann.fingerprint) in self.proven,
            replaced=replaced,
        )
        if step.change.records:
            new = step.change.records[0]
            log.info(
                "%s %s %s (%s): %s",
                new.status.value,
                ann.role.value,
                ann.component_id,
                ann.address,
                new.reason,
                extra=_fields(ann, decision),
            )
        self.step(step)
        return decision

    def _note(self, ann: Announcement, decision: Decision) -> None:
        key = f"{ann.component_id}:{ann.fingerprint}:{ann.role}:{ann.cluster}"
        if not self.notes.first(key, decision.code):
            return
        if self._admit_note(decision.code):
            log.warning(
                "refused %s %s: %s",
                ann.role.value,
                ann.component_id,
                decision.reason,
                extra=_fields(ann, decision),
            )
            self.step(Transition(Write(events=(refused_event(ann, decision, self.clock()),))))

    def _admit_note(self, code: str) -> bool:
        """A note may be written now, or is held for the window's summary event."""
        if self.notes.admit(self.clock(), code):
            return True
        if self._summary_handle is None and not self.stopping:
            self._summary_handle = asyncio.get_running_loop().call_later(
                self.notes.window, self._write_summary
            )
        return False

    def _write_summary(self) -> None:
        self._summary_handle = None
        event = self.notes.summary(self.clock())
        if event is not None and not self.stopping:
            log.warning("%s", event.reason)
            self.step(Transition(Write(events=(event,))))

    def redecide(self, component_id: str, *, fresh: bool = False, retry: bool = False) -> None:
        """Decide again for a known component: its live announcement if it is the accepted
        one, else the announcement its record describes."""
        record = self.memory.records.get(component_id)
        live = self.live.get(component_id)
        if record is None:
            if live is not None:
                self.decide(live, fresh=fresh)
            return
        self.decide(announcement_of(record, live), fresh=fresh, retry=retry)

    # -- transitions and effects -------------------------------------------------------------

    def step(self, step: Transition) -> Awaitable[None]:
        """Apply a transition to memory now, queue its write, and carry out its effects once
        the write is durable. The returned awaitable resolves after the effects are started."""
        if step.empty:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        self.memory.apply(step.change)
        self.busy_at = time.monotonic()  # for quietgc: a burst is on while transitions come
        durable = self.writer.commit(step.change)
        # Shielded: a caller that is cancelled (a client hung up) must not cancel the effects
        # of a transition that is already in memory and on its way to the disk.
        return asyncio.shield(self.spawn(self._after(durable, step.effects)))

    async def _after(self, durable: Awaitable[None], effects: tuple[Effect, ...]) -> None:
        try:
            await durable
        except Exception as exc:
            self._on_fatal(exc)
            raise
        self.effects(effects)

    def effects(self, effects: tuple[Effect, ...]) -> None:
        for effect in effects:
            cid = effect.component_id
            if effect.kind is EffectKind.RUN_HOOK:
                self.spawn(self.registering.run(cid, rerun=effect.rerun))
            elif effect.kind is EffectKind.WAKE:
                self.notify(cid)
            elif effect.kind is EffectKind.CANCEL_TIMERS:
                self.timers.cancel(cid)
            elif effect.kind in (EffectKind.EXPIRE_AT, EffectKind.RETRY_AT, EffectKind.RECHECK_AT):
                self.timers.arm(cid, effect.kind, effect.at)
            elif effect.kind is EffectKind.RECONSIDER:
                self.reconsider()
            elif effect.kind is EffectKind.REDECIDE:
                self.redecide(cid, fresh=True)
            elif effect.kind is EffectKind.RUN_DEREGISTER_HOOK and effect.record is not None:
                self.deregistering.start(effect.record)

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

    def _expire(self, component_id: str) -> None:
        record = self.memory.records.get(component_id)
        if record is not None:
            self.step(expired(record, self.clock(), self.timing.pending_timeout))

    def key_proven(self, record: Record) -> None:
        # By the record's state, not by `proven`: an HTTP announcement proves the key too,
        # and must not make the credential request that follows it a no-op.
        if record.status is not Status.AWAITING_KEY:
            return
        self.proven.add((record.component_id, record.fingerprint))
        old = self.memory.records.get(record.replaces) if record.replaces else None
        if record.replaces and (old is None or old.claimable):
            # Taking over the operator's registration: decided again now that the key is
            # proven (the registration may be gone, or still running its hook).
            self.redecide(record.component_id, fresh=True)
            return
        if old is not None and old.status in HOLDS_SLOT and record.status is Status.AWAITING_KEY:
            silent = self.view().silent_for(old.component_id)
            if silent is None or silent < self.settings.replace_after:
                # The old identity was heard again since: the policy decides afresh.
                self.redecide(record.component_id, fresh=True)
                return
        self.step(key_proven(record, self.clock(), old))

    # -- plumbing ----------------------------------------------------------------------------

    def change_event(self, component_id: str) -> asyncio.Event:
        return self._changed.setdefault(component_id, asyncio.Event())

    @contextlib.contextmanager
    def waiting_on(self, component_id: str) -> Iterator[None]:
        """Count a request waiting on the component's change event (a credential request, an
        announcement waiting for its outcome); the event is dropped when the last one ends,
        not before (one caller's end must not leave another waiting on a forgotten event)."""
        self._waiters[component_id] = self._waiters.get(component_id, 0) + 1
        try:
            yield
        finally:
            left = self._waiters.pop(component_id) - 1
            if left:
                self._waiters[component_id] = left
            else:
                self._changed.pop(component_id, None)

    def notify(self, component_id: str) -> None:
        """Wake every request waiting on this component; later waiters get a fresh event."""
        event = self._changed.pop(component_id, None)
        if event is not None:
            event.set()

    def notify_all(self) -> None:
        for component_id in list(self._changed):
            self.notify(component_id)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("registrar task failed", exc_info=task.exception())

    def _fire(self, component_id: str, kind: EffectKind) -> None:
        if kind is EffectKind.EXPIRE_AT:
            self._expire(component_id)
        elif kind is EffectKind.RETRY_AT:
            self.redecide(component_id, retry=True)
        elif kind is EffectKind.RECHECK_AT:
            self.redecide(component_id)
        elif kind is EffectKind.RECONSIDER:
            self.reconsider()
        elif kind is EffectKind.LEASE_END:
            self._lease_ended(component_id)

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
    ) -> CredentialAnswer:
        return await self.desk.credentials(component_id, public_key, wait, have, euca)

    async def mark_collected(self, component_id: str) -> None:
        await self.desk.mark_collected(component_id)
