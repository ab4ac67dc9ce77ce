"""`eucareg ca show|renew|rotate`, on the CLC: the cloud CA certificate (cloud-cert.pem) as it
stands; renewing it for the same key, which a running agent takes up at once; and replacing the
key itself, with a handover signed by the old one (agent stopped).
"""

from __future__ import annotations

import datetime
import time
from pathlib import Path
from typing import Any

import click
from cryptography import x509

from eucareg.cli.common import config_option, fail, load_config, print_json
from eucareg.config.file import SOCKET_FILE, Config
from eucareg.core import grammar, renewal
from eucareg.core.model import Role
from eucareg.pki import certificates, keypairs
from eucareg.pki import credentials as cred


@click.group()
def ca() -> None:
    """The cloud CA on the CLC (docs/credentials.md, "Renewing the cloud CA" and "Replacing
    the CA key")."""


@ca.command()
@config_option("The CLC's TOML configuration.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show(config_path: Path, as_json: bool) -> None:
    """Print the cloud CA certificate's key fingerprint (what components pin), serial,
    validity and when it is renewed; after `ca rotate`, the key it hands over from, and until
    when."""
    from eucareg.pki import handover

    key_dir, key = _clc(load_config(config_path))
    cert = _held(key_dir, key)
    info = describe(cert, time.time())
    passed = handover.load_held(key_dir / handover.HANDOVER, cert, time.time())
    if passed is not None:  # after `ca rotate`, while components may still move
        info["handover_from"] = passed.old_fingerprint
        info["handover_until"] = _iso(passed.ends)
    _print(info, as_json)


@ca.command()
@config_option("The CLC's TOML configuration.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def renew(config_path: Path, as_json: bool) -> None:
    """Renew the cloud CA certificate now, for the same key and name: 20 years from now.
    Nothing any component holds stops working, no pin changes (pins are key fingerprints);
    the running agent serves the new certificate at once and hands it to every component
    with its next bundle. Run it as root on the CLC."""
    from eucareg.agent.cloudca import renew_held

    key_dir, key = _clc(load_config(config_path))
    old = _held(key_dir, key)
    try:
        new = renew_held(key_dir, key, time.time(), old)
    except (OSError, keypairs.CredentialError) as exc:
        fail(f"cannot renew {key_dir / cred.CLOUD_CERT}: {exc}", 1)
    info = describe(new, time.time())
    info["previous_serial"] = format(old.serial_number, "x")
    _print(info, as_json)


@ca.command()
@config_option("The CLC's TOML configuration.")
@click.option(
    "--overlap",
    metavar="DURATION",
    default="30d",
    show_default=True,
    help="How long components may still move from the old key (e.g. 12h, 30d; 10m to 366d).",
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def rotate(config_path: Path, overlap: str, yes: bool, as_json: bool) -> None:
    """Replace the cloud CA key (a planned change, never a remedy for a stolen key: see
    docs/credentials.md). Stop the CLC's agent first, then start it again: it serves the new
    CA with a handover signed by the old key, every component moves its pin and gets its
    certificate re-issued under the new key within the overlap (no hook runs, nothing is
    unregistered). Join tokens made before still pin the old key: make new ones."""
    from eucareg.agent import rotation

    cfg = load_config(config_path)
    try:
        seconds = grammar.duration(overlap, "--overlap", high=rotation.MAX_OVERLAP)
    except grammar.Invalid as exc:
        fail(str(exc))
    if seconds < rotation.MIN_OVERLAP:
        fail(f"--overlap: must be at least 10m (components must have time to move), got {overlap}")
    key_dir, _key = _clc(cfg)
    if rotation.agent_running(cfg.state_dir):
        fail(
            f"the agent is running ({cfg.state_dir / SOCKET_FILE} answers): stop it first "
            "(systemctl stop eucareg-agent), rotate, then start it again",
            1,
        )
    if not yes and not click.confirm(
        "Replace the cloud CA key? Components that stay offline for the whole overlap must be "
        "moved by hand afterwards",
        err=True,
    ):
        fail("not rotated", 1)
    from eucareg.store.owner import hold

    try:
        # The registrar's lock, held throughout: an agent started during the prompt or the
        # rotation (its registrar claims this lock) would serve the old key over the new one.
        with hold(cfg.database) as pid:
            if pid is not None or rotation.agent_running(cfg.state_dir):
                fail(f"an agent (pid {pid or 'unknown'}) started meanwhile: stop it first", 1)
            done = rotation.rotate(cfg.state_dir, key_dir, seconds, time.time())
    except (OSError, keypairs.CredentialError) as exc:
        fail(f"cannot rotate the cloud CA key: {exc}", 1)
    info: dict[str, Any] = {
        "previous_fingerprint": done.old_fingerprint,
        "fingerprint": done.new_fingerprint,
        "handover_until": _iso(done.overlap_ends),
        "retired_key": str(done.retired_key),
        "next": "start the agent; make new join tokens; set ca_fingerprint to the new "
        "fingerprint where a configuration names the old one",
    }
    _print(info, as_json)


def describe(cert: x509.Certificate, now: float) -> dict[str, Any]:
    validity = certificates.validity(cert)
    margin = renewal.ca_margin()
    return {
        "fingerprint": certificates.cert_fingerprint(cert),
        "serial": format(cert.serial_number, "x"),
        "subject": cert.subject.rfc4514_string(),
        "not_before": _iso(validity.not_before),
        "not_after": _iso(validity.not_after),
        "renew_at": _iso(renewal.due_at(validity, margin)),
        "state": renewal.phase(validity, margin, now).value,
    }


def _print(info: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(info)
        return
    width = max(len(k) for k in info)
    for name, value in info.items():
        click.echo(f"{name.replace('_', ' '):{width}}  {value}")


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _clc(cfg: Config) -> tuple[Path, keypairs.PrivateKey]:
    from eucareg.agent.identity import identity_key

    if cfg.component(Role.CLC) is None:
        fail("this host runs no CLC: the cloud CA lives on the CLC (components = [clc ...])")
    path = identity_key(cfg, Role.CLC)
    try:
        return cfg.key_dir, keypairs.load_key(path)
    except keypairs.CredentialError as exc:
        fail(f"cannot read the CLC's key (run this as root on the CLC): {exc}", 1)


def _held(key_dir: Path, key: keypairs.PrivateKey) -> x509.Certificate:
    from eucareg.pki.cloud import read_held

    try:
        return read_held(key_dir, key)
    except keypairs.CredentialError as exc:
        fail(f"{key_dir / cred.CLOUD_CERT}: {exc}", 1)
