"""The `eucareg` command: run the agent, and let an operator see what the registrar decided.

Operator commands talk to the local registrar's HTTP API; every one of them takes --json for
scripts (docs/cli.md documents the output).
"""

from __future__ import annotations

import asyncio
import csv
import datetime
import functools
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
import click
from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from eucareg.cli.logs import setup_logging
from eucareg.config import file as config_mod
from eucareg.pki.credentials import CredentialError

DEFAULT_CONFIG = Path("/etc/eucareg/eucareg.toml")

# Piped output is not cut to 80 columns: tables stay one row per line for grep and less.
_WIDTH = None if sys.stdout.isatty() else 160
console = Console(width=_WIDTH)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def fail(message: str, code: int = 2) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    sys.exit(code)


def load_config(path: Path) -> config_mod.Config:
    try:
        return config_mod.load(path)
    except config_mod.ConfigError as exc:
        fail(str(exc))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="eucareg")
def main() -> None:
    """eucareg: automatic, checked registration of Eucalyptus cloud components.

    Every host runs `eucareg agent`; the CLC's and each CC's agent also run the registrar.
    The other commands ask the local registrar what it decided.
    """


# -- agent -------------------------------------------------------------------------------------


@main.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=DEFAULT_CONFIG,
    show_default=True,
    help="The host's TOML configuration (see docs/configuration.md).",
)
def agent(config_path: Path) -> None:
    """Announce this host's components, collect their credentials, and run the registrar
    when this host holds the CLC or a CC. Stops cleanly on SIGTERM or Ctrl-C, withdrawing
    its announcements."""
    from eucareg.agent.host import Agent

    cfg = load_config(config_path)
    setup_logging(cfg.log_level, cfg.log_format)
    try:
        asyncio.run(Agent(cfg).run_forever())
    except (OSError, CredentialError) as exc:
        logging.getLogger("eucareg").error("agent cannot run: %s", exc)
        sys.exit(1)


@main.command("check-config")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=DEFAULT_CONFIG,
    show_default=True,
    help="The TOML configuration to check.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the effective configuration as JSON.")
def check_config(config_path: Path, as_json: bool) -> None:
    """Validate a configuration file and show the effective settings, defaults included."""
    cfg = load_config(config_path)
    effective = {
        "address": str(cfg.address),
        "state_dir": str(cfg.state_dir),
        "key_dir": str(cfg.key_dir),
        "hook_dir": str(cfg.hook_dir),
        "api_port": cfg.api_port,
        "sshd": f"{cfg.sshd[0]}:{cfg.sshd[1]}" if cfg.sshd else None,
        "recheck_interval": cfg.recheck_interval,
        "pending_timeout": cfg.pending_timeout,
        "hook_timeout": cfg.hook_timeout,
        "retry_base": cfg.retry_base,
        "retry_max": cfg.retry_max,
        "ipv6": cfg.ipv6,
        "log_level": cfg.log_level,
        "log_format": cfg.log_format,
        "eucalyptus_version": cfg.eucavers,
        "fallback_registrar": (
            f"http://{cfg.fallback_registrar[0]}:{cfg.fallback_registrar[1]}"
            if cfg.fallback_registrar
            else None
        ),
        "ca_fingerprint": cfg.ca_fingerprint,
        "runs_registrar": cfg.runs_registrar,
        "components": [
            {
                "role": c.role.value,
                "cluster": c.cluster,
                "address": str(c.address),
                "installed": str(c.installed) if c.installed else None,
                "token": "set" if c.token else None,
            }
            for c in cfg.components
        ],
    }
    if as_json:
        click.echo(json.dumps(effective, indent=2))
    else:
        console.print(f"[green]ok[/]: {config_path}")
        for key, value in effective.items():
            if key != "components":
                console.print(f"  {key:15} {value}", highlight=False)
        for comp in effective["components"]:  # type: ignore[attr-defined]
            console.print(
                f"  component       {comp['role']:7} cluster={comp['cluster'] or '-'} "
                f"address={comp['address']}",
                highlight=False,
            )


