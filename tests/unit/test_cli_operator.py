"""The operator commands (click's CliRunner) against a real registrar API on 127.0.0.1, port 0:
text and --json output, and every documented exit status with a one-line error and no
traceback (docs/cli.md, EXIT STATUS). The CLI runs in a worker thread (it runs its own event
loop) while the API is served by the test's loop.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from eucareg.cli.main import main
from eucareg.core.model import Role
from tests.factories import ann
from tests.unit.test_api_harness import ADMIN_TOKEN, Harness, key_of

# The CLI must not read this machine's /etc/eucareg (conftest.py).
pytestmark = pytest.mark.usefixtures("no_host_config")


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "admin.token"
    path.write_text(ADMIN_TOKEN + "\n")
    return path


async def run(*args: str, env: dict[str, str] | None = None) -> Result:
    runner = CliRunner(env={"EUCAREG_API": None, "EUCAREG_ADMIN_TOKEN_FILE": None, **(env or {})})
    result = await asyncio.to_thread(runner.invoke, main, list(args))
    # Whatever happened, it must not end in a traceback.
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    return result


async def op(h: Harness, token_file: Path, *args: str) -> Result:
    """An operator command with --api and --admin-token-file pointing at `h`."""
    return await run(*args, "--api", h.socket, "--admin-token-file", str(token_file))


def parsed(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


async def test_trust_commands_print_the_trust_line_or_json(clc: Harness, token_file: Path) -> None:
    result = await op(clc, token_file, "trust")
    assert result.exit_code == 0
    assert result.stdout == "mode local; locked: nothing; install window closed\n"
    locked = parsed(await op(clc, token_file, "lock", "--task", "clc", "--json"))
    assert set(locked) == {
        "mode",
        "locked",
        "install_until",
        "install_open",
        "install_remaining",
        "changed",
    }
    assert locked["locked"] == ["clc"]
    result = await op(clc, token_file, "unlock")
    assert result.stdout == "mode local; locked: nothing; install window closed\n"
    result = await op(clc, token_file, "mode", "any")
    assert result.stdout.startswith("mode any; ")
    result = await op(clc, token_file, "install-mode", "open", "--for", "10m")
    assert "install window open for 600s more" in result.stdout
    opened = parsed(await op(clc, token_file, "install-mode", "status", "--json"))
    assert opened["install_open"] is True and opened["mode"] == "any"
    result = await op(clc, token_file, "install-mode", "close")
    assert result.stdout.endswith("install window closed\n")


async def test_a_bad_duration_is_the_registrars_400_and_exit_1(
    clc: Harness, token_file: Path
) -> None:
    result = await op(clc, token_file, "install-mode", "open", "--for", "soon")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: for: expected a duration such as '30s'")
    assert result.stderr.rstrip().endswith("(HTTP 400)")
    assert result.stdout == ""


async def test_pending_approve_and_status(clc: Harness, token_file: Path) -> None:
    walrus = ann(Role.WALRUS)
    clc.announce(walrus)
    await clc.record_status(walrus.component_id, "pending")
    rows = parsed(await op(clc, token_file, "pending", "--json"))
    assert [(r["component_id"], r["status"]) for r in rows] == [(walrus.component_id, "pending")]
    table = await op(clc, token_file, "pending")
    assert walrus.component_id in table.stdout and "pending" in table.stdout
    result = await op(clc, token_file, "approve", walrus.component_id)
    assert result.exit_code == 0
    assert result.stdout == (f"approved walrus {walrus.component_id} ({walrus.fingerprint})\n")
    status = parsed(await op(clc, token_file, "status", "--json"))
    keys = ["errors", "legacy", "local", "mdns", "registrar", "tree", "warnings"]
    assert list(status) == keys  # sorted
    [row] = status["tree"]["walrus"]
    assert row["component_id"] == walrus.component_id and row["approved"] is True
    tree = await op(clc, token_file, "status")
    assert tree.stdout.startswith("cluster registrar  mode local; locked: nothing;")
    assert f"walrus {walrus.component_id} {walrus.address}" in tree.stdout


async def test_reject_and_deregister_by_id_or_fingerprint(clc: Harness, token_file: Path) -> None:
    first, second = ann(Role.WALRUS), ann(Role.CC, "cluster1")
    for a in (first, second):
        clc.announce(a)
        await clc.record_status(a.component_id, "pending")
    by_key = ("--fingerprint", first.fingerprint)
    answer = parsed(await op(clc, token_file, "reject", *by_key, "--json"))
    assert (answer["component"]["component_id"], answer["component"]["status"]) == (
        first.component_id,
        "rejected",
    )
    result = await op(clc, token_file, "deregister", second.component_id)
    assert result.stdout == f"deregistered {second.component_id}; its credentials are revoked\n"
    answer = parsed(await op(clc, token_file, "deregister", first.component_id, "--json"))
    assert answer["deregistered"] == first.component_id
    assert answer["changed"][0]["action"] == "deleted"


async def test_an_unknown_component_is_exit_1_with_the_registrars_reason(
    clc: Harness, token_file: Path
) -> None:
    result = await op(clc, token_file, "approve", "nosuch-component")
    assert result.exit_code == 1
    assert result.stderr == (
        "error: no component nosuch-component in this registrar's records (HTTP 400)\n"
    )


@pytest.mark.parametrize(
    "args",
    [
        ("approve",),
        ("reject", "cc-000000000001", "--fingerprint", "sha256:00"),
        ("deregister", "--fingerprint", ""),
    ],
)
async def test_naming_no_component_or_two_is_a_usage_error(
    clc: Harness, token_file: Path, args: tuple[str, ...]
) -> None:
    result = await op(clc, token_file, *args)
    assert result.exit_code == 2
    assert result.stderr == "error: name the component by ID or by --fingerprint (one of the two)\n"


async def test_events_as_table_json_and_csv(clc: Harness, token_file: Path) -> None:
    await op(clc, token_file, "lock")
    walrus = ann(Role.WALRUS)
    clc.announce(walrus)
    await clc.record_status(walrus.component_id, "refused")
    rows = parsed(await op(clc, token_file, "events", "--json"))
    assert [(r["kind"], r["code"]) for r in rows] == [("trust", "locked"), ("refused", "locked")]
    since = ("--since", str(rows[0]["seq"]))
    assert parsed(await op(clc, token_file, "events", "--json", *since)) == [rows[1]]
    only = parsed(await op(clc, token_file, "events", "--json", "--role", "walrus", "--csv"))
    assert only == [rows[1]]  # --json wins over --csv
    result = await op(clc, token_file, "events", "--csv", "--kind", "refused")
    # RFC 4180 line ends (Result.stdout would turn them into \n).
    header = b"seq,at,kind,code,role,cluster,component_id,address,reason,via\r\n"
    assert result.stdout_bytes.startswith(header)
    [line] = list(csv.DictReader(io.StringIO(result.stdout)))
    assert (line["component_id"], line["cluster"], line["code"]) == (
        walrus.component_id,
        "",
        "locked",
    )
    table = await op(clc, token_file, "events", "--limit", "1")
    assert "refused" in table.stdout and "trust" not in table.stdout  # only the newest event


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("events", "--limit", "0"), "Invalid value for '--limit'"),
        (("events", "--since", "-1"), "Invalid value for '--since'"),
        (("events", "--role", "clc"), "Invalid value for '--role'"),
        (("token", "create", "--role", "clc"), "Invalid value for '--role'"),
        (("token", "create", "--role", "nc", "--uses", "0"), "Invalid value for '--uses'"),
        (("mode", "sideways"), "Invalid value for '{local|any|off}'"),
        (("status", "--bogus"), "No such option"),
        (("status", "--config", "/nonexistent/eucareg.toml"), "does not exist"),
    ],
)
async def test_usage_errors_are_exit_2(
    clc: Harness, token_file: Path, args: tuple[str, ...], message: str
) -> None:
    result = await op(clc, token_file, *args)
    assert result.exit_code == 2
    assert message in result.stderr


async def test_tokens_create_list_and_revoke(clc: Harness, token_file: Path) -> None:
    result = await op(clc, token_file, "token", "create", "--role", "cc", "--uses", "2")
    assert result.exit_code == 0
    token = result.stdout.strip()
    assert token.startswith("eucareg1.") and token.endswith(clc.cloud.fingerprint[7:])
    created = parsed(await op(clc, token_file, "token", "create", "--role", "walrus", "--json"))
    assert list(created) == ["token", "changed"]
    listed = parsed(await op(clc, token_file, "token", "list", "--json"))
    assert [(t["role"], t["uses"], t["state"]) for t in listed] == [
        ("cc", 2, "valid"),
        ("walrus", None, "valid"),
    ]
    table = await op(clc, token_file, "token", "list")
    assert "unlimited" in table.stdout and listed[0]["token_id"] in table.stdout
    token_id = listed[0]["token_id"]
    result = await op(clc, token_file, "token", "revoke", token_id)
    assert result.stdout == f"revoked token {token_id}\n"
    result = await op(clc, token_file, "token", "revoke", token_id, "--json")
    assert result.exit_code == 1
    assert result.stderr == f"error: no unrevoked token {token_id} (HTTP 400)\n"
    result = await op(clc, token_file, "token", "create", "--role", "walrus", "--cluster", "c1")
    assert (result.exit_code, result.stderr) == (
        1,
        "error: a walrus belongs to no cluster (HTTP 400)\n",
    )


async def test_the_cli_shows_a_registered_component_as_delivered(
    clc: Harness, token_file: Path
) -> None:
    await op(clc, token_file, "install-mode", "open")
    walrus = ann(Role.WALRUS)
    clc.announce(walrus)
    await clc.record_status(walrus.component_id, "awaiting-key")
    fields = {"component_id": walrus.component_id}
    assert (await clc.signed("/v1/credentials", key_of(walrus), fields, "?wait=10"))[0] == 200
    tree = await op(clc, token_file, "status")
    assert f"walrus {walrus.component_id} {walrus.address} registered creds delivered" in (
        tree.stdout
    )
