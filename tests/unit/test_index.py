"""The record index the policy's checks read: kept in step through any sequence of changes (the
policy's own tests, which build their index from the records, cover the decisions)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from eucareg.core.index import RecordIndex
from eucareg.core.model import Record, Role, Status
from eucareg.core.transitions import Write
from eucareg.core.trust import TrustSettings
from eucareg.registrar.memory import Memory
from tests.factories import ann, record_from

IDS = [f"cc-{n:012x}" for n in range(6)]
records = st.builds(
    Record,
    component_id=st.sampled_from(IDS),
    role=st.sampled_from([Role.CC, Role.SC, Role.WALRUS]),
    cluster=st.sampled_from([None, "c1", "c2"]),
    address=st.sampled_from(["10.0.0.1", "10.0.0.2"]),
    fingerprint=st.sampled_from(["sha256:" + c * 64 for c in "abc"]),
    status=st.sampled_from(list(Status)),
    reason=st.just(""),
)
changes = st.lists(
    st.one_of(
        st.builds(lambda r: Write(records=(r,)), records),
        st.builds(lambda i: Write(deleted=(i,)), st.sampled_from(IDS)),
    ),
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(changes)
def test_the_index_stays_in_step_with_the_records(writes: list[Write]) -> None:
    memory = Memory({}, {}, TrustSettings(), {}, set())
    for write in writes:
        memory.apply(write)
        assert memory.index == RecordIndex.of(memory.records)


def test_lookups_return_ids_whatever_their_status() -> None:
    cc = record_from(ann(Role.CC, "c1"), Status.REJECTED)
    sc = record_from(ann(Role.SC, "c1"), Status.REGISTERED)
    index = RecordIndex([cc, sc])
    assert index.in_cluster(Role.CC, "c1") == {cc.component_id}
    assert index.with_key(sc.fingerprint) == {sc.component_id}
    assert index.at(Role.SC, sc.address) == {sc.component_id}
    assert index.clusters(Role.SC) == ["c1"]
    index.update(sc, None)
    assert index.in_cluster(Role.SC, "c1") == frozenset() and index.clusters(Role.SC) == []