@main.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=DEFAULT_CONFIG,
    show_default=True,
    help="The host's TOML configuration.",
)
@click.option("--json", "as_json", is_flag=True, help="Print id and fingerprint as JSON.")
def fingerprint(config_path: Path, as_json: bool) -> None:
    """Print the id and key fingerprint of each component on this host, for confirming them
    out of band with the registrar's operator. Creates the keys if they do not exist yet."""
    from eucareg.agent.host import load_or_create_identity

    cfg = load_config(config_path)
    rows = []
    for comp in cfg.components:
        try:
            ident = load_or_create_identity(cfg.state_dir, comp.role)
        except (OSError, CredentialError) as exc:
            fail(f"cannot read or create the {comp.role.value} identity: {exc}", 1)
        rows.append(
            {
                "role": comp.role.value,
                "component_id": ident.component_id,
                "fingerprint": ident.fingerprint,
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        click.echo(f"{row['role']:7} {row['component_id']:20} {row['fingerprint']}")


# -- operator queries --------------------------------------------------------------------------


@dataclass(frozen=True)
class Api:
    """The local registrar's API, with the admin credential operator endpoints require."""

    base: str
    token: str | None

    def call(
        self,
        method: str,
        path: str,
        params: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}

        async def fetch() -> tuple[int, dict[str, Any]]:
            timeout = aiohttp.ClientTimeout(total=15)
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.request(
                    method, self.base + path, params=params, json=body, headers=headers
                ) as response,
            ):
                data: dict[str, Any] = await response.json(content_type=None)
                return response.status, data

        try:
            code, data = asyncio.run(fetch())
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            fail(f"cannot reach the registrar at {self.base}: {str(exc) or type(exc).__name__}", 3)
        except ValueError as exc:  # an answer that is not JSON: not an eucareg registrar
            fail(f"{self.base} did not answer like an eucareg registrar: {exc}", 3)
        if code == 401 and not self.token:
            fail("no admin credential: run as root, or pass --admin-token-file", 4)
        if code != 200:
            fail(f"{data.get('error', data)} (HTTP {code})", 4 if code in (401, 403) else 1)
        return data

    def get(self, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        return self.call("GET", path, params=params)

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.call("POST", path, body=body)


def make_api(api_url: str | None, config_path: Path | None, token_file: Path | None) -> Api:
    path = config_path or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    cfg = load_config(path) if path is not None else None
    port = cfg.api_port if cfg else config_mod.DEFAULT_API_PORT
    base = api_url.rstrip("/") if api_url else f"http://127.0.0.1:{port}"
    state_dir = cfg.state_dir if cfg else config_mod.DEFAULT_STATE_DIR
    token_path = token_file or state_dir / "admin.token"
    try:
        token: str | None = token_path.read_text().strip()
    except PermissionError:
        fail(f"cannot read the admin credential {token_path}: permission denied (run as root)", 4)
    except OSError:
        if token_file is not None:
            fail(f"cannot read the admin credential {token_path}", 4)
        token = None
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
            help="Registrar API base URL [default: from --config, else http://127.0.0.1:8780].",
        ),
        click.option(
            "--config",
            "config_path",
            type=click.Path(path_type=Path, dir_okay=False, exists=True),
            help="Take the API port and state_dir from this configuration file.",
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


json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


@main.command()
@with_api_options
@json_option
def status(api: Api, as_json: bool) -> None:
    """Show the cloud as a tree: cloud -> Walrus, clusters -> CC, SC and NCs, with each
    component's state, address and whether it is announcing right now."""
    data = api.get("/v1/status")
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    console.print(render_tree(data))
    for error in data.get("errors", []):
        err_console.print(f"[yellow]warning:[/] {error}", highlight=False)


STATUS_STYLE = {
    "registered": "green",
    "registering": "cyan",
    "pending": "yellow",
    "failed": "red",
    "refused": "red",
    "expired": "magenta",
    "unmatched": "magenta",
    "awaiting-key": "cyan",
    "rejected": "red",
}


def _line(comp: dict[str, Any]) -> str:
    state = comp.get("status", "?")
    style = STATUS_STYLE.get(state, "white")
    online = "" if comp.get("online", True) else " [dim](not announcing)[/]"
    creds = ""
    if state == "registered":
        creds = (
            " creds delivered" if comp.get("credentials_collected_at") else " creds not collected"
        )
    detail = f" — {comp['reason']}" if state not in ("registered",) else ""
    return (
        f"[bold]{comp['role']}[/] {comp['component_id']} {comp['address']} "
        f"[{style}]{state}[/]{creds}{online}{detail}"
    )


def render_tree(data: dict[str, Any]) -> Tree:
    tree_data = data.get("tree", {})
    clc = tree_data.get("clc")
    registrar = data.get("registrar", {})
    trust = f" [dim]{trust_line(registrar['trust'])}[/]" if "trust" in registrar else ""
    if clc:
        root = Tree(f"[bold]cloud[/] (CLC {clc['component_id']} at {clc['address']}){trust}")
    else:
        root = Tree(f"[bold]cluster registrar[/] {registrar.get('cluster') or ''}{trust}")
    walrus = tree_data.get("walrus", [])
    walrus_node = root.add("[bold]walrus[/]")
    if not walrus:
        walrus_node.add("[dim]none[/]")
    for comp in walrus:
        walrus_node.add(_line(comp))
    for cluster in tree_data.get("clusters", []):
        node = root.add(f"[bold]cluster {cluster['name']}[/]")
        for role in ("cc", "sc", "nc"):
            for comp in cluster[role]:
                node.add(_line(comp))
    unmatched = tree_data.get("unmatched", [])
    if unmatched:
        node = root.add("[bold magenta]unmatched[/]")
        for comp in unmatched:
            node.add(_line(comp) + f" (cluster {comp.get('cluster')})")
    return root


@main.command()
@with_api_options
@json_option
@click.option("--component", help="Only events of this component id.")
@click.option(
    "--kind",
    help="Only this kind: pending, awaiting-key, registering, registered, failed, refused, "
    "rejected, expired, unmatched, matched, approved, deregistered, credentials, trust.",
)
@click.option("--role", type=click.Choice(["walrus", "cc", "sc", "nc"]), help="Only this role.")
@click.option("--cluster", help="Only this cluster.")
@click.option("--since", type=int, default=0, show_default=True, help="Only after this seq.")
@click.option("--limit", type=click.IntRange(1, 100_000), default=200, show_default=True)
@click.option("--csv", "as_csv", is_flag=True, help="Export as CSV (one row per event).")
def events(
    api: Api,
    as_json: bool,
    component: str | None,
    kind: str | None,
    role: str | None,
    cluster: str | None,
    since: int,
    limit: int,
    as_csv: bool,
) -> None:
    """List the registrar's decisions with their reasons, oldest first (the newest LIMIT)."""
    params = {"since": str(since), "limit": str(limit)}
    for key, value in (
        ("component", component),
        ("kind", kind),
        ("role", role),
        ("cluster", cluster),
    ):
        if value:
            params[key] = value
    data = api.get("/v1/events", params)
    rows = data.get("events", [])
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if as_csv:
        fields = ["seq", "at", "kind", "code", "role", "cluster", "component_id", "address"]
        writer = csv.DictWriter(sys.stdout, fieldnames=[*fields, "reason"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        return
    table = Table(show_lines=False, header_style="bold")
    for column in ("seq", "time", "kind", "role", "cluster", "component", "address", "reason"):
        table.add_column(column, overflow="fold")
    for row in rows:
        stamp = datetime.datetime.fromtimestamp(row["at"]).strftime("%H:%M:%S.%f")[:-3]
        style = STATUS_STYLE.get(row["kind"], "")
        table.add_row(
            str(row["seq"]),
            stamp,
            f"[{style}]{row['kind']}[/]" if style else row["kind"],
            row["role"],
            row["cluster"] or "-",
            row["component_id"],
            row["address"],
            row["reason"],
        )
    console.print(table)


# -- trust and lock-down -----------------------------------------------------------------------


def _print_trust(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    console.print(trust_line(data), highlight=False)


def trust_line(trust: dict[str, Any]) -> str:
    locked = ", ".join(trust.get("locked", [])) or "nothing"
    if trust.get("install_open"):
        window = f"open for {trust['install_remaining']:.0f}s more"
    else:
        window = "closed"
    return f"mode {trust['mode']}; locked: {locked}; install window {window}"


@main.command()
@with_api_options
@json_option
def trust(api: Api, as_json: bool) -> None:
    """Show the registrar's mode, locks and install window."""
    _print_trust(api.get("/v1/trust"), as_json)


task_option = click.option(
    "--task",
    type=click.Choice(["clc", "cc", "all"]),
    default="all",
    show_default=True,
    help="clc: Walrus/CC/SC registration; cc: NC registration.",
)


@main.command()
@with_api_options
@json_option
@task_option
def lock(api: Api, as_json: bool, task: str) -> None:
    """Lock down auto-registration at once: new announcements are refused (and logged);
    existing registrations stay. Kept across restarts."""
    _print_trust(api.post("/v1/trust/lock", {"tasks": task, "locked": True}), as_json)


@main.command()
@with_api_options
@json_option
@task_option
def unlock(api: Api, as_json: bool, task: str) -> None:
    """Undo `eucareg lock`; refused announcements still on the network are decided again."""
    _print_trust(api.post("/v1/trust/lock", {"tasks": task, "locked": False}), as_json)


@main.command()
@with_api_options
@json_option
@click.argument("mode", type=click.Choice(["local", "any", "off"]))
def mode(api: Api, as_json: bool, mode: str) -> None:
    """Set the registration mode: local (components announced on this network), any (also
    signed HTTP fallback requests from anywhere), or off (register nothing new)."""
    _print_trust(api.post("/v1/trust/mode", {"mode": mode}), as_json)


@main.command("install-mode")
@with_api_options
@json_option
@click.argument("action", type=click.Choice(["open", "close", "status"]))
@click.option("--for", "duration", default="30m", show_default=True, help="Window length.")
def install_mode(api: Api, as_json: bool, action: str, duration: str) -> None:
    """Open or close an install window, in which announcements without a join token are
    accepted without approval. It closes by itself when its time is up."""
    if action == "status":
        data = api.get("/v1/trust")
    else:
        data = api.post("/v1/trust/install-window", {"open": action == "open", "for": duration})
    _print_trust(data, as_json)


@main.command()
@with_api_options
@json_option
def pending(api: Api, as_json: bool) -> None:
    """List components that are not registered: waiting for approval or a dependency,
    waiting to prove their key, expired, or refused."""
    rows = api.get("/v1/pending")["pending"]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(header_style="bold")
    for column in ("id", "role", "cluster", "address", "status", "fingerprint", "why"):
        table.add_column(column, overflow="fold")
    for row in rows:
        style = STATUS_STYLE.get(row["status"], "")
        table.add_row(
            row["component_id"],
            row["role"],
            row["cluster"] or "-",
            row["address"],
            f"[{style}]{row['status']}[/]",
            row["fingerprint"],
            row["reason"],
        )
    console.print(table)


def _target(component_id: str | None, fingerprint: str | None) -> dict[str, str]:
    if bool(component_id) == bool(fingerprint):
        fail("name the component by ID or by --fingerprint (one of the two)")
    return {"component_id": component_id} if component_id else {"fingerprint": fingerprint or ""}


def _component_command(
    name: str, path: str, describe: Callable[[dict[str, Any]], str], doc: str
) -> None:
    """One operator action on one component, named by id or by key fingerprint."""

    def command(api: Api, as_json: bool, component_id: str | None, fingerprint: str | None) -> None:
        data = api.post(path, _target(component_id, fingerprint))
        if as_json:
            click.echo(json.dumps(data, indent=2))
        else:
            console.print(describe(data), highlight=False)

    command.__doc__ = doc
    decorated = click.option(
        "--fingerprint", help="Name the component by key fingerprint (sha256:…) instead of id."
    )(command)
    decorated = click.argument("component_id", required=False)(decorated)
    main.command(name)(with_api_options(json_option(decorated)))


_component_command(
    "approve",
    "/v1/approve",
    lambda d: (
        f"approved {d['component']['role']} {d['component']['component_id']} "
        f"({d['component']['fingerprint']})"
    ),
    """Approve a pending component, after checking its fingerprint out of band
    (`eucareg fingerprint` on that host).""",
)
_component_command(
    "reject",
    "/v1/reject",
    lambda d: f"rejected {d['component']['role']} {d['component']['component_id']}",
    """Reject a pending component: it stays out, whatever it announces, until approved.""",
)
_component_command(
    "deregister",
    "/v1/deregister",
    lambda d: f"deregistered {d['deregistered']}; its credentials are revoked",
    """Remove a component and revoke its credentials. The component notices, deletes them,
    and is then treated like a newcomer under the current trust settings.""",
)


@main.group()
def token() -> None:
    """Join tokens: proof that a component was meant to join, bound to its own key."""


@token.command("create")
@with_api_options
@json_option
@click.option("--role", type=click.Choice(["walrus", "cc", "sc", "nc"]), required=True)
@click.option("--cluster", help="The cluster it may join (cc, sc, nc).")
@click.option("--ttl", default="1h", show_default=True, help="How long the token is valid.")
@click.option("--uses", type=click.IntRange(1), help="How many components it may admit.")
def token_create(
    api: Api, as_json: bool, role: str, cluster: str | None, ttl: str, uses: int | None
) -> None:
    """Print a new join token. Put it in the component's config (components.ROLE.token)."""
    data = api.post("/v1/tokens", {"role": role, "cluster": cluster, "ttl": ttl, "uses": uses})
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(data["token"])


@token.command("list")
@with_api_options
@json_option
def token_list(api: Api, as_json: bool) -> None:
    """List tokens with their scope, expiry, uses and state (never their secrets)."""
    rows = api.get("/v1/tokens")["tokens"]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(header_style="bold")
    for column in ("token", "role", "cluster", "expires", "uses", "used by", "state"):
        table.add_column(column, overflow="fold")
    for row in rows:
        expires = datetime.datetime.fromtimestamp(row["expires_at"]).strftime("%Y-%m-%d %H:%M")
        table.add_row(
            row["token_id"],
            row["role"],
            row["cluster"] or "-",
            expires,
            "unlimited" if row["uses"] is None else str(row["uses"]),
            ", ".join(row["used_by"]) or "-",
            row["state"],
        )
    console.print(table)


@token.command("revoke")
@with_api_options
@json_option
@click.argument("token_id")
def token_revoke(api: Api, as_json: bool, token_id: str) -> None:
    """Revoke a token: it admits nothing more (registrations it made stay)."""
    data = api.post("/v1/tokens/revoke", {"token_id": token_id})
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        console.print(f"revoked token {data['revoked']}")


if __name__ == "__main__":
    main()
