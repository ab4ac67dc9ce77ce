"""The pure transitions: token uses kept in step with records, every interleaving of two
announcements that share a token, slots freed by failures, and reinstalled machines."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import pytest

from eucareg.core.decisions import decided
from eucareg.core.model import (
    Announcement,
    DecisionKind,
    HookOutcome,
    HookRun,
    Record,
    Role,
    Status,
)
from eucareg.core.operations import deregistered, expired, rejected
from eucareg.core.policy import decide
from eucareg.core.registering import hook_finished, key_proven
from eucareg.core.transitions import (
    NOTHING,
    EffectKind,
    Timing,
    TokenChange,
    Transition,
    token_uses,
)
from eucareg.core.trust import Token, TrustSettings, check_token
from eucareg.core.view import RegistrarSettings, View
from eucareg.registrar.memory import Memory
from tests.factories import ann, fake_fingerprint, record_from

NC_SETTINGS = RegistrarSettings(registers=frozenset({Role.NC}), own_cluster="c1")
TIMING = Timing(retry_base=1, retry_max=10)
NOW = 1000.0


def token_record(status: Status, token_id: str = "tok000000001") -> Record:
    return record_from(ann(Role.NC, "c1"), status, admitted_by=f"token:{token_id}")


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        (None, Status.AWAITING_KEY, [TokenChange.RESERVE]),
        (Status.AWAITING_KEY, Status.REGISTERING, []),
        (Status.REGISTERING, Status.FAILED, []),  # a failed component keeps its use
        (Status.FAILED, Status.REFUSED, [TokenChange.RELEASE]),
        (Status.AWAITING_KEY, Status.EXPIRED, [TokenChange.RELEASE]),
        (Status.REGISTERED, Status.REPLACED, [TokenChange.RELEASE]),
        (Status.PENDING, Status.REJECTED, []),
    ],
)
def test_a_token_use_is_held_exactly_while_the_record_holds_its_admission(
    before: Status | None, after: Status, expected: list[TokenChange]
) -> None:
    new = token_record(after)
    old = replace(new, status=before) if before is not None else None
    assert [u.change for u in token_uses(new.component_id, old, new)] == expected


def test_deregistration_spends_the_use_and_frees_the_slot() -> None:
    record = token_record(Status.REGISTERED)
    step = deregistered(record, NOW)
    assert [u.change for u in step.change.token_uses] == [TokenChange.SPEND]
    assert step.change.deleted == (record.component_id,)
    assert step.change.revoke == (record.component_id,)
    assert EffectKind.RECONSIDER in [e.kind for e in step.effects]


def test_a_failed_hook_frees_the_slot_and_schedules_a_retry() -> None:
    record = token_record(Status.REGISTERING)
    run = HookRun("r1", record.component_id, "node", NOW, HookOutcome.FAILED, exit_code=3)
    step = hook_finished(record, run, NOW, TIMING)
    [new] = step.change.records
    assert new.status is Status.FAILED and new.attempts == 1
    kinds = [e.kind for e in step.effects]
    assert EffectKind.RECONSIDER in kinds and EffectKind.RETRY_AT in kinds
    assert step.change.hook_runs == (run,)


def test_a_hook_outcome_for_a_record_deregistered_meanwhile_only_completes_the_journal() -> None:
    run = HookRun("r1", "nc-gone-000001", "node", NOW, HookOutcome.OK)
    step = hook_finished(None, run, NOW, TIMING)
    assert step.change.records == () and step.change.hook_runs == (run,)


def test_expiry_and_rejection_release_what_they_held() -> None:
    waiting = replace(token_record(Status.AWAITING_KEY), expires_at=NOW)
    step = expired(waiting, NOW, 60)
    assert [u.change for u in step.change.token_uses] == [TokenChange.RELEASE]
    # The use handed back goes to whoever was refused for want of it.
    assert EffectKind.RECONSIDER in [e.kind for e in step.effects]
    # A timer from before the wait was extended changes nothing.
    assert expired(replace(waiting, expires_at=NOW + 5), NOW, 60) is NOTHING
    pending = replace(waiting, status=Status.PENDING, admitted_by="")
    assert rejected(pending, NOW).change.records[0].status is Status.REJECTED
    with pytest.raises(ValueError, match="deregister it instead"):
        rejected(token_record(Status.REGISTERED), NOW)


# -- a pure simulation of one registrar, to run every interleaving ---------------------------

MASTER = b"pure-master-key"


@dataclass
class Sim:
    """The engine's decide -> transition -> apply loop, without I/O."""

    memory: Memory
    proven: set[str] = field(default_factory=set)
    live: dict[str, Announcement] = field(default_factory=dict)
    hooks: list[str] = field(default_factory=list)

    def view(self, a: Announcement) -> View:
        verdict = None
        if a.token_id is not None:
            verdict = check_token(self.memory.tokens.get(a.token_id), a, MASTER, NOW)
        return View(
            records=self.memory.records,
            live_registered_clusters=frozenset(),
            self_registered=True,
            trust=self.memory.trust,
            now=NOW,
            token=verdict,
            online=frozenset(self.live),
        )

    def apply(self, step: Transition) -> None:
        self.memory.apply(step.change)
        for effect in step.effects:
            if effect.kind is EffectKind.RUN_HOOK:
                self.hooks.append(effect.component_id)
            elif effect.kind is EffectKind.RECONSIDER:
                for a in list(self.live.values()):
                    record = self.memory.records.get(a.component_id)
                    if record is None or record.status in (Status.PENDING, Status.REFUSED):
                        self.announce(a)

    def announce(self, a: Announcement, *, retry: bool = False) -> None:
        self.live[a.component_id] = a
        decision = decide(self.view(a), a, NC_SETTINGS, retry=retry)
        existing = self.memory.records.get(a.component_id)
        self.apply(
            decided(
                existing,
                a,
                decision,
                now=NOW,
                timing=TIMING,
                proven=a.component_id in self.proven,
            )
        )

    def prove(self, a: Announcement) -> None:
        self.proven.add(a.component_id)
        record = self.memory.records.get(a.component_id)
        if record is not None:
            self.apply(key_proven(record, NOW))

    def hook(self, a: Announcement, ok: bool) -> None:
        if a.component_id not in self.hooks:
            return
        self.hooks.remove(a.component_id)
        outcome = HookOutcome.OK if ok else HookOutcome.FAILED
        run = HookRun("r-" + a.component_id, a.component_id, "node", NOW, outcome)
        self.apply(hook_finished(self.memory.records.get(a.component_id), run, NOW, TIMING))


