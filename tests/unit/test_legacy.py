"""Legacy announcements: what Ubuntu 9.10 and 10.04 published is recognised, reported once, shown
in status while it is heard, and never registered; eucareg records are never taken for it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
from rich.console import Console

from eucareg.api import answers
from eucareg.cli.render import render_tree
from eucareg.core import legacy, txt
from eucareg.core.grammar import CLUSTER, VERSION
from eucareg.core.legacy import LegacyComponent, classify
from eucareg.core.model import Role
from eucareg.mdns.types import Change, Sighting
from eucareg.registrar.engine import Registrar
from tests.factories import ann, sighting
from tests.unit.test_api_harness import CLC_SETTINGS, served
from tests.unit.test_registrar import make_registrar, settle

OLD = {"txtvers": "1", "protovers": "1", "eucavers": "1.6.2"}
HOST = ("10.77.1.20",)


def old(txt_type: str) -> dict[str, str]:
    return {**OLD, "type": txt_type}


@pytest.mark.parametrize(
    ("instance", "record", "addresses", "expected"),
    [
        # 9.10: the CC only, under one fixed name, with or without TXT data.
        (
            "Eucalyptus cluster controller",
            {},
            HOST,
            ("9.10", "cc", None, "10.77.1.20", None),
        ),
        (
            "Eucalyptus cluster controller",
            {"txtvers": "1", "eucavers": "1.6"},
            HOST,
            ("9.10", "cc", None, "10.77.1.20", "1.6"),
        ),
        (
            "Eucalyptus cluster controller #2",
            {},
            ("fe80::1%eth0", "10.77.1.21"),
            ("9.10", "cc", None, "10.77.1.21", None),
        ),
        # 10.04: every type, the cluster where the instance name puts it.
        ("Cloud controller", old("cloud"), HOST, ("10.04", "clc", None, "10.77.1.20", "1.6.2")),
        ("Walrus", old("walrus"), HOST, ("10.04", "walrus", None, "10.77.1.20", "1.6.2")),
        ("cluster1", old("cluster"), HOST, ("10.04", "cc", "cluster1", "10.77.1.20", "1.6.2")),
        (
            "cluster1 storage",
            old("storage"),
            HOST,
            ("10.04", "sc", "cluster1", "10.77.1.20", "1.6.2"),
        ),
        ("cluster1 node", old("node"), HOST, ("10.04", "nc", "cluster1", "10.77.1.20", "1.6.2")),
        # avahi's renames on a collision do not leak into the cluster (lesson L2).
        ("Walrus #2", old("walrus"), HOST, ("10.04", "walrus", None, "10.77.1.20", "1.6.2")),
        ("cluster1 #3", old("cluster"), HOST, ("10.04", "cc", "cluster1", "10.77.1.20", "1.6.2")),
        (
            "cluster1 node #2",
            old("node"),
            HOST,
            ("10.04", "nc", "cluster1", "10.77.1.20", "1.6.2"),
        ),
        # A name that does not say the cluster: still legacy, the cluster unknown.
        ("some node", old("storage"), HOST, ("10.04", "sc", None, "10.77.1.20", "1.6.2")),
        ("bad name! node", old("node"), HOST, ("10.04", "nc", None, "10.77.1.20", "1.6.2")),
        # No usable address: shown as unknown; a bad eucavers is not shown.
        (
            "cluster2 node",
            {**old("node"), "eucavers": "1.6 beta"},
            ("127.0.0.1", "junk"),
            ("10.04", "nc", "cluster2", "", None),
        ),
    ],
)
def test_legacy_announcements_are_recognised(
    instance: str,
    record: dict[str, str],
    addresses: tuple[str, ...],
    expected: tuple[str, str, str | None, str, str | None],
) -> None:
    assert isinstance(txt.decode(instance, record, addresses), txt.Rejected)
    heard = classify(instance, record, addresses)
    assert heard == LegacyComponent(*expected, instance=instance)
    assert heard.code == f"legacy-{expected[0]}"


def eucareg_record(**change: str) -> dict[str, str]:
    return {**sighting(ann(Role.SC, "cluster1")).txt, **change}


@pytest.mark.parametrize(
    ("instance", "record"),
    [
        # eucareg records, however broken, stay rejected with decode's reason.
        ("cluster1 storage", eucareg_record(fp="sha256:" + "A" * 64)),
        ("cluster1 storage", {k: v for k, v in eucareg_record().items() if k != "id"}),
        ("cluster1 storage", {k: v for k, v in eucareg_record().items() if k != "fp"}),
        ("cluster1 storage", {**old("storage"), "addr": "10.77.1.20"}),
        ("cluster1 storage", {**old("storage"), "state": "ready"}),
        ("Eucalyptus cluster controller", eucareg_record(fp="md5:abc")),
        # Not 10.04 either: a key missing, an unknown type, versions that are not numbers.
        ("cluster1 storage", {k: v for k, v in old("storage").items() if k != "eucavers"}),
        ("cluster1 storage", {"type": "storage"}),
        ("cluster1", old("toaster")),
        ("cluster1", {**old("cluster"), "txtvers": "one"}),
        ("cluster1", {**old("cluster"), "protovers": ""}),
        # Garbage, and a name that is only close to the 9.10 one.
        ("printer", {"rp": "queue"}),
        ("printer", {}),
        ("eucalyptus cluster controller", {}),
        ("Eucalyptus cluster controller 2", {}),
        ("x" * 300, old("node")),
    ],
)
def test_what_is_not_legacy_is_not_called_legacy(instance: str, record: dict[str, str]) -> None:
    assert classify(instance, record, HOST) is None


def test_a_valid_eucareg_record_is_never_legacy_even_under_an_old_name() -> None:
    record = eucareg_record()
    assert not isinstance(txt.decode("cluster1 storage", record), txt.Rejected)
    assert classify("cluster1 storage", record) is None
    assert classify("Eucalyptus cluster controller", record) is None


def test_the_module_agrees_with_the_core_grammar_and_roles() -> None:
    assert {t: Role.from_txt_type(t).value for t in legacy.ROLES} == legacy.ROLES
    assert set(legacy.ROLES) == {r.txt_type for r in Role}
    assert legacy._CLUSTER.pattern == CLUSTER.pattern
    assert VERSION.pattern.startswith(legacy._VERSION.pattern)


def test_the_reason_says_what_was_heard_and_what_to_do() -> None:
    heard = classify("cluster1 storage", old("storage"), HOST)
    assert heard is not None
    assert legacy.reason(heard) == (
        "announcement 'cluster1 storage': a Eucalyptus 10.04 sc of cluster cluster1 at "
        "10.77.1.20 (eucavers 1.6.2) announces itself the old way; it is not registered by "
        "eucareg: import what the old front end registered (eucareg import, docs/upgrade.md), "
        "then install eucareg there: it takes its registration over"
    )


# -- the registrar ---------------------------------------------------------------------------


def old_sighting(instance: str, record: dict[str, str], change: Change = Change.ADDED) -> Sighting:
    return Sighting(instance, change, txt=record, addresses=HOST)


async def notes_of(reg: Registrar) -> list[Any]:
    await settle(reg)
    return [e for e in reg.store.events() if e.kind != "trust"]


async def test_a_legacy_sighting_is_one_event_no_record_and_shown_until_goodbye(
    tmp_path: Path,
) -> None:
    reg = await make_registrar(tmp_path)
    storage = old_sighting("cluster1 storage", old("storage"))
    reg.on_sighting(storage)
    reg.on_sighting(storage)  # a refresh says nothing new
    reg.on_sighting(old_sighting("cluster1 storage", old("storage"), Change.UPDATED))
    reg.on_sighting(old_sighting("Eucalyptus cluster controller", {}))
    events = await notes_of(reg)
    assert reg.store.records() == {} and reg.records() == {}
    assert not reg.live and not reg.presence.instances
    assert [(e.kind, e.code, e.component_id, e.role, e.cluster, e.address) for e in events] == [
        ("legacy", "legacy-10.04", "instance:cluster1 storage", "sc", "cluster1", "10.77.1.20"),
        ("legacy", "legacy-9.10", "instance:Eucalyptus cluster controller", "cc", None, HOST[0]),
    ]
    assert "install eucareg there" in events[0].reason
    assert "eucareg import" in events[1].reason
    assert reg.legacy_components() == [
        {
            "kind": "9.10",
            "role": "cc",
            "cluster": None,
            "address": "10.77.1.20",
            "eucavers": None,
            "instance": "Eucalyptus cluster controller",
        },
        {
            "kind": "10.04",
            "role": "sc",
            "cluster": "cluster1",
            "address": "10.77.1.20",
            "eucavers": "1.6.2",
            "instance": "cluster1 storage",
        },
    ]
    # A goodbye takes it out of status; the other stays.
    reg.on_sighting(Sighting("cluster1 storage", Change.REMOVED))
    assert [c["instance"] for c in reg.legacy_components()] == ["Eucalyptus cluster controller"]
    # Heard again after a while: shown again, but the registrar already said so.
    reg.on_sighting(storage)
    assert len(reg.legacy_components()) == 2
    assert len(await notes_of(reg)) == 2
    await reg.close()


async def test_a_malformed_eucareg_record_stays_rejected(tmp_path: Path) -> None:
    reg = await make_registrar(tmp_path)
    record = eucareg_record(fp="sha256:" + "A" * 64)
    reg.on_sighting(old_sighting("cluster1 storage", record))
    [event] = await notes_of(reg)
    assert (event.kind, event.code) == ("rejected", "bad-txt")
    assert reg.legacy_components() == []
    await reg.close()


async def test_an_instance_that_turns_into_an_eucareg_announcement_leaves_the_legacy_list(
    tmp_path: Path,
) -> None:
    reg = await make_registrar(tmp_path)
    reg.on_sighting(old_sighting("cluster1 node", old("node")))
    assert len(reg.legacy_components()) == 1
    walrus = ann(Role.WALRUS)
    reg.on_sighting(sighting(walrus, Change.UPDATED, instance="cluster1 node"))
    await settle(reg)
    assert reg.legacy_components() == []
    assert walrus.component_id in reg.records()
    await reg.close()


async def test_status_lists_legacy_components_in_its_schema_and_the_tree_shows_them(
    tmp_path: Path,
) -> None:
    async with served(tmp_path, CLC_SETTINGS) as clc:
        clc.registrar.on_sighting(old_sighting("cluster1 node #2", old("node")))
        status, answer = await clc.get("/v1/status")
        assert status == 200
        jsonschema.validate(answer, answers.STATUS)
        assert answer["legacy"] == [
            {
                "kind": "10.04",
                "role": "nc",
                "cluster": "cluster1",
                "address": "10.77.1.20",
                "eucavers": "1.6.2",
                "instance": "cluster1 node #2",
            }
        ]
        console = Console(width=200, record=True)
        console.print(render_tree(answer))
        text = console.export_text()
        assert "legacy (not registered)" in text
        assert "nc 'cluster1 node #2' cluster cluster1 10.77.1.20 Eucalyptus 10.04" in text
        clc.registrar.on_sighting(Sighting("cluster1 node #2", Change.REMOVED))
        status, answer = await clc.get("/v1/status")
        assert answer["legacy"] == []
