"""Trust: the registrar's mode and locks, install windows, and join tokens with their proofs.

Everything here is pure (values in, verdicts out), so the policy can use it and the tests can
exercise every refusal. A token's secret is derived from the registrar's master key and never
travels: components announce an HMAC proof bound to their id, key, role, cluster and address.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field
from enum import StrEnum

from eucareg.core.model import Announcement, Role

TOKEN_PREFIX = "eucareg1"
PROOF_MAX_AGE = 900.0  # seconds a proof stays acceptable; agents refresh well before
_TOKEN_RE = re.compile(
    r"eucareg1\.(?P<id>[a-z0-9]{12})\.(?P<secret>[A-Za-z0-9_-]{43})\.(?P<ca>[0-9a-f]{64})",
    re.ASCII,
)


class Mode(StrEnum):
    """The design's three modes (its 'Alternative' section)."""

    LOCAL = "local"  # register what is announced on the local network
    ANY = "any"  # also accept HTTP fallback requests from anywhere (CLC)
    OFF = "off"  # register nothing new


class Task(StrEnum):
    """The two registration tasks that can be locked separately (design: two switches)."""

    CLC = "clc"  # Walrus, CC, SC
    CC = "cc"  # NC

    @classmethod
    def of(cls, role: Role) -> Task:
        return cls.CC if role is Role.NC else cls.CLC


@dataclass(frozen=True)
class TrustSettings:
    """Operator-set trust state of one registrar; persisted, changed at run time."""

    mode: Mode = Mode.LOCAL
    locked: frozenset[Task] = frozenset()
    install_until: float | None = None  # install window closes at this time

    def install_open(self, now: float) -> bool:
        return self.install_until is not None and now < self.install_until


@dataclass(frozen=True)
class Token:
    """A join token as the registrar stores it (never with its secret)."""

    token_id: str
    role: Role
    cluster: str | None
    created_at: float
    expires_at: float
    uses: int | None  # None: unlimited
    revoked_at: float | None
    ca_fingerprint: str
    used_by: frozenset[str] = field(default_factory=frozenset)
    # Components this token admitted that were deregistered since: it does not admit them again.
    spent_by: frozenset[str] = field(default_factory=frozenset)

    def uses_left(self, component_id: str) -> int | None:
        if self.uses is None:
            return None
        return self.uses - len(self.used_by - {component_id})


@dataclass(frozen=True)
class TokenVerdict:
    ok: bool
    code: str
    reason: str


@dataclass(frozen=True)
class ParsedToken:
    token_id: str
    secret: bytes
    ca_fingerprint: str


class TokenError(ValueError):
    """A token string that is not an eucareg join token."""


def new_token_id() -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return "".join(secrets.choice(alphabet) for _ in range(12))


def new_master_key() -> bytes:
    return secrets.token_bytes(32)


def token_secret(master_key: bytes, token_id: str) -> bytes:
    """Derived, not stored: a copy of the database does not leak any token."""
    return hmac.new(master_key, b"eucareg-token|" + token_id.encode(), hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def format_token(token_id: str, secret: bytes, ca_fingerprint: str) -> str:
    """eucareg1.<id>.<secret>.<CA key sha256>: what the operator hands to a component."""
    ca_hex = ca_fingerprint.removeprefix("sha256:")
    return f"{TOKEN_PREFIX}.{token_id}.{_b64(secret)}.{ca_hex}"


def parse_token(text: str) -> ParsedToken:
    match = _TOKEN_RE.fullmatch(text.strip())
    if match is None:
        raise TokenError(
            "not an eucareg join token (expected eucareg1.<12 chars>.<43 chars>.<64 hex>)"
        )
    return ParsedToken(
        token_id=match["id"],
        secret=_unb64(match["secret"]),
        ca_fingerprint="sha256:" + match["ca"],
    )


def proof_message(
    *,
    component_id: str,
    fingerprint: str,
    role: Role,
    cluster: str | None,
    address: str,
    stamp: int,
) -> bytes:
    return "|".join(
        [
            "eucareg-join-v1",
            component_id,
            fingerprint,
            role.txt_type,
            cluster or "",
            address,
            str(stamp),
        ]
    ).encode()


def make_proof(secret: bytes, message: bytes) -> str:
    return _b64(hmac.new(secret, message, hashlib.sha256).digest())


def announcement_proof_message(ann: Announcement, stamp: int) -> bytes:
    return proof_message(
        component_id=ann.component_id,
        fingerprint=ann.fingerprint,
        role=ann.role,
        cluster=ann.cluster,
        address=str(ann.address),
        stamp=stamp,
    )


def check_token(
    token: Token | None, ann: Announcement, master_key: bytes, now: float
) -> TokenVerdict:
    """Is `ann` admitted by the token it names? Every 'no' says exactly why."""
    if ann.token_id is None or ann.token_proof is None or ann.token_stamp is None:
        return TokenVerdict(False, "no-token", "no join token proof in the announcement")
    if token is None:
        return TokenVerdict(False, "unknown-token", f"token {ann.token_id} was never issued here")
    if token.revoked_at is not None:
        return TokenVerdict(False, "token-revoked", f"token {token.token_id} was revoked")
    if now >= token.expires_at:
        return TokenVerdict(False, "token-expired", f"token {token.token_id} has expired")
    if token.role is not ann.role:
        return TokenVerdict(
            False,
            "token-wrong-role",
            f"token {token.token_id} is for a {token.role.value}, not a {ann.role.value}",
        )
    if token.cluster is not None and token.cluster != ann.cluster:
        return TokenVerdict(
            False,
            "token-wrong-cluster",
            f"token {token.token_id} is for cluster {token.cluster}, not {ann.cluster}",
        )
    expected = make_proof(
        token_secret(master_key, token.token_id),
        announcement_proof_message(ann, ann.token_stamp),
    )
    if not hmac.compare_digest(expected, ann.token_proof):
        return TokenVerdict(
            False,
            "bad-proof",
            f"the proof for token {token.token_id} does not match this id, key and address "
            "(wrong token, or a copied announcement)",
        )
    if abs(now - ann.token_stamp) > PROOF_MAX_AGE:
        return TokenVerdict(
            False,
            "stale-proof",
            f"token proof made {now - ann.token_stamp:+.0f}s ago (replayed announcement?)",
        )
    if ann.component_id in token.spent_by:
        return TokenVerdict(
            False,
            "token-spent",
            f"token {token.token_id} admitted {ann.component_id} before it was deregistered; "
            "approve it or issue a new token",
        )
    left = token.uses_left(ann.component_id)
    if left is not None and left <= 0:
        return TokenVerdict(
            False, "token-used-up", f"token {token.token_id} has no uses left ({token.uses} used)"
        )
    return TokenVerdict(True, "token", f"admitted by token {token.token_id}")
