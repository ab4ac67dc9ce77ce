"""Join tokens and proofs: every way a token can fail says so, and the secret never travels."""

from __future__ import annotations

from dataclasses import replace

import pytest

from eucareg.core import txt
from eucareg.core.model import Announcement, Role
from eucareg.core.trust import (
    PROOF_MAX_AGE,
    Token,
    TokenError,
    announcement_proof_message,
    check_token,
    format_token,
    make_proof,
    parse_token,
    token_secret,
)
from tests.factories import ann, sighting

MASTER = b"unit-test-master"
NOW = 1_800_000_000.0
CA = "sha256:" + "c" * 64


def issued(**changes: object) -> Token:
    base = Token(
        token_id="abcdefghijkl",
        role=Role.NC,
        cluster="c1",
        created_at=NOW - 60,
        expires_at=NOW + 3600,
        uses=2,
        revoked_at=None,
        ca_fingerprint=CA,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def proven(
    a: Announcement, token: Token, stamp: float = NOW, secret: bytes | None = None
) -> Announcement:
    key = secret if secret is not None else token_secret(MASTER, token.token_id)
    with_token = replace(a, token_id=token.token_id, token_stamp=int(stamp))
    proof = make_proof(key, announcement_proof_message(with_token, int(stamp)))
    return replace(with_token, token_proof=proof)


def test_token_string_round_trips_and_carries_the_ca_pin() -> None:
    secret = token_secret(MASTER, "abcdefghijkl")
    text = format_token("abcdefghijkl", secret, CA)
    parsed = parse_token(text)
    assert (parsed.token_id, parsed.secret, parsed.ca_fingerprint) == ("abcdefghijkl", secret, CA)
    for bad in ("", "eucareg1.short.x.y", text + "x", text.replace("eucareg1", "eucareg2")):
        with pytest.raises(TokenError):
            parse_token(bad)


def test_valid_proof_is_accepted_and_the_txt_carries_no_secret() -> None:
    token = issued()
    a = proven(ann(Role.NC, "c1"), token)
    assert check_token(token, a, MASTER, NOW).ok
    encoded = sighting(a).txt
    decoded = txt.decode("x", encoded)
    assert isinstance(decoded, Announcement) and decoded.token_proof == a.token_proof
    secret_text = format_token(token.token_id, token_secret(MASTER, token.token_id), CA)
    assert secret_text.split(".")[2] not in " ".join(encoded.values())


@pytest.mark.parametrize(
    ("token_changes", "code"),
    [
        ({"revoked_at": NOW - 1}, "token-revoked"),
        ({"expires_at": NOW - 1}, "token-expired"),
        ({"role": Role.SC}, "token-wrong-role"),
        ({"cluster": "c2"}, "token-wrong-cluster"),
        ({"uses": 1, "used_by": frozenset({"nc-someone-else"})}, "token-used-up"),
    ],
)
def test_each_token_refusal_names_its_reason(token_changes: dict[str, object], code: str) -> None:
    token = issued(**token_changes)
    verdict = check_token(token, proven(ann(Role.NC, "c1"), token), MASTER, NOW)
    assert (verdict.ok, verdict.code) == (False, code)


def test_proof_failures() -> None:
    token = issued()
    a = ann(Role.NC, "c1")
    assert check_token(None, proven(a, token), MASTER, NOW).code == "unknown-token"
    assert check_token(token, a, MASTER, NOW).code == "no-token"
    wrong = proven(a, token, secret=b"x" * 32)
    assert check_token(token, wrong, MASTER, NOW).code == "bad-proof"
    # A proof copied onto another component, key or address is worthless.
    good = proven(a, token)
    for other in (
        replace(good, component_id="nc-0123456789ab"),
        replace(good, fingerprint="sha256:" + "d" * 64),
        replace(good, address=ann(Role.NC, "c1").address),
    ):
        assert check_token(token, other, MASTER, NOW).code == "bad-proof"
    old = proven(a, token, stamp=NOW - PROOF_MAX_AGE - 5)
    assert check_token(token, old, MASTER, NOW).code == "stale-proof"


def test_a_component_may_reuse_its_own_use_but_not_after_deregistration() -> None:
    a = ann(Role.NC, "c1")
    token = issued(uses=1, used_by=frozenset({a.component_id}))
    assert check_token(token, proven(a, token), MASTER, NOW).ok
    spent = replace(token, spent_by=frozenset({a.component_id}))
    assert check_token(spent, proven(a, spent), MASTER, NOW).code == "token-spent"