def token_sim(uses: int) -> tuple[Sim, str]:
    from eucareg.core.trust import token_secret

    token = Token("sharedtoken1", Role.NC, "c1", 0.0, 1e12, uses, None, "sha256:" + "0" * 64)
    memory = Memory({}, {token.token_id: token}, TrustSettings(), {}, set())
    return Sim(memory), token_secret(MASTER, token.token_id).hex()


def with_token(a: Announcement, secret_hex: str) -> Announcement:
    from eucareg.core.trust import announcement_proof_message, make_proof

    stamp = int(NOW)
    stamped = replace(a, token_id="sharedtoken1", token_stamp=stamp)
    proof = make_proof(bytes.fromhex(secret_hex), announcement_proof_message(stamped, stamp))
    return replace(stamped, token_proof=proof)


def node(address: str | None = None) -> Announcement:
    """An NC announcement with a made-up key fingerprint (the simulation checks no signature)."""
    n = next(_serial)
    return ann(Role.NC, "c1", address=address, fingerprint=fake_fingerprint(f"sim-{n}"))


_serial = itertools.count()


def interleavings(a: list[str], b: list[str]) -> Iterator[list[tuple[int, str]]]:
    """Every merge of two ordered step lists (which list each step comes from)."""
    n = len(a) + len(b)
    for positions in itertools.combinations(range(n), len(a)):
        ia, ib, merged = iter(a), iter(b), []
        for i in range(n):
            merged.append((0, next(ia)) if i in positions else (1, next(ib)))
        yield merged


STEPS = ["announce", "prove", "hook", "retry"]


@pytest.mark.parametrize("outcomes", list(itertools.product([True, False], repeat=2)))
def test_every_interleaving_of_two_announcements_sharing_a_one_use_token(
    outcomes: tuple[bool, bool],
) -> None:
    """However the two announcements, their key proofs, hook outcomes and retries interleave,
    the token admits at most one of them, and the other is refused with the exhausted code."""
    for order in interleavings(STEPS, STEPS):
        sim, secret = token_sim(uses=1)
        nodes = [with_token(node(), secret) for _ in range(2)]
        for who, what in order:
            comp = nodes[who]
            if what == "announce":
                sim.announce(comp)
            elif what == "prove":
                sim.prove(comp)
            elif what == "hook":
                sim.hook(comp, outcomes[who])
            elif comp.component_id in sim.memory.records:
                sim.announce(comp, retry=True)
        token = sim.memory.tokens["sharedtoken1"]
        assert len(token.used_by) <= 1, order
        holders = [
            r
            for r in sim.memory.records.values()
            if r.status in (Status.AWAITING_KEY, Status.REGISTERING, Status.REGISTERED)
            or (r.status is Status.FAILED and r.admitted_by)
        ]
        assert len(holders) <= 1, order
        assert {r.component_id for r in holders} <= token.used_by, order
        refused = [r for r in sim.memory.records.values() if r.status is Status.REFUSED]
        for record in refused:
            assert "no uses left" in record.reason, order


