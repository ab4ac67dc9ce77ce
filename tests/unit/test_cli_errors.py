"""How the operator commands fail: where the API and the credential come from (--api,
EUCAREG_API, --config), an unreachable registrar or something else answering (exit 3), a
missing, unreadable or refused credential and a non-loopback source (exit 4). Each is one
`error: …` line on standard error and never a traceback.
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from click.testing import CliRunner, Result

from eucareg.cli import client
from eucareg.cli.main import main
from tests.unit.test_api_harness import ADMIN_TOKEN, CLC_SETTINGS, Harness, served

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
    result = await run("trust", "--config", str(config), env={"EUCAREG_API": closed_url()})
    assert result.exit_code == 3


async def test_the_environment_names_the_api_and_the_credential(
    clc: Harness, tmp_path: Path
) -> None:
    token = write(tmp_path / "t", ADMIN_TOKEN)
    env = {"EUCAREG_API": clc.base, "EUCAREG_ADMIN_TOKEN_FILE": str(token)}
    assert (await run("trust", env=env)).exit_code == 0


def closed_url() -> str:
    """A loopback port nobody listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def test_an_unreachable_registrar_is_exit_3(tmp_path: Path) -> None:
    url = closed_url()
    token = str(write(tmp_path / "t", "x"))
    result = await run("status", "--api", url, "--admin-token-file", token)
    assert result.exit_code == 3
    assert result.stderr.startswith(f"error: cannot reach the registrar at {url}: ")
    assert result.stdout == ""


async def other_server(answer: web.Response) -> TestServer:
    async def handler(_request: web.Request) -> web.Response:
        return answer

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = TestServer(app)
    await server.start_server()
    return server


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
    server = await other_server(answer)
    try:
        base = str(server.make_url("")).rstrip("/")
        token = str(write(tmp_path / "t", ADMIN_TOKEN))
        result = await run("status", "--api", base, "--admin-token-file", token)
    finally:
        await server.close()
    assert result.exit_code == 3
    assert result.stderr.startswith(f"error: {base} did not answer like an eucareg registrar: ")
    assert why in result.stderr


@pytest.mark.parametrize(
    "command", [("pending",), ("events",), ("token", "list"), ("token", "create", "--role", "nc")]
)
async def test_every_operator_command_checks_the_shape_of_the_answer(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    server = await other_server(web.json_response({"something": "else"}))
    try:
        base = str(server.make_url(""))
        token = str(write(tmp_path / "t", ADMIN_TOKEN))
        result = await run(*command, "--api", base, "--admin-token-file", token)
    finally:
        await server.close()
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
    result = await run("status", "--api", closed_url(), "--admin-token-file", str(missing))
    assert (result.exit_code, result.stderr) == (
        4,
        f"error: cannot read the admin credential {missing}\n",
    )


async def test_a_wrong_credential_is_exit_4(clc: Harness, tmp_path: Path) -> None:
    token = write(tmp_path / "t", "wrong-token")
    result = await run("status", "--api", clc.base, "--admin-token-file", str(token))
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
    result = await run("status", "--api", closed_url(), "--admin-token-file", str(token))
    assert result.exit_code == 4
    assert result.stderr.startswith(f"error: the admin credential {token} is not a token")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
async def test_an_unreadable_credential_is_exit_4(tmp_path: Path) -> None:
    token = write(tmp_path / "t", ADMIN_TOKEN)
    token.chmod(0)
    result = await run("status", "--api", closed_url(), "--admin-token-file", str(token))
    assert (result.exit_code, result.stderr) == (
        4,
        f"error: cannot read the admin credential {token}: permission denied (run as root)\n",
    )


async def test_a_lan_source_address_is_exit_4(tmp_path: Path) -> None:
    @web.middleware
    async def from_the_lan(request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request.clone(remote="10.0.2.7"))
        return response

    token = str(write(tmp_path / "t", ADMIN_TOKEN))
    async with served(tmp_path / "clc", CLC_SETTINGS, middlewares=(from_the_lan,)) as lan:
        result = await run("pending", "--api", lan.base, "--admin-token-file", token)
    assert (result.exit_code, result.stderr) == (
        4,
        "error: operator endpoints answer on loopback only (HTTP 403)\n",
    )


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


async def test_a_url_that_is_not_http_is_a_usage_error(tmp_path: Path) -> None:
    result = await run("status", "--api", "ftp://127.0.0.1/")
    assert result.exit_code == 2
    assert "is not unix:PATH or an http(s):// URL" in result.output
