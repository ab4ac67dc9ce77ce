"""The registrar: turns sightings into decisions and decisions into effects and records.

One code path serves the CLC (Walrus, CC, SC) and the CC (NC). Work is serialised per component,
and a decision and the record it implies are written with no await between them, so concurrent
sightings can neither register one component twice nor fill one slot twice (lesson L1).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cryptography import x509

from eucareg.core.model import (
    HOLDS_SLOT,
    AnnouncedState,
    Announcement,
    Decision,
    DecisionKind,
    Event,
    Record,
    Role,
    Status,
)
from eucareg.core.policy import RegistrarSettings, View, decide
from eucareg.core.trust import (
    Mode,
    Task,
    Token,
    TrustSettings,
    check_token,
    format_token,
    new_token_id,
    token_secret,
)
from eucareg.core.txt import Rejected, decode
from eucareg.mdns.types import Change, Sighting
from eucareg.pki import credentials as cred
from eucareg.registrar.hooks import run_hook
from eucareg.store.registry import HookRun, IssuedCertificate, Store, TrustStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Timing:
    """Time limits of a registrar, from the config file."""

    pending_timeout: float = 3600.0
    hook_timeout: float = 60.0
    retry_base: float = 2.0
    retry_max: float = 300.0

    def backoff(self, attempts: int) -> float:
        return float(min(self.retry_max, self.retry_base * 2 ** max(0, attempts - 1)))


@dataclass(frozen=True)
class Issuer:
    """The key and certificate a registrar signs component certificates with."""

    key: cred.PrivateKey
    cert: x509.Certificate
    cloud_cert: x509.Certificate

    def bundle(self, record: Record, cert: x509.Certificate) -> dict[str, str]:
        layout = cred.LAYOUTS[record.role]
        files = {cred.CLOUD_CERT: cred.cert_pem(self.cloud_cert), layout.cert: cred.cert_pem(cert)}
        if layout.issuer:
            files[layout.issuer] = cred.cert_pem(self.cert)
        return files


class CredentialRefused(Exception):
    """A credential request that must be answered with an error (status, message)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class CredentialAnswer:
    status: Status | None
    reason: str
    files: dict[str, str] | None


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
    ) -> None:
        self.store = store
        self.settings = settings
        self.hook_dir = hook_dir
        self.timing = timing
        self._issuer_for = issuer_for
        self._self_registered = self_registered
        self._clock = clock
        self.live: dict[str, Announcement] = {}
        self._instances: dict[str, str] = {}  # DNS-SD instance -> component id
        self._locks: dict[str, asyncio.Lock] = {}
        self._changed: dict[str, asyncio.Event] = {}  # woken when a record changes
        self._proven: set[tuple[str, str]] = set()  # (id, fingerprint) that signed a request
        self.trust_store = TrustStore(store)
        self.trust = self.trust_store.load_settings()
        self._master_key = master_key
        self._install_timer: asyncio.TimerHandle | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._noted: dict[str, str] = {}  # last event-only note per key, to avoid repeats
        self.started_at = clock()

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Pick up where a previous run stopped: re-arm expiry and retry timers."""
        now = self._clock()
        self._arm_install_close()
        for record in self.store.records().values():
            if record.status in WAITING and record.expires_at is not None:
                self._arm_expiry(record.component_id, record.expires_at)
            elif record.status is Status.FAILED:
                self._arm_retry(record.component_id, record.next_retry_at or now)
            elif record.status is Status.REGISTERING:
                # We died while its hook ran; it did not finish registering, so run it again.
                self._arm_retry(record.component_id, now)

    async def close(self) -> None:
        if self._install_timer is not None:
            self._install_timer.cancel()
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def idle(self) -> None:
        """Wait until every scheduled piece of work is done (tests and benchmarks)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- read access -------------------------------------------------------------------------

    def records(self) -> dict[str, Record]:
        return self.store.records()

    def record(self, component_id: str) -> Record | None:
        return self.store.get(component_id)

    def online(self, component_id: str) -> bool:
        """Whether the component is announcing itself now."""
        return component_id in self.live

    def tokens(self) -> list[Token]:
        return self.trust_store.tokens()

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
        return await asyncio.to_thread(self.store.hook_runs, component_id)

    # -- input: sightings -----------------------------------------------------------------

    def on_sighting(self, sighting: Sighting) -> None:
        """Entry point for the mDNS browser; never blocks, never raises."""
        if sighting.change is Change.REMOVED:
            self._forget_instance(sighting.instance)
            return
        result = decode(sighting.instance, sighting.txt, sighting.addresses)
        if isinstance(result, Rejected):
            self._note_rejected(sighting, result)
            return
        self.submit(result)

    def submit(self, ann: Announcement) -> asyncio.Task[None]:
        """Track a decoded announcement and schedule its decision."""
        previous_id = self._instances.get(ann.instance)
        if previous_id is not None and previous_id != ann.component_id:
            self._forget_instance(ann.instance)
        fresh = ann.component_id not in self.live
        self._instances[ann.instance] = ann.component_id
        previous = self.live.get(ann.component_id)
        record = self.store.get(ann.component_id)
        spoof = (
            previous is not None
            and record is not None
            and previous.fingerprint == record.fingerprint != ann.fingerprint
        )
        if not spoof:
            # Someone else announcing a known id with another key must not displace the real
            # announcement (it would hide a live "registered as FOO", for instance).
            self.live[ann.component_id] = ann
        task = self._spawn(self._process(ann, fresh=fresh))
        if (
            ann.role is Role.CC
            and ann.state is AnnouncedState.REGISTERED
            and (previous is None or previous.state is not AnnouncedState.REGISTERED)
        ):
            # A CC now says "registered as FOO": SCs of FOO may stop waiting.
            self._reevaluate(lambda a: a.role is Role.SC and a.cluster == ann.cluster)
        return task

    async def fallback(self, ann: Announcement) -> Record | None:
        """A signed HTTP announcement (the design's registration-service fallback).

        The request was signed by the announced key, so possession is already proven. It is
        not a live mDNS announcement: the component repeats it until it is registered.
        """
        self._proven.add((ann.component_id, ann.fingerprint))
        await self._process(ann, fresh=ann.component_id not in self.live)
        return self.store.get(ann.component_id)

    def _forget_instance(self, instance: str) -> None:
        component_id = self._instances.pop(instance, None)
        if component_id is not None and component_id not in self._instances.values():
            self.live.pop(component_id, None)
            log.info("component %s withdrew its announcement", component_id)

    def _note_rejected(self, sighting: Sighting, rejected: Rejected) -> None:
        component_id = sighting.txt.get("id", "") or f"instance:{sighting.instance}"[:64]
        key = f"rejected:{sighting.instance}"
        if self._noted.get(key) == rejected.reason:
            return
        self._noted[key] = rejected.reason
        log.warning("rejected announcement %r: %s", sighting.instance, rejected.reason)
        self.store.add_event(
            component_id=component_id,
            role=_role_name(sighting.txt.get("type", "")),
            cluster=sighting.txt.get("cluster"),
            address=sighting.txt.get("addr", ""),
            kind="rejected",
            code=rejected.code,
            reason=f"announcement {sighting.instance!r}: {rejected.reason}",
        )

    def self_registration_changed(self) -> None:
        """The CC on this host got its credentials: NCs waiting on it may proceed."""
        self._reevaluate(lambda a: a.role is Role.NC)

    def _reevaluate(
        self,
        wanted: Callable[[Announcement], bool],
        statuses: frozenset[Status] = frozenset({Status.PENDING, Status.UNMATCHED}),
        *,
        unrecorded: bool = False,
    ) -> None:
        """Decide again for live announcements whose verdict may have changed."""
        records = self.store.records()
        for ann in list(self.live.values()):
            record = records.get(ann.component_id)
            if not wanted(ann):
                continue
            if (record is None and unrecorded) or (
                record is not None and record.status in statuses
            ):
                self._spawn(self._process(ann, fresh=False))

    # -- decisions ------------------------------------------------------------------------

    def view(self, ann: Announcement | None = None) -> View:
        records = self.store.records()
        now = self._clock()
        verdict = None
        if ann is not None and ann.token_id is not None:
            token = self.trust_store.token(ann.token_id)
            verdict = check_token(token, ann, self._master_key, now)
        live_clusters = frozenset(
            ann.cluster
            for ann in self.live.values()
            if ann.role is Role.CC
            and ann.state is AnnouncedState.REGISTERED
            and ann.cluster is not None
            and (rec := records.get(ann.component_id)) is not None
            and rec.status is Status.REGISTERED
            and rec.fingerprint == ann.fingerprint
        )
        return View(
            records=records,
            live_registered_clusters=live_clusters,
            self_registered=self._self_registered(),
            trust=self.trust,
            now=now,
            token=verdict,
        )

    async def _process(self, ann: Announcement, *, fresh: bool) -> None:
        async with self._lock(ann.component_id):
            view = self.view(ann)
            existing = view.records.get(ann.component_id)
            decision = decide(view, ann, self.settings, fresh=fresh)
            # No await between decide() and apply(): see the module docstring.
            proceed = self._apply(decision, ann, existing)
            if proceed:
                await self._register(ann)

    def _apply(self, decision: Decision, ann: Announcement, existing: Record | None) -> bool:
        """Record a decision; True when registration effects must follow."""
        now = self._clock()
        kind = decision.kind
        if kind in (DecisionKind.IGNORE, DecisionKind.KEEP):
            return False
        if kind is DecisionKind.FORGET:
            self.store.delete(ann.component_id, event=("matched", decision.code, decision.reason))
            return False
        if decision.event_only:
            self._note(ann, decision)
            return False
        proven = (ann.component_id, ann.fingerprint) in self._proven
        status = {
            DecisionKind.REGISTER: Status.REGISTERING if proven else Status.AWAITING_KEY,
            DecisionKind.PENDING: Status.PENDING,
            DecisionKind.REFUSE: Status.REFUSED,
            DecisionKind.UNMATCHED: Status.UNMATCHED,
        }[kind]
        if (
            existing is not None
            and existing.status is status
            and existing.reason == decision.reason
            and existing.address == str(ann.address)
        ):
            return False  # same verdict as last time: no new event
        reason = decision.reason
        if status is Status.AWAITING_KEY:
            reason += "; waiting for a request signed by its key"
        record = Record(
            component_id=ann.component_id,
            role=ann.role,
            cluster=ann.cluster,
            address=str(ann.address),
            fingerprint=ann.fingerprint,
            status=status,
            reason=reason,
            waiting_for=(
                "proof of key possession" if status is Status.AWAITING_KEY else decision.waiting_for
            ),
            instance=ann.instance,
            first_seen=existing.first_seen if existing else now,
            updated_at=now,
            expires_at=now + self.timing.pending_timeout if status in WAITING else None,
            approved=existing.approved if existing else False,
            admitted_by=decision.admitted_by,
        )
        self.store.put(record, event=(status.value, decision.code, reason))
        self._notify(ann.component_id)
        log.info(
            "%s %s %s (%s): %s",
            status.value,
            ann.role.value,
            ann.component_id,
            ann.address,
            reason,
        )
        if status in WAITING and record.expires_at is not None:
            self._arm_expiry(ann.component_id, record.expires_at)
        else:
            self._cancel_timer(ann.component_id)
        return status is Status.REGISTERING

    def _note(self, ann: Announcement, decision: Decision) -> None:
        key = f"{ann.component_id}:{ann.fingerprint}:{ann.role}:{ann.cluster}"
        if self._noted.get(key) == decision.code:
            return
        self._noted[key] = decision.code
        log.warning("refused %s %s: %s", ann.role.value, ann.component_id, decision.reason)
        self.store.add_event(
            component_id=ann.component_id,
            role=ann.role.value,
            cluster=ann.cluster,
            address=str(ann.address),
            kind="refused",
            code=decision.code,
            reason=decision.reason,
        )

    # -- effects --------------------------------------------------------------------------

    async def _register(self, ann: Announcement) -> None:
        """Run the hook; the component is registered only when it succeeded or was absent."""
        run = await run_hook(self.hook_dir, ann, self.timing.hook_timeout)
        self.store.add_hook_run(run)
        record = self.store.get(ann.component_id)
        if record is None or record.status is not Status.REGISTERING:
            return  # deregistered meanwhile
        now = self._clock()
        if run.outcome in ("ok", "skipped"):
            how = "hook succeeded" if run.outcome == "ok" else "no hook script"
            reason = f"registered ({how})"
            self.store.put(
                replace(
                    record,
                    status=Status.REGISTERED,
                    reason=reason,
                    registered_at=now,
                    updated_at=now,
                    attempts=record.attempts + 1,
                    next_retry_at=None,
                    waiting_for=None,
                    expires_at=None,
                ),
                event=("registered", run.outcome, reason),
            )
            log.info("registered %s %s at %s", ann.role.value, ann.component_id, ann.address)
            if record.admitted_by.startswith("token:"):
                token_id = record.admitted_by.removeprefix("token:")
                self.trust_store.use_token(token_id, ann.component_id, now)
            self._notify(ann.component_id)
            if ann.role is Role.CC:
                # NCs of this cluster that the CLC saw as unmatched now have a home.
                # NCs the CLC saw as unmatched may have a home now; the others' reasons list
                # the registered clusters, which just changed.
                self._reevaluate(lambda a: a.role is Role.NC)
            return
        attempts = record.attempts + 1
        delay = self.timing.backoff(attempts)
        detail = (run.stderr.strip().splitlines() or [""])[-1][:200]
        reason = (
            f"hook {run.outcome}"
            + (f" (exit {run.exit_code})" if run.exit_code is not None else "")
            + (f": {detail}" if detail else "")
            + f"; retry {attempts + 1} in {delay:g}s"
        )
        self.store.put(
            replace(
                record,
                status=Status.FAILED,
                reason=reason,
                updated_at=now,
                attempts=attempts,
                next_retry_at=now + delay,
            ),
            event=("failed", f"hook-{run.outcome}", reason),
        )
        log.warning("registration of %s failed: %s", ann.component_id, reason)
        self._notify(ann.component_id)
        self._arm_retry(ann.component_id, now + delay)

    async def _retry(self, component_id: str) -> None:
        async with self._lock(component_id):
            record = self.store.get(component_id)
            if record is None or record.status not in (Status.FAILED, Status.REGISTERING):
                return
            # What was accepted, not whatever now announces under that id (it may be a spoof).
            ann = _announcement_from_record(record, self.live.get(component_id))
            now = self._clock()
            reason = f"retrying registration (attempt {record.attempts + 1})"
            self.store.put(
                replace(record, status=Status.REGISTERING, reason=reason, updated_at=now),
                event=("registering", "retry", reason),
            )
            await self._register(ann)

    def _expire(self, component_id: str) -> None:
        record = self.store.get(component_id)
        if record is None or record.status not in WAITING:
            return
        waited = self.timing.pending_timeout
        reason = f"gave up after {waited:g}s waiting for {record.waiting_for}; re-announce to retry"
        self.store.put(
            replace(record, status=Status.EXPIRED, reason=reason, updated_at=self._clock()),
            event=("expired", "pending-timeout", reason),
        )
        log.warning("pending %s expired: %s", component_id, reason)
        self._notify(component_id)

    # -- operator actions (trust) --------------------------------------------------------

    def _trust_event(self, code: str, reason: str) -> None:
        self.store.add_event(
            component_id="-",
            role="registrar",
            cluster=None,
            address="",
            kind="trust",
            code=code,
            reason=reason,
        )
        log.info("trust: %s", reason)

    def _set_trust(self, trust: TrustSettings, code: str, reason: str) -> None:
        self.trust = trust
        self.trust_store.save_settings(trust)
        self._trust_event(code, reason)
        self._arm_install_close()
        # Components long-polling over HTTP (fallback) re-announce when woken.
        for component_id in list(self._changed):
            self._notify(component_id)
        # Anything not yet registered may now be decided differently.
        self._reevaluate(
            lambda _a: True,
            frozenset({Status.PENDING, Status.REFUSED, Status.UNMATCHED}),
            unrecorded=True,
        )

    async def set_mode(self, mode: Mode) -> None:
        self._set_trust(replace(self.trust, mode=mode), "mode", f"mode set to {mode.value}")

    async def set_locked(self, tasks: frozenset[Task], locked: bool) -> None:
        new = self.trust.locked | tasks if locked else self.trust.locked - tasks
        names = ", ".join(sorted(t.value for t in tasks))
        what = "locked" if locked else "unlocked"
        self._set_trust(replace(self.trust, locked=frozenset(new)), what, f"{what} {names}")

    async def open_install_window(self, seconds: float) -> float:
        until = self._clock() + seconds
        self._set_trust(
            replace(self.trust, install_until=until),
            "install-window-open",
            f"install window open for {seconds:g}s: unsigned announcements are accepted",
        )
        return until

    async def close_install_window(self, reason: str = "closed by the operator") -> None:
        self._set_trust(
            replace(self.trust, install_until=None),
            "install-window-closed",
            f"install window {reason}",
        )

    def _arm_install_close(self) -> None:
        if self._install_timer is not None:
            self._install_timer.cancel()
            self._install_timer = None
        until = self.trust.install_until
        if until is None:
            return
        delay = max(0.0, until - self._clock())
        self._install_timer = asyncio.get_running_loop().call_later(
            delay, lambda: self._spawn(self.close_install_window("closed: its time ran out"))
        )

    def find(self, component_id: str | None, fingerprint: str | None) -> Record:
        """The record an operator names, by id or by key fingerprint; KeyError otherwise."""
        records = self.store.records()
        if component_id:
            if component_id not in records:
                raise KeyError(f"no component {component_id} in this registrar's records")
            return records[component_id]
        matches = [r for r in records.values() if r.fingerprint == fingerprint]
        if not matches:
            raise KeyError(f"no component with key {fingerprint} in this registrar's records")
        return matches[0]

    async def approve(self, record: Record) -> Record:
        if record.status in HOLDS_SLOT:
            raise ValueError(f"{record.component_id} is already {record.status.value}")
        reason = f"approved by the operator (key {record.fingerprint})"
        updated = replace(
            record,
            approved=True,
            status=Status.PENDING,
            reason=reason,
            waiting_for="re-evaluation",
            updated_at=self._clock(),
        )
        self.store.put(updated, event=("approved", "operator", reason))
        ann = self.live.get(record.component_id)
        if ann is not None:
            self._spawn(self._process(ann, fresh=True))
        return updated

    async def reject(self, record: Record) -> Record:
        if record.status in HOLDS_SLOT:
            raise ValueError(
                f"{record.component_id} is {record.status.value}; deregister it instead"
            )
        reason = "rejected by the operator; it stays out until approved"
        updated = replace(
            record,
            approved=False,
            status=Status.REJECTED,
            reason=reason,
            waiting_for=None,
            expires_at=None,
            updated_at=self._clock(),
        )
        self.store.put(updated, event=("rejected", "operator", reason))
        self._cancel_timer(record.component_id)
        self._notify(record.component_id)
        return updated

    async def deregister(self, record: Record) -> None:
        """Remove a component and revoke its credentials; it then meets the current trust
        settings again like any newcomer (lesson L9)."""
        reason = "deregistered by the operator; credentials revoked"
        self.store.delete(
            record.component_id,
            event=("deregistered", "operator", reason),
            revoke_reason="deregistered by the operator",
        )
        if record.admitted_by.startswith("token:"):
            self.trust_store.spend_token(
                record.admitted_by.removeprefix("token:"), record.component_id
            )
        self._proven.discard((record.component_id, record.fingerprint))
        self._cancel_timer(record.component_id)
        self._notify(record.component_id)
        ann = self.live.get(record.component_id)
        if ann is not None:
            self._spawn(self._process(ann, fresh=True))

    async def create_token(
        self, role: Role, cluster: str | None, ttl: float, uses: int | None, ca_fingerprint: str
    ) -> str:
        if role not in self.settings.registers:
            raise ValueError(f"this registrar does not register {role.value} components")
        if role is Role.NC:
            cluster = cluster or self.settings.own_cluster
            if cluster != self.settings.own_cluster:
                raise ValueError(f"this CC registers nodes of {self.settings.own_cluster} only")
        elif role is Role.WALRUS and cluster:
            raise ValueError("a walrus belongs to no cluster")
        if uses is not None and uses < 1:
            raise ValueError("uses must be at least 1")
        if not self._master_key:
            raise ValueError("this registrar has no master key; cannot issue tokens")
        now = self._clock()
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
        self.trust_store.add_token(token)
        scope = f"{role.value}" + (f" of cluster {cluster}" if cluster else "")
        limit = f", {uses} use(s)" if uses else ""
        self._trust_event("token-created", f"token {token.token_id} created for {scope}{limit}")
        secret = token_secret(self._master_key, token.token_id)
        return format_token(token.token_id, secret, ca_fingerprint)

    async def revoke_token(self, token_id: str) -> None:
        if not self.trust_store.revoke_token(token_id, self._clock()):
            raise KeyError(f"no unrevoked token {token_id}")
        self._trust_event("token-revoked", f"token {token_id} revoked")

    # -- credentials ----------------------------------------------------------------------

    async def credentials(
        self,
        component_id: str,
        public_key: cred.PublicKey,
        wait: float,
        have: str | None = None,
    ) -> CredentialAnswer:
        """Answer a component's (already signature-checked) request for its credentials.

        The signed request is the component's proof that it holds the announced key: an
        accepted component waits for it before its hook runs. With `have` (the serial of the
        certificate it holds), the request watches for revocation instead.
        """
        fingerprint = cred.fingerprint(public_key)
        deadline = self._clock() + max(0.0, wait)
        status: Status | None
        woken = False
        while True:
            event = self._change_event(component_id)
            record = self.store.get(component_id)
            if have is not None and self.trust_store.revoked(have):
                raise CredentialRefused(410, "these credentials were revoked (deregistered)")
            if record is None:
                if have is not None:
                    raise CredentialRefused(410, f"{component_id} is not registered here")
                status, reason = None, "not known to this registrar (yet)"
            elif record.fingerprint != fingerprint:
                raise CredentialRefused(403, f"{component_id} is registered with another key")
            elif record.status is Status.REGISTERED:
                files, serial = self._bundle(record, public_key)
                if have != serial or self._clock() >= deadline:
                    return CredentialAnswer(Status.REGISTERED, record.reason, files)
                status, reason = record.status, record.reason
            else:
                if record.status is Status.AWAITING_KEY:
                    self._key_proven(record)
                status, reason = record.status, record.reason
            remaining = deadline - self._clock()
            if remaining <= 0 or (woken and status not in IN_PROGRESS):
                # Woken while not progressing by itself (refused, pending, ...): answer now,
                # so a component announcing over HTTP re-announces under the new settings.
                return CredentialAnswer(status, reason, None)
            try:
                await asyncio.wait_for(event.wait(), remaining)
                woken = True
            except TimeoutError:
                woken = False

    def _key_proven(self, record: Record) -> None:
        key = (record.component_id, record.fingerprint)
        if key not in self._proven:
            self._proven.add(key)
            self._spawn(self._after_proof(record.component_id))

    async def _after_proof(self, component_id: str) -> None:
        async with self._lock(component_id):
            record = self.store.get(component_id)
            if record is None or record.status is not Status.AWAITING_KEY:
                return
            reason = "proved possession of its key; running the registration hook"
            self.store.put(
                replace(
                    record,
                    status=Status.REGISTERING,
                    reason=reason,
                    updated_at=self._clock(),
                    expires_at=None,
                    waiting_for=None,
                ),
                event=("registering", "key-proven", reason),
            )
            self._cancel_timer(component_id)
            # What was accepted, not whatever now announces under that id (it may be a spoof).
            ann = _announcement_from_record(record, self.live.get(component_id))
            await self._register(ann)

    def _bundle(self, record: Record, public_key: cred.PublicKey) -> tuple[dict[str, str], str]:
        issuer = self._issuer_for(record.role)
        if issuer is None:
            raise CredentialRefused(503, f"no issuer for {record.role.value} credentials here")
        issued = self.store.certificate(record.component_id)
        if issued is None or issued.fingerprint != record.fingerprint:
            cert = cred.issue_certificate(
                issuer_key=issuer.key,
                issuer_cert=issuer.cert,
                subject_key=public_key,
                role=record.role,
                component_id=record.component_id,
                cluster=record.cluster,
            )
            issued = IssuedCertificate(
                component_id=record.component_id,
                fingerprint=record.fingerprint,
                serial=format(cert.serial_number, "x"),
                cert_pem=cred.cert_pem(cert),
                issued_at=self._clock(),
            )
            self.store.put_certificate(issued)
            self.store.add_event(
                component_id=record.component_id,
                role=record.role.value,
                cluster=record.cluster,
                address=record.address,
                kind="credentials",
                code="issued",
                reason=f"certificate {issued.serial} issued for {record.fingerprint[:19]}…",
            )
        return issuer.bundle(record, cred.load_cert_pem(issued.cert_pem)), issued.serial

    async def mark_collected(self, component_id: str) -> None:
        record = self.store.get(component_id)
        if record is not None and record.credentials_collected_at is None:
            self.store.put(replace(record, credentials_collected_at=self._clock()))

    # -- plumbing -------------------------------------------------------------------------

    def _lock(self, component_id: str) -> asyncio.Lock:
        return self._locks.setdefault(component_id, asyncio.Lock())

    def _change_event(self, component_id: str) -> asyncio.Event:
        return self._changed.setdefault(component_id, asyncio.Event())

    def _notify(self, component_id: str) -> None:
        """Wake every request waiting on this component; later waiters get a fresh event."""
        event = self._changed.pop(component_id, None)
        if event is not None:
            event.set()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("registrar task failed", exc_info=task.exception())

    def _cancel_timer(self, component_id: str) -> None:
        handle = self._timers.pop(component_id, None)
        if handle is not None:
            handle.cancel()

    def _arm_expiry(self, component_id: str, at: float) -> None:
        self._cancel_timer(component_id)
        delay = max(0.0, at - self._clock())
        self._timers[component_id] = asyncio.get_running_loop().call_later(
            delay, self._expire, component_id
        )

    def _arm_retry(self, component_id: str, at: float) -> None:
        self._cancel_timer(component_id)
        delay = max(0.0, at - self._clock())
        self._timers[component_id] = asyncio.get_running_loop().call_later(
            delay, lambda: self._spawn(self._retry(component_id))
        )


def _role_name(txt_type: str) -> str:
    try:
        return Role.from_txt_type(txt_type).value
    except ValueError:
        return txt_type or "?"


WAITING = frozenset({Status.PENDING, Status.AWAITING_KEY})
IN_PROGRESS = frozenset({Status.AWAITING_KEY, Status.REGISTERING, Status.FAILED, Status.REGISTERED})


def _announcement_from_record(record: Record, live: Announcement | None = None) -> Announcement:
    """Rebuild the accepted announcement from the record; the live one only lends its
    eucavers, and only when it has the recorded key and address."""
    same = (
        live is not None
        and live.fingerprint == record.fingerprint
        and str(live.address) == record.address
    )
    return Announcement(
        role=record.role,
        component_id=record.component_id,
        cluster=record.cluster,
        state=AnnouncedState.READY,
        address=ipaddress.ip_address(record.address),
        fingerprint=record.fingerprint,
        api_port=None,
        eucavers=live.eucavers if same and live is not None else "",
        instance=record.instance,
    )
