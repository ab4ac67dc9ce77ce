"""`eucareg setup ROLE`: configure a new Walrus, CC, SC or NC. It listens to the LAN as
`eucareg discover` does, offers the clusters and the CLC it heard, falls back to asking for the
registrar's host (setup_prompts.py; every prompt has an option, for installers), and writes the
agent's configuration (setup_file.py).
"""

from __future__ import annotations

from pathlib import Path

import click

from eucareg.cli import discover
from eucareg.cli.common import DEFAULT_CONFIG, fail
from eucareg.cli.setup_file import configured_cluster, report, write, written
from eucareg.cli.setup_prompts import (
    Asker,
    Plan,
    cc_heard,
    choose_clc,
    choose_cluster,
    cluster_name,
    from_option,
    listen,
    needs_listening,
    re_ask,
    registrar,
    token,
)
from eucareg.config.values import ConfigError, parse_duration
from eucareg.core.model import Role
from eucareg.core.trust import parse_token

ROLES = ("walrus", "cc", "sc", "nc")
ASK = "\0ask"  # `--token` given without a value: prompt for it (hidden)


@click.command()
@click.argument("role", type=click.Choice(ROLES))
@click.option("--cluster", help="The cluster this CC, SC or NC belongs to (no prompt).")
@click.option("--clc", "clc_host", metavar="HOST", help="The CLC's host (Walrus, CC, SC).")
@click.option("--cc", "cc_host", metavar="HOST", help="The CC's host (NC).")
@click.option(
    "--token",
    "token_text",
    is_flag=False,
    flag_value=ASK,
    metavar="[TOKEN]",
    help="A join token for this component; without a value, asked for (not echoed).",
)
@click.option("--address", "address_text", help="The preferred address on a multi-homed host.")
@click.option(
    "--timeout",
    default=discover.DEFAULT_TIMEOUT,
    show_default=True,
    help="How long to listen for announcements (at most 300s).",
)
@click.option(
    "--backend",
    type=click.Choice(["auto", "avahi", "zeroconf"]),
    default="auto",
    show_default=True,
    help="Listen through python-zeroconf, the host's avahi-daemon, or (auto) Avahi when it runs "
    "in this network namespace, as the agent's [mdns] backend.",
)
@click.option("--yes", "-y", is_flag=True, help="Ask nothing; what is missing is an error.")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=DEFAULT_CONFIG,
    show_default=True,
    help="The configuration to create, or to add the component to (comments kept).",
)
def setup(
    role: str,
    cluster: str | None,
    clc_host: str | None,
    cc_host: str | None,
    token_text: str | None,
    address_text: str | None,
    timeout: str,
    backend: str,
    yes: bool,
    config_path: Path,
) -> None:
    """Configure this host's ROLE (walrus, cc, sc or nc): which cluster it belongs to, and
    where its registrar is.

    Listens for announcements (--timeout), offers the clusters and the CLC heard, and pins the
    CLC's CA key as ca_fingerprint once confirmed; when nothing suitable is heard, asks for the
    CLC's host (the CC's for an NC) and writes it as fallback_registrar. Creates --config (mode
    0600) or adds [components.ROLE] to it, keeping its comments; then start the agent.

    Exit status: 0 when written, 1 when the file cannot be written, 2 for bad arguments,
    information missing with --yes, or a result that would not load.
    """
    the_role = Role(role)
    ask = Asker(yes)
    if the_role is Role.NC and clc_host is not None:
        fail("--clc: an NC registers with its cluster's CC: give --cc HOST")
    if the_role is not Role.NC and cc_host is not None:
        fail(f"--cc: a {role} registers with the CLC: give --clc HOST")
    try:
        seconds = parse_duration(timeout, "--timeout", discover.MAX_TIMEOUT)
    except ConfigError as exc:
        fail(str(exc))
    plan = Plan(the_role)
    pin = None
    if token_text is not None:
        if token_text == ASK:
            ask.need("--token TOKEN", "--token without a value asks for it")
            token_text = click.prompt("Join token", hide_input=True, value_proc=re_ask(token))
        plan.component["token"] = from_option(token_text, token, "--token")
        pin = parse_token(token_text).ca_fingerprint
    if cluster is not None and the_role.needs_cluster:
        plan.component["cluster"] = from_option(cluster, cluster_name, "--cluster")
    elif cluster is not None:
        fail(f"--cluster: a {role} belongs to no cluster")
    elif the_role.needs_cluster and (kept := configured_cluster(config_path, the_role)):
        click.echo(f"The {role}'s cluster is {kept}, as {config_path} says (--cluster changes it).")
        plan.component["cluster"] = kept
    host = cc_host if the_role is Role.NC else clc_host
    if host is not None:
        plan.top["fallback_registrar"] = from_option(
            host, registrar, "--cc" if cc_host else "--clc"
        )

    heard = listen(seconds, backend) if needs_listening(plan) else discover.Survey(())
    if the_role.needs_cluster and "cluster" not in plan.component:
        plan.component["cluster"] = choose_cluster(the_role, heard, ask)
    if the_role is Role.CC and cc_heard(heard, plan):
        click.echo(
            f"warning: a CC already announces cluster {plan.component['cluster']}; the CLC "
            "registers one CC per cluster name",
            err=True,
        )
    if the_role is Role.NC:
        if "fallback_registrar" not in plan.top and not cc_heard(heard, plan):
            why = f"no CC of cluster {plan.component['cluster']} heard within {seconds:g}s"
            click.echo(f"{why}.")
            plan.top["fallback_registrar"] = ask.prompt(
                "The CC's hostname or address", registrar, "--cc HOST", why
            )
    elif "fallback_registrar" not in plan.top:
        choose_clc(plan, heard, pin, seconds, ask)
    text, secret = written(config_path, plan, address_text, ask)
    write(config_path, text, new=not config_path.exists(), secret=secret)
    report(config_path, plan)