@pytest.mark.parametrize("uses", [1, 3])
def test_ten_nodes_announcing_at_once_take_exactly_the_tokens_uses(uses: int) -> None:
    sim, secret = token_sim(uses)
    nodes = [with_token(node(), secret) for _ in range(10)]
    for comp in nodes:
        sim.announce(comp)
    for comp in nodes:
        sim.prove(comp)
    for comp in nodes:
        sim.hook(comp, True)
    statuses = sorted(r.status.value for r in sim.memory.records.values())
    assert statuses.count("registered") == uses
    assert statuses.count("refused") == 10 - uses
    assert len(sim.memory.tokens["sharedtoken1"].used_by) == uses


def test_a_refused_newcomer_is_admitted_when_a_failure_frees_the_slot() -> None:
    """One address, two nodes: the second is refused while the first holds it, and decided
    again (without any trust change) when the first's hook fails."""
    sim, _ = token_sim(1)
    sim.memory.trust = TrustSettings(install_until=1e12)
    first = node("10.9.9.9")
    second = node("10.9.9.9")
    sim.announce(first)
    sim.prove(first)
    sim.prove(second)
    sim.announce(second)
    assert sim.memory.records[second.component_id].status is Status.REFUSED
    sim.hook(first, False)
    assert sim.memory.records[first.component_id].status is Status.FAILED
    assert sim.memory.records[second.component_id].status is Status.REGISTERING


def test_a_reinstalled_machine_replaces_its_silent_old_identity() -> None:
    old = token_record(Status.REGISTERED)
    newcomer = ann(Role.NC, "c1", address=old.address)
    trust = TrustSettings(install_until=1e12)
    settings = replace(NC_SETTINGS, replace_after=60)
    base = View({old.component_id: old}, frozenset(), True, trust, NOW, online=frozenset())
    # Heard now: refused. Silent 10s of 60: waits, with a recheck when the 60s are up.
    heard = replace(base, online=frozenset({old.component_id}))
    assert decide(heard, newcomer, settings).code == "address-in-use"
    waiting = decide(replace(base, last_seen={old.component_id: NOW - 10}), newcomer, settings)
    assert waiting.kind is DecisionKind.PENDING and waiting.recheck_at == NOW + 50
    # Silent long enough: admitted, replacing the old one, whose credentials are revoked.
    gone = replace(base, last_seen={old.component_id: NOW - 61})
    decision = decide(gone, newcomer, settings)
    assert decision.kind is DecisionKind.REGISTER and decision.replaces == old.component_id
    assert f"replaces {old.component_id}" in decision.reason
    # Admitted but unproven: nothing happens to the old one yet (a forged announcement must
    # not revoke a powered-off machine).
    step = decided(None, newcomer, decision, now=NOW, timing=TIMING, proven=False, replaced=old)
    [admitted] = step.change.records
    assert admitted.status is Status.AWAITING_KEY and admitted.replaces == old.component_id
    assert step.change.revoke == ()
    # Its key proven, it replaces the old one, whose credentials are revoked.
    step = key_proven(admitted, NOW + 1, old)
    by_id = {r.component_id: r for r in step.change.records}
    assert by_id[old.component_id].status is Status.REPLACED
    assert by_id[newcomer.component_id].status is Status.REGISTERING
    assert step.change.revoke == (old.component_id,)
    assert [u.change for u in step.change.token_uses] == [TokenChange.RELEASE]
    # Proven at once (a signed HTTP announcement): replaced in the same step.
    step = decided(None, newcomer, decision, now=NOW, timing=TIMING, proven=True, replaced=old)
    assert {r.status for r in step.change.records} == {Status.REGISTERING, Status.REPLACED}


def test_without_trust_a_replacement_waits_for_the_operator() -> None:
    old = token_record(Status.REGISTERED)
    newcomer = ann(Role.NC, "c1", address=old.address)
    view = View(
        {old.component_id: old}, frozenset(), True, TrustSettings(), NOW, last_seen={}, seen_floor=0
    )
    decision = decide(view, newcomer, replace(NC_SETTINGS, replace_after=60))
    assert decision.kind is DecisionKind.PENDING and decision.code == "awaiting-approval"
    assert decision.replaces == old.component_id
    step = decided(None, newcomer, decision, now=NOW, timing=TIMING, proven=False, replaced=old)
    assert [r.component_id for r in step.change.records] == [newcomer.component_id]
