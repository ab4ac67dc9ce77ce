"""`eucareg backup`, `eucareg restore` and `eucareg db status|upgrade`: the commands that keep a
registrar host's state (docs/backup.md). They read and write files on this host; none of them
talks to the registrar's API.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import click

from eucareg.cli.common import (
    config_option,
    console,
    err_console,
    fail,
    json_option,
    load_config,
    print_json,
)

RUNNING = 5  # exit status: the agent runs on this state_dir (docs/cli.md, EXIT STATUS)

passphrase_option = click.option(
    "--passphrase-file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    metavar="PASSFILE",
    help="Encrypt (backup) or decrypt (restore) with the passphrase on this file's first line.",
)


def _passphrase(path: Path | None) -> bytes | None:
    from eucareg.backup.container import BackupError, read_passphrase

    if path is None:
        return None
    try:
        return read_passphrase(path)
    except BackupError as exc:
        fail(str(exc))


@click.command()
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@config_option("The host's TOML configuration (says where state_dir and key_dir are).")
@passphrase_option
@json_option
def backup(file: Path, config_path: Path, passphrase_file: Path | None, as_json: bool) -> None:
    """Write this host's registry, cloud CA, identity keys and secrets to FILE (mode 0600).

    Safe while the agent runs: the registry is copied as one consistent snapshot. FILE must
    not exist. Without --passphrase-file the file is not encrypted and holds the cloud CA's
    private key: keep it as you keep that key.
    """
    from eucareg.backup import container, contents

    cfg = load_config(config_path)
    passphrase = _passphrase(passphrase_file)
    file = file.absolute()
    if file.exists():
        fail(f"{file}: already exists; a backup never overwrites a file")
    try:
        with tempfile.TemporaryDirectory(dir=file.parent, prefix=".eucareg-backup-") as scratch:
            members = contents.collect(cfg, Path(scratch))
            if not members:
                fail(f"nothing to back up: {cfg.state_dir} holds no eucareg state", 1)
            manifest = contents.manifest(cfg, members, encrypted=passphrase is not None)
            payload = contents.pack(manifest, members)
        container.write_private(file, container.seal(payload, passphrase))
    except (container.BackupError, OSError) as exc:
        fail(str(exc), 1)
    summary = {"file": str(file), **{k: v for k, v in manifest.items() if k != "files"}}
    summary["files"] = [{"name": f["name"], "bytes": f["bytes"]} for f in manifest["files"]]
    if as_json:
        print_json(summary)
    else:
        console.print(f"wrote {file}", highlight=False)
        for f in manifest["files"]:
            console.print(f"  {f['name']:40} {f['bytes']:>10} bytes", highlight=False)
        console.print(
            f"  schema revision {manifest['schema_revision'] or '-'}, "
            f"cloud CA {manifest['ca_fingerprint'] or '-'}",
            highlight=False,
        )
    if passphrase is None:
        err_console.print(
            f"[bold yellow]WARNING:[/] {file} is NOT encrypted and holds this host's private "
            "keys (on the CLC, the cloud CA's): anyone who reads it can impersonate this "
            "registrar. Keep it as you keep those keys, or use --passphrase-file.",
            highlight=False,
        )


@click.command()
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@config_option("The host's TOML configuration (says where state_dir and key_dir are).")
@passphrase_option
@click.option(
    "--dry-run", is_flag=True, help="Check FILE and show what would change; change nothing."
)
@json_option
def restore(
    file: Path, config_path: Path, passphrase_file: Path | None, dry_run: bool, as_json: bool
) -> None:
    """Put a backup made by `eucareg backup` back on this host; the agent must be stopped.

    FILE is checked whole (checksums, seal, role, schema) before anything is touched. Each
    current file it replaces is moved into STATE_DIR/replaced-TIME/, never deleted, and an
    older registry is migrated. Restoring the same FILE again changes nothing.
    """
    from eucareg.backup import container, contents
    from eucareg.backup import restore as rst
    from eucareg.store.errors import SchemaTooNew
    from eucareg.store.owner import hold

    cfg = load_config(config_path)
    passphrase = _passphrase(passphrase_file)
    try:
        archive = contents.unpack(container.unseal(file, passphrase), file)
        rst.check_fits(archive, cfg)
        running = rst.agent_running(cfg)
        if running is not None:
            fail(
                f"{running}: stop the agent before restoring (systemctl stop eucareg-agent)",
                RUNNING,
            )
        if dry_run:
            _show(archive, rst.plan(archive, cfg), None, as_json, dry_run=True)
            return
        with hold(cfg.database) as pid:
            if pid is not None:
                fail(f"an agent (pid {pid}) started meanwhile: stop it first", RUNNING)
            result = rst.apply(archive, cfg)
    except (container.BackupError, SchemaTooNew, OSError) as exc:
        fail(str(exc), 1)
    _show(archive, result.steps, result, as_json, dry_run=False)


def _show(archive: Any, steps: list[Any], result: Any, as_json: bool, *, dry_run: bool) -> None:
    m = archive.manifest
    info = {
        "dry_run": dry_run,
        "made_by": m["eucareg_version"],
        "created_at": m["created_at"],
        "host": m["host"],
        "schema_revision": m["schema_revision"],
        "ca_fingerprint": m["ca_fingerprint"],
        "components": m["components"],
        "files": [{"name": s.name, "target": str(s.target), "action": s.action} for s in steps],
        "changed": any(s.action != "same" for s in steps),
        "replaced_into": str(result.aside) if result and result.aside else None,
        "migrated": result.migrated if result else [],
        "config_differs": bool(result and result.config_differs),
    }
    if as_json:
        print_json(info)
        return
    head = "would restore" if dry_run else "restored"
    console.print(
        f"{head} the backup of {m['host']} made {m['created_at']} by eucareg "
        f"{m['eucareg_version']} (schema {m['schema_revision'] or '0.1.0'}, "
        f"cloud CA {m['ca_fingerprint'] or '-'})",
        highlight=False,
    )
    for s in steps:
        console.print(f"  {s.action:8} {s.target}", highlight=False)
    if not info["changed"]:
        console.print("nothing to do: this host already holds exactly this backup")
    if result is not None and result.aside is not None:
        console.print(f"the files it replaced are in {result.aside}", highlight=False)
    for step in info["migrated"]:
        console.print(f"registry: {step}", highlight=False)
    if info["config_differs"]:
        err_console.print(
            "[yellow]warning:[/] the backup's configuration differs from "
            f"{m['config'] or 'this one'}; yours was kept"
            + (f", the backup's is in {result.aside}/config" if result and result.aside else ""),
            highlight=False,
        )


@click.group()
def db() -> None:
    """The registry database's schema: see where it stands, or upgrade it."""


