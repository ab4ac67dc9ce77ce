"""The `eucareg` command group, and the commands about this host: `agent`, `check-config` and
`fingerprint`. The operator commands, which talk to the local registrar's API, live in
queries.py and trust.py and are added to the group here (docs/cli.md documents them all).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from eucareg.cli import backup, ca, discover, importing, join, queries, setup, trust
from eucareg.cli.common import config_option, console, fail, load_config, print_json
from eucareg.cli.logs import setup_logging
from eucareg.pki.keypairs import CredentialError

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="eucareg")
def main() -> None:
    """eucareg: automatic, checked registration of Eucalyptus cloud components.

    Every host runs `eucareg agent`; the CLC's and each CC's agent also run the registrar.
    The other commands ask the local registrar what it decided.
    """


# -- agent -------------------------------------------------------------------------------------


@main.command()
@config_option("The host's TOML configuration (see docs/configuration.md).")
def agent(config_path: Path) -> None:
    """Announce this host's components, collect their credentials, and run the registrar
    when this host holds the CLC or a CC. Stops cleanly on SIGTERM or Ctrl-C, withdrawing
    its announcements."""
    from eucareg.agent.host import Agent
    from eucareg.agent.statedir import AGENT_UMASK, StateDirError
    from eucareg.store.errors import SchemaTooNew, StoreBusy

    cfg = load_config(config_path)
    setup_logging(cfg.log_level, cfg.log_format)
    # Everything the agent writes is private (keys, tokens, the registry and its journals);
    # hooks get the umask euca_conf needs (registrar/hooks.py).
    os.umask(AGENT_UMASK)
    try:
        asyncio.run(Agent(cfg).run_forever())
    except (OSError, CredentialError, StoreBusy, SchemaTooNew, StateDirError) as exc:
        logging.getLogger("eucareg").error("agent cannot run: %s", exc)
        sys.exit(1)


def _mdns_summary(setting: str) -> dict[str, str]:
    """The mDNS backend the agent would use now; `auto` asks the system bus, read-only."""
    from eucareg.mdns.choice import preview

    return asyncio.run(preview(setting))


@main.command("check-config")
@config_option("The TOML configuration to check.")
@click.option("--json", "as_json", is_flag=True, help="Print the effective configuration as JSON.")
def check_config(config_path: Path, as_json: bool) -> None:
    """Validate a configuration file and show the effective settings, defaults included."""
    cfg = load_config(config_path)
    components = [
        {
            "role": c.role.value,
            "cluster": c.cluster,
            "address": str(c.address),
            "installed": str(c.installed) if c.installed else None,
            "token": "set" if c.token else None,
        }
        for c in cfg.components
    ]
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
        "replace_after": cfg.replace_after,
        "keep_history": cfg.keep_history,
        "max_events": cfg.max_events,
        "max_hook_runs": cfg.max_hook_runs,
        "max_unadmitted": cfg.max_unadmitted,
        "max_hooks_running": cfg.max_hooks_running,
        "batch_hooks": sorted(role.hook_name for role in cfg.batch_hooks),
        "batch_max": cfg.batch_max,
        "batch_wait": cfg.batch_wait,
        "rate_limit": cfg.rate_limit,
        "rate_burst": cfg.rate_burst,
        "rate_sources": cfg.rate_sources,
        "max_in_flight": cfg.max_in_flight,
        "ipv6": cfg.ipv6,
        "mdns_backend": _mdns_summary(cfg.mdns_backend),
        "log_level": cfg.log_level,
        "log_format": cfg.log_format,
        "eucalyptus_version": cfg.eucavers,
        "fallback_registrar": (
            f"https://{cfg.fallback_registrar[0]}:{cfg.fallback_registrar[1]}"
            if cfg.fallback_registrar
            else None
        ),
        "fallback_after": cfg.fallback_after,
        "report_interval": cfg.report_interval,
        "dnssd": _dnssd_summary(cfg),
        "eucalyptus": {
            "deliver_keys": cfg.eucalyptus.deliver,
            "keys_dir": str(cfg.eucalyptus.keys_dir),
            "user": cfg.eucalyptus.user,
        },
        "ca_fingerprint": cfg.ca_fingerprint,
        "allowed_ranges": [str(net) for net in cfg.allowed_ranges],
        "runs_registrar": cfg.runs_registrar,
        "components": components,
    }
    if as_json:
        print_json(effective)
    else:
        console.print(f"[green]ok[/]: {config_path}")
        for key, value in effective.items():
            if key != "components":
                console.print(f"  {key:18} {value}", highlight=False)
        for comp in components:
            console.print(
                f"  {'component':18} {comp['role']:7} cluster={comp['cluster'] or '-'} "
                f"address={comp['address']}",
                highlight=False,
            )


def _dnssd_summary(cfg: Any) -> dict[str, Any] | None:
    """The `[dnssd]` table as check-config shows it (secrets by file name only)."""
    d = cfg.dnssd
    if d is None:
        return None
    return {
        "domain": d.domain,
        "server": f"{d.server[0]}:{d.server[1]}",
        "tsig_key_name": d.tsig_key_name,
        "tsig_secret_file": d.tsig_secret_file,
        "prune_key_name": d.prune_key_name,
        "refresh": d.refresh,
        "browse_interval": d.browse_interval,
        "mdns": d.mdns,
    }


@main.command()
@config_option("The host's TOML configuration.")
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
        print_json(rows)
        return
    for row in rows:
        click.echo(f"{row['role']:7} {row['component_id']:20} {row['fingerprint']}")


for command in (
    queries.status,
    queries.events,
    queries.pending,
    trust.register,
    importing.import_command,
    trust.approve,
    trust.reject,
    trust.deregister,
    trust.trust,
    trust.lock,
    trust.unlock,
    trust.mode,
    trust.install_mode,
    trust.token,
    join.join,
    discover.discover,
    setup.setup,
    ca.ca,
    backup.backup,
    backup.restore,
    backup.db,
):
    main.add_command(command)


if __name__ == "__main__":
    main()
