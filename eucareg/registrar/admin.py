"""Trust administration: the operator's mode, locks, install windows, join tokens, and the
approve / reject / deregister decisions on single components.

Each action is a transition from the core; it is answered only once it is durable.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from eucareg.core.model import (
    AnnouncedState,
    Announcement,
    Decision,
    HookRun,
    IPAddress,
    Record,
    Role,
)
from eucareg.core.operations import (
    approved,
    deregistered,
    registrar_event,
    rejected,
    trust_changed,
)
from eucareg.core.transitions import EffectKind, Transition, Write
from eucareg.core.trust import (
    Mode,
    Task,
    Token,
    TrustSettings,
    format_token,
    new_token_id,
    token_secret,
)
from eucareg.upgrade import plan
from eucareg.upgrade.plan import Candidate, PlanRow

if TYPE_CHECKING:
    from eucareg.registrar.ports import Engine

log = logging.getLogger(__name__)


class TrustAdmin:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._install_timer: asyncio.TimerHandle | None = None

    def close(self) -> None:
        if self._install_timer is not None:
            self._install_timer.cancel()
            self._install_timer = None

    # -- mode, locks, install window ---------------------------------------------------------

    async def _set_trust(self, trust: TrustSettings, code: str, reason: str) -> None:
        engine = self.engine
        log.info("trust: %s", reason)
        await engine.step(trust_changed(trust, engine.clock(), code, reason))
        self.arm_install_close()
        # Components long-polling over HTTP (fallback) re-announce when woken.
        engine.notify_all()

    async def set_mode(self, mode: Mode) -> None:
        trust = replace(self.engine.trust, mode=mode)
        await self._set_trust(trust, "mode", f"mode set to {mode.value}")

    async def set_locked(self, tasks: frozenset[Task], locked: bool) -> None:
        current = self.engine.trust.locked
        new = current | tasks if locked else current - tasks
        names = ", ".join(sorted(t.value for t in tasks))
        what = "locked" if locked else "unlocked"
        trust = replace(self.engine.trust, locked=frozenset(new))
        await self._set_trust(trust, what, f"{what} {names}")

    async def open_install_window(self, seconds: float) -> float:
        until = self.engine.clock() + seconds
        await self._set_trust(
            replace(self.engine.trust, install_until=until),
            "install-window-open",
            f"install window open for {seconds:g}s: unsigned announcements are accepted",
        )
        return until

    async def close_install_window(self, reason: str = "closed by the operator") -> None:
        await self._set_trust(
            replace(self.engine.trust, install_until=None),
            "install-window-closed",
            f"install window {reason}",
        )

    def arm_install_close(self) -> None:
        self.close()
        until = self.engine.trust.install_until
        if until is None or self.engine.stopping:
            return
        delay = max(0.0, until - self.engine.clock())
        self._install_timer = asyncio.get_running_loop().call_later(delay, self._time_ran_out)

    def _time_ran_out(self) -> None:
        self._install_timer = None
        asyncio.get_running_loop().create_task(
            self.close_install_window("closed: its time ran out")
        )

    # -- single components -------------------------------------------------------------------

    def find(self, component_id: str | None, fingerprint: str | None) -> Record:
        """The record an operator names, by id or by key fingerprint; KeyError otherwise."""
        records = self.engine.memory.records
        if component_id:
            if component_id not in records:
                raise KeyError(f"no component {component_id} in this registrar's records")
            return records[component_id]
        matches = [r for r in records.values() if r.fingerprint == fingerprint]
        if not matches:
            raise KeyError(f"no component with key {fingerprint} in this registrar's records")
        return matches[0]

    async def _apply(self, step: Transition) -> None:
        await self.engine.step(step)

    async def approve(self, record: Record) -> Record:
        current = self.find(record.component_id, None)
        step = approved(current, self.engine.clock())
        await self._apply(step)
        return step.change.records[0]

    async def reject(self, record: Record) -> Record:
        current = self.find(record.component_id, None)
        step = rejected(current, self.engine.clock())
        await self._apply(step)
        return step.change.records[0]

    async def deregister(self, record: Record) -> asyncio.Future[HookRun] | None:
        """Remove a component and revoke its credentials; it then meets the current trust
        settings again like any newcomer (lesson L9). Returns the outcome of its deregister
        hook to come, when its registration hook ran (docs/hooks.md)."""
        current = self.find(record.component_id, None)
        self.engine.proven.discard((current.component_id, current.fingerprint))
        step = deregistered(current, self.engine.clock())
        await self._apply(step)
        if not any(e.kind is EffectKind.RUN_DEREGISTER_HOOK for e in step.effects):
            return None
        return self.engine.deregistering.outcome(current.component_id)

    async def register(
        self, role: Role, address: IPAddress, cluster: str | None, fingerprint: str | None
    ) -> tuple[Decision, Record | None]:
        """The operator registers a component by role and address before it is heard (the
        design's manual registration). Its hook runs now; the component that announces
        itself there later (with `fingerprint`, if given) takes the registration over."""
        engine = self.engine
        component_id = f"{role.value}-{uuid.uuid4().hex[:12]}"
        ann = Announcement(
            role=role,
            component_id=component_id,
            cluster=cluster,
            state=AnnouncedState.READY,
            address=address,
            fingerprint=fingerprint or "",
            api_port=None,
            eucavers="",
            instance=f"manual:{address}",
            source="manual",
        )
        # No key to prove: the operator vouches, so the hook runs at once.
        engine.proven.add((component_id, ann.fingerprint))
        decision = engine.decide(ann)
        record = engine.memory.records.get(component_id)
        if record is None:
            engine.proven.discard((component_id, ann.fingerprint))
        await engine.writer.flush()
        return decision, record

    async def import_components(
        self, candidates: Sequence[Candidate], *, dry_run: bool, source: str
    ) -> list[PlanRow]:
        """Record what a Eucalyptus 1.6.2 front end registered (`eucareg import`): all of
        it, or (when a row conflicts or is refused, or in a dry run) nothing. Planned and
        applied with no await in between, so concurrent imports see each other's records.
        No hook runs: Eucalyptus registered these components already."""
        engine = self.engine
        settings = engine.settings
        rows = plan.classify(
            candidates,
            engine.memory.records,
            registers=settings.registers,
            own_cluster=settings.own_cluster,
            allowed=settings.allowed_ranges,
            index=engine.memory.index,
        )
        todo = [r for r in rows if r.action is plan.Action.IMPORT]
        if dry_run or not todo or any(r.action in plan.BLOCKING for r in rows):
            return rows
        ids = [f"{r.role.value}-{uuid.uuid4().hex[:12]}" for r in todo]
        log.info("import: %d components from %s", len(todo), source)
        await engine.step(plan.imported(todo, ids, engine.clock(), source))
        await engine.writer.flush()
        return plan.with_ids(rows, ids)

    # -- join tokens -------------------------------------------------------------------------

    async def create_token(
        self, role: Role, cluster: str | None, ttl: float, uses: int | None, ca_fingerprint: str
    ) -> str:
        engine = self.engine
        settings = engine.settings
        if role not in settings.registers:
            raise ValueError(f"this registrar does not register {role.value} components")
        if role is Role.NC:
            cluster = cluster or settings.own_cluster
            if cluster != settings.own_cluster:
                raise ValueError(f"this CC registers nodes of {settings.own_cluster} only")
        elif role is Role.WALRUS and cluster:
            raise ValueError("a walrus belongs to no cluster")
        if uses is not None and uses < 1:
            raise ValueError("uses must be at least 1")
        if not engine.master_key:
            raise ValueError("this registrar has no master key; cannot issue tokens")
        now = engine.clock()
        token = Token(
            token_id=new_token_id(),
            role=role,
            cluster=cluster,
            created_at=now,
            expires_at=now + ttl,
            uses=uses,
            revoked_at=None,
            ca_fingerprint=ca_fingerprint,
        )
        scope = f"{role.value}" + (f" of cluster {cluster}" if cluster else "")
        limit = f", {uses} use(s)" if uses else ""
        reason = f"token {token.token_id} created for {scope}{limit}"
        await self._apply(
            Transition(
                Write(tokens=(token,), events=(registrar_event(now, "token-created", reason),))
            )
        )
        log.info("trust: %s", reason)
        secret = token_secret(engine.master_key, token.token_id)
        return format_token(token.token_id, secret, ca_fingerprint)

    async def revoke_token(self, token_id: str) -> None:
        engine = self.engine
        token = engine.memory.tokens.get(token_id)
        if token is None or token.revoked_at is not None:
            raise KeyError(f"no unrevoked token {token_id}")
        now = engine.clock()
        reason = f"token {token_id} revoked"
        await self._apply(
            Transition(
                Write(
                    tokens=(replace(token, revoked_at=now),),
                    events=(registrar_event(now, "token-revoked", reason),),
                )
            )
        )
        log.info("trust: %s", reason)
