"""The import plan, pure (eucareg/upgrade/plan.py): each listed component is imported, already
registered, another registrar's, in conflict with a record or another listed component, or
refused (lesson L3); the transition that records the imports runs no hook.
"""

from __future__ import annotations

from eucareg.core.model import Record, Role, Status
from eucareg.core.transitions import EffectKind
from eucareg.upgrade.plan import ADMITTED_BY, Action, Candidate, classify, imported, with_ids

CLC = frozenset({Role.WALRUS, Role.CC, Role.SC})
CC = frozenset({Role.NC})


def cand(role: Role, cluster: str | None, address: str) -> Candidate:
    return Candidate(role, cluster, address, "L:1")


def record(
    cid: str, role: Role, cluster: str | None, address: str, status: Status = Status.REGISTERED
) -> Record:
    return Record(cid, role, cluster, address, "sha256:" + "a" * 64, status, "")


def actions(candidates: list[Candidate], records: list[Record] = (), **kw: object) -> list[str]:  # type: ignore[assignment]
    settings = {"registers": CLC, "own_cluster": None, **kw}
    rows = classify(candidates, {r.component_id: r for r in records}, **settings)  # type: ignore[arg-type]
    return [f"{r.action.value}: {r.reason}" for r in rows]


def test_a_whole_front_end_imports_on_the_clc_and_the_nodes_go_to_their_cc() -> None:
    listed = [
        cand(Role.WALRUS, None, "10.0.0.1"),
        cand(Role.CC, "c1", "10.0.0.1"),  # CC and SC share the front end's address
        cand(Role.SC, "c1", "10.0.0.1"),
        cand(Role.NC, "c1", "10.0.0.5"),
    ]
    rows = classify(listed, {}, registers=CLC, own_cluster=None)
    assert [r.action for r in rows] == [Action.IMPORT] * 3 + [Action.ELSEWHERE]
    assert "run `eucareg import` on the CC of cluster c1" in rows[3].reason
    on_cc = classify(listed, {}, registers=CC, own_cluster="c1")
    assert [r.action for r in on_cc] == [Action.ELSEWHERE] * 3 + [Action.IMPORT]
    other_cc = classify(listed, {}, registers=CC, own_cluster="c2")
    assert "on that cluster's CC" in other_cc[3].reason


def test_addresses_never_registered_are_refused_lesson_l3() -> None:
    listed = [
        cand(Role.NC, "c1", "fe80::1"),
        cand(Role.NC, "c1", "127.0.0.1"),
        cand(Role.NC, "c1", "::1"),
        cand(Role.NC, "c1", "169.254.3.3"),
        cand(Role.NC, "c1", "::ffff:10.0.0.9"),
        cand(Role.NC, "c1", "0.0.0.0"),
        cand(Role.NC, "c1", "224.0.0.251"),
    ]
    rows = classify(listed, {}, registers=CC, own_cluster="c1")
    assert all(r.action is Action.REFUSED for r in rows), rows
    assert "never registered (lesson L3)" in rows[0].reason


def test_the_registrar_allow_list_is_honoured() -> None:
    import ipaddress

    allowed = (ipaddress.ip_network("169.254.0.0/16"),)
    [row] = classify(
        [cand(Role.NC, "c1", "169.254.3.3")], {}, registers=CC, own_cluster="c1", allowed=allowed
    )
    assert row.action is Action.IMPORT


def test_already_registered_is_not_imported_twice_whoever_registered_it() -> None:
    held = [
        record("walrus-1", Role.WALRUS, None, "10.0.0.1"),
        record("cc-1", Role.CC, "c1", "10.0.0.1"),
    ]
    rows = classify(
        [cand(Role.WALRUS, None, "10.0.0.1"), cand(Role.CC, "c1", "10.0.0.1")],
        {r.component_id: r for r in held},
        registers=CLC,
        own_cluster=None,
    )
    assert [(r.action, r.component_id) for r in rows] == [
        (Action.REGISTERED, "walrus-1"),
        (Action.REGISTERED, "cc-1"),
    ]


def test_conflicts_with_the_registry_name_the_holder() -> None:
    held = [
        record("walrus-1", Role.WALRUS, None, "10.0.0.2"),  # another Walrus
        record("cc-1", Role.CC, "c1", "10.0.0.9"),  # c1's CC elsewhere
        record(
            "sc-1", Role.SC, "c2", "10.0.0.3", Status.AWAITING_KEY
        ),  # same address, other cluster
    ]
    got = actions(
        [
            cand(Role.WALRUS, None, "10.0.0.1"),
            cand(Role.CC, "c1", "10.0.0.1"),
            cand(Role.SC, "c3", "10.0.0.3"),
        ],
        held,
    )
    assert got[0].startswith("conflict: the Walrus is held by walrus-1 (walrus at 10.0.0.2")
    assert got[1].startswith("conflict: the CC of cluster c1 is held by cc-1")
    assert got[2].startswith("conflict: this address is held by sc-1 (sc of cluster c2")
    assert all("deregister it first" in g for g in got)


def test_a_record_not_holding_a_slot_does_not_block_the_import() -> None:
    held = [
        record("cc-9", Role.CC, "c1", "10.0.0.1", Status.PENDING),
        record("cc-8", Role.CC, "c1", "10.0.0.8", Status.FAILED),
    ]
    assert actions([cand(Role.CC, "c1", "10.0.0.1")], held)[0].startswith("import")


