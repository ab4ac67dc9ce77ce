"""The configuration `eucareg setup` writes: the plan merged into the existing file (comments
kept) or into a new one (0600), checked by the parser the agent uses before it is written.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import NoReturn

import click

from eucareg.cli.common import fail
from eucareg.cli.setup_prompts import Asker, Plan, address, cluster_name, from_option
from eucareg.config import values as config_values
from eucareg.config.values import ConfigError
from eucareg.core.model import Role


def configured_cluster(path: Path, role: Role) -> str | None:
    """The cluster an existing configuration already gives `role` (a valid name), if any."""
    import tomllib

    try:
        body = tomllib.loads(path.read_text(encoding="utf-8")).get("components", {})
        name = body.get(role.value, {}).get("cluster")
        return cluster_name(name) if isinstance(name, str) else None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, AttributeError, ValueError):
        return None  # reported, if it matters, when the result is checked


def written(path: Path, plan: Plan, address_text: str | None, ask: Asker) -> tuple[str, bool]:
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
        given = from_option(address_text, address, "--address")
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


def write(path: Path, text: str, *, new: bool, secret: bool) -> None:
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


def report(path: Path, plan: Plan) -> None:
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
