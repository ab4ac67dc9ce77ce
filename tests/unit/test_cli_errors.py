"""How the operator commands fail: where the API and the credential come from (--api,
EUCAREG_API, --config), an unreachable registrar or something else answering (exit 3), a
missing, unreadable or refused credential and a non-loopback source (exit 4). Each is one
`error: …` line on standard error and never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from click.testing import CliRunner, Result

from eucareg.cli import client
from eucareg.cli.main import main
from tests.unit.test_api_harness import ADMIN_TOKEN, Harness

# The CLI must not read this machine's /etc/eucareg (conftest.py).
pytestmark = pytest.mark.usefixtures("no_host_config")


async def run(*args: str, env: dict[str, str] | None = None) -> Result:
    runner = CliRunner(env={"EUCAREG_API": None, "EUCAREG_ADMIN_TOKEN_FILE": None, **(env or {})})
    result = await asyncio.to_thread(runner.invoke, main, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    return result


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


async def config_for(tmp_path: Path, clc: Harness) -> Path:
    """A host config whose state_dir holds the operator socket of `clc`."""
    state = tmp_path / "state"
    state.mkdir(parents=True, exist_ok=True)
    runner = clc.client.server.runner
    assert runner is not None
    await web.UnixSite(runner, str(state / "api.sock")).start()
    port = clc.client.port
    return write(
        tmp_path / "eucareg.toml",
        f'address = "10.0.2.10"\nstate_dir = "{state}"\napi_port = {port}\n'
        "[components.clc]\ninstalled = true\n",
    )


async def test_config_gives_the_socket_and_the_credential(clc: Harness, tmp_path: Path) -> None:
    config = await config_for(tmp_path, clc)
    write(tmp_path / "state" / "admin.token", ADMIN_TOKEN)
    result = await run("trust", "--config", str(config))
    assert (result.exit_code, result.stdout) == (
        0,
        "mode local; locked: nothing; install window closed\n",
    )
    # EUCAREG_API wins over the socket in --config's state_dir.
    result = await run("trust", "--config", str(config), env={"EUCAREG_API": closed_url(tmp_path)})
    assert result.exit_code == 3


async def test_the_environment_names_the_api_and_the_credential(
    clc: Harness, tmp_path: Path
) -> None:
    token = write(tmp_path / "t", ADMIN_TOKEN)
    env = {"EUCAREG_API": clc.socket, "EUCAREG_ADMIN_TOKEN_FILE": str(token)}
    assert (await run("trust", env=env)).exit_code == 0


def closed_url(tmp_path: Path) -> str:
    """An operator socket nobody listens on."""
    return f"unix:{tmp_path / 'nobody.sock'}"


async def test_an_unreachable_registrar_is_exit_3(tmp_path: Path) -> None:
    url = closed_url(tmp_path)
    token = str(write(tmp_path / "t", "x"))
    result = await run("status", "--api", url, "--admin-token-file", token)
    assert result.exit_code == 3
    assert result.stderr.startswith(f"error: cannot reach the registrar at {url}: ")
    assert result.stdout == ""


@contextlib.asynccontextmanager
async def other_server(tmp_path: Path, answer: web.Response) -> AsyncIterator[str]:
    """Something that is not a registrar, on a socket where the CLI may look: its base."""

    async def handler(_request: web.Request) -> web.Response:
        return answer

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.UnixSite(runner, str(tmp_path / "other.sock")).start()
    try:
        yield f"unix:{tmp_path / 'other.sock'}"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (web.Response(text="<html>hello</html>", content_type="text/html"), "Expecting value"),
        (web.json_response([1, 2]), "its answer is not a JSON object"),
        (web.json_response({"hello": "world"}), "no 'tree' in its answer"),
        (web.Response(status=204), "its answer is not a JSON object"),
    ],
)
async def test_something_that_is_not_a_registrar_is_exit_3(
    tmp_path: Path, answer: web.Response, why: str
) -> None:
    async with other_server(tmp_path, answer) as base:
        token = str(write(tmp_path / "t", ADMIN_TOKEN))
        result = await run("status", "--api", base, "--admin-token-file", token)
    assert result.exit_code == 3
    assert result.stderr.startswith(f"error: {base} did not answer like an eucareg registrar: ")
    assert why in result.stderr


@pytest.mark.parametrize(
    "command", [("pending",), ("events",), ("token", "list"), ("token", "create", "--role", "nc")]
)
async def test_every_operator_command_checks_the_shape_of_the_answer(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    async with other_server(tmp_path, web.json_response({"something": "else"})) as base:
        token = str(write(tmp_path / "t", ADMIN_TOKEN))
        result = await run(*command, "--api", base, "--admin-token-file", token)
    assert result.exit_code == 3
    assert "did not answer like an eucareg registrar" in result.stderr


async def test_no_credential_is_exit_4(clc: Harness, tmp_path: Path) -> None:
    # The default file (state_dir/admin.token) does not exist: the request goes without one.
    config = await config_for(tmp_path, clc)
    result = await run("status", "--config", str(config))
    assert (result.exit_code, result.stderr) == (
        4,
        "error: no admin credential: run as root, or pass --admin-token-file\n",
    )
    # An explicitly named file that cannot be read is an error before any request.
    missing = tmp_path / "nonexistent"
    result = await run("status", "--api", closed_url(tmp_path), "--admin-token-file", str(missing))
    assert (result.exit_code, result.stderr) == (
        4,
        f"error: cannot read the admin credential {missing}\n",
    )


async def test_a_wrong_credential_is_exit_4(clc: Harness, tmp_path: Path) -> None:
    token = write(tmp_path / "t", "wrong-token")
    result = await run("status", "--api", clc.socket, "--admin-token-file", str(token))
    assert (result.exit_code, result.stderr) == (
        4,
        "error: the local admin credential is required (see docs/security.md) (HTTP 401)\n",
    )


@pytest.mark.parametrize(
    "content", ["t\u00f6ken-with-umlaut", "two words", b"\xff\xfe-not-text", "tab\there"]
)
async def test_a_credential_that_is_not_a_token_is_exit_4(
    tmp_path: Path, content: str | bytes
) -> None:
    token = write(tmp_path / "t", content)
    result = await run("status", "--api", closed_url(tmp_path), "--admin-token-file", str(token))
    assert result.exit_code == 4
    assert result.stderr.startswith(f"error: the admin credential {token} is not a token")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
async def test_an_unreadable_credential_is_exit_4(tmp_path: Path) -> None:
    token = write(tmp_path / "t", ADMIN_TOKEN)
    token.chmod(0)
    result = await run("status", "--api", closed_url(tmp_path), "--admin-token-file", str(token))
    assert (result.exit_code, result.stderr) == (
        4,
        f"error: cannot read the admin credential {token}: permission denied (run as root)\n",
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="making a socket another user's needs root")
async def test_a_socket_another_user_could_have_made_gets_no_credential(
    tmp_path: Path,
) -> None:
    """The credential goes only to a socket root (or we) made, in a directory nobody else
    can write: otherwise another local user could be listening there."""
    token = str(write(tmp_path / "t", ADMIN_TOKEN))
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    async with other_server(theirs, web.json_response({"tree": {}})) as base:
        os.chown(theirs / "other.sock", 65534, 65534)
        result = await run("status", "--api", base, "--admin-token-file", token)
        assert result.exit_code == 4
        assert "belongs to uid 65534, not to root" in result.stderr
        os.chown(theirs / "other.sock", 0, 0)
        theirs.chmod(0o777)
        result = await run("status", "--api", base, "--admin-token-file", token)
        assert result.exit_code == 4
        assert "writable by others" in result.stderr


async def test_an_invalid_config_is_exit_2(tmp_path: Path) -> None:
    config = write(tmp_path / "eucareg.toml", "address = [\n")
    result = await run("status", "--config", str(config))
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {config}: not valid TOML")


@pytest.mark.parametrize(
    "url",
    [
        "http://10.1.2.3:8780",
        "http://[::ffff:127.0.0.1]:8780",
        "http://127.0.0.1.example.com:8780",
        "http://operator@10.0.0.1:8780",
        # Not loopback either: any local user may listen there while the agent is down.
        "http://127.0.0.1:8780",
        "https://localhost:8780",
        "unix:",
    ],
)
async def test_the_admin_credential_never_leaves_the_host(
    tmp_path: Path, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def contacted(*_args: Any, **_kwargs: Any) -> None:
        # Were the check ever to regress, no packet may go to these addresses (network rules).
        raise AssertionError("the CLI tried to reach a non-loopback registrar")

    monkeypatch.setattr(client.Api, "call", contacted)
    token_file = write(tmp_path / "admin.token", "secret-token\n")
    for how in (["--api", url], []):
        env = {} if how else {"EUCAREG_API": url}
        result = await run("status", *how, "--admin-token-file", str(token_file), env=env)
        assert result.exit_code == 2, result.output
        assert "refusing to send the admin credential" in result.output


async def test_an_api_that_is_not_a_socket_is_a_usage_error(tmp_path: Path) -> None:
    result = await run("status", "--api", "ftp://127.0.0.1/")
    assert result.exit_code == 2
    assert "is not unix:PATH" in result.output
