"""sd_notify without systemd-python: READY, STATUS, WATCHDOG and STOPPING datagrams to the
socket systemd names in $NOTIFY_SOCKET (docs/systemd.md). Standard library only; without
$NOTIFY_SOCKET every call here does nothing.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
from collections import Counter
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from typing import TYPE_CHECKING

from eucareg.core.model import Record, Role, Status

from .tasks import Supervisor

if TYPE_CHECKING:
    from eucareg.registrar.engine import Registrar

    from .component import Component

log = logging.getLogger(__name__)

STATUS_EVERY = 2.0  # seconds between looks at whether the STATUS line changed
LABELS = {Role.WALRUS: "Walrus", Role.CC: "CC", Role.SC: "SC", Role.NC: "NC"}


def socket_address(value: str) -> str | None:
    """The address to send to: an absolute path, or `@name` for an abstract socket (as
    sd_notify reads it). Anything else (vsock:, a relative path) is not ours to use."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


class Notifier:
    """The agent's side of Type=notify. Sends never block: a datagram that does not fit is
    dropped (a missed WATCHDOG=1 is made up by the next one, a STATUS by the next change)."""

    def __init__(
        self,
        address: str | None = None,
        *,
        watchdog: float | None = None,
        status_every: float = STATUS_EVERY,
    ) -> None:
        self.address = address
        self.watchdog = watchdog if address else None  # systemd's timeout, in seconds
        self.status_every = status_every
        self._sock: socket.socket | None = None
        self._warned = False
        self._status = ""
        if address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.setblocking(False)

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """Read and unset NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID, as
        sd_notify(unset_environment=1) does: hooks and their children must not talk to
        systemd in our name, nor inherit a watchdog that is not theirs."""
        env = os.environ if environ is None else environ
        raw = env.pop("NOTIFY_SOCKET", "")
        usec, pid = env.pop("WATCHDOG_USEC", ""), env.pop("WATCHDOG_PID", "")
        address = socket_address(raw) if raw else None
        if raw and address is None:
            log.warning("NOTIFY_SOCKET=%r is not a socket eucareg can use; not notifying", raw)
        watchdog = None
        # WATCHDOG_PID names the process the watchdog is meant for; any other ignores it.
        if usec.isdigit() and int(usec) > 0 and pid in ("", str(os.getpid())):
            watchdog = int(usec) / 1e6
        return cls(address, watchdog=watchdog)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *assignments: str) -> bool:
        """Send `KEY=value` lines in one datagram; False when nothing was sent."""
        if self._sock is None or self.address is None:
            return False
        try:
            self._sock.sendto("\n".join(assignments).encode(), self.address)
        except OSError as exc:  # BlockingIOError too: a full queue is not worth waiting for
            if not self._warned:
                self._warned = True
                shown = self.address.replace("\0", "@", 1)
                log.warning("cannot notify systemd at %s: %s", shown, exc)
            return False
        return True

    def started(self, supervisor: Supervisor, status: Callable[[], str]) -> None:
        """READY=1 with the first STATUS line, then the watchdog and status tasks."""
        if not self.enabled:
            return
        self._status = self._describe(status)
        self.notify("READY=1", f"STATUS={self._status}")
        if self.watchdog is not None:
            supervisor.spawn("systemd-watchdog", self.watchdog_loop)
        supervisor.spawn("systemd-status", functools.partial(self.status_loop, status))

    def stopping(self) -> None:
        """STOPPING=1; nothing is sent after it (systemd stops watching us then)."""
        self.notify("STOPPING=1", "STATUS=stopping")
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def watchdog_loop(self) -> None:
        """WATCHDOG=1 every half timeout, sent from the event loop itself: a loop that is
        blocked sends nothing, so systemd restarts an agent that stopped answering (a
        thread would keep pinging for a wedged agent)."""
        assert self.watchdog is not None
        interval = self.watchdog / 2
        loop = asyncio.get_running_loop()
        while True:
            self.notify("WATCHDOG=1")
            due = loop.time() + interval
            await asyncio.sleep(interval)
            late = loop.time() - due
            if late > interval / 2:
                # A near miss: worth a line in the log before it becomes a restart.
                log.warning(
                    "the event loop was stuck: %.1f s between watchdog pings"
                    " (systemd allows %.0f s)",
                    interval + late,
                    self.watchdog,
                )

    async def status_loop(self, status: Callable[[], str]) -> None:
        """Send STATUS= whenever the line changed (`systemctl status` shows it)."""
        while True:
            await asyncio.sleep(self.status_every)
            line = self._describe(status)
            if line != self._status and self.notify(f"STATUS={line}"):
                self._status = line

    def _describe(self, status: Callable[[], str]) -> str:
        # A status line is for people: a bug in it must not fail the agent's start, nor
        # make the supervisor give up on a task and stop the agent.
        try:
            return status()
        except Exception:
            if not self._warned:
                self._warned = True
                log.exception("cannot describe the agent's state for systemd")
            return self._status or "running"


def status_line(components: Sequence[Component], registrar: Registrar | None) -> str:
    """One line for `systemctl status`: each component's state and, on a registrar host,
    what it has registered, e.g. `cc cc-77ab6b5b542b registered; registered here: 3 NCs`."""
    parts = [component_state(c) for c in components]
    if registrar is not None:
        parts.append(registrar_counts(registrar.memory.records.values()))
    return "; ".join(parts)


def component_state(comp: Component) -> str:
    name = f"{comp.role.value} {comp.identity.component_id}"
    if comp.role is Role.CLC:
        return name  # nothing registers the CLC
    if comp.registered:
        return f"{name} registered"
    return f"{name} {'announced, not registered yet' if comp.announced else 'not announced'}"


def registrar_counts(records: Iterable[Record]) -> str:
    registered: Counter[Role] = Counter()
    waiting = failed = 0
    for record in records:
        if record.status is Status.REGISTERED:
            registered[record.role] += 1
        elif record.status in (Status.PENDING, Status.AWAITING_KEY, Status.REGISTERING):
            waiting += 1
        elif record.status is Status.FAILED:
            failed += 1
    counts = [
        f"{registered[role]} {_plural(label, registered[role])}"
        for role, label in LABELS.items()
        if registered[role]
    ]
    line = f"registered here: {', '.join(counts) or 'none'}"
    if waiting:
        line += f"; {waiting} waiting"
    if failed:
        line += f"; {failed} failed"
    return line


def _plural(label: str, n: int) -> str:
    if n == 1:
        return label
    return label + ("es" if label.endswith("s") else "s")
