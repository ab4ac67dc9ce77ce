"""The pure decision function: every check of the design, on hand-built states."""

from __future__ import annotations

from dataclasses import replace

from eucareg.core.model import AnnouncedState, Announcement, DecisionKind, Record, Role, Status
from eucareg.core.policy import decide
from eucareg.core.rivals import rival_warnings
from eucareg.core.trust import Mode, Task, TokenVerdict, TrustSettings
from eucareg.core.view import RegistrarSettings, View
from tests.factories import ann, fake_fingerprint, record_from

CLC = RegistrarSettings(
    registers=frozenset({Role.WALRUS, Role.CC, Role.SC}), observes_unmatched_nodes=True
)
CC1 = RegistrarSettings(registers=frozenset({Role.NC}), own_cluster="c1")


def record_of(a: Announcement, status: Status = Status.REGISTERED, reason: str = "ok") -> Record:
    return record_from(a, status, reason=reason)


# The operator opened an install window: these tests are about the design's checks.
OPEN = TrustSettings(install_until=1e12)


def view(
    *records: Record,
    live: frozenset[str] = frozenset(),
    me: bool = False,
    trust: TrustSettings = OPEN,
    token: TokenVerdict | None = None,
    silent: dict[str, float] | None = None,
) -> View:
    """Every recorded component is heard now, except those in `silent` (id -> seconds)."""
    silent = silent or {}
    return View(
        {r.component_id: r for r in records},
        live,
        me,
        trust,
        1000.0,
        token,
        online=frozenset(r.component_id for r in records if r.component_id not in silent),
        last_seen={cid: 1000.0 - secs for cid, secs in silent.items()},
    )


def test_first_walrus_is_registered_and_a_second_is_refused_naming_the_first() -> None:
    first, second = ann(Role.WALRUS), ann(Role.WALRUS)
    assert decide(view(), first, CLC).kind is DecisionKind.REGISTER
    decision = decide(view(record_of(first)), second, CLC)
    assert decision.kind is DecisionKind.REFUSE
    assert decision.code == "walrus-exists"
    assert first.component_id in decision.reason


def test_walrus_slot_is_held_while_the_first_is_still_registering() -> None:
    first, second = ann(Role.WALRUS), ann(Role.WALRUS)
    for status in (Status.AWAITING_KEY, Status.REGISTERING):
        assert decide(view(record_of(first, status)), second, CLC).code == "walrus-exists"
    # A refused, expired or failing walrus holds nothing: a hook that keeps failing must not
    # keep the genuine one out.
    for status in (Status.REFUSED, Status.EXPIRED, Status.FAILED, Status.REPLACED):
        assert decide(view(record_of(first, status)), second, CLC).kind is DecisionKind.REGISTER


def test_duplicate_cluster_name_is_refused_but_another_name_is_accepted() -> None:
    cc1 = ann(Role.CC, "c1")
    dup, other = ann(Role.CC, "c1"), ann(Role.CC, "c2")
    state = view(record_of(cc1))
    refused = decide(state, dup, CLC)
    assert (refused.kind, refused.code) == (DecisionKind.REFUSE, "cluster-name-taken")
    assert decide(state, other, CLC).kind is DecisionKind.REGISTER


def test_sc_waits_for_a_live_registered_cluster_announcement() -> None:
    cc1, sc = ann(Role.CC, "c1"), ann(Role.SC, "c1")
    pending = decide(view(record_of(cc1)), sc, CLC)
    assert pending.kind is DecisionKind.PENDING
    assert pending.waiting_for == "cluster c1"
    ready = decide(view(record_of(cc1), live=frozenset({"c1"})), sc, CLC)
    assert ready.kind is DecisionKind.REGISTER


def test_second_sc_of_a_cluster_is_refused_even_when_the_cluster_is_live() -> None:
    sc1, sc2 = ann(Role.SC, "c1"), ann(Role.SC, "c1")
    decision = decide(view(record_of(sc1), live=frozenset({"c1"})), sc2, CLC)
    assert (decision.kind, decision.code) == (DecisionKind.REFUSE, "cluster-has-sc")