@db.command("status")
@config_option("The host's TOML configuration.")
@json_option
def db_status(config_path: Path, as_json: bool) -> None:
    """Show the registry's schema revision, the one this eucareg knows, and what an upgrade
    would apply. Exit status 1 when the registry is newer than this eucareg."""
    import sqlalchemy as sa

    from eucareg.store.registry import sqlite_url
    from eucareg.store.upgrade import schema_state, scripts

    cfg = load_config(config_path)
    if not cfg.database.exists():
        state: dict[str, Any] = {
            "state": "missing",
            "revision": None,
            "head": scripts().get_current_head(),
            "pending": [],
        }
    else:
        engine = sa.create_engine(sqlite_url(cfg.database))
        try:
            state = schema_state(engine).as_dict()
        except sa.exc.DatabaseError as exc:
            fail(f"{cfg.database}: not a readable registry: {exc.orig}", 1)
        finally:
            engine.dispose()
    state = {"database": str(cfg.database), **state}
    if as_json:
        print_json(state)
    else:
        for key in ("database", "state", "revision", "head"):
            console.print(f"{key:9} {state[key] or '-'}", highlight=False)
        console.print(f"{'pending':9} {' '.join(state['pending']) or '-'}", highlight=False)
    if state["state"] == "newer":
        raise SystemExit(1)


@db.command("upgrade")
@config_option("The host's TOML configuration.")
@json_option
def db_upgrade(config_path: Path, as_json: bool) -> None:
    """Bring the registry to this eucareg's schema now, as the agent does when it starts
    (a copy of the file is kept first). The agent must be stopped."""
    import sqlalchemy as sa

    from eucareg.store.errors import SchemaTooNew
    from eucareg.store.owner import LockRefused, hold
    from eucareg.store.registry import sqlite_url
    from eucareg.store.upgrade import upgrade

    cfg = load_config(config_path)
    if not cfg.database.exists():
        fail(f"{cfg.database}: no registry here (the agent creates it when it first starts)", 1)
    try:
        with hold(cfg.database) as pid:
            if pid is not None:
                fail(f"an agent (pid {pid}) holds {cfg.database}: stop it first", RUNNING)
            engine = sa.create_engine(sqlite_url(cfg.database))
            try:
                done = upgrade(engine, lock_held=True)
            finally:
                engine.dispose()
    except SchemaTooNew as exc:
        fail(str(exc), 1)
    except sa.exc.DatabaseError as exc:
        fail(f"{cfg.database}: not a readable registry: {exc.orig}", 1)
    except LockRefused as exc:
        fail(str(exc), 1)
    if as_json:
        print_json({"database": str(cfg.database), "done": done})
        return
    for step in done or ["already at this eucareg's schema; nothing to do"]:
        console.print(step, highlight=False)
