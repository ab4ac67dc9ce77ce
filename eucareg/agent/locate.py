"""Finding the registrar each component talks to: CLCs and registered CCs heard over mDNS, the
token or configured CA pin, the registrar that certified credentials already held, and the
configured fallback URL when nothing suitable announces itself. Which of them is genuine is
decided by TLS (pki/tls.py), never by what they announce.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from eucareg.core import txt
from eucareg.core.grammar import IPNetwork
from eucareg.core.model import AnnouncedState, Announcement, Role
from eucareg.mdns.types import Change, Sighting

from .reach import local_networks, reachable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Endpoint:
    """A registrar's HTTP API; `component_id` is empty for the configured fallback."""

    address: str
    port: int
    component_id: str
    fingerprint: str = ""

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"https://{host}:{self.port}"


class Registrars:
    """The registrars heard so far, updated from sightings; wakes waiters when they change."""

    def __init__(
        self,
        fallback: tuple[str, int] | None = None,
        allowed: tuple[IPNetwork, ...] = (),
        *,
        fallback_after: float = 0.0,
        fallback_spread: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[float, float], float] = random.uniform,
        networks: Callable[[], Sequence[IPNetwork]] = local_networks,
    ) -> None:
        self._allowed = allowed
        self._networks = networks  # our links: which of a registrar's addresses to use
        self._fallback = Endpoint(*fallback, component_id="") if fallback else None
        # mDNS gets the first word: the fallback is offered only this long after we started,
        # stretched at random so that hosts started together do not all fall back together.
        self._clock = clock
        self.fallback_after = fallback_after * rng(1.0, 1.0 + fallback_spread)
        self._fallback_at = clock() + self.fallback_after
        self._clc: dict[str, Endpoint] = {}  # instance -> CLC endpoint
        self._clusters: dict[str, tuple[str, Endpoint]] = {}  # instance -> (cluster, endpoint)
        self._changed = asyncio.Event()
        self._warned: set[str] = set()  # warnings given since the last change, to say each once

    def on_sighting(self, sighting: Sighting) -> None:
        """mDNS browser callback: never blocks, never raises on what others announce."""
        if sighting.change is Change.REMOVED:
            changed = self._forget(sighting.instance)
        else:
            endpoint = self._endpoint(sighting)
            if endpoint is None:
                # Not (or no longer) a registrar: a CC whose credentials were revoked says so.
                changed = self._forget(sighting.instance)
            elif endpoint[0] is None:
                self._clc[sighting.instance] = endpoint[1]
                changed = True
            else:
                self._clusters[sighting.instance] = (endpoint[0], endpoint[1])
                changed = True
        if changed:
            log.debug("registrars changed: %s %s", sighting.change.value, sighting.instance)
            # Wake everyone waiting now, and give later waiters a fresh event.
            self._changed.set()
            self._changed = asyncio.Event()
            self._warned.clear()

    def _endpoint(self, sighting: Sighting) -> tuple[str | None, Endpoint] | None:
        """(cluster, endpoint) of a registrar heard: a CLC (cluster None), or a CC that says
        it is registered; None for anything else. A dual-homed registrar is reached at the
        address it offers on one of our links (reach.py)."""
        ann = txt.decode(sighting.instance, sighting.txt, sighting.addresses, self._allowed)
        if not isinstance(ann, Announcement) or ann.api_port is None:
            return None
        registered_cc = ann.role is Role.CC and ann.state is AnnouncedState.REGISTERED
        if ann.role is not Role.CLC and not (registered_cc and ann.cluster):
            return None
        address = reachable(ann.address, sighting.addresses, self._networks())
        endpoint = Endpoint(str(address), ann.api_port, ann.component_id, ann.fingerprint)
        return (None if ann.role is Role.CLC else ann.cluster, endpoint)

    def _forget(self, instance: str) -> bool:
        clc = self._clc.pop(instance, None)
        cluster = self._clusters.pop(instance, None)
        return clc is not None or cluster is not None

    async def wait_changed(self, timeout: float | None) -> None:
        """Return when the registrars heard change, or after `timeout` seconds (None: never)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    def candidates(
        self,
        role: Role,
        cluster: str | None,
        *,
        pin: str | None,
        issuer: str | None,
    ) -> list[Endpoint]:
        """The registrars `role` may ask, the likeliest first; the fallback when none is heard
        (once `fallback_after` has passed since we started).

        Every one of them must still prove itself in the TLS handshake (pki/tls.py): what is
        announced over mDNS is only a hint. `pin` (the CA key a token or the configuration
        names) filters CLCs by the key they announce. `issuer`, when we hold credentials, is the
        key of the registrar that certified them: it goes first. A CC announcing another key
        is tried after it, because a reinstalled CC has a new key under the same cloud CA.
        """
        if role is Role.NC:
            found = [ep for c, ep in self._clusters.values() if c == cluster]
            if len(found) > 1:
                self._warn(
                    f"more than one CC announces itself as registered for cluster {cluster}: "
                    + ", ".join(sorted(f"{ep.component_id}@{ep.address}" for ep in found))
                )
        else:
            found = [ep for ep in self._clc.values() if pin is None or ep.fingerprint == pin]
            if len(self._clc) > 1 and len(found) != 1:
                self._warn(f"more than one CLC announces itself: {sorted(self._clc)}")
            if not found and self._clc:
                self._warn(
                    f"no announced CLC has the CA key we pin ({pin}); ignoring "
                    + ", ".join(sorted(ep.address for ep in self._clc.values()))
                )
        # The one that certified us first, then by address: a stable order to go through.
        found.sort(key=lambda ep: (ep.fingerprint != issuer, *_numeric(ep.address), ep.port))
        if found:
            return found
        return [self._fallback] if self._fallback and self.fallback_in() == 0 else []

    def fallback_in(self) -> float | None:
        """Seconds until the fallback may be used (0: now; None: there is none)."""
        if self._fallback is None:
            return None
        return max(0.0, self._fallback_at - self._clock())

    def _warn(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning("%s", message)


def _numeric(address: str) -> tuple[int, int]:
    """An address as (IP version, value) for sorting; a host name after every address."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return (9, 0)
    return (ip.version, int(ip))