def test_the_listing_contradicting_itself_is_a_conflict() -> None:
    got = actions(
        [
            cand(Role.WALRUS, None, "10.0.0.1"),
            cand(Role.WALRUS, None, "10.0.0.2"),  # two Walruses
            cand(Role.CC, "c1", "10.0.0.1"),
            cand(Role.CC, "c1", "10.0.0.7"),  # c1 twice
            cand(Role.CC, "c2", "10.0.0.1"),  # one address, two CCs
            cand(Role.SC, "c9", "10.0.0.1"),  # no CC for c9
        ]
    )
    assert got[0].startswith("import")
    assert got[1].startswith("conflict: the Walrus is listed twice: also walrus at 10.0.0.1")
    assert got[2].startswith("import")
    assert got[3].startswith("conflict: the CC of cluster c1 is listed twice")
    assert got[4].startswith(
        "conflict: the CC of cluster c2 is listed twice: also cc of cluster c1"
    )
    assert got[5].startswith("conflict: cluster c9 has no CC")


def test_an_sc_whose_cc_is_registered_here_already_may_be_imported() -> None:
    held = [record("cc-1", Role.CC, "c1", "10.0.0.9")]
    assert actions([cand(Role.SC, "c1", "10.0.0.3")], held)[0].startswith("import")


def test_addresses_are_compared_as_the_registry_writes_them() -> None:
    held = [record("nc-1", Role.NC, "c1", "fd00::5")]
    rows = classify(
        [cand(Role.NC, "c1", "fd00:0:0::5")],
        {"nc-1": held[0]},
        registers=CC,
        own_cluster="c1",
    )
    assert (rows[0].action, rows[0].address) == (Action.REGISTERED, "fd00::5")


def test_the_transition_records_registered_claimable_records_and_runs_no_hook() -> None:
    rows = classify(
        [cand(Role.CC, "c1", "10.0.0.1"), cand(Role.SC, "c1", "10.0.0.1")],
        {},
        registers=CLC,
        own_cluster=None,
    )
    step = imported(rows, ["cc-000000000001", "sc-000000000001"], 100.0, "list.txt")
    records = step.change.records
    assert [(r.status, r.claimable, r.admitted_by, r.fingerprint) for r in records] == [
        (Status.REGISTERED, True, ADMITTED_BY, "")
    ] * 2
    assert [e.kind for e in step.change.events] == ["imported", "imported"]
    assert step.change.hook_runs == ()
    kinds = [e.kind for e in step.effects]
    assert EffectKind.RUN_HOOK not in kinds and kinds[-1] is EffectKind.RECONSIDER
    named = with_ids(rows, ["cc-000000000001", "sc-000000000001"])
    assert [r.component_id for r in named] == ["cc-000000000001", "sc-000000000001"]


KEY_A = "sha256:" + "a" * 64
KEY_B = "sha256:" + "b" * 64


def pinned(role: Role, cluster: str | None, address: str, key: str) -> Candidate:
    return Candidate(role, cluster, address, "L:1", key)


def test_a_pinned_key_is_recorded_and_checked() -> None:
    rows = classify([pinned(Role.CC, "c1", "10.0.0.1", KEY_B)], {}, registers=CLC, own_cluster=None)
    assert rows[0].action is Action.IMPORT and "only key sha256:bbbbbbbbbbbb" in rows[0].reason
    step = imported(rows, ["cc-000000000001"], 1.0, "L")
    assert step.change.records[0].fingerprint == KEY_B
    # The key held by another record (KEY_A is the record() helper's), or given twice.
    held = [record("walrus-1", Role.WALRUS, None, "10.0.0.9")]
    got = actions([pinned(Role.CC, "c1", "10.0.0.1", KEY_A)], held)
    assert got[0].startswith("conflict: key sha256:aaaaaaaaaaaa… already belongs to walrus-1")
    got = actions(
        [pinned(Role.CC, "c1", "10.0.0.1", KEY_B), pinned(Role.SC, "c1", "10.0.0.1", KEY_B)]
    )
    assert got[1].startswith("conflict: key sha256:bbbbbbbbbbbb… is given twice")
    bad = actions([pinned(Role.CC, "c1", "10.0.0.1", "sha256:xyz")])
    assert bad[0].startswith("refused: the key given is not a fingerprint")


def test_already_registered_with_another_key_is_a_conflict() -> None:
    held = [record("cc-1", Role.CC, "c1", "10.0.0.1")]  # adopted with KEY_A
    assert actions([pinned(Role.CC, "c1", "10.0.0.1", KEY_A)], held)[0].startswith(
        "already-registered"
    )
    other = actions([pinned(Role.CC, "c1", "10.0.0.1", KEY_B)], held)[0]
    assert other.startswith("conflict: already registered here as cc-1, with key")
    unpinned = Record("cc-2", Role.CC, "c1", "10.0.0.1", "", Status.REGISTERED, "")
    note = actions([pinned(Role.CC, "c1", "10.0.0.1", KEY_B)], [unpinned])[0]
    # A key given for a record that has none is not applied: a conflict, not a silent no-op.
    assert note.startswith("conflict: already registered here as cc-2 without a key")
    assert "import again to pin it" in note
