"""Core vocabulary of eucareg: roles, announcements, registration records and decisions.

Everything here is immutable data. The policy turns these values into decisions; the edges
(mDNS, HTTP, hooks, database) translate between them and the outside world.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import StrEnum

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Role(StrEnum):
    """A component kind, named as operators name them in config files."""

    CLC = "clc"
    WALRUS = "walrus"
    CC = "cc"
    SC = "sc"
    NC = "nc"

    @property
    def txt_type(self) -> str:
        """The `type=` value of the Eucalyptus DNS-SD protocol."""
        return _TXT_TYPES[self]

    @property
    def hook_name(self) -> str:
        """The registration script run for this role (the 10.04 script names)."""
        return _HOOK_NAMES[self]

    @property
    def needs_cluster(self) -> bool:
        return self in (Role.CC, Role.SC, Role.NC)

    @classmethod
    def from_txt_type(cls, value: str) -> Role:
        for role, txt in _TXT_TYPES.items():
            if txt == value:
                return role
        raise ValueError(f"unknown component type {value!r}")


_TXT_TYPES = {
    Role.CLC: "cloud",
    Role.WALRUS: "walrus",
    Role.CC: "cluster",
    Role.SC: "storage",
    Role.NC: "node",
}
_HOOK_NAMES = {
    Role.CLC: "cloud",
    Role.WALRUS: "walrus",
    Role.CC: "cluster",
    Role.SC: "storage",
    Role.NC: "node",
}


class AnnouncedState(StrEnum):
    """What a component says about itself in its TXT record."""

    READY = "ready"
    REGISTERED = "registered"


@dataclass(frozen=True)
class Announcement:
    """One component's announcement, decoded and validated from a DNS-SD sighting.

    Identity is (component_id, fingerprint); `instance` is the DNS-SD instance name and is
    kept for logs only, because responders rename colliding names (lesson L2).
    """

    role: Role
    component_id: str
    cluster: str | None
    state: AnnouncedState
    address: IPAddress
    fingerprint: str
    api_port: int | None
    eucavers: str
    instance: str
    # Join token proof (trust.py): token id, HMAC proof and the time it was made.
    token_id: str | None = None
    token_proof: str | None = None
    token_stamp: int | None = None
    # "mdns" for announcements heard on the LAN, "fallback" for signed HTTP requests, and
    # "certified" for those whose TLS client certificate (issued by this cloud) names the
    # announced component and key: authenticated, so mode any does not apply to them;
    # "manual" for the operator's own registration (`eucareg register`).
    source: str = "mdns"


class Status(StrEnum):
    """Where a component stands in a registrar's records."""

    PENDING = "pending"  # waiting for a dependency or for the operator (see waiting_for)
    AWAITING_KEY = "awaiting-key"  # accepted; waits for a request signed by the announced key
    REGISTERING = "registering"  # decided; hook running
    REGISTERED = "registered"
    FAILED = "failed"  # hook failed; decided again with backoff, holding no slot meanwhile
    REFUSED = "refused"  # a consistency or trust check said no
    REJECTED = "rejected"  # the operator said no; stays out until approved
    EXPIRED = "expired"  # waited too long for its dependency
    UNMATCHED = "unmatched"  # an NC whose cluster no registered CC has (seen by the CLC)
    REPLACED = "replaced"  # a reinstalled machine came back with a new identity at its address


# Statuses that hold a uniqueness slot (one Walrus, one CC per name, one SC per cluster, one
# component per address). A failed hook does not: a component whose registration keeps failing
# must not keep a genuine one out (it is decided afresh at each retry).
HOLDS_SLOT = frozenset({Status.AWAITING_KEY, Status.REGISTERING, Status.REGISTERED})
# Statuses in which a join-token use stays reserved for the component.
HOLDS_TOKEN_USE = HOLDS_SLOT | {Status.FAILED}
# Records kept for components nobody admitted: what an unauthenticated flood could grow (capped).
UNADMITTED = frozenset({Status.PENDING, Status.REFUSED, Status.UNMATCHED, Status.EXPIRED})


