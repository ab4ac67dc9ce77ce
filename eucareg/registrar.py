"""The registrar: turns sightings into decisions and decisions into effects and records.

One code path serves the CLC (Walrus, CC, SC) and the CC (NC). Work is serialised per component,
and a decision and the record it implies are written with no await between them, so concurrent
sightings can neither register one component twice nor fill one slot twice (lesson L1).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cryptography import x509

from eucareg import credentials as cred
from eucareg.hooks import run_hook
from eucareg.mdns import Change, Sighting
from eucareg.model import (
    AnnouncedState,
    Announcement,
    Decision,
    DecisionKind,
    Record,
    Role,
    Status,
)
from eucareg.policy import RegistrarSettings, View, decide
from eucareg.store import IssuedCertificate, Store
from eucareg.txt import Rejected, decode

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
        self._registered: dict[str, asyncio.Event] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._noted: dict[str, str] = {}  # last event-only note per key, to avoid repeats
        self.started_at = clock()

    # -- lifecycle ------------------------------------------------------------------------

    def resume(self) -> None:
        """Pick up where a previous run stopped: re-arm expiry and retry timers."""
        now = self._clock()
        for record in self.store.records().values():
            if record.status is Status.PENDING and record.expires_at is not None:
                self._arm_expiry(record.component_id, record.expires_at)
            elif record.status is Status.FAILED:
                self._arm_retry(record.component_id, record.next_retry_at or now)
            elif record.status is Status.REGISTERING:
                # We died while its hook ran; it did not finish registering, so run it again.
                self._arm_retry(record.component_id, now)

    async def close(self) -> None:
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

    # -- input: sightings -----------------------------------------------------------------

    def on_sighting(self, sighting: Sighting) -> None:
        """Entry point for the mDNS browser; never blocks, never raises."""
        if sighting.change is Change.REMOVED:
            self._forget_instance(sighting.instance)
            return
        result = decode(sighting.instance, sighting.txt)
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
            role=sighting.txt.get("type", "?"),
            cluster=sighting.txt.get("cluster"),
            address=sighting.txt.get("addr", ""),
            kind="rejected",
            code=rejected.code,
            reason=f"announcement {sighting.instance!r}: {rejected.reason}",
        )

    def self_registration_changed(self) -> None:
        """The CC on this host got its credentials: NCs waiting on it may proceed."""
        self._reevaluate(lambda a: a.role is Role.NC)

    def _reevaluate(self, wanted: Callable[[Announcement], bool]) -> None:
        records = self.store.records()
        for ann in list(self.live.values()):
            record = records.get(ann.component_id)
            if (
                wanted(ann)
                and record is not None
                and record.status in (Status.PENDING, Status.UNMATCHED)
            ):
                self._spawn(self._process(ann, fresh=False))

    # -- decisions ------------------------------------------------------------------------

    def view(self) -> View:
        records = self.store.records()
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
        )

    async def _process(self, ann: Announcement, *, fresh: bool) -> None:
        async with self._lock(ann.component_id):
            view = self.view()
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
        status = {
            DecisionKind.REGISTER: Status.REGISTERING,
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
        record = Record(
            component_id=ann.component_id,
            role=ann.role,
            cluster=ann.cluster,
            address=str(ann.address),
            fingerprint=ann.fingerprint,
            status=status,
            reason=decision.reason,
            waiting_for=decision.waiting_for,
            instance=ann.instance,
            first_seen=existing.first_seen if existing else now,
            updated_at=now,
            expires_at=now + self.timing.pending_timeout if status is Status.PENDING else None,
        )
        self.store.put(record, event=(status.value, decision.code, decision.reason))
        log.info(
            "%s %s %s (%s): %s",
            status.value,
            ann.role.value,
            ann.component_id,
            ann.address,
            decision.reason,
        )
        if status is Status.PENDING and record.expires_at is not None:
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
                ),
                event=("registered", run.outcome, reason),
            )
            log.info("registered %s %s at %s", ann.role.value, ann.component_id, ann.address)
            self._registered_event(ann.component_id).set()
            if ann.role is Role.CC:
                # NCs of this cluster that the CLC saw as unmatched now have a home.
                self._reevaluate(lambda a: a.role is Role.NC and a.cluster == ann.cluster)
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
        self._arm_retry(ann.component_id, now + delay)

    async def _retry(self, component_id: str) -> None:
        async with self._lock(component_id):
            record = self.store.get(component_id)
            if record is None or record.status not in (Status.FAILED, Status.REGISTERING):
                return
            ann = self.live.get(component_id) or _announcement_from_record(record)
            now = self._clock()
            reason = f"retrying registration (attempt {record.attempts + 1})"
            self.store.put(
                replace(record, status=Status.REGISTERING, reason=reason, updated_at=now),
                event=("registering", "retry", reason),
            )
            await self._register(ann)

    def _expire(self, component_id: str) -> None:
        record = self.store.get(component_id)
        if record is None or record.status is not Status.PENDING:
            return
        waited = self.timing.pending_timeout
        reason = f"gave up after {waited:g}s waiting for {record.waiting_for}; re-announce to retry"
        self.store.put(
            replace(record, status=Status.EXPIRED, reason=reason, updated_at=self._clock()),
            event=("expired", "pending-timeout", reason),
        )
        log.warning("pending %s expired: %s", component_id, reason)

    # -- credentials ----------------------------------------------------------------------

    async def credentials(
        self, component_id: str, public_key: cred.PublicKey, wait: float
    ) -> CredentialAnswer:
        """Answer a component's (already signature-checked) request for its credentials."""
        fingerprint = cred.fingerprint(public_key)
        deadline = self._clock() + max(0.0, wait)
        while True:
            record = self.store.get(component_id)
            if record is None:
                status, reason = None, "not known to this registrar (yet)"
            elif record.fingerprint != fingerprint:
                raise CredentialRefused(403, f"{component_id} is registered with another key")
            elif record.status is Status.REGISTERED:
                return CredentialAnswer(
                    Status.REGISTERED, record.reason, self._bundle(record, public_key)
                )
            else:
                status, reason = record.status, record.reason
            remaining = deadline - self._clock()
            if remaining <= 0:
                return CredentialAnswer(status, reason, None)
            event = self._registered_event(component_id)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), remaining)

    def _bundle(self, record: Record, public_key: cred.PublicKey) -> dict[str, str]:
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
        return issuer.bundle(record, cred.load_cert_pem(issued.cert_pem))

    def mark_collected(self, component_id: str) -> None:
        record = self.store.get(component_id)
        if record is not None and record.credentials_collected_at is None:
            self.store.put(replace(record, credentials_collected_at=self._clock()))

    # -- plumbing -------------------------------------------------------------------------

    def _lock(self, component_id: str) -> asyncio.Lock:
        return self._locks.setdefault(component_id, asyncio.Lock())

    def _registered_event(self, component_id: str) -> asyncio.Event:
        return self._registered.setdefault(component_id, asyncio.Event())

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


def _announcement_from_record(record: Record) -> Announcement:
    """Rebuild what was announced from what we recorded, for retries after the component left."""
    return Announcement(
        role=record.role,
        component_id=record.component_id,
        cluster=record.cluster,
        state=AnnouncedState.READY,
        address=ipaddress.ip_address(record.address),
        fingerprint=record.fingerprint,
        api_port=None,
        eucavers="",
        instance=record.instance,
    )
