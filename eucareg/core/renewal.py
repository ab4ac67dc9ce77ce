"""When a certificate is renewed, as pure functions of its validity and `now` (Unix seconds): the
registrar renews a component's certificate for the same key once less than its margin is left,
and the CLC its own cloud CA certificate. Also the transition that stores a renewal.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from enum import StrEnum

from eucareg.core.model import IssuedCertificate, Record, event_for
from eucareg.core.transitions import Transition, Write

DAY = 86400.0
DEFAULT_LIFETIME = 5 * 365 * DAY  # a component certificate (what eucareg always issued)
CA_LIFETIME = 20 * 365 * DAY  # the cloud CA certificate
MIN_LIFETIME = 3600.0  # shorter certificates are a typo, or a storm of renewals waiting
# A certificate is used at least this long before it is due: a margin that leaves less would
# renew every certificate again as soon as it is collected.
MIN_USE = 60.0
# Certificates start this long before they are made (clocks differ); one that starts later
# than this from now was made by a clock that ran ahead.
SKEW = 300.0
# Component certificates fall due up to this share of their margin early, each by its serial:
# with the default policy (5 years, renewed with 20 months left) over about two months.
SPREAD = 0.1


class Phase(StrEnum):
    CURRENT = "current"  # more than the margin left
    DUE = "due"  # within the margin (or not valid yet: made while a clock ran ahead): renew
    EXPIRED = "expired"  # past its end: nothing holding it works any more


@dataclass(frozen=True)
class Validity:
    """A certificate's validity, in Unix seconds."""

    not_before: float
    not_after: float

    @property
    def lifetime(self) -> float:
        return self.not_after - self.not_before


@dataclass(frozen=True)
class RenewalPolicy:
    """How long new certificates last, and how long before its end one is renewed (None: a
    third of `lifetime`)."""

    lifetime: float = DEFAULT_LIFETIME
    renew_before: float | None = None

    @property
    def margin(self) -> float:
        return self.renew_before if self.renew_before is not None else self.lifetime / 3

    def problem(self) -> str | None:
        """Why this policy cannot be used (None when it can)."""
        if self.lifetime < MIN_LIFETIME:
            return f"certificate_lifetime: must be at least 1h, got {self.lifetime:g} s"
        if self.margin <= 0:
            return f"certificate_renew_before: must be longer than zero, got {self.margin:g} s"
        if self.margin > self.lifetime - MIN_USE:
            return (
                f"certificate_renew_before: must be at least {MIN_USE:g} s shorter than "
                f"certificate_lifetime ({self.lifetime:g} s), got {self.margin:g} s (every "
                "certificate would be renewed again as soon as it is issued)"
            )
        return None


DEFAULT_POLICY = RenewalPolicy()


def spread(validity: Validity, margin: float, serial: str) -> float:
    """How much earlier than its margin says this certificate falls due: a share of SPREAD of
    the margin, fixed by its serial (random), so that the certificates of a thousand nodes
    registered in one minute do not all fall due in one minute years later. Never so much
    that it would be due within MIN_USE of its start: short lifetimes get none."""
    room = validity.not_after - margin - (validity.not_before + SKEW) - MIN_USE
    share = int.from_bytes(hashlib.sha256(serial.encode()).digest()[:8]) / 2.0**64
    return share * max(0.0, min(SPREAD * margin, room))


def due_at(validity: Validity, margin: float, serial: str | None = None) -> float:
    """When a certificate becomes due for renewal (spread by its serial, when given). One
    issued under another policy may be due at once (a margin longer than its whole life): it
    is renewed once, under this policy, whose margin the configuration keeps shorter than its
    lifetime (RenewalPolicy.problem)."""
    early = spread(validity, margin, serial) if serial is not None else 0.0
    return validity.not_after - margin - early


def phase(validity: Validity, margin: float, now: float, serial: str | None = None) -> Phase:
    """Where a certificate stands at `now`. One that is not valid yet was made while the
    issuer's clock ran ahead: nobody can use it, so it is renewed as if due (else it would
    be kept until its far-off due date, and its holder could never take it)."""
    if now >= validity.not_after:
        return Phase.EXPIRED
    if now >= due_at(validity, margin, serial) or now < validity.not_before - SKEW:
        return Phase.DUE
    return Phase.CURRENT


UNREADABLE = Validity(0.0, 0.0)  # a stored certificate that cannot be read: renew it


def agent_margin(validity: Validity) -> float:
    """The margin an agent assumes for its own certificate (it does not know its registrar's
    setting): a third of the certificate's lifetime, the registrar's default."""
    return validity.lifetime / 3


def ca_margin() -> float:
    """The cloud CA certificate is renewed with a third of its lifetime left."""
    return CA_LIFETIME / 3


def certificate_renewed(
    record: Record, issued: IssuedCertificate, previous: IssuedCertificate, until: str
) -> Transition:
    """A new certificate for the key the component already holds one for. Unlike a
    certificate_issued for another key, the previous one is NOT revoked: the component may
    still present it until it has collected the new one, and it ends by itself."""
    reason = f"certificate {previous.serial} renewed as {issued.serial} (valid until {until})"
    return Transition(
        Write(
            records=(replace(record, credentials_issued_at=issued.issued_at),),
            certificates=(issued,),
            events=(event_for(record, issued.issued_at, "credentials", "renewed", reason),),
        )
    )
