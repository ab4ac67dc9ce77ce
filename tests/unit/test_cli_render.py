"""What people read: the status tree rows (creds, not announcing, reasons, unmatched clusters),
the trust line and the tables, rendered from registrar answers without any network.
"""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console

from eucareg.cli.render import events_table, pending_table, render_tree, tokens_table, trust_line

TRUST = {"mode": "local", "locked": [], "install_open": False, "install_remaining": 0.0}


def text_of(renderable: Any) -> str:
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def row(role: str, cid: str, status: str, **extra: Any) -> dict[str, Any]:
    return {
        "role": role,
        "component_id": cid,
        "address": "10.0.0.1",
        "status": status,
        "reason": f"why {cid}",
        "cluster": "c1",
        "online": True,
        "credentials_collected_at": None,
        "fingerprint": "sha256:ab",
        **extra,
    }


def test_the_tree_shows_each_row_as_documented() -> None:
    status = {
        "registrar": {"cluster": None, "trust": {**TRUST, "locked": ["cc"]}},
        "tree": {
            "clc": {"component_id": "clc-1", "address": "10.0.0.9"},
            "walrus": [row("walrus", "walrus-1", "registered", credentials_collected_at=1.0)],
            "clusters": [
                {
                    "name": "c1",
                    "cc": [row("cc", "cc-1", "registered", online=False)],
                    "sc": [row("sc", "sc-1", "pending")],
                    "nc": [],
                }
            ],
            "unmatched": [row("nc", "nc-9", "unmatched", cluster="c9")],
        },
    }
    lines = text_of(render_tree(status)).splitlines()
    assert lines[0] == (
        "cloud (CLC clc-1 at 10.0.0.9) mode local; locked: cc; install window closed"
    )
    assert lines[1:] == [
        "├── walrus",
        "│   └── walrus walrus-1 10.0.0.1 registered creds delivered",
        "├── cluster c1",
        "│   ├── cc cc-1 10.0.0.1 registered creds not collected (not announcing)",
        "│   └── sc sc-1 10.0.0.1 pending — why sc-1",
        "└── unmatched",
        "    └── nc nc-9 10.0.0.1 unmatched — why nc-9 (cluster c9)",
    ]


def test_a_cluster_registrar_without_walrus() -> None:
    status = {"registrar": {"cluster": "c1", "trust": TRUST}, "tree": {"clc": None}}
    assert text_of(render_tree(status)).splitlines() == [
        "cluster registrar c1 mode local; locked: nothing; install window closed",
        "└── walrus",
        "    └── none",
    ]


def test_the_trust_line_counts_down_an_open_window() -> None:
    line = trust_line({**TRUST, "install_open": True, "install_remaining": 89.6})
    assert line == "mode local; locked: nothing; install window open for 90s more"


def test_tables_hold_every_row() -> None:
    event = {
        "seq": 7,
        "at": 0.0,
        "kind": "refused",
        "role": "nc",
        "cluster": None,
        "component_id": "nc-1",
        "address": "10.0.0.1",
        "reason": "locked",
    }
    text = text_of(events_table([event]))
    assert "nc-1" in text and "refused" in text and " - " in text
    assert "why sc-1" in text_of(pending_table([row("sc", "sc-1", "pending")]))
    token: dict[str, Any] = {
        "token_id": "abcdefghijkl",
        "role": "nc",
        "cluster": None,
        "expires_at": 0.0,
        "uses": None,
        "used_by": [],
        "state": "expired",
    }
    text = text_of(tokens_table([token]))
    assert "abcdefghijkl" in text and "unlimited" in text and "expired" in text