@dataclass(frozen=True)
class Record:
    """A registrar's stored view of one component."""

    component_id: str
    role: Role
    cluster: str | None
    address: str
    fingerprint: str
    status: Status
    reason: str
    waiting_for: str | None = None
    instance: str = ""
    first_seen: float = 0.0
    updated_at: float = 0.0
    registered_at: float | None = None
    expires_at: float | None = None
    attempts: int = 0
    next_retry_at: float | None = None
    credentials_issued_at: float | None = None
    credentials_collected_at: float | None = None
    approved: bool = False  # the operator approved this id and key
    admitted_by: str = ""  # token:<id> | install-window | approval
    replaces: str | None = None  # the offline component whose address this one took over
    # Registered by the operator (`eucareg register`) before its component was heard: the
    # first component to announce itself at this role, address and cluster (and with this
    # key, if one was given) takes the registration over, with no second hook.
    claimable: bool = False


class DecisionKind(StrEnum):
    REGISTER = "register"
    PENDING = "pending"
    REFUSE = "refuse"
    UNMATCHED = "unmatched"
    KEEP = "keep"  # nothing to change: already registered, in progress, or expired
    IGNORE = "ignore"  # not this registrar's business
    FORGET = "forget"  # drop an observation record that no longer applies
    ADOPT = "adopt"  # take over an operator's registration made for this role and address


@dataclass(frozen=True)
class Decision:
    """What the policy says to do with one announcement, and why."""

    kind: DecisionKind
    code: str
    reason: str
    waiting_for: str | None = None
    # How an accepted component earned trust: token:<id>, install-window or approval.
    admitted_by: str = ""
    # A refusal that must not overwrite the existing record (e.g. someone else claiming a
    # registered component's id): it is logged as an event only.
    event_only: bool = False
    # A reinstalled machine: the offline component at this address that this one replaces.
    replaces: str | None = None
    # Decide again at this time (a wait that ends by the clock, not by another event).
    recheck_at: float | None = None


@dataclass(frozen=True)
class Event:
    """One recorded decision or effect, as listed by `eucareg events`."""

    seq: int
    at: float
    component_id: str
    role: str
    cluster: str | None
    address: str
    kind: str
    code: str
    reason: str
    via: str = ""  # how the announcement behind it was heard (HEARD_VIA); "" if none was


@dataclass(frozen=True)
class NewEvent:
    """An event about to be recorded (the store numbers it)."""

    at: float
    component_id: str
    role: str
    cluster: str | None
    address: str
    kind: str
    code: str
    reason: str
    via: str = ""


# How an announcement reached the registrar, as events record it: multicast DNS, wide-area
# DNS-SD, an HTTP report (signed; "certified" when by a registered component's certificate),
# or the operator's own registration.
HEARD_VIA = ("mdns", "dnssd", "fallback", "certified", "manual")


def event_for(record: Record, at: float, kind: str, code: str, reason: str) -> NewEvent:
    return NewEvent(
        at=at,
        component_id=record.component_id,
        role=record.role.value,
        cluster=record.cluster,
        address=record.address,
        kind=kind,
        code=code,
        reason=reason,
    )


class HookOutcome(StrEnum):
    RUNNING = "running"  # journaled before the script may start; final outcome not known
    OK = "ok"
    FAILED = "failed"
    TIMEOUT = "timeout"
    SKIPPED = "skipped"  # no script for this role
    INTERRUPTED = "interrupted"  # the registrar died or stopped while it ran


@dataclass(frozen=True)
class HookRun:
    """One registration script run, journaled when it starts and completed when it ends."""

    run_id: str
    component_id: str
    hook: str
    started_at: float
    outcome: HookOutcome
    duration: float = 0.0
    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    attempt: int = 1
    rerun: bool = False  # run again because an earlier run of it was interrupted
    pgid: int | None = None  # its process group (the script runs in a session of its own)
    proc_start: int | None = None  # the group leader's start time (guards against PID reuse)
    batch: str | None = None  # the batch this run was part of (one script run for many)


@dataclass(frozen=True)
class IssuedCertificate:
    component_id: str
    fingerprint: str
    serial: str
    cert_pem: str
    issued_at: float


def announcement_of(record: Record, live: Announcement | None = None) -> Announcement:
    """Rebuild the accepted announcement from the record; the live one only lends its
    eucavers and token proof, and only when it has the recorded key and address."""
    same = (
        live is not None
        and live.fingerprint == record.fingerprint
        and str(live.address) == record.address
    )
    if same and live is not None and not record.claimable:
        return live
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
        # The operator's own registration is decided again as the operator's (claims.manual).
        source="manual" if record.claimable else "mdns",
    )
