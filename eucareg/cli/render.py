"""How the operator commands show registrar answers to people: the status tree, the trust line
and the tables of events, pending components and tokens (formats in docs/cli.md). Pure: data in,
rich renderables or strings out.
"""

from __future__ import annotations

import datetime
from typing import Any

from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

STATUS_STYLE = {
    "registered": "green",
    "registering": "cyan",
    "pending": "yellow",
    "failed": "red",
    "refused": "red",
    "expired": "magenta",
    "unmatched": "magenta",
    "replaced": "magenta",
    "awaiting-key": "cyan",
    "rejected": "red",
}


def trust_line(trust: dict[str, Any]) -> str:
    locked = ", ".join(trust.get("locked", [])) or "nothing"
    if trust.get("install_open"):
        window = f"open for {trust['install_remaining']:.0f}s more"
    else:
        window = "closed"
    return f"mode {trust['mode']}; locked: {locked}; install window {window}"


def component_line(comp: dict[str, Any]) -> str:
    """One row of the tree: role id address status[ creds …][ (not announcing)][ — reason]."""
    state = comp.get("status", "?")
    style = STATUS_STYLE.get(state, "white")
    online = "" if comp.get("online", True) else " [dim](not announcing)[/]"
    creds = ""
    if state == "registered":
        creds = (
            " creds delivered" if comp.get("credentials_collected_at") else " creds not collected"
        )
    detail = f" — {comp['reason']}" if state != "registered" else ""
    return (
        f"[bold]{comp['role']}[/] {comp['component_id']} {comp['address']} "
        f"[{style}]{state}[/]{creds}{online}{detail}"
    )


def render_tree(data: dict[str, Any]) -> Tree:
    """The `status` tree from a GET /v1/status answer."""
    tree_data = data.get("tree", {})
    clc = tree_data.get("clc")
    registrar = data.get("registrar", {})
    trust = f" [dim]{trust_line(registrar['trust'])}[/]" if "trust" in registrar else ""
    if clc:
        root = Tree(f"[bold]cloud[/] (CLC {clc['component_id']} at {clc['address']}){trust}")
    else:
        root = Tree(f"[bold]cluster registrar[/] {registrar.get('cluster') or ''}{trust}")
    walrus = tree_data.get("walrus", [])
    walrus_node = root.add("[bold]walrus[/]")
    if not walrus:
        walrus_node.add("[dim]none[/]")
    for comp in walrus:
        walrus_node.add(component_line(comp))
    for cluster in tree_data.get("clusters", []):
        node = root.add(f"[bold]cluster {cluster['name']}[/]")
        for role in ("cc", "sc", "nc"):
            for comp in cluster[role]:
                node.add(component_line(comp))
    unmatched = tree_data.get("unmatched", [])
    if unmatched:
        node = root.add("[bold magenta]unmatched[/]")
        for comp in unmatched:
            node.add(component_line(comp) + f" (cluster {comp.get('cluster')})")
    mdns = data.get("mdns")
    if mdns:
        root.add(escape(f"mDNS: {mdns['backend']} ({mdns['reason']})"))
    legacy = data.get("legacy", [])
    if legacy:
        # Pre-eucareg components (docs/mdns.md, "Legacy announcements"); names are anyone's.
        node = root.add("[bold yellow]legacy (not registered)[/]")
        for comp in legacy:
            cluster = f" cluster {comp['cluster']}" if comp.get("cluster") else ""
            node.add(
                escape(
                    f"{comp['role']} {comp['instance']!r}{cluster} {comp['address'] or '?'} "
                    f"Eucalyptus {comp['kind']}"
                )
            )
    return root


def _styled(value: str) -> str:
    style = STATUS_STYLE.get(value, "")
    return f"[{style}]{value}[/]" if style else value


def _table(*columns: str) -> Table:
    table = Table(header_style="bold")
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def events_table(rows: list[dict[str, Any]]) -> Table:
    table = _table(
        "seq", "time", "kind", "role", "cluster", "component", "address", "via", "reason"
    )
    for row in rows:
        stamp = datetime.datetime.fromtimestamp(row["at"]).strftime("%H:%M:%S.%f")[:-3]
        table.add_row(
            str(row["seq"]),
            stamp,
            _styled(row["kind"]),
            row["role"],
            row["cluster"] or "-",
            row["component_id"],
            row["address"],
            row.get("via") or "-",
            row["reason"],
        )
    return table


def pending_table(rows: list[dict[str, Any]]) -> Table:
    table = _table("id", "role", "cluster", "address", "status", "fingerprint", "why")
    for row in rows:
        table.add_row(
            row["component_id"],
            row["role"],
            row["cluster"] or "-",
            row["address"],
            _styled(row["status"]),
            row["fingerprint"],
            row["reason"],
        )
    return table


def tokens_table(rows: list[dict[str, Any]]) -> Table:
    table = _table("token", "role", "cluster", "expires", "uses", "used by", "state")
    for row in rows:
        expires = datetime.datetime.fromtimestamp(row["expires_at"]).strftime("%Y-%m-%d %H:%M")
        table.add_row(
            row["token_id"],
            row["role"],
            row["cluster"] or "-",
            expires,
            "unlimited" if row["uses"] is None else str(row["uses"]),
            ", ".join(row["used_by"]) or "-",
            row["state"],
        )
    return table
