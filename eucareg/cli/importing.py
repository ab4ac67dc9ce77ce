"""`eucareg import`: adopt what an Ubuntu 9.10/10.04 (Eucalyptus 1.6.2) front end registered.
Reads the `euca_conf --list-*` output (the truth) and cross-checks the old configuration and
key directory, shows the plan, records it through the local registrar (POST /v1/import), then
stops the old registration jobs. docs/upgrade.md walks through it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import click

from eucareg.cli.client import Api, with_api_options
from eucareg.cli.common import console, err_console, fail, json_option, print_json
from eucareg.core.model import Role
from eucareg.upgrade import jobs
from eucareg.upgrade.checks import cross_check
from eucareg.upgrade.keys import read_keys
from eucareg.upgrade.plan import BLOCKING, MAX_IMPORT, Action, PlanRow, elsewhere
from eucareg.upgrade.sources import (
    MAX_TEXT,
    Listed,
    Listing,
    Problem,
    canonical_address,
    parse_listing,
    parse_pins,
    read_conf,
    read_text,
)

LIST_COMMAND = ("euca_conf", "--list-walruses", "--list-clusters", "--list-scs", "--list-nodes")
COMMAND_TIMEOUT = 120.0
ACTION_STYLE = {
    Action.IMPORT: "green",
    Action.REGISTERED: "dim",
    Action.ELSEWHERE: "dim",
    Action.CONFLICT: "red",
    Action.REFUSED: "red",
}


@click.command("import")
@with_api_options
@json_option
@click.option(
    "--root",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    default=Path("/"),
    show_default=True,
    help="Read /etc/eucalyptus and /var/lib/eucalyptus, and stop the jobs of /etc/init, "
    "under this directory (a chroot, a copy of the old front end).",
)
@click.option(
    "--list-file",
    type=click.Path(path_type=Path, dir_okay=False, allow_dash=True),
    help="A file holding the output of `euca_conf --list-walruses --list-clusters --list-scs "
    "--list-nodes` (on the CLC); - reads standard input.",
)
@click.option(
    "--from-command",
    is_flag=True,
    help="Run `euca_conf --list-walruses --list-clusters --list-scs --list-nodes` (euca_conf "
    "from PATH, on the CLC) and import what it prints.",
)
@click.option(
    "--fingerprints",
    "pins_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Lines of 'ROLE ADDRESS sha256:…' (`eucareg fingerprint` on each component's host): "
    "only the component with that key may take the listed registration over.",
)
@click.option("--dry-run", is_flag=True, help="Show the plan and change nothing.")
@click.option("--yes", "-y", is_flag=True, help="Import without asking for confirmation.")
@click.option(
    "--keep-legacy-jobs",
    is_flag=True,
    help="Do not stop uec-component-listener and the eucalyptus-*-publication jobs.",
)
@click.option(
    "--legacy-jobs-only",
    is_flag=True,
    help="Only stop and disable the legacy jobs (on hosts that run no registrar: NCs, a "
    "separate Walrus or SC).",
)
def import_command(
    api: Api,
    as_json: bool,
    root: Path,
    list_file: Path | None,
    from_command: bool,
    pins_file: Path | None,
    dry_run: bool,
    yes: bool,
    keep_legacy_jobs: bool,
    legacy_jobs_only: bool,
) -> None:
    """Import what an existing Eucalyptus 1.6.2 cloud (Ubuntu 9.10 or 10.04) registered: the
    registrations `euca_conf --list-*` shows become eucareg records, `registered` and
    claimable, with no hook run. The eucareg agent installed on each component then takes
    its registration over (it proves its key). The CLC's registrar imports the Walrus, CCs
    and SCs; each CC's registrar imports the NCs of its cluster: run it on each. Stops the
    legacy registration jobs afterwards. Run it with --dry-run first."""
    if legacy_jobs_only:
        if list_file or from_command or pins_file or dry_run or keep_legacy_jobs:
            fail(
                "--legacy-jobs-only takes no listing, --fingerprints, --dry-run or "
                "--keep-legacy-jobs"
            )
        results = jobs.stop_legacy_jobs(root)
        _finish(as_json, {"legacy_jobs": [r.json() for r in results]}, results)
        return
    if bool(list_file) == from_command:
        fail("give the listing to import: --list-file FILE or --from-command (one of the two)")
    text, origin = _listing_text(list_file)
    listing = parse_listing(text, origin)
    fatal = [p for p in listing.problems if p.fatal]
    if fatal:
        _print_problems(fatal, "error")
        fail(
            f"the listing cannot be imported as it stands ({len(fatal)} problem(s) above); "
            "nothing was changed",
            1,
        )
    if not listing.components:
        fail(f"{origin} lists no component (no 'registered ...:' entries); nothing to import", 1)
    pins = _pins(pins_file, listing)
    registrar = api.field(api.get("/v1/registry"), "registrar", dict)
    registers = frozenset(Role(r) for r in registrar.get("registers", []))
    own = registrar.get("cluster")
    try:
        conf, keys = read_conf(root), read_keys(root)
    except (OSError, ValueError) as exc:
        fail(f"cannot read the old configuration: {exc}", 1)
    warnings = [
        *(p for p in listing.problems if not p.fatal),
        *conf.problems,
        *cross_check(listing, conf, keys, own),
    ]
    rows = _plan(api, listing, pins, registers, own, origin, dry_run=True)
    report: dict[str, Any] = {
        "dry_run": dry_run,
        "plan": [r.json() for r in rows],
        "warnings": [str(w) for w in warnings],
        "imported": 0,
        "legacy_jobs": [],
    }
    if not as_json:
        _show(rows, warnings)
    blocked = [r for r in rows if r.action in BLOCKING]
    if blocked:
        if as_json:
            print_json(report)
        fail(
            f"nothing imported: {len(blocked)} component(s) conflict or are refused (see "
            "the plan); fix the listing or the registry and run it again",
            1,
        )
    todo = sum(1 for r in rows if r.action is Action.IMPORT)
    if dry_run:
        _finish(as_json, report, [], f"dry run: nothing changed; {todo} to import")
        return
    if todo and not yes:
        if not sys.stdin.isatty():
            fail("give --yes to import without a terminal to confirm on")
        if not click.confirm(f"import {todo} component(s) as registered, with no hook?"):
            fail("nothing imported", 1)
    if todo:
        rows = _plan(api, listing, pins, registers, own, origin, dry_run=False)
        report["plan"] = [r.json() for r in rows]
        report["imported"] = sum(1 for r in rows if r.action is Action.IMPORT)
    results = [] if keep_legacy_jobs else jobs.stop_legacy_jobs(root)
    report["legacy_jobs"] = [r.json() for r in results]
    report["dry_run"] = False
    _finish(as_json, report, results, _imported_line(rows, todo))


def _listing_text(list_file: Path | None) -> tuple[str, str]:
    if list_file is None:
        return _run_euca_conf(), " ".join(LIST_COMMAND)
    if str(list_file) == "-":
        # Bounded like a file: a runaway pipe is refused, not read into memory whole.
        data = sys.stdin.buffer.read(MAX_TEXT + 1)
        if len(data) > MAX_TEXT:
            fail(f"<stdin>: larger than {MAX_TEXT} bytes; not a euca_conf listing", 1)
        return data.decode("utf-8", errors="replace"), "<stdin>"
    try:
        text = read_text(list_file)
    except (OSError, ValueError) as exc:
        fail(f"cannot read {list_file}: {exc}", 1)
    if text is None:
        fail(f"{list_file}: no such file", 1)
    return text, str(list_file)


def euca_conf_path() -> str | None:
    """euca_conf from PATH, searching only its absolute entries: root's PATH holding `.`, an
    empty or a relative entry must not run a euca_conf from the working directory as root."""
    entries = os.environ.get("PATH", os.defpath).split(os.pathsep)
    trusted = os.pathsep.join(e for e in entries if os.path.isabs(e))
    return shutil.which(LIST_COMMAND[0], path=trusted) if trusted else None


def _run_euca_conf() -> str:
    program = euca_conf_path()
    if program is None:
        fail(
            f"{LIST_COMMAND[0]} is not in any absolute directory of PATH (relative entries "
            "are not searched); run it yourself and give its output with --list-file",
            1,
        )
    try:
        done = subprocess.run(
            [program, *LIST_COMMAND[1:]],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        fail(f"cannot run {' '.join(LIST_COMMAND)}: {exc}", 1)
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip()[-500:]
        fail(f"{' '.join(LIST_COMMAND)} failed (exit {done.returncode}): {detail}", 1)
    if len(done.stdout) > MAX_TEXT:
        fail(f"{program} printed more than {MAX_TEXT} characters: not a euca_conf listing", 1)
    return done.stdout


def _pins(path: Path | None, listing: Listing) -> dict[tuple[Role, str], str]:
    """The keys given with --fingerprints, each for a listed component; else exit 1."""
    if path is None:
        return {}
    try:
        text = read_text(path)
    except (OSError, ValueError) as exc:
        fail(f"cannot read {path}: {exc}", 1)
    if text is None:
        fail(f"{path}: no such file", 1)
    pins, problems = parse_pins(text, str(path))
    listed = {(c.role, canonical_address(c.address)) for c in listing.components}
    strays = [
        Problem(str(path), f"a key for {role.value} at {address}, which the listing does not list")
        for role, address in pins
        if (role, address) not in listed
    ]
    if problems or strays:
        _print_problems([*problems, *strays], "error")
        fail(f"{path} cannot be used as it stands (above); nothing was changed", 1)
    return pins


def _plan(
    api: Api,
    listing: Listing,
    pins: dict[tuple[Role, str], str],
    registers: frozenset[Role],
    own: str | None,
    origin: str,
    *,
    dry_run: bool,
) -> list[PlanRow]:
    """The registrar's plan for the components it registers, and, in listing order, the
    others marked as another registrar's."""
    mine = [c for c in listing.components if not elsewhere(c.role, c.cluster, registers, own)]
    if len(mine) > MAX_IMPORT:
        fail(f"{len(mine)} components for one registrar; one import takes at most {MAX_IMPORT}", 1)
    answered: list[dict[str, Any]] = []
    if mine:
        body = {
            "components": [_component(c, pins) for c in mine],
            "dry_run": dry_run,
            "source": origin[-200:],
        }
        answered = api.field(api.post("/v1/import", body), "plan", list)
        if len(answered) != len(mine):
            api.not_a_registrar("its plan does not answer each component")
    by_entry = dict(zip((id(c) for c in mine), answered, strict=True))
    return [_row(c, by_entry.get(id(c)), registers, own) for c in listing.components]


