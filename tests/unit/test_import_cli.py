"""`eucareg import` (click's CliRunner) against a real registrar over its operator socket: the
plan table, --dry-run changing nothing, --json, a broken listing or a conflict stopping
everything with exit 1, confirmation, --from-command with a fake euca_conf on PATH, and the
legacy jobs (a fake initctl on PATH), never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from eucareg.cli.main import main
from eucareg.core.model import Status
from tests.unit.test_api_harness import Harness
from tests.unit.test_cli_operator import op, run, token_file
from tests.unit.test_import_sources import LISTING, fake_tool, make_clc_keys, write

__all__ = ["token_file"]  # the fixture, shared
pytestmark = pytest.mark.usefixtures("no_host_config")


@pytest.fixture
def front(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A 1.6.2 front end under tmp/root with its listing, and a fake initctl on PATH."""
    root = tmp_path / "root"
    write(root / "etc/eucalyptus/eucalyptus.conf", 'NODES="10.12.10.102"\n')
    make_clc_keys(root, ["cluster1"])
    write(root / "etc/init/uec-component-listener.conf", "")
    write(root / "list.txt", LISTING)
    fake_tool(tmp_path / "bin", "initctl", tmp_path / "initctl.log")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    return root


async def test_dry_run_shows_the_plan_and_changes_nothing(
    clc: Harness, token_file: Path, front: Path
) -> None:
    args = ("import", "--root", str(front), "--list-file", str(front / "list.txt"), "--dry-run")
    result = await op(clc, token_file, *args)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["ROLE", "CLUSTER", "ADDRESS", "ACTION", "LINE", "DETAIL"]
    assert lines[1].split()[:5] == ["walrus", "-", "10.12.10.100", "import", "2"]
    assert "elsewhere" in lines[4] and "run `eucareg import` on the CC of cluster" in lines[4]
    assert "dry run: nothing changed; 3 to import" in result.stdout
    assert "does not name node 10.12.10.103" not in result.stderr  # no CC here: not compared
    assert clc.registrar.records() == {}
    assert not (front.parent / "initctl.log").exists()


async def test_import_with_yes_then_again_json(clc: Harness, token_file: Path, front: Path) -> None:
    args = ("import", "--root", str(front), "--list-file", str(front / "list.txt"))
    result = await op(clc, token_file, *args, "--yes")
    assert result.exit_code == 0, result.output
    assert "imported 3 component(s) as registered, no hook run" in result.stdout
    assert "legacy job uec-component-listener (upstart): stopped; disabled" in result.stdout
    assert {r.status for r in clc.registrar.records().values()} == {Status.REGISTERED}
    assert (front / "etc/init/uec-component-listener.override").read_text() == "manual\n"
    again = await op(clc, token_file, *args, "--yes", "--json")
    assert again.exit_code == 0, again.output
    report = json.loads(again.stdout)
    assert report["imported"] == 0 and report["dry_run"] is False
    assert [r["action"] for r in report["plan"]] == ["already-registered"] * 3 + ["elsewhere"] * 2
    assert report["legacy_jobs"][0]["disabled"].startswith("already disabled")
    assert len(clc.registrar.records()) == 3


async def test_without_a_terminal_or_yes_nothing_is_imported(
    clc: Harness, token_file: Path, front: Path
) -> None:
    result = await op(
        clc, token_file, "import", "--root", str(front), "--list-file", str(front / "list.txt")
    )
    assert result.exit_code == 2 and "give --yes" in result.stderr
    assert clc.registrar.records() == {}


async def test_a_broken_listing_changes_nothing_and_names_each_line(
    clc: Harness, token_file: Path, front: Path
) -> None:
    write(front / "bad.txt", LISTING + "registered nodes:\n   node7.example  cluster1\nhello\n")
    result = await op(
        clc,
        token_file,
        "import",
        "--root",
        str(front),
        "--list-file",
        str(front / "bad.txt"),
        "--yes",
    )
    assert result.exit_code == 1, result.output
    assert "bad.txt:11: " in result.stderr and "bad.txt:12: " in result.stderr
    assert "nothing was changed" in result.stderr
    assert clc.registrar.records() == {} and not (front.parent / "initctl.log").exists()


async def test_a_conflict_is_shown_and_nothing_is_imported(
    clc: Harness, token_file: Path, front: Path
) -> None:
    write(front / "two.txt", LISTING + "registered walruses:\n   walrus2  10.12.10.101\n")
    result = await op(
        clc,
        token_file,
        "import",
        "--root",
        str(front),
        "--list-file",
        str(front / "two.txt"),
        "--yes",
    )
    assert result.exit_code == 1, result.output
    assert "conflict" in result.stdout and "the Walrus is listed twice" in result.stdout
    assert "nothing imported: 1 component(s) conflict or are refused" in result.stderr
    assert clc.registrar.records() == {}


