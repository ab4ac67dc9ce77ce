"""The operator commands' client of the local registrar API: where it is, the admin credential,
and one request at a time. Every failure ends the command with the documented exit status:
3 unreachable or not a registrar, 4 credential or source refused, 1 any other refusal.
"""

from __future__ import annotations

import asyncio
import functools
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import aiohttp
import click

from eucareg.cli.common import DEFAULT_CONFIG, fail, load_config
from eucareg.config import file as config_mod

REQUEST_TIMEOUT = 15.0  # seconds a request has in total (docs/cli.md)
T = TypeVar("T")


@dataclass(frozen=True)
class Api:
    """The local registrar's API, with the admin credential operator endpoints require."""

    base: str  # "unix:PATH": the operator socket
    token: str | None

    def call(
        self,
        method: str,
        path: str,
        params: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
        timeout_s: float = REQUEST_TIMEOUT,
    ) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}

        socket = self.base.removeprefix("unix:")
        if self.token:
            _trusted_socket(Path(socket))
        url = "http://localhost" + path  # the host part means nothing on a Unix socket

        async def fetch() -> tuple[int, Any]:
            timeout = aiohttp.ClientTimeout(total=timeout_s)
            connector = aiohttp.UnixConnector(path=socket)
            async with (
                aiohttp.ClientSession(timeout=timeout, connector=connector) as session,
                session.request(method, url, params=params, json=body, headers=headers) as response,
            ):
                return response.status, await response.json(content_type=None)

        try:
            code, data = asyncio.run(fetch())
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            fail(f"cannot reach the registrar at {self.base}: {str(exc) or type(exc).__name__}", 3)
        except ValueError as exc:  # an answer that is not JSON: not an eucareg registrar
            self.not_a_registrar(str(exc))
        if not isinstance(data, dict):
            self.not_a_registrar("its answer is not a JSON object")
        if code == 401 and not self.token:
            fail("no admin credential: run as root, or pass --admin-token-file", 4)
        if code != 200:
            reason = data.get("error", data)
            fail(f"{reason} (HTTP {code})", 4 if code in (401, 403) else 1)
        return data

    def get(self, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        return self.call("GET", path, params=params)

    def post(
        self,
        path: str,
        body: dict[str, Any],
        params: dict[str, str] | None = None,
        timeout_s: float = REQUEST_TIMEOUT,
    ) -> dict[str, Any]:
        return self.call("POST", path, params=params, body=body, timeout_s=timeout_s)

    def field(self, data: dict[str, Any], key: str, kind: type[T]) -> T:
        """`data[key]`, which an eucareg registrar always sends with this type."""
        value = data.get(key)
        if not isinstance(value, kind):
            self.not_a_registrar(f"no {key!r} in its answer")
        return value

    def not_a_registrar(self, why: str) -> NoReturn:
        fail(f"{self.base} did not answer like an eucareg registrar: {why}", 3)


def _trusted_socket(path: Path) -> None:
    """The admin credential goes only to a socket that root (or we) made, in a directory
    no one else can write: another local user must not be able to stand in for it."""
    me = os.geteuid()
    for where, what in ((path.parent, "directory"), (path, "socket")):
        try:
            st = where.lstat()
        except FileNotFoundError:
            continue  # nothing to talk to: the connection fails (exit 3)
        except OSError as exc:
            fail(f"cannot check the operator {what} {where}: {exc}", 4)
        if st.st_uid not in (0, me):
            fail(
                f"the operator {what} {where} belongs to uid {st.st_uid}, not to root: "
                "refusing to send it the admin credential",
                4,
            )
        if what == "directory" and st.st_mode & 0o022:
            fail(
                f"the operator socket's directory {where} is writable by others: refusing "
                "to send the admin credential there",
                4,
            )
        if what == "socket" and not stat.S_ISSOCK(st.st_mode):
            fail(f"{where} is not a socket: refusing to send it the admin credential", 4)


def _socket_only(base: str) -> None:
    """The admin credential opens every operator action: it goes to the operator socket only.
    Not to a loopback TCP port either: any local user can listen on one while the agent is
    down, and would receive it."""
    if base.startswith("unix:") and len(base) > len("unix:"):
        return
    fail(
        f"--api {base!r} is not unix:PATH: refusing to send the admin credential anywhere "
        "but the operator socket of the registrar on this host (STATE_DIR/api.sock)",
        2,
    )


def make_api(api_url: str | None, config_path: Path | None, token_file: Path | None) -> Api:
    """Resolve the URL and read the credential in the documented order (docs/cli.md)."""
    path = config_path or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    cfg = load_config(path) if path is not None else None
    state_dir = cfg.state_dir if cfg else config_mod.DEFAULT_STATE_DIR
    base = api_url.rstrip("/") if api_url else f"unix:{state_dir / config_mod.SOCKET_FILE}"
    _socket_only(base)
    token_path = token_file or state_dir / "admin.token"
    try:
        token: str | None = token_path.read_text().strip()
    except PermissionError:
        fail(f"cannot read the admin credential {token_path}: permission denied (run as root)", 4)
    except UnicodeDecodeError:
        fail(f"the admin credential {token_path} is not a token (not text)", 4)
    except OSError:
        if token_file is not None:
            fail(f"cannot read the admin credential {token_path}", 4)
        token = None
    # It goes into an HTTP header: anything but visible ASCII is not a token we made.
    if token and not (token.isascii() and token.isprintable() and " " not in token):
        fail(f"the admin credential {token_path} is not a token (unexpected characters)", 4)
    return Api(base, token)


def with_api_options(func: Any) -> Any:
    """Add --api, --config and --admin-token-file, handing the command a ready `api`."""

    @functools.wraps(func)
    def wrapper(
        *args: Any,
        api_url: str | None,
        config_path: Path | None,
        admin_token_file: Path | None,
        **kwargs: Any,
    ) -> Any:
        return func(*args, api=make_api(api_url, config_path, admin_token_file), **kwargs)

    options = [
        click.option(
            "--api",
            "api_url",
            envvar="EUCAREG_API",
            help="The local registrar's operator socket, as unix:PATH "
            "[default: unix:STATE_DIR/api.sock, STATE_DIR from --config].",
        ),
        click.option(
            "--config",
            "config_path",
            type=click.Path(path_type=Path, dir_okay=False, exists=True),
            help="Take state_dir from this configuration file.",
        ),
        click.option(
            "--admin-token-file",
            type=click.Path(path_type=Path, dir_okay=False),
            envvar="EUCAREG_ADMIN_TOKEN_FILE",
            help="The local admin credential [default: STATE_DIR/admin.token].",
        ),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper
