"""Operator commands that only look: `status` (the cloud as a tree), `events` (the decision log,
as a table, JSON or CSV) and `pending` (what waits for the operator or a dependency).
"""

from __future__ import annotations

import csv
import sys

import click

from eucareg.cli.client import Api, with_api_options
from eucareg.cli.common import console, err_console, json_option, print_json

EVENT_KINDS = (
    "pending, awaiting-key, registering, registered, failed, refused, rejected, expired, "
    "unmatched, matched, replaced, hook, approved, deregistered, credentials, trust, summary, "
    "adopted, adopted-by, legacy, imported"
)
# `via` last: it came later (registry revision 0003), and scripts may read columns by position.
CSV_FIELDS = [
    "seq",
    "at",
    "kind",
    "code",
    "role",
    "cluster",
    "component_id",
    "address",
    "reason",
    "via",
]


@click.command()
@with_api_options
@json_option
def status(api: Api, as_json: bool) -> None:
    """Show the cloud as a tree: cloud -> Walrus, clusters -> CC, SC and NCs, with each
    component's state, address and whether it is announcing right now."""
    data = api.get("/v1/status")
    api.field(data, "tree", dict)
    if as_json:
        print_json(data, sort_keys=True)
        return
    from eucareg.cli.render import render_tree  # rich, only to print

    console.print(render_tree(data))
    for line in [*data.get("warnings", []), *data.get("errors", [])]:
        err_console.print(f"[yellow]warning:[/] {line}", highlight=False)


@click.command()
@with_api_options
@json_option
@click.option("--component", help="Only events of this component id.")
@click.option("--kind", help=f"Only this kind: {EVENT_KINDS}.")
@click.option("--role", type=click.Choice(["walrus", "cc", "sc", "nc"]), help="Only this role.")
@click.option("--cluster", help="Only this cluster.")
@click.option(
    "--since", type=click.IntRange(0), default=0, show_default=True, help="Only after this seq."
)
@click.option("--limit", type=click.IntRange(1, 100_000), default=200, show_default=True)
@click.option("--csv", "as_csv", is_flag=True, help="Export as CSV (one row per event).")
def events(
    api: Api,
    as_json: bool,
    component: str | None,
    kind: str | None,
    role: str | None,
    cluster: str | None,
    since: int,
    limit: int,
    as_csv: bool,
) -> None:
    """List the registrar's decisions with their reasons, oldest first (the newest LIMIT)."""
    params = {"since": str(since), "limit": str(limit)}
    filters = {"component": component, "kind": kind, "role": role, "cluster": cluster}
    params.update({key: value for key, value in filters.items() if value})
    rows = api.field(api.get("/v1/events", params), "events", list)
    if as_json:
        print_json(rows)
    elif as_csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    else:
        from eucareg.cli.render import events_table  # rich, only to print

        console.print(events_table(rows))


@click.command()
@with_api_options
@json_option
def pending(api: Api, as_json: bool) -> None:
    """List components that are not registered: waiting for approval or a dependency,
    waiting to prove their key, expired, or refused."""
    rows = api.field(api.get("/v1/pending"), "pending", list)
    if as_json:
        print_json(rows)
    else:
        from eucareg.cli.render import pending_table  # rich, only to print

        console.print(pending_table(rows))
