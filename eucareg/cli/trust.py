"""Operator commands that change what the registrar trusts: its mode, locks and install window,
decisions about single components (register, approve, reject, deregister) and join tokens.
docs/security.md says what each one stops.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from eucareg.cli.client import REQUEST_TIMEOUT, Api, with_api_options
from eucareg.cli.common import console, fail, json_option, print_json
from eucareg.core import grammar

ROLES = click.Choice(["walrus", "cc", "sc", "nc"])


def _print_trust(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(data, sort_keys=True)
    else:
        from eucareg.cli.render import trust_line  # rich, only to print

        console.print(trust_line(data), highlight=False)


@click.command()
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


@click.command()
@with_api_options
@json_option
@task_option
def lock(api: Api, as_json: bool, task: str) -> None:
    """Lock down auto-registration at once: new announcements are refused (and logged);
    existing registrations stay. Kept across restarts."""
    _print_trust(api.post("/v1/trust/lock", {"tasks": task, "locked": True}), as_json)


@click.command()
@with_api_options
@json_option
@task_option
def unlock(api: Api, as_json: bool, task: str) -> None:
    """Undo `eucareg lock`; refused announcements still on the network are decided again."""
    _print_trust(api.post("/v1/trust/lock", {"tasks": task, "locked": False}), as_json)


@click.command()
@with_api_options
@json_option
@click.argument("mode", type=click.Choice(["local", "any", "off"]))
def mode(api: Api, as_json: bool, mode: str) -> None:
    """Set the registration mode: local (components announced on this network), any (also
    signed HTTP fallback requests from anywhere), or off (register nothing new)."""
    _print_trust(api.post("/v1/trust/mode", {"mode": mode}), as_json)


@click.command("install-mode")
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


# -- one component -----------------------------------------------------------------------------


def _target(component_id: str | None, fingerprint: str | None) -> dict[str, str]:
    if bool(component_id) == bool(fingerprint):
        fail("name the component by ID or by --fingerprint (one of the two)")
    return {"component_id": component_id} if component_id else {"fingerprint": fingerprint or ""}


def component_command(
    name: str, path: str, describe: Callable[[dict[str, Any]], str], doc: str
) -> click.Command:
    """One operator action on one component, named by id or by key fingerprint."""

    def command(api: Api, as_json: bool, component_id: str | None, fingerprint: str | None) -> None:
        data = api.post(path, _target(component_id, fingerprint))
        if as_json:
            print_json(data)
        else:
            console.print(describe(data), highlight=False)

    command.__doc__ = doc
    decorated = click.option(
        "--fingerprint", help="Name the component by key fingerprint (sha256:…) instead of id."
    )(command)
    decorated = click.argument("component_id", required=False)(decorated)
    return click.command(name)(with_api_options(json_option(decorated)))


@click.command()
@with_api_options
@json_option
@click.argument("role", type=ROLES)
@click.argument("address")
@click.option("--cluster", help="The cluster of a CC, SC or NC.")
@click.option(
    "--fingerprint",
    help="The component's key (sha256:…, `eucareg fingerprint` on its host): only the "
    "component with this key may take the registration over.",
)
def register(
    api: Api,
    as_json: bool,
    role: str,
    address: str,
    cluster: str | None,
    fingerprint: str | None,
) -> None:
    """Register a component by hand, before it is heard: the design's manual registration,
    for a component that no announcement of it can reach. The design's checks apply (one
    Walrus, unique cluster names, one SC per cluster, ...), and its hook runs now. The
    component collects its credentials once it announces itself at ADDRESS (over mDNS or
    its fallback registrar), with the given key if --fingerprint was given. Without
    --fingerprint, the first component to announce itself as ROLE at ADDRESS takes it."""
    body = {"role": role, "address": address, "cluster": cluster, "fingerprint": fingerprint}
    data = api.post("/v1/register", body)
    if as_json:
        print_json(data)
        return
    row = data["component"]
    console.print(
        f"registered {row['role']} at {row['address']} as {row['component_id']} "
        f"({row['status']}): {row['reason']}",
        highlight=False,
    )


approve = component_command(
    "approve",
    "/v1/approve",
    lambda d: (
        f"approved {d['component']['role']} {d['component']['component_id']} "
        f"({d['component']['fingerprint']})"
    ),
    """Approve a pending component, after checking its fingerprint out of band
    (`eucareg fingerprint` on that host).""",
)
reject = component_command(
    "reject",
    "/v1/reject",
    lambda d: f"rejected {d['component']['role']} {d['component']['component_id']}",
    """Reject a pending component: it stays out, whatever it announces, until approved.""",
)
# The longest the registrar waits for a deregister hook (api/operator.py MAX_DEREGISTER_WAIT;
# not imported: the CLI does not load the server).
MAX_DEREGISTER_WAIT = 600.0


@click.command()
@with_api_options
@json_option
@click.argument("component_id", required=False)
@click.option(
    "--fingerprint", help="Name the component by key fingerprint (sha256:…) instead of id."
)
@click.option(
    "--wait",
    "wait",
    default="90s",
    show_default=True,
    help="How long to wait for the deregister hook's outcome (its retries included); 0: "
    "do not wait.",
)
def deregister(
    api: Api, as_json: bool, component_id: str | None, fingerprint: str | None, wait: str
) -> None:
    """Remove a component and revoke its credentials, and run its deregister hook (e.g.
    `euca_conf --deregister-nodes`, docs/hooks.md), waiting for its outcome. The component
    notices, deletes its credentials, and is then treated like a newcomer under the current
    trust settings. Exit status 1 when the hook failed (the component is deregistered from
    eucareg all the same: undo its Eucalyptus registration by hand)."""
    seconds = _wait_seconds(wait)
    data = api.post(
        "/v1/deregister",
        _target(component_id, fingerprint),
        params={"wait": f"{seconds:g}"},
        timeout_s=seconds + REQUEST_TIMEOUT,
    )
    hook = data.get("hook") or {"state": "none", "reason": "", "run": None}
    if as_json:
        print_json(data)
    else:
        console.print(
            f"deregistered {data['deregistered']}; its credentials are revoked", highlight=False
        )
        if hook.get("state") != "none":  # no hook owed: nothing more to say
            console.print(f"deregister hook: {_hook_line(hook)}", highlight=False)
    run = hook.get("run") or {}
    if hook.get("state") == "done" and run.get("outcome") not in ("ok", "skipped"):
        raise SystemExit(1)


def _wait_seconds(value: str) -> float:
    if value.strip() in ("0", "0s"):
        return 0.0
    try:
        seconds = grammar.duration(value, "--wait", high=MAX_DEREGISTER_WAIT)
    except grammar.Invalid as exc:
        raise click.BadParameter(str(exc), param_hint="--wait") from None
    return seconds


def _hook_line(hook: dict[str, Any]) -> str:
    """The hook's outcome in one line, with the tail of what a failed script said."""
    run = hook.get("run")
    if hook.get("state") != "done" or not isinstance(run, dict):
        return str(hook.get("reason", ""))
    line = f"{run.get('hook')}: {run.get('outcome')}"
    if run.get("exit_code") is not None:
        line += f" (exit {run['exit_code']})"
    line += f", attempt {run.get('attempt')}"
    tail = (str(run.get("stderr") or "").strip().splitlines() or [""])[-1]
    if tail and run.get("outcome") not in ("ok", "skipped"):
        line += f": {tail[:200]}"
    return line