def _component(entry: Listed, pins: dict[tuple[Role, str], str]) -> dict[str, str]:
    """One component of the request body; absent fields left out (the body is bounded)."""
    body = {"role": entry.role.value, "address": entry.address}
    if entry.cluster:
        body["cluster"] = entry.cluster
    key = pins.get((entry.role, canonical_address(entry.address)))
    if key:
        body["fingerprint"] = key
    return body


def _row(
    entry: Listed, answer: dict[str, Any] | None, registers: frozenset[Role], own: str | None
) -> PlanRow:
    if answer is None:
        reason = elsewhere(entry.role, entry.cluster, registers, own)
        return PlanRow(
            entry.role, entry.cluster, entry.address, Action.ELSEWHERE, reason, None, entry.where
        )
    return PlanRow(
        entry.role,
        entry.cluster,
        str(answer.get("address", entry.address)),
        Action(answer["action"]),
        str(answer.get("reason", "")),
        answer.get("component_id"),
        entry.where,
        answer.get("fingerprint") or "",
    )


def _show(rows: list[PlanRow], warnings: list[Problem]) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("ROLE", "CLUSTER", "ADDRESS", "ACTION", "LINE", "DETAIL"):
        table.add_column(column)
    for r in rows:
        style = ACTION_STYLE[r.action]
        action = r.action.value.replace("-", " ")
        table.add_row(
            r.role.value,
            escape(r.cluster or "-"),
            escape(r.address),
            f"[{style}]{action}[/]",
            escape(r.where.rpartition(":")[2]),  # the line of the listing (the file is known)
            escape(r.reason + (f" ({r.component_id})" if r.component_id else "")),
        )
    console.print(table)
    _print_problems(warnings, "warning")