def test_cc_registrar_waits_for_itself_then_registers_its_own_nodes_only() -> None:
    nc = ann(Role.NC, "c1")
    waiting = decide(view(me=False), nc, CC1)
    assert waiting.kind is DecisionKind.PENDING
    assert "c1" in (waiting.waiting_for or "")
    assert decide(view(me=True), nc, CC1).kind is DecisionKind.REGISTER
    foreign = decide(view(me=True), ann(Role.NC, "c2"), CC1)
    assert foreign.kind is DecisionKind.IGNORE


def test_already_registered_component_is_kept_not_registered_again() -> None:
    nc = ann(Role.NC, "c1")
    decision = decide(view(record_of(nc), me=True), nc, CC1)
    assert decision.kind is DecisionKind.KEEP
    # The same component under another DNS-SD instance name (an Avahi rename) is the same.
    renamed = replace(nc, instance="node-x #2")
    assert decide(view(record_of(nc), me=True), renamed, CC1).kind is DecisionKind.KEEP


def test_someone_else_announcing_a_registered_id_is_refused_without_touching_the_record() -> None:
    nc = ann(Role.NC, "c1")
    impostor = replace(nc, fingerprint=fake_fingerprint("impostor"), address="10.77.200.9")
    decision = decide(view(record_of(nc), me=True), impostor, CC1)
    assert decision.kind is DecisionKind.REFUSE
    assert decision.code == "identity-conflict"
    assert decision.event_only


def test_one_key_cannot_register_two_ids() -> None:
    nc = ann(Role.NC, "c1")
    clone = ann(Role.NC, "c1", fingerprint=nc.fingerprint)
    decision = decide(view(record_of(nc), me=True), clone, CC1)
    assert decision.code == "key-in-use"


def test_two_nodes_cannot_share_an_address() -> None:
    nc = ann(Role.NC, "c1", address="10.77.5.5")
    other = ann(Role.NC, "c1", address="10.77.5.5")
    assert decide(view(record_of(nc), me=True), other, CC1).code == "address-in-use"


def test_registered_sc_announcing_another_cluster_is_refused_as_changed_identity() -> None:
    sc = ann(Role.SC, "c1")
    moved = replace(sc, cluster="c2")
    decision = decide(view(record_of(sc), live=frozenset({"c2"})), moved, CLC)
    assert (decision.code, decision.event_only) == ("changed-identity", True)


def test_expired_wait_is_revived_only_by_a_fresh_sighting() -> None:
    sc = ann(Role.SC, "c1")
    expired = record_of(sc, Status.EXPIRED)
    assert decide(view(expired), sc, CLC).kind is DecisionKind.KEEP
    assert decide(view(expired), sc, CLC, fresh=True).kind is DecisionKind.PENDING


def test_clc_flags_a_node_whose_cluster_no_registered_cc_has() -> None:
    cc1 = ann(Role.CC, "c1")
    stray = ann(Role.NC, "nowhere")
    decision = decide(view(record_of(cc1)), stray, CLC)
    assert decision.kind is DecisionKind.UNMATCHED
    assert "nowhere" in decision.reason and "c1" in decision.reason
    # A node of a registered cluster is the CC's business, not the CLC's.
    assert decide(view(record_of(cc1)), ann(Role.NC, "c1"), CLC).kind is DecisionKind.IGNORE
    # Once its cluster registers, the CLC drops the observation.
    cc9 = ann(Role.CC, "nowhere")
    after = view(record_of(cc1), record_of(cc9), record_of(stray, Status.UNMATCHED))
    assert decide(after, stray, CLC).kind is DecisionKind.FORGET


def test_clc_with_a_local_cc_registers_its_nodes_and_still_flags_strays() -> None:
    both = RegistrarSettings(
        registers=frozenset({Role.WALRUS, Role.CC, Role.SC, Role.NC}),
        own_cluster="c1",
        observes_unmatched_nodes=True,
    )
    cc1 = ann(Role.CC, "c1")
    mine = ann(Role.NC, "c1")
    stray = ann(Role.NC, "c2")
    state = view(record_of(cc1), me=True)
    assert decide(state, mine, both).kind is DecisionKind.REGISTER
    assert decide(state, stray, both).kind is DecisionKind.UNMATCHED


