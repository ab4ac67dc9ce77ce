"""Attacks on issue 10's additions: legacy announcements in the registrar, `eucareg discover`
and `eucareg setup`, by a hostile host on the LAN and by an unlucky operator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from rich.console import Console

from eucareg.cli import discover
from eucareg.cli.main import main
from eucareg.cli.render import render_tree
from eucareg.core.model import Role
from eucareg.mdns.types import Change, Sighting
from eucareg.registrar.notes import NOTES_PER_WINDOW
from eucareg.registrar.notices import MAX_LEGACY
from tests.factories import ann, sighting
from tests.unit.test_cli_discover import CLC_FP, clc, garbage, member
from tests.unit.test_cli_setup import a_token, canned, path, written  # noqa: F401
from tests.unit.test_legacy import old, old_sighting
from tests.unit.test_registrar import make_registrar, settle

# -- legacy in the registrar -------------------------------------------------------------------


async def test_a_flood_of_legacy_names_is_bounded_in_memory_and_in_the_event_log(
    tmp_path: Path,
) -> None:
    reg = await make_registrar(tmp_path)
    flood = MAX_LEGACY + 500
    for n in range(flood):
        reg.on_sighting(old_sighting(f"c{n} node", old("node")))
    await settle(reg)
    assert len(reg.legacy) == MAX_LEGACY
    assert "c0 node" not in reg.legacy and f"c{flood - 1} node" in reg.legacy
    legacy_events = [e for e in reg.store.events() if e.kind == "legacy"]
    assert len(legacy_events) == NOTES_PER_WINDOW  # the rest held for the window's summary
    assert sum(reg.notes.held.values()) == flood - NOTES_PER_WINDOW


async def test_a_legacy_refresh_storm_writes_one_event(tmp_path: Path) -> None:
    reg = await make_registrar(tmp_path)
    for change in (Change.ADDED, Change.UPDATED) * 200:
        reg.on_sighting(old_sighting("cluster1 node", old("node"), change))
    await settle(reg)
    assert len([e for e in reg.store.events() if e.kind == "legacy"]) == 1


async def test_hostile_legacy_names_are_bounded_and_shown_escaped(tmp_path: Path) -> None:
    reg = await make_registrar(tmp_path)
    hostile = "[/][bold red]x\x1b]0;pwn\x07\x1b[2J\r\n node"
    reg.on_sighting(old_sighting(hostile, old("node")))
    reg.on_sighting(old_sighting("n" * 10_000 + " node", old("node")))  # too long: not legacy
    await settle(reg)
    assert list(reg.legacy) == [hostile]
    (event,) = [e for e in reg.store.events() if e.kind == "legacy"]
    assert len(event.component_id) <= 64
    assert "\x1b" not in event.reason and "\n" not in event.reason
    console = Console(record=True, width=400, color_system=None)
    console.print(render_tree({"legacy": reg.legacy_components()}))
    shown = console.export_text()
    assert "\x1b" not in shown and "[/][bold red]x" in shown


async def test_a_legacy_copy_of_a_live_instance_does_not_hide_it_and_goodbye_clears_both(
    tmp_path: Path,
) -> None:
    reg = await make_registrar(tmp_path)
    real = ann(Role.CC, "cluster1")
    reg.on_sighting(sighting(real, instance="cluster1"))
    reg.on_sighting(old_sighting("cluster1", old("cluster"), Change.UPDATED))
    await settle(reg)
    assert real.component_id in reg.live  # a legacy look-alike does not displace it
    assert "cluster1" in reg.legacy
    reg.on_sighting(sighting(real, Change.UPDATED, instance="cluster1"))
    assert "cluster1" not in reg.legacy  # the flip back leaves the legacy list
    reg.on_sighting(old_sighting("cluster1", old("cluster"), Change.UPDATED))
    reg.on_sighting(Sighting("cluster1", Change.REMOVED))
    assert "cluster1" not in reg.legacy
    assert reg.presence.instances.get("cluster1") is None


# -- discover -----------------------------------------------------------------------------------


def discover_run(monkeypatch: pytest.MonkeyPatch, heard: list[Sighting], *args: str) -> Result:
    async def listen(
        seconds: float, *, ipv6: bool = False, backend_name: str = "auto"
    ) -> list[Sighting]:
        return list(heard)

    monkeypatch.setattr(discover, "listen", listen)
    return CliRunner().invoke(main, ["discover", *args])


def test_discover_verbose_shows_hostile_ignored_names_as_text(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hostile = "[/][bold red]\x1b]0;pwn\x07\x1b[2J"
    bad = garbage(hostile, fp="[/]\x1b[2J" + "A" * 5000)
    result = discover_run(monkeypatch, [clc(), bad], "clc", "--verbose")
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output
    assert "[/][bold red]" in result.output  # literal, not read as markup
    as_json = discover_run(monkeypatch, [clc(), bad], "clc", "--json")
    data = json.loads(as_json.stdout)
    assert data["ignored"][0]["instance"] == hostile
    assert len(data["ignored"][0]["reason"]) < 1000


def test_discover_two_clcs_and_a_clc_twin_under_a_rename(monkeypatch: pytest.MonkeyPatch) -> None:
    twin = clc()
    renamed = Sighting(twin.instance + " #2", Change.ADDED, twin.txt, twin.addresses)
    other = clc("10.77.1.11", component_id="clc-0000000000aa", fingerprint="sha256:" + "b" * 64)
    result = discover_run(monkeypatch, [twin, renamed], "clc", "--json")
    assert result.exit_code == 0 and len(json.loads(result.stdout)["clcs"]) == 1
    result = discover_run(monkeypatch, [twin, renamed, other], "clc", "--json")
    assert result.exit_code == 3
    assert len(json.loads(result.stdout)["clcs"]) == 2


@pytest.mark.parametrize("timeout", ["0s", "-1s", "301s", "nan", "inf", "1e9s", ""])
def test_discover_refuses_silly_timeouts(monkeypatch: pytest.MonkeyPatch, timeout: str) -> None:
    result = discover_run(monkeypatch, [clc()], "clc", "--timeout", timeout)
    assert result.exit_code == 2, (timeout, result.output)


# -- setup --------------------------------------------------------------------------------------


def setup_run(config: Path, *args: str, answers: str = "") -> Result:
    return CliRunner().invoke(main, ["setup", *args, "--config", str(config)], input=answers)


@pytest.mark.parametrize("value", ["[/]", "[red]x"])
def test_setup_option_errors_are_not_markup(path: Path, value: str) -> None:  # noqa: F811
    result = setup_run(path, "cc", "--cluster", value, "--clc", "10.0.0.1", "--yes")
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 2
    assert repr(value) in result.output


def test_setup_offers_hostile_cluster_names_never(
    canned: list[Sighting],  # noqa: F811
    path: Path,  # noqa: F811
) -> None:
    real = sighting(ann(Role.CC, "cluster1"))
    bad = Sighting("[/]x", Change.ADDED, {**real.txt, "cluster": "[/]\x1b[2J"}, real.addresses)
    canned += [bad, member(Role.CC, "cluster2", 12)]
    result = setup_run(path, "sc", answers="1\nclc.example\n")
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "[/]" not in result.output
    assert "1) cluster2" in result.output
    assert written(path)["components"] == {"sc": {"cluster": "cluster2"}}


def test_setup_sc_with_clc_given_still_offers_the_clusters_heard(
    canned: list[Sighting],  # noqa: F811
    path: Path,  # noqa: F811
) -> None:
    canned += [member(Role.CC, "cluster2", 12)]
    result = setup_run(path, "sc", "--clc", "10.0.0.1", answers="1\n")
    assert result.exit_code == 0, result.output
    assert "No cluster heard" not in result.output
    assert written(path)["components"] == {"sc": {"cluster": "cluster2"}}


def test_setup_with_a_token_of_another_cloud_never_pins_the_clc_heard(
    canned: list[Sighting],  # noqa: F811
    path: Path,  # noqa: F811
) -> None:
    canned += [clc()]  # announces CLC_FP
    foreign = a_token("sha256:" + "c" * 64)
    result = setup_run(path, "walrus", "--token", foreign, "--yes")
    assert result.exit_code == 2 and "--clc HOST" in result.output
    assert not path.exists()
    result = setup_run(path, "walrus", "--token", foreign, answers="clc.example\n")
    assert result.exit_code == 0, result.output
    body = written(path)
    assert CLC_FP not in json.dumps(body)
    assert body["fallback_registrar"] == "https://clc.example:8780"


def test_setup_through_a_symlinked_config_writes_the_target(tmp_path: Path) -> None:
    target = tmp_path / "real.toml"
    target.write_text("# keep me\n")
    link = tmp_path / "eucareg.toml"
    link.symlink_to(target)
    result = setup_run(link, "walrus", "--clc", "10.0.0.1", "--yes", "--token", a_token())
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and "# keep me" in target.read_text()
    assert target.stat().st_mode & 0o077 == 0  # it holds a token now


def test_setup_on_an_unreadable_directory_fails_cleanly(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = setup_run(blocker / "eucareg.toml", "walrus", "--clc", "10.0.0.1", "--yes")
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code in (1, 2) and "Traceback" not in result.output


@pytest.mark.parametrize("answers", ["\n\n\n", "0\n99\n-1\nx\n[/]\n", "\x1b[2J\n", "1e0\n"])
def test_setup_nasty_answers_are_asked_again(
    canned: list[Sighting],  # noqa: F811
    path: Path,  # noqa: F811
    answers: str,
) -> None:
    canned += [member(Role.CC, "cluster2", 12)]
    result = setup_run(path, "sc", answers=answers + "1\nclc.example\n")
    assert result.exit_code == 0, result.output
    assert written(path)["components"] == {"sc": {"cluster": "cluster2"}}
