"""POST /v1/import over HTTP against a real registrar (real store, real hooks counted): the
operator credential is required, bad bodies are 400 naming the field, a dry run changes
nothing, an import is all or nothing and idempotent, N+1 concurrent imports record each
component once, and an imported component is adopted by the first component that announces
itself at its role and address and proves its key, with no hook run, in any trust mode.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from eucareg.core.model import Role, Status
from eucareg.core.trust import Mode
from eucareg.registrar.engine import Registrar
from eucareg.upgrade.plan import MAX_IMPORT, Candidate
from tests.factories import KEYS, ann, sighting
from tests.unit.test_api_harness import CC_SETTINGS, CLC_SETTINGS, Harness, served
from tests.unit.test_registrar import counting_hooks, hook_lines, make_registrar, settle

FRONT = "10.77.9.9"
CLUSTER = [
    {"role": "walrus", "address": FRONT},
    {"role": "cc", "address": FRONT, "cluster": "c1"},
    {"role": "sc", "address": FRONT, "cluster": "c1"},
]


@pytest.fixture
async def clc(tmp_path: Path) -> AsyncIterator[Harness]:
    async with served(tmp_path, CLC_SETTINGS, peer_key=None) as harness:
        yield harness


async def test_only_the_operator_may_import(clc: Harness) -> None:
    for token in (None, "wrong-token-0123456789"):
        status, answer = await clc.admin("POST", "/v1/import", {"components": CLUSTER}, token)
        assert status == 401, answer
    assert clc.registrar.records() == {}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "components"),
        ({"components": []}, "components"),
        ({"components": [{"role": "clc", "address": FRONT}]}, "role"),
        ({"components": [{"role": "cc", "address": FRONT, "name": "x"}]}, "name"),
        ({"components": [{"role": "cc"}]}, "address"),
        ({"components": CLUSTER, "dry_run": "yes"}, "dry_run"),
        ({"components": [{"role": "nc", "address": "10.0.0.1", "cluster": "c 1"}]}, "cluster"),
        (
            {
                "components": [
                    {"role": "nc", "address": f"10.0.{i // 250}.{i % 250 + 1}", "cluster": "c1"}
                    for i in range(MAX_IMPORT + 1)
                ]
            },
            "components",
        ),
    ],
)
async def test_bad_bodies_are_400_naming_the_field(
    clc: Harness, body: dict[str, Any], message: str
) -> None:
    status, answer = await clc.post("/v1/import", body)
    assert status in (400, 413), answer
    assert message in answer["error"] or status == 413, answer
    assert clc.registrar.records() == {}


async def test_a_dry_run_plans_and_changes_nothing(clc: Harness) -> None:
    status, answer = await clc.post("/v1/import", {"components": CLUSTER, "dry_run": True})
    assert status == 200, answer
    assert [r["action"] for r in answer["plan"]] == ["import"] * 3
    assert (answer["imported"], answer["dry_run"], answer["changed"]) == (0, True, [])
    assert clc.registrar.records() == {}


async def test_an_import_is_recorded_once_and_a_rerun_changes_nothing(clc: Harness) -> None:
    status, answer = await clc.post("/v1/import", {"components": CLUSTER, "source": "list.txt"})
    assert status == 200, answer
    assert answer["imported"] == 3 and len(answer["changed"]) == 3
    records = clc.registrar.records()
    assert sorted(r.role.value for r in records.values()) == ["cc", "sc", "walrus"]
    assert all(
        (r.status, r.claimable, r.admitted_by, r.fingerprint)
        == (Status.REGISTERED, True, "imported", "")
        for r in records.values()
    )
    assert {r["component_id"] for r in answer["plan"]} == set(records)
    status, events = await clc.get("/v1/events", kind="imported")
    assert len(events["events"]) == 3 and "list.txt" in events["events"][0]["reason"]
    status, runs = await clc.get("/v1/hooks")
    assert runs["hook_runs"] == []
    status, again = await clc.post("/v1/import", {"components": CLUSTER})
    assert status == 200 and again["imported"] == 0 and again["changed"] == []
    assert [r["action"] for r in again["plan"]] == ["already-registered"] * 3
    assert clc.registrar.records() == records


async def test_one_conflict_and_nothing_is_imported(clc: Harness) -> None:
    body = {"components": [*CLUSTER, {"role": "cc", "address": "10.77.9.10", "cluster": "c1"}]}
    status, answer = await clc.post("/v1/import", body)
    assert (status, answer["code"]) == (409, "import-conflict"), answer
    assert "nothing imported: 1 of 4 cannot be imported" in answer["error"]
    assert "the CC of cluster c1 is listed twice" in answer["error"]
    assert clc.registrar.records() == {}
    refused = {"components": [{"role": "walrus", "address": "fe80::1"}]}
    status, answer = await clc.post("/v1/import", refused)
    assert status == 409 and "lesson L3" in answer["error"]
    assert clc.registrar.records() == {}


async def test_n_plus_one_concurrent_imports_record_each_component_once(clc: Harness) -> None:
    answers = await asyncio.gather(
        *(clc.post("/v1/import", {"components": CLUSTER}) for _ in range(11))
    )
    assert all(status == 200 for status, _ in answers), answers
    assert sum(a["imported"] for _, a in answers) == 3
    assert len(clc.registrar.records()) == 3
    assert len(clc.registrar.store.records()) == 3  # and so on disk


async def test_nodes_are_imported_by_their_own_cc_only(tmp_path: Path) -> None:
    async with served(tmp_path, CC_SETTINGS, peer_key=None) as cc:
        body = {
            "components": [
                {"role": "nc", "address": "10.77.9.20", "cluster": "cluster1"},
                {"role": "nc", "address": "10.77.9.21", "cluster": "cluster2"},
                {"role": "cc", "address": FRONT, "cluster": "cluster1"},
            ],
            "dry_run": True,
        }
        status, answer = await cc.post("/v1/import", body)
        assert status == 200, answer
        assert [r["action"] for r in answer["plan"]] == ["import", "elsewhere", "elsewhere"]
        body["dry_run"] = False
        status, answer = await cc.post("/v1/import", body)
        assert status == 200 and answer["imported"] == 1, answer


# -- adoption -----------------------------------------------------------------------------------


async def imported_registrar(tmp_path: Path) -> Registrar:
    counting_hooks(tmp_path / "hooks", tmp_path / "hooks.log")
    # No install window, mode local: only the import admits anything.
    reg = await make_registrar(tmp_path, CLC_SETTINGS, install_window=False)
    rows = await reg.admin.import_components(
        [Candidate(Role.CC, "c1", FRONT), Candidate(Role.SC, "c1", FRONT)],
        dry_run=False,
        source="test",
    )
    assert [r.component_id is not None for r in rows] == [True, True]
    return reg


@pytest.mark.parametrize("mode", [Mode.LOCAL, Mode.OFF])
async def test_the_component_that_announces_there_adopts_it_and_no_hook_runs(
    tmp_path: Path, mode: Mode
) -> None:
    reg = await imported_registrar(tmp_path)
    await reg.admin.set_mode(mode)
    placeholders = set(reg.records())
    cc = ann(Role.CC, "c1", address=FRONT)
    sc = ann(Role.SC, "c1", address=FRONT)
    for a in (cc, sc):
        reg.on_sighting(sighting(a))
    await settle(reg)
    for a in (cc, sc):
        record = reg.record(a.component_id)
        assert record is not None and record.status is Status.REGISTERED, record
        assert (record.admitted_by, record.claimable) == ("imported", False)
        assert [e.kind for e in reg.store.events(component_id=a.component_id)][-1] == "adopted"
    assert not placeholders & set(reg.records())  # the imported records are gone (adopted-by)
    assert hook_lines(tmp_path / "hooks.log") == []
    assert await reg.hook_runs() == []
    # A component nobody imported still meets the trust rules (pending in mode local).
    walrus = ann(Role.WALRUS, address="10.77.9.30")
    reg.on_sighting(sighting(walrus))
    await settle(reg)
    newcomer = reg.record(walrus.component_id)
    expected = Status.PENDING if mode is Mode.LOCAL else Status.REFUSED
    assert newcomer is not None and newcomer.status is expected
    # And import again: nothing twice.
    again = await reg.admin.import_components(
        [Candidate(Role.CC, "c1", FRONT)],
        dry_run=False,
        source="test",
    )
    assert [r.action.value for r in again] == ["already-registered"]
    await reg.close()


async def test_another_cluster_at_the_imported_address_takes_nothing(tmp_path: Path) -> None:
    reg = await imported_registrar(tmp_path)
    rogue = ann(Role.CC, "c2", address=FRONT)
    reg.on_sighting(sighting(rogue))
    await settle(reg)
    record = reg.record(rogue.component_id)
    assert record is not None and record.status is Status.REFUSED
    assert "eucareg import registered cc" in record.reason and "for cluster c1" in record.reason
    assert sum(1 for r in reg.records().values() if r.admitted_by == "imported") == 2
    await reg.close()


async def test_an_unproven_claimant_waits_and_a_restart_keeps_the_import(tmp_path: Path) -> None:
    reg = await imported_registrar(tmp_path)
    cc = ann(Role.CC, "c1", address=FRONT)
    KEYS.pop(cc.fingerprint)  # its key never signs a request: it must not take it over
    reg.on_sighting(sighting(cc))
    await settle(reg)
    record = reg.record(cc.component_id)
    assert record is not None and record.status is Status.AWAITING_KEY
    assert sum(1 for r in reg.records().values() if r.claimable) == 2
    await reg.close()
    again = await make_registrar(tmp_path, CLC_SETTINGS, install_window=False)
    assert sum(1 for r in again.records().values() if r.claimable) == 2
    waiting = again.record(cc.component_id)
    assert waiting is not None and waiting.status is Status.AWAITING_KEY
    await again.close()


async def test_a_component_already_waiting_adopts_as_soon_as_it_is_imported(
    tmp_path: Path,
) -> None:
    counting_hooks(tmp_path / "hooks", tmp_path / "hooks.log")
    reg = await make_registrar(tmp_path, CLC_SETTINGS, install_window=False)
    cc = ann(Role.CC, "c1", address=FRONT)
    reg.on_sighting(sighting(cc))  # its agent started before the import: it waits
    await settle(reg)
    waiting = reg.record(cc.component_id)
    assert waiting is not None and waiting.status is Status.PENDING
    await reg.admin.import_components([Candidate(Role.CC, "c1", FRONT)], dry_run=False, source="t")
    await settle(reg)
    record = reg.record(cc.component_id)
    assert record is not None and record.status is Status.REGISTERED
    assert record.admitted_by == "imported" and hook_lines(tmp_path / "hooks.log") == []
    assert [r.component_id for r in reg.records().values()] == [cc.component_id]
    await reg.close()


async def test_a_restart_after_the_import_keeps_all_of_it(tmp_path: Path) -> None:
    reg = await imported_registrar(tmp_path)
    await reg.close()  # the import was answered once durable; a new process reads it back
    again = await make_registrar(tmp_path, CLC_SETTINGS, install_window=False)
    kept = sorted((r.role.value, r.status.value, r.claimable) for r in again.records().values())
    assert kept == [("cc", "registered", True), ("sc", "registered", True)]
    await again.close()


async def test_with_a_key_given_only_that_component_adopts_it(tmp_path: Path) -> None:
    counting_hooks(tmp_path / "hooks", tmp_path / "hooks.log")
    reg = await make_registrar(tmp_path, CLC_SETTINGS, install_window=False)
    genuine = ann(Role.CC, "c1", address=FRONT)
    await reg.admin.import_components(
        [Candidate(Role.CC, "c1", FRONT, fingerprint=genuine.fingerprint)],
        dry_run=False,
        source="t",
    )
    impostor = ann(Role.CC, "c1", address=FRONT)  # first on the wire, and proves its key
    reg.on_sighting(sighting(impostor))
    await settle(reg)
    refused = reg.record(impostor.component_id)
    assert refused is not None and refused.status is Status.REFUSED
    assert "for another key" in refused.reason
    reg.on_sighting(sighting(genuine))
    await settle(reg)
    record = reg.record(genuine.component_id)
    assert record is not None and record.status is Status.REGISTERED
    assert hook_lines(tmp_path / "hooks.log") == []
    await reg.close()


async def test_a_key_in_the_body_must_be_a_fingerprint(clc: Harness) -> None:
    body = {"components": [{"role": "walrus", "address": FRONT, "fingerprint": "sha256:00"}]}
    status, answer = await clc.post("/v1/import", body)
    assert status == 400 and "fingerprint" in answer["error"], answer


async def test_the_longest_body_the_limit_allows_fits_the_api(clc: Harness) -> None:
    rows = [
        {
            "role": "walrus",  # the longest role name; refused as a conflict, but read
            "address": f"fd00:1111:2222:3333:4444:5555:6666:{i:04x}",
            "cluster": "c" * 64,
            "fingerprint": "sha256:" + f"{i:064x}",
        }
        for i in range(MAX_IMPORT)
    ]
    status, answer = await clc.post(
        "/v1/import", {"components": rows, "dry_run": True, "source": "s" * 200}
    )
    assert status == 200, answer
    assert len(answer["plan"]) == MAX_IMPORT
