"""`eucareg join URL --token T`: a host that multicast does not reach joins the cloud in one
command. It checks that the registrar proves the CA key the token names, writes the registrar
and the tokens into the configuration, and announces each component over HTTP, saying where
each one stands. The agent then collects the credentials and keeps the host heard.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from eucareg.cli.common import config_option, console, fail, json_option, load_config
from eucareg.config.components import ComponentConfig
from eucareg.config.file import Config
from eucareg.config.values import ConfigError, parse_duration, registrar_url
from eucareg.core.model import Role
from eucareg.core.trust import ParsedToken, TokenError, parse_token

MAX_WAIT = 300.0  # --wait at most (the registrar holds a request 30 s at most anyway)
# What the registrar answered that means "on its way": the command succeeds.
ACCEPTED = frozenset({"registered", "registering", "awaiting-key", "pending"})


@dataclass(frozen=True)
class Outcome:
    role: Role
    component_id: str
    status: str
    reason: str
    waiting_for: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "role": self.role.value,
            "component_id": self.component_id,
            "status": self.status,
            "reason": self.reason,
            "waiting_for": self.waiting_for,
        }


@click.command()
@click.argument("url")
@click.option(
    "--token",
    "tokens",
    multiple=True,
    required=True,
    metavar="[ROLE=]TOKEN",
    help="A join token from `eucareg token create` on the registrar. A host with several "
    "components names the one each token is for: --token cc=T1 --token sc=T2.",
)
@click.option(
    "--wait",
    default="10s",
    show_default=True,
    help="How long to wait for each component's outcome before reporting where it stands.",
)
@config_option("The host's TOML configuration; it is changed in place (a copy is kept as .bak).")
@json_option
def join(url: str, tokens: tuple[str, ...], wait: str, config_path: Path, as_json: bool) -> None:
    """Join the cloud whose registrar answers at URL (https://HOST:PORT), from a network that
    multicast does not reach.

    Checks that the registrar proves the cloud CA key the token names, then sets
    `fallback_registrar` and each component's `token` in the configuration, and announces
    each component over HTTP. Prints where each one stands: registered, pending (and on
    what), or refused (and why). Then (re)start the agent: it collects the credentials and
    keeps announcing the host to the registrar.

    Exit status: 0 when every component was accepted or waits on something named, 1 when the
    registrar could not be verified or refused a component, 2 for bad arguments.
    """
    from eucareg.config import edit  # tomlkit: not for `eucareg agent` to import

    cfg = load_config(config_path)
    try:
        target = registrar_url(url, "URL")
        seconds = parse_duration(wait, "--wait", MAX_WAIT)
    except ConfigError as exc:
        fail(str(exc))
    assigned = assign(cfg, tokens)
    pin = one_pin(assigned)
    try:
        text = edit.joined(config_path.read_text(encoding="utf-8"), url, _texts(tokens, assigned))
    except (ConfigError, OSError, UnicodeDecodeError) as exc:
        fail(f"{config_path}: {exc}")

    def commit() -> None:
        try:
            # The tokens are secrets: the file is no longer readable by group and others.
            edit.replace_file(config_path, text, secret=True)
        except OSError as exc:
            fail(f"{config_path}: cannot write it: {exc.strerror}; nothing changed", 1)

    outcomes = asyncio.run(_join(cfg, target, assigned, pin, seconds, commit))
    _report(url, pin, config_path, outcomes, as_json)
    if any(o.status not in ACCEPTED for o in outcomes):
        raise SystemExit(1)


def assign(cfg: Config, tokens: tuple[str, ...]) -> dict[Role, ParsedToken]:
    """Which component each token is for; fails naming the problem."""
    joinable = [c.role for c in cfg.components if c.role is not Role.CLC]
    if not joinable:
        fail("this host runs no component that joins a cloud (a CLC is the cloud)")
    out: dict[Role, ParsedToken] = {}
    for given in tokens:
        role_name, sep, text = given.rpartition("=") if "=" in given[:8] else ("", "", given)
        if sep:
            try:
                role = Role(role_name)
            except ValueError:
                fail(f"--token {role_name}=…: no such role (expected one of walrus, cc, sc, nc)")
            if role not in joinable:
                fail(f"--token {role.value}=…: this host has no {role.value} component")
        elif len(joinable) == 1:
            role = joinable[0]
        else:
            names = ", ".join(r.value for r in joinable)
            fail(f"this host runs {names}: say which one each token is for (--token ROLE=TOKEN)")
        if role in out:
            fail(f"two tokens for the {role.value}")
        try:
            out[role] = parse_token(text)
        except TokenError as exc:
            fail(f"--token for the {role.value}: {exc}")
    if Role.NC in out and len(out) > 1:
        fail("an NC joins its CC and the other components the CLC: run join once for each")
    return out


def one_pin(assigned: dict[Role, ParsedToken]) -> str:
    pins = {t.ca_fingerprint for t in assigned.values()}
    if len(pins) > 1:
        fail("the tokens name different clouds (CA keys " + ", ".join(sorted(pins)) + ")")
    return pins.pop()


def _texts(tokens: tuple[str, ...], assigned: dict[Role, ParsedToken]) -> dict[Role, str]:
    """The token texts as given, by the role `assign` gave them (the same order)."""
    texts = [t.rpartition("=")[2] if "=" in t[:8] else t for t in tokens]
    return {role: text.strip() for role, text in zip(assigned, texts, strict=True)}


async def _join(
    cfg: Config,
    target: tuple[str, int],
    assigned: dict[Role, ParsedToken],
    pin: str,
    wait: float,
    commit: Callable[[], None],
) -> list[Outcome]:
    """Verify the registrar, then `commit` (write the configuration), then announce."""
    import aiohttp

    from eucareg.agent.locate import Endpoint
    from eucareg.agent.statedir import AGENT_UMASK
    from eucareg.pki import tls

    nc = cfg.component(Role.NC)
    role = Role.CC if Role.NC in assigned else Role.CLC
    expect = tls.Expect(role, cluster=nc.cluster if nc and role is Role.CC else None, pin=pin)
    endpoint = Endpoint(*target, component_id="")
    timeout = aiohttp.ClientTimeout(total=wait + 15, sock_connect=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        try:
            async with session.get(
                endpoint.url + "/v1/health",
                ssl=tls.client_context(expect),
                server_hostname=tls.SERVER_NAMES[role],
            ) as response:
                await response.read()
        except aiohttp.ClientConnectorCertificateError as exc:
            fail(
                f"{endpoint.url} does not prove the cloud CA key the token names ({pin}): "
                f"{exc.certificate_error}; nothing changed",
                1,
            )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            fail(f"cannot reach {endpoint.url}: {exc or type(exc).__name__}; nothing changed", 1)
        commit()
        os.umask(AGENT_UMASK)  # the identity keys it may make are the agent's, and private
        outcomes = []
        for joining, token in assigned.items():
            comp = cfg.component(joining)
            assert comp is not None
            outcomes.append(await _announce(session, cfg, comp, token, endpoint, expect, wait))
    return outcomes


async def _announce(
    session: Any,
    cfg: Config,
    comp: ComponentConfig,
    token: ParsedToken,
    endpoint: Any,
    expect: Any,
    wait: float,
) -> Outcome:
    from eucareg.agent import collect
    from eucareg.agent.announce import TokenProver, service_spec
    from eucareg.agent.identity import load_or_create_identity

    identity = await asyncio.to_thread(load_or_create_identity, cfg.state_dir, comp.role)
    spec = service_spec(
        cfg, comp, identity, registered=False, api_port=cfg.api_port, prover=TokenProver(token)
    )
    try:
        status, data = await collect.post_announcement(
            session, identity, endpoint, spec.txt, expect, wait=wait
        )
    except collect.COLLECT_ERRORS as exc:
        return Outcome(comp.role, identity.component_id, "error", str(exc) or type(exc).__name__)
    shown = data.get("status") if isinstance(data.get("status"), str) else f"HTTP {status}"
    reason = data.get("reason") or data.get("error") or ""
    waiting = data.get("waiting_for")
    return Outcome(
        comp.role,
        identity.component_id,
        str(shown) if status in (200, 403) else f"HTTP {status}",
        str(reason),
        waiting if isinstance(waiting, str) else None,
    )


def _report(url: str, pin: str, path: Path, outcomes: list[Outcome], as_json: bool) -> None:
    if as_json:
        from eucareg.cli.common import print_json

        print_json(
            {
                "registrar": url,
                "ca_fingerprint": pin,
                "config": str(path),
                "components": [o.as_json() for o in outcomes],
            }
        )
        return
    console.print(f"{url} proves the cloud CA key {pin}", highlight=False)
    console.print(f"wrote {path} (the previous file is {path}.bak)", highlight=False)
    for o in outcomes:
        waits = f" (waiting for {o.waiting_for})" if o.waiting_for else ""
        console.print(f"{o.role.value} {o.component_id}: {o.status}: {o.reason}{waits}")
    console.print(
        "next: (re)start the agent (`eucareg agent`, or its service); it collects the "
        "credentials and keeps announcing this host to the registrar",
        highlight=False,
    )
