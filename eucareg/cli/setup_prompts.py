"""What `eucareg setup` asks and how: the plan it fills in, answers typed or given as options
(checked as the agent would check them, asked again when wrong), and the clusters and CLCs it
offers from what it heard on the LAN.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import click

from eucareg.cli import discover
from eucareg.cli.common import fail
from eucareg.config.file import DEFAULT_API_PORT
from eucareg.config.values import ConfigError, registrar_url
from eucareg.core import grammar
from eucareg.core.model import Role
from eucareg.core.trust import TokenError, parse_token

T = TypeVar("T")


@dataclass
class Plan:
    """What setup writes: top-level keys, and the keys of `[components.ROLE]`."""

    role: Role
    top: dict[str, str] = field(default_factory=dict)
    component: dict[str, str] = field(default_factory=dict)


class Asker:
    """Prompts, or with --yes the error naming the option that would have answered."""

    def __init__(self, yes: bool) -> None:
        self.yes = yes

    def need(self, option: str, why: str) -> None:
        if self.yes:
            fail(f"{why}: give {option} (--yes asks nothing)")

    def prompt(self, text: str, parse: Callable[[str], T], option: str, why: str) -> T:
        self.need(option, why)
        value: T = click.prompt(text, value_proc=re_ask(parse))
        return value

    def confirm(self, text: str) -> bool:
        return True if self.yes else click.confirm(text, default=False)


def re_ask(parse: Callable[[str], T]) -> Callable[[str], T]:
    """A value_proc: click asks again when it raises BadParameter."""

    def proc(text: str) -> T:
        try:
            return parse(text.strip())
        except (ConfigError, grammar.Invalid, TokenError) as exc:
            raise click.BadParameter(str(exc)) from None

    return proc


# -- values --------------------------------------------------------------------------------------


def cluster_name(text: str) -> str:
    return grammar.cluster(text, "cluster")


def registrar(text: str, key: str = "registrar") -> str:
    """'https://HOST:PORT' from HOST, HOST:PORT or the URL itself (port 8780 by default)."""
    url = text if "://" in text else f"https://{text}"
    if url.count(":") < 2:
        url = f"{url.rstrip('/')}:{DEFAULT_API_PORT}"
    host, port = registrar_url(url, key)
    return f"https://{host}:{port}"


def token(text: str) -> str:
    parse_token(text)
    return text


def address(text: str) -> str:
    return str(grammar.address(text, "address"))


def from_option(value: str, parse: Callable[[str], str], option: str) -> str:
    """The value an option gave, parsed; a bad one is an error naming the option."""
    try:
        return parse(value.strip())
    except (ConfigError, grammar.Invalid, TokenError) as exc:
        fail(f"{option}: {exc}")


# -- what was heard ------------------------------------------------------------------------------


def needs_listening(plan: Plan) -> bool:
    if plan.role.needs_cluster and "cluster" not in plan.component:
        return True  # the clusters heard are offered (a CC is shown the names in use)
    return "fallback_registrar" not in plan.top


def listen(seconds: float, backend: str) -> discover.Survey:
    click.echo(f"Listening for announcements for {seconds:g}s…")
    try:
        sightings = asyncio.run(discover.listen(seconds, backend_name=backend))
    except (OSError, RuntimeError) as exc:
        # zeroconf raises RuntimeError on a host with no interface to listen on: then nothing
        # can be heard, and setup asks instead.
        click.echo(f"warning: cannot listen for mDNS announcements: {exc}", err=True)
        return discover.Survey(())
    return discover.survey(sightings)


def choose_cluster(role: Role, heard: discover.Survey, ask: Asker) -> str:
    rows = discover.cluster_rows(heard.announcements)
    ask.need("--cluster NAME", f"which cluster this {role.value} belongs to")
    if role is Role.CC or not rows:
        if rows:
            click.echo("Clusters heard on this LAN (a new CC needs a name of its own):")
            for row in rows:
                click.echo(f"  {row['name']}: {_ccs(row)}")
        elif role is not Role.CC:
            click.echo("No cluster heard on this LAN.")
        return ask.prompt(f"Name of this {role.value}'s cluster", cluster_name, "--cluster", "")
    click.echo("Clusters heard on this LAN:")
    for n, row in enumerate(rows, 1):
        click.echo(f"  {n}) {row['name']}: {_ccs(row)}")
    other = len(rows) + 1
    click.echo(f"  {other}) another cluster (type its name)")
    choice = click.prompt(
        f"Which cluster does this {role.value} belong to? (1-{other})",
        type=click.IntRange(1, other),
    )
    if choice == other:
        return ask.prompt("Cluster name", cluster_name, "--cluster", "")
    name: str = rows[choice - 1]["name"]
    return name


def _ccs(row: dict[str, Any]) -> str:
    ccs = [
        f"CC {cc['component_id']} at {cc['address']}, "
        + ("registered" if cc["registered"] else "not registered yet")
        for cc in row["cc"]
    ]
    return "; ".join(ccs) or "no CC heard"


def cc_heard(heard: discover.Survey, plan: Plan) -> bool:
    rows = discover.cluster_rows(heard.announcements)
    return any(r["name"] == plan.component["cluster"] and r["cc"] for r in rows)


def choose_clc(
    plan: Plan, heard: discover.Survey, pin: str | None, seconds: float, ask: Asker
) -> None:
    """Pin a CLC heard (ca_fingerprint), once confirmed; or ask for its host."""
    rows = discover.clc_rows(heard.announcements)
    if pin is not None:
        # The token names the cloud's CA: a CLC with another key is not this cloud's.
        rows = [r for r in rows if r["fingerprint"] == pin]
    chosen = None
    if len(rows) > 1:
        ask.need("--clc HOST", f"{len(rows)} CLCs heard on this LAN")
        click.echo("CLCs heard on this LAN:")
        for n, row in enumerate(rows, 1):
            click.echo(f"  {n}) {row['component_id']} at {row['address']}")
        chosen = rows[
            click.prompt(f"Which CLC? (1-{len(rows)})", type=click.IntRange(1, len(rows))) - 1
        ]
    elif rows:
        chosen = rows[0]
    if chosen is not None:
        click.echo(
            f"CLC {chosen['component_id']} heard at {chosen['address']}, announcing the cloud "
            f"CA key\n  {chosen['fingerprint']}\n"
            "setup writes it as ca_fingerprint: this host then accepts credentials from that "
            "CA only. Compare it with `eucareg fingerprint` on the CLC."
        )
        if ask.confirm("Is this the fingerprint the CLC shows?"):
            if pin is None:
                plan.top["ca_fingerprint"] = chosen["fingerprint"]
            return
    why = "no CLC heard" if chosen is None else "the CLC heard was not confirmed"
    if chosen is None:
        click.echo(f"No CLC heard on this LAN within {seconds:g}s.")
    plan.top["fallback_registrar"] = ask.prompt(
        "The CLC's hostname or address", registrar, "--clc HOST", why
    )