# -- join tokens -------------------------------------------------------------------------------


@click.group()
def token() -> None:
    """Join tokens: proof that a component was meant to join, bound to its own key."""


@token.command("create")
@with_api_options
@json_option
@click.option("--role", type=ROLES, required=True)
@click.option("--cluster", help="The cluster it may join (cc, sc, nc).")
@click.option("--ttl", default="1h", show_default=True, help="How long the token is valid.")
@click.option("--uses", type=click.IntRange(1), help="How many components it may admit.")
def token_create(
    api: Api, as_json: bool, role: str, cluster: str | None, ttl: str, uses: int | None
) -> None:
    """Print a new join token. Put it in the component's config (components.ROLE.token)."""
    data = api.post("/v1/tokens", {"role": role, "cluster": cluster, "ttl": ttl, "uses": uses})
    if as_json:
        print_json(data)
    else:
        click.echo(api.field(data, "token", str))


@token.command("list")
@with_api_options
@json_option
def token_list(api: Api, as_json: bool) -> None:
    """List tokens with their scope, expiry, uses and state (never their secrets)."""
    rows = api.field(api.get("/v1/tokens"), "tokens", list)
    if as_json:
        print_json(rows)
    else:
        from eucareg.cli.render import tokens_table  # rich, only to print

        console.print(tokens_table(rows))


@token.command("revoke")
@with_api_options
@json_option
@click.argument("token_id")
def token_revoke(api: Api, as_json: bool, token_id: str) -> None:
    """Revoke a token: it admits nothing more (registrations it made stay)."""
    data = api.post("/v1/tokens/revoke", {"token_id": token_id})
    if as_json:
        print_json(data)
    else:
        console.print(f"revoked token {data['revoked']}", highlight=False)
