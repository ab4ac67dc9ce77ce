"""The `eucareg` command: run the agent, and let an operator see what the registrar decided.

Operator commands talk to the local registrar's HTTP API; every one of them takes --json for
scripts (docs/cli.md documents the output).
"""

from __future__ import annotations

import asyncio
import csv
import datetime
import json
import logging
import sys
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
import click
from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from eucareg import config as config_mod
from eucareg.logs import setup_logging

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
    from eucareg.agent import Agent

    cfg = load_config(config_path)
    setup_logging(cfg.log_level, cfg.log_format)
    try:
        asyncio.run(Agent(cfg).run_forever())
    except OSError as exc:
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
        "runs_registrar": cfg.runs_registrar,
        "components": [
            {
                "role": c.role.value,
                "cluster": c.cluster,
                "address": str(c.address),
                "installed": str(c.installed) if c.installed else None,
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
    from eucareg.agent import load_or_create_identity

    cfg = load_config(config_path)
    rows = []
    for comp in cfg.components:
        ident = load_or_create_identity(cfg.state_dir, comp.role)
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


def api_base(api: str | None, config_path: Path | None) -> str:
    if api:
        return api.rstrip("/")
    path = config_path or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    if path is not None:
        cfg = load_config(path)
        return f"http://127.0.0.1:{cfg.api_port}"
    return f"http://127.0.0.1:{config_mod.DEFAULT_API_PORT}"


def api_get(base: str, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
    async def fetch() -> dict[str, Any]:
        timeout = aiohttp.ClientTimeout(total=15)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(base + path, params=params) as response,
        ):
            data: dict[str, Any] = await response.json(content_type=None)
            if response.status != 200:
                raise click.ClickException(f"{base}{path}: HTTP {response.status}: {data}")
            return data

    try:
        return asyncio.run(fetch())
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        fail(f"cannot reach the registrar at {base}: {exc or type(exc).__name__}", code=3)


api_options = [
    click.option(
        "--api",
        envvar="EUCAREG_API",
        help="Registrar API base URL [default: from --config, else http://127.0.0.1:8780].",
    ),
    click.option(
        "--config",
        "config_path",
        type=click.Path(path_type=Path, dir_okay=False, exists=True),
        help="Take the API port from this configuration file.",
    ),
    click.option("--json", "as_json", is_flag=True, help="Machine-readable output."),
]


def with_api_options(func: Any) -> Any:
    for option in reversed(api_options):
        func = option(func)
    return func


@main.command()
@with_api_options
def status(api: str | None, config_path: Path | None, as_json: bool) -> None:
    """Show the cloud as a tree: cloud -> Walrus, clusters -> CC, SC and NCs, with each
    component's state, address and whether it is announcing right now."""
    data = api_get(api_base(api, config_path), "/v1/status")
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
    if clc:
        root = Tree(f"[bold]cloud[/] (CLC {clc['component_id']} at {clc['address']})")
    else:
        clusters = data.get("registrar", {}).get("cluster")
        root = Tree(f"[bold]cluster registrar[/] {clusters or ''}")
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
@click.option("--component", help="Only events of this component id.")
@click.option(
    "--kind",
    help="Only this kind: registered, registering, pending, refused, failed, expired, "
    "unmatched, matched, rejected, credentials.",
)
@click.option("--role", type=click.Choice(["walrus", "cc", "sc", "nc"]), help="Only this role.")
@click.option("--cluster", help="Only this cluster.")
@click.option("--since", type=int, default=0, show_default=True, help="Only after this seq.")
@click.option("--limit", type=click.IntRange(1, 100_000), default=200, show_default=True)
@click.option("--csv", "as_csv", is_flag=True, help="Export as CSV (one row per event).")
def events(
    api: str | None,
    config_path: Path | None,
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
    data = api_get(api_base(api, config_path), "/v1/events", params)
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


# -- demo --------------------------------------------------------------------------------------


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print only the final status as JSON.")
@click.option("--nodes", type=click.IntRange(1, 20), default=2, show_default=True)
@click.option(
    "--timeout", type=float, default=60.0, show_default=True, help="Seconds to wait for the cloud."
)
def demo(as_json: bool, nodes: int, timeout: float) -> None:
    """Build the design's first test topology (CLC+Walrus+CC+SC on one host, plus NCs) in an
    isolated network-namespace lab, show the announcements and decisions as they happen and
    the final tree, then tear the lab down."""
    from eucareg.demo import run_demo

    sys.exit(run_demo(as_json=as_json, nodes=nodes, timeout=timeout))


if __name__ == "__main__":
    main()
