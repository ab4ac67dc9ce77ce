"""Talking to the site's DNS server: one query, one signed update. A server that is down,
refuses, or answers garbage never raises into the agent: each kind of failure is logged once
(Problems), and the caller retries after a bounded back-off.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import dns.asyncquery
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.tsig
import dns.update

log = logging.getLogger(__name__)

QUERY_TIMEOUT = 2.0  # one query, UDP and its TCP retry together
UPDATE_TIMEOUT = 3.0  # one update, connect to answer
MAX_BACKOFF = 60.0
EDNS_PAYLOAD = 1232  # larger answers come over TCP


class BrowseFailed(Exception):
    """A query got no usable answer (timeout, refusal, garbage); the message says which."""


@dataclass
class Problems:
    """Each kind of failure is logged once when it starts (and when its text changes), and
    once at info level when it ends; retries in between are quiet."""

    current: dict[str, str] = field(default_factory=dict)

    def failed(self, topic: str, text: str) -> None:
        if self.current.get(topic) != text:
            log.warning("DNS-SD: %s", text)
            self.current[topic] = text
        else:
            log.debug("DNS-SD: %s (again)", text)

    def solved(self, topic: str, text: str) -> None:
        if self.current.pop(topic, None) is not None:
            log.info("DNS-SD: %s", text)


class Server:
    """The site's DNS server at `address`; counts the updates sent, for tests and debugging."""

    def __init__(self, address: tuple[str, int], problems: Problems) -> None:
        self.host, self.port = address
        self._problems = problems
        self.updates_sent = 0

    async def ask(
        self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType
    ) -> dns.message.Message:
        """The server's answer for (name, type): NOERROR or NXDOMAIN; BrowseFailed otherwise."""
        query = dns.message.make_query(name, rdtype, use_edns=0, payload=EDNS_PAYLOAD)
        query.flags &= ~dns.flags.RD  # an authoritative answer, nothing recursed
        try:
            response, _ = await dns.asyncquery.udp_with_fallback(
                query, self.host, port=self.port, timeout=QUERY_TIMEOUT
            )
        except Exception as exc:
            raise BrowseFailed(
                f"{name} {dns.rdatatype.to_text(rdtype)}: {_describe(exc)}"
            ) from None
        rcode = response.rcode()
        if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            raise BrowseFailed(
                f"{name} {dns.rdatatype.to_text(rdtype)}: the server answered "
                f"{dns.rcode.to_text(rcode)}{_hint(rcode)}"
            )
        return response

    async def update(
        self,
        topic: str,
        what: str,
        message: dns.update.UpdateMessage,
        timeout: float,
        expected: tuple[int, ...] = (),
    ) -> bool:
        """Send one update; False (logged) unless the server answered NOERROR. An rcode in
        `expected` (a prerequisite that failed) returns False quietly."""
        where = f"{self.host}:{self.port}"
        self.updates_sent += 1
        try:
            response = await dns.asyncquery.tcp(message, self.host, port=self.port, timeout=timeout)
        except Exception as exc:
            self._problems.failed(topic, f"{what} at {where} failed: {_describe(exc)}")
            return False
        rcode = response.rcode()
        if rcode != dns.rcode.NOERROR:
            if rcode not in expected:
                self._problems.failed(
                    topic, f"{what}: {where} answered {dns.rcode.to_text(rcode)}{_hint(rcode)}"
                )
            return False
        self._problems.solved(topic, f"{what}: {where} takes updates again")
        return True


def backoff(base: float, failures: int, ceiling: float) -> float:
    """The wait before retrying after `failures` failures in a row: doubling from `base`."""
    delay = base * 2 ** min(failures - 1, 16)
    return float(min(delay, ceiling, MAX_BACKOFF))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, dns.tsig.PeerBadKey):
        return "the server does not know our TSIG key (check the key name and the named.conf)"
    if isinstance(exc, dns.tsig.PeerBadSignature):
        return "the server rejected our TSIG signature (check the secret and the algorithm)"
    if isinstance(exc, dns.tsig.PeerError):
        return f"TSIG error: {exc}"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _hint(rcode: int) -> str:
    if rcode == dns.rcode.REFUSED:
        return " (the key may not change these names: check the zone's update-policy)"
    if rcode == dns.rcode.NOTAUTH:
        return " (the server is not authoritative for the domain, or does not know the key)"
    return ""