async def test_from_command_runs_euca_conf(
    clc: Harness, token_file: Path, front: Path, tmp_path: Path
) -> None:
    fake_tool(tmp_path / "bin", "euca_conf", tmp_path / "euca.log", f"cat {front / 'list.txt'}")
    result = await op(
        clc, token_file, "import", "--root", str(front), "--from-command", "--dry-run", "--json"
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["plan"][0]["where"] == (
        "euca_conf --list-walruses --list-clusters --list-scs --list-nodes:2"
    )
    assert (tmp_path / "euca.log").read_text().split() == [
        "euca_conf",
        "--list-walruses",
        "--list-clusters",
        "--list-scs",
        "--list-nodes",
    ]
    fake_tool(tmp_path / "bin", "euca_conf", tmp_path / "euca.log", "echo boom >&2; exit 3")
    failed = await op(clc, token_file, "import", "--from-command", "--dry-run")
    assert failed.exit_code == 1 and "failed (exit 3): boom" in failed.stderr


async def test_usage_errors(clc: Harness, token_file: Path, front: Path) -> None:
    neither = await op(clc, token_file, "import", "--dry-run")
    assert neither.exit_code == 2 and "--list-file FILE or --from-command" in neither.stderr
    both = await op(clc, token_file, "import", "--list-file", "x", "--from-command")
    assert both.exit_code == 2
    missing = await op(clc, token_file, "import", "--list-file", str(front / "nope.txt"))
    assert missing.exit_code == 1 and "no such file" in missing.stderr
    empty = front / "empty.txt"
    empty.write_text("\n")
    nothing = await op(clc, token_file, "import", "--list-file", str(empty))
    assert nothing.exit_code == 1 and "lists no component" in nothing.stderr


async def test_legacy_jobs_only_needs_no_registrar(front: Path, tmp_path: Path) -> None:
    result = await run(
        "import",
        "--legacy-jobs-only",
        "--root",
        str(front),
        "--api",
        f"unix:{tmp_path / 'none.sock'}",
    )
    assert result.exit_code == 0, result.output
    assert "legacy job uec-component-listener (upstart): stopped" in result.stdout
    assert (tmp_path / "initctl.log").read_text() == "initctl stop uec-component-listener\n"
    mixed = await run("import", "--legacy-jobs-only", "--dry-run", "--root", str(front))
    assert mixed.exit_code == 2


async def test_fingerprints_pin_keys_and_a_bad_file_changes_nothing(
    clc: Harness, token_file: Path, front: Path
) -> None:
    key = "sha256:" + "c" * 64
    write(front / "keys.txt", f"# from eucareg fingerprint\ncc 10.12.10.100 {key}\n")
    args = ("import", "--root", str(front), "--list-file", str(front / "list.txt"))
    result = await op(
        clc, token_file, *args, "--fingerprints", str(front / "keys.txt"), "--dry-run", "--json"
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["plan"]
    assert [r["fingerprint"] for r in rows[:3]] == [None, key, None]
    write(front / "bad.txt", f"cc 10.12.10.100 {key}\nsc 10.12.10.77 {key}\nnc nonsense\n")
    bad = await op(clc, token_file, *args, "--fingerprints", str(front / "bad.txt"), "--yes")
    assert bad.exit_code == 1, bad.output
    assert "bad.txt:3: expected 'ROLE ADDRESS sha256:…'" in bad.stderr
    assert "a key for sc at 10.12.10.77, which the listing does not list" in bad.stderr
    assert clc.registrar.records() == {}
    done = await op(clc, token_file, *args, "--fingerprints", str(front / "keys.txt"), "--yes")
    assert done.exit_code == 0, done.output
    [cc] = [r for r in clc.registrar.records().values() if r.role.value == "cc"]
    assert cc.fingerprint == key


async def test_the_listing_from_standard_input(clc: Harness, token_file: Path, front: Path) -> None:
    runner = CliRunner(env={"EUCAREG_API": None, "EUCAREG_ADMIN_TOKEN_FILE": None})
    args = [
        "import",
        "--root",
        str(front),
        "--list-file",
        "-",
        "--dry-run",
        "--json",
        "--api",
        clc.socket,
        "--admin-token-file",
        str(token_file),
    ]
    result = await asyncio.to_thread(runner.invoke, main, args, input=LISTING)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["plan"]
    assert rows[0]["where"] == "<stdin>:2" and len(rows) == 5
