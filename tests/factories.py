"""Builders for announcements and sightings used across the unit tests."""

from __future__ import annotations

import hashlib
import ipaddress
import itertools

from eucareg.core import txt
from eucareg.core.model import AnnouncedState, Announcement, Record, Role, Status
from eucareg.mdns.types import Change, Sighting
from eucareg.pki import keypairs

_counter = itertools.count(1)
# Real RSA keys, made on first use and kept for the whole test session (about 35 ms each).
# Each announcement built without a fingerprint takes the next unused index, so no two
# announcements share a key unless a test passes the same fingerprint on purpose.
_key_counter = itertools.count()
_pool: list[keypairs.PrivateKey] = []
# Every key the factories handed out, by fingerprint, so tests can prove possession.
KEYS: dict[str, keypairs.PrivateKey] = {}


def pool_key(n: int) -> keypairs.PrivateKey:
    """The n-th key of the session's pool, generated when first asked for."""
    if n < 0:
        raise ValueError(f"key index {n} must not be negative")
    while len(_pool) <= n:
        key = keypairs.generate_key()
        _pool.append(key)
        KEYS[keypairs.fingerprint(key.public_key())] = key
    return _pool[n]


def fresh_key() -> keypairs.PrivateKey:
    """A key no announcement of this session has been given yet."""
    return pool_key(next(_key_counter))


def fake_fingerprint(seed: str) -> str:
    return "sha256:" + hashlib.sha256(seed.encode()).hexdigest()


def ann(
    role: Role,
    cluster: str | None = None,
    *,
    component_id: str | None = None,
    address: str | None = None,
    fingerprint: str | None = None,
    state: AnnouncedState = AnnouncedState.READY,
    instance: str | None = None,
    api_port: int | None = None,
) -> Announcement:
    n = next(_counter)
    component_id = component_id or f"{role.value}-{n:012x}"
    return Announcement(
        role=role,
        component_id=component_id,
        cluster=cluster,
        state=state,
        address=ipaddress.ip_address(address or f"10.77.{n // 250}.{n % 250 + 2}"),
        fingerprint=fingerprint or keypairs.fingerprint(fresh_key().public_key()),
        api_port=api_port,
        eucavers="3.4",
        instance=instance or f"{role.txt_type}-{component_id}",
    )


def sighting(
    a: Announcement, change: Change = Change.ADDED, instance: str | None = None
) -> Sighting:
    record = txt.encode(
        role=a.role,
        component_id=a.component_id,
        cluster=a.cluster,
        state=a.state,
        address=a.address,
        fingerprint=a.fingerprint,
        api_port=a.api_port,
        eucavers=a.eucavers,
        token=(
            (a.token_id, a.token_stamp, a.token_proof)
            if a.token_id and a.token_stamp is not None and a.token_proof
            else None
        ),
    )
    return Sighting(instance or a.instance, change, txt=record, addresses=(str(a.address),))


def record_from(a: Announcement, status: Status = Status.PENDING, **fields: object) -> Record:
    """The record a registrar would keep for `a`, in `status` (more fields as keywords)."""
    return Record(
        component_id=a.component_id,
        role=a.role,
        cluster=a.cluster,
        address=str(a.address),
        fingerprint=a.fingerprint,
        status=status,
        reason=str(fields.pop("reason", "")),
        **fields,  # type: ignore[arg-type]
    )
