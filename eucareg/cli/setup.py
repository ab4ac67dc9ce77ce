"""`eucareg setup ROLE`: configure a new Walrus, CC, SC or NC. It listens to the LAN as
`eucareg discover` does, offers the clusters and the CLC it heard, falls back to asking for the
registrar's host, and writes the agent's configuration; every prompt has an option, for installers.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from eucareg.cli import discover
from eucareg.cli.common import DEFAULT_CONFIG, fail
from eucareg.config import values as config_values
from eucareg.config.file import DEFAULT_API_PORT
from eucareg.config.values import ConfigError, parse_duration, registrar_url
from eucareg.core import grammar
from eucareg.core.model import Role
from eucareg.core.trust import TokenError, parse_token

ROLES = ("walrus", "cc", "sc", "nc")
ASK = "\0ask"  # `--token` given without a value: prompt for it (hidden)
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
        value: T = click.prompt(text, value_proc=_re_ask(parse))
        return value

    def confirm(self, text: str) -> bool:
        return True if self.yes else click.confirm(text, default=False)


def _re_ask(parse: Callable[[str], T]) -> Callable[[str], T]:
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


def _option(value: str, parse: Callable[[str], str], option: str) -> str:
    try:
        return parse(value.strip())
    except (ConfigError, grammar.Invalid, TokenError) as exc:
        fail(f"{option}: {exc}")


# -- the command ---------------------------------------------------------------------------------


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
            token_text = click.prompt("Join token", hide_input=True, value_proc=_re_ask(token))
        plan.component["token"] = _option(token_text, token, "--token")
        pin = parse_token(token_text).ca_fingerprint
    if cluster is not None and the_role.needs_cluster:
        plan.component["cluster"] = _option(cluster, cluster_name, "--cluster")
    elif cluster is not None:
        fail(f"--cluster: a {role} belongs to no cluster")
    elif the_role.needs_cluster and (kept := _configured_cluster(config_path, the_role)):
        click.echo(f"The {role}'s cluster is {kept}, as {config_path} says (--cluster changes it).")
        plan.component["cluster"] = kept
    host = cc_host if the_role is Role.NC else clc_host
    if host is not None:
        plan.top["fallback_registrar"] = _option(host, registrar, "--cc" if cc_host else "--clc")

    heard = _listen(seconds, backend) if _needs_listening(plan) else discover.Survey(())
    if the_role.needs_cluster and "cluster" not in plan.component:
        plan.component["cluster"] = _choose_cluster(the_role, heard, ask)
    if the_role is Role.CC and _cc_heard(heard, plan):
        click.echo(
            f"warning: a CC already announces cluster {plan.component['cluster']}; the CLC "
            "registers one CC per cluster name",
            err=True,
        )
    if the_role is Role.NC:
        if "fallback_registrar" not in plan.top and not _cc_heard(heard, plan):
            why = f"no CC of cluster {plan.component['cluster']} heard within {seconds:g}s"
            click.echo(f"{why}.")
            plan.top["fallback_registrar"] = ask.prompt(
                "The CC's hostname or address", registrar, "--cc HOST", why
            )
    elif "fallback_registrar" not in plan.top:
        _choose_clc(plan, heard, pin, seconds, ask)
    text, secret = _written(config_path, plan, address_text, ask)
    _write(config_path, text, new=not config_path.exists(), secret=secret)
    _report(config_path, plan)


def _configured_cluster(path: Path, role: Role) -> str | None:
    """The cluster an existing configuration already gives `role` (a valid name), if any."""
    import tomllib

    try:
        body = tomllib.loads(path.read_text(encoding="utf-8")).get("components", {})
        name = body.get(role.value, {}).get("cluster")
        return cluster_name(name) if isinstance(name, str) else None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, AttributeError, ValueError):
        return None  # reported, if it matters, when the result is checked


def _needs_listening(plan: Plan) -> bool:
    if plan.role.needs_cluster and "cluster" not in plan.component:
        return True  # the clusters heard are offered (a CC is shown the names in use)
    return "fallback_registrar" not in plan.top


def _listen(seconds: float, backend: str) -> discover.Survey:
    click.echo(f"Listening for announcements for {seconds:g}s…")
    try:
        sightings = asyncio.run(discover.listen(seconds, backend_name=backend))
    except (OSError, RuntimeError) as exc:
        # zeroconf raises RuntimeError on a host with no interface to listen on: then nothing
        # can be heard, and setup asks instead.
        click.echo(f"warning: cannot listen for mDNS announcements: {exc}", err=True)
        return discover.Survey(())
    return discover.survey(sightings)


def _choose_cluster(role: Role, heard: discover.Survey, ask: Asker) -> str:
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


def _cc_heard(heard: discover.Survey, plan: Plan) -> bool:
    rows = discover.cluster_rows(heard.announcements)
    return any(r["name"] == plan.component["cluster"] and r["cc"] for r in rows)


def _choose_clc(
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


# -- the file ------------------------------------------------------------------------------------


def _written(path: Path, plan: Plan, address_text: str | None, ask: Asker) -> tuple[str, bool]:
    """The new text of the configuration, checked by the parser the agent uses, and whether
    it holds a token (a secret)."""
    import tomlkit
    from tomlkit.exceptions import TOMLKitError

    from eucareg.config import edit

    try:
        old = path.read_text(encoding="utf-8") if path.exists() else None
        doc = tomlkit.parse(old) if old is not None else tomlkit.document()
    except (OSError, UnicodeDecodeError, TOMLKitError) as exc:
        fail(f"{path}: cannot read it as TOML: {exc}; nothing written")
    if old is None:
        doc.add(tomlkit.comment(f"written by `eucareg setup {plan.role.value}`"))
        doc.add(tomlkit.comment("every key is in docs/configuration.md"))
    if address_text is not None:
        given = _option(address_text, address, "--address")
        if doc.get("address") in (None, given):
            plan.top["address"] = given
        else:
            plan.component["address"] = given
    elif "address" not in doc and len(found := config_values.usable_addresses()) != 1:
        # The agent would refuse to start (lesson L3): ask now rather than fail later.
        why = (
            f"this host has {len(found)} usable addresses ({', '.join(map(str, found))}), "
            "and eucareg never guesses between addresses"
            if found
            else "this host has no usable address to detect (loopback and link-local "
            "addresses cannot be registered)"
        )
        click.echo(f"{why[0].upper()}{why[1:]}.")
        plan.top["address"] = ask.prompt(
            f"The address this {plan.role.value} announces", address, "--address", why
        )
    # The address first: in a new file it heads the keys, as in docs/configuration.md.
    for key in sorted(plan.top, key=lambda k: k != "address"):
        doc[key] = plan.top[key]
    components = doc.get("components")
    if components is None:
        components = tomlkit.table(is_super_table=True)
        doc["components"] = components
    if not isinstance(components, dict):
        _invalid(path, "components: expected a table")
    table = components.get(plan.role.value)
    if table is None:
        table = tomlkit.table()
        components[plan.role.value] = table
    if not isinstance(table, dict):
        _invalid(path, f"components.{plan.role.value}: expected a table")
    for key, value in plan.component.items():
        table[key] = value
    text = tomlkit.dumps(doc)
    try:
        cfg = edit.check(text)
    except ConfigError as exc:
        _invalid(path, str(exc))
    return text, any(c.token for c in cfg.components)


def _invalid(path: Path, problem: str) -> NoReturn:
    fail(f"{path}: the result would not load: {problem}; nothing written")


def _write(path: Path, text: str, *, new: bool, secret: bool) -> None:
    from eucareg.config import edit

    try:
        if not new:
            edit.replace_file(path, text, secret=secret)
            return
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True)
            path.parent.chmod(0o755)  # whatever the umask: the agent's user reads through it
        # mkstemp makes the file 0600: it may hold a token, a secret.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        fail(f"{path}: cannot write it: {exc.strerror or exc}; nothing written", 1)


def _report(path: Path, plan: Plan) -> None:
    click.echo(f"Wrote {path}:")
    for key, value in plan.top.items():
        click.echo(f"  {key} = {value!r}")
    for key, value in plan.component.items():
        shown = "(set)" if key == "token" else repr(value)
        click.echo(f"  components.{plan.role.value}.{key} = {shown}")
    click.echo(
        "Next: start the agent (`systemctl enable --now eucareg-agent`, or "
        f"`eucareg agent --config {path}`); `eucareg fingerprint --config {path}` shows the "
        "key the registrar's operator may be asked to approve."
    )