def test_clc_ignores_itself_and_a_cc_registrar_ignores_clc_roles() -> None:
    assert decide(view(), ann(Role.CLC), CLC).kind is DecisionKind.IGNORE
    for role, cluster in ((Role.WALRUS, None), (Role.CC, "c1"), (Role.SC, "c1")):
        assert decide(view(me=True), ann(role, cluster), CC1).kind is DecisionKind.IGNORE


def test_registered_state_announcement_of_a_known_cc_changes_nothing() -> None:
    cc = ann(Role.CC, "c1")
    registered = replace(cc, state=AnnouncedState.REGISTERED)
    assert decide(view(record_of(cc)), registered, CLC).kind is DecisionKind.KEEP


# -- trust (issue: trust and lock-down) ----------------------------------------------------------


def test_by_default_an_unknown_component_waits_for_the_operator() -> None:
    nc = ann(Role.NC, "c1")
    decision = decide(view(me=True, trust=TrustSettings()), nc, CC1)
    assert (decision.kind, decision.code) == (DecisionKind.PENDING, "awaiting-approval")
    assert nc.fingerprint in decision.reason
    approved = replace(record_of(nc, Status.PENDING), approved=True)
    accepted = decide(view(approved, me=True, trust=TrustSettings()), nc, CC1)
    assert (accepted.kind, accepted.admitted_by) == (DecisionKind.REGISTER, "approval")


def test_install_window_admits_only_while_open() -> None:
    nc = ann(Role.NC, "c1")
    open_until_500 = TrustSettings(install_until=500.0)  # view time is 1000
    assert decide(view(me=True, trust=open_until_500), nc, CC1).kind is DecisionKind.PENDING
    admitted = decide(view(me=True, trust=TrustSettings(install_until=2000.0)), nc, CC1)
    assert admitted.admitted_by == "install-window"


def test_valid_token_admits_and_a_bad_one_refuses_with_its_reason() -> None:
    nc = ann(Role.NC, "c1")
    good = TokenVerdict(True, "token", "admitted by token abc")
    admitted = decide(
        view(me=True, trust=TrustSettings(), token=good), replace(nc, token_id="t"), CC1
    )
    assert admitted.kind is DecisionKind.REGISTER and admitted.admitted_by == "token:t"
    bad = TokenVerdict(False, "token-expired", "token t has expired")
    refused = decide(view(me=True, trust=OPEN, token=bad), nc, CC1)
    # A bad token is refused even inside an install window: it is a claim that failed.
    assert (refused.kind, refused.code) == (DecisionKind.REFUSE, "token-expired")
    approved = replace(record_of(nc, Status.REFUSED), approved=True)
    assert decide(view(approved, me=True, token=bad), nc, CC1).kind is DecisionKind.REGISTER


def test_locks_and_mode_off_refuse_new_components_but_keep_registered_ones() -> None:
    nc, walrus = ann(Role.NC, "c1"), ann(Role.WALRUS)
    both = RegistrarSettings(
        registers=frozenset({Role.WALRUS, Role.CC, Role.SC, Role.NC}), own_cluster="c1"
    )
    cc_locked = replace(OPEN, locked=frozenset({Task.CC}))
    assert decide(view(me=True, trust=cc_locked), nc, both).code == "locked"
    assert decide(view(me=True, trust=cc_locked), walrus, both).kind is DecisionKind.REGISTER
    off = replace(OPEN, mode=Mode.OFF)
    assert decide(view(me=True, trust=off), walrus, both).code == "registration-off"
    kept = decide(view(record_of(nc), me=True, trust=off), nc, both)
    assert kept.kind is DecisionKind.KEEP


def test_http_fallback_needs_mode_any() -> None:
    walrus = replace(ann(Role.WALRUS), source="fallback")
    assert decide(view(), walrus, CLC).code == "fallback-not-allowed"
    assert (
        decide(view(trust=replace(OPEN, mode=Mode.ANY)), walrus, CLC).kind is DecisionKind.REGISTER
    )


def test_rejected_and_awaiting_key_components_are_left_alone() -> None:
    nc = ann(Role.NC, "c1")
    for status in (Status.REJECTED, Status.AWAITING_KEY):
        assert decide(view(record_of(nc, status), me=True), nc, CC1).kind is DecisionKind.KEEP