def _print_problems(problems: list[Problem], label: str) -> None:
    from rich.markup import escape

    for problem in problems:
        err_console.print(f"[yellow]{label}:[/] {escape(str(problem))}", highlight=False)


def _imported_line(rows: list[PlanRow], todo: int) -> str:
    done = sum(1 for r in rows if r.action is Action.IMPORT)
    held = sum(1 for r in rows if r.action is Action.REGISTERED)
    if not todo:
        return f"nothing to import ({held} already registered)"
    return (
        f"imported {done} component(s) as registered, no hook run ({held} already "
        "registered); start the eucareg agent on each: it takes its registration over"
    )


def _finish(
    as_json: bool, report: dict[str, Any], results: list[jobs.JobResult], line: str = ""
) -> None:
    if as_json:
        print_json(report)
    else:
        if line:
            console.print(line, highlight=False)
        for r in results:
            console.print(
                f"legacy job {r.name} ({r.system}): {r.stopped}; {r.disabled}",
                highlight=False,
                markup=False,
            )
        if not results and "legacy_jobs" in report and not report.get("dry_run"):
            console.print("legacy jobs: none found here", highlight=False)
    if any(not r.ok for r in results):
        fail(
            "some legacy jobs could not be stopped or disabled (above): stop them by hand, "
            "or components may be registered twice",
            1,
        )