# -- what an unauthenticated sender can make us store ----------------------------------------

GOOD_TOKEN = TokenVerdict(True, "token-ok", "join token abc (1 use left)")


def test_an_http_announcement_without_a_token_outside_mode_any_is_refused_unstored() -> None:
    walrus = replace(ann(Role.WALRUS), source="fallback")
    decision = decide(view(), walrus, CLC)
    assert (decision.kind, decision.code) == (DecisionKind.REFUSE, "fallback-not-allowed")
    assert decision.event_only  # nothing recorded
    # With a valid join token it is accepted from anywhere, in mode local too.
    tokened = replace(walrus, token_id="abcdefghijkl")
    assert decide(view(token=GOOD_TOKEN), tokened, CLC).kind is DecisionKind.REGISTER
    # In mode any it is stored like an mDNS sighting (here: waiting for approval).
    closed_any = TrustSettings(mode=Mode.ANY)
    decision = decide(view(trust=closed_any), walrus, CLC)
    assert decision.kind is DecisionKind.PENDING and not decision.event_only


def test_past_the_cap_a_newcomer_is_refused_pending_full_and_not_stored() -> None:
    settings = replace(CLC, max_unadmitted=3)
    closed = TrustSettings()  # no window: newcomers wait for approval
    full = replace(view(trust=closed), unadmitted=3)
    walrus = ann(Role.WALRUS)
    decision = decide(full, walrus, settings)
    assert (decision.kind, decision.code, decision.event_only) == (
        DecisionKind.REFUSE,
        "pending-full",
        True,
    )
    assert "the limit is 3" in decision.reason
    # One below the cap: stored as pending.
    assert decide(replace(full, unadmitted=2), walrus, settings).kind is DecisionKind.PENDING
    # A token-proven newcomer is never crowded out.
    tokened = replace(walrus, token_id="abcdefghijkl")
    assert decide(replace(full, token=GOOD_TOKEN), tokened, settings).kind is DecisionKind.REGISTER
    # A component already recorded is decided as always (its record exists already).
    pending = replace(record_of(walrus), status=Status.PENDING)
    again = replace(view(pending, trust=closed), unadmitted=3)
    assert decide(again, walrus, settings).code != "pending-full"


# -- a second CLC, rival CCs ------------------------------------------------------------------


def test_a_second_clc_is_an_event_never_a_record() -> None:
    settings = RegistrarSettings(
        registers=frozenset({Role.WALRUS, Role.CC, Role.SC}), own_clc="clc-0000000000c1"
    )
    view = View(records={}, live_registered_clusters=frozenset(), self_registered=True)
    other = ann(Role.CLC, None)
    decision = decide(view, other, settings)
    assert (decision.kind, decision.code, decision.event_only) == (
        DecisionKind.REFUSE,
        "second-clc",
        True,
    )
    assert str(other.address) in decision.reason
    ours = replace(other, component_id="clc-0000000000c1")
    assert decide(view, ours, settings).kind is DecisionKind.IGNORE
    # A CC host (no CLC of its own) does not judge CLCs.
    cc_host = RegistrarSettings(registers=frozenset({Role.NC}), own_cluster="c1")
    assert decide(view, other, cc_host).kind is DecisionKind.IGNORE


def test_rival_warnings_name_a_second_clc_and_clusters_claimed_twice() -> None:
    other_clc = ann(Role.CLC, None)
    own = replace(ann(Role.CLC, None), component_id="clc-0000000000c1")
    cc1, cc2, cc3 = ann(Role.CC, "c1"), ann(Role.CC, "c1"), ann(Role.CC, "c2")
    lines = rival_warnings([own, other_clc, cc1, cc2, cc3], "clc-0000000000c1")
    assert len(lines) == 2
    assert lines[0].startswith(f"another CLC announces itself: {other_clc.component_id} at ")
    assert lines[1].startswith("2 CCs claim cluster c1: ")
    assert cc1.component_id in lines[1] and cc2.component_id in lines[1]
    assert rival_warnings([own, cc1, cc3], "clc-0000000000c1") == []
    assert rival_warnings([other_clc], None) == []  # only a CLC host reports CLCs
