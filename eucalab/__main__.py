"""`python -m eucalab` (or `eucalab`): the lab's command line; `make demo` runs its `demo`."""

from __future__ import annotations

import sys

import click


@click.group()
def main() -> None:
    """eucalab: isolated network-namespace labs for eucareg (never the host's real network)."""


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print only the final status as JSON.")
@click.option("--nodes", type=click.IntRange(1, 20), default=2, show_default=True)
@click.option(
    "--timeout", type=float, default=60.0, show_default=True, help="Seconds to wait for the cloud."
)
def demo(as_json: bool, nodes: int, timeout: float) -> None:
    """Build the design's first test topology (CLC+Walrus+CC+SC on one host, plus NCs) in an
    isolated network-namespace lab, show the announcements and decisions as they happen and
    the final tree, then tear the lab down."""
    from eucalab.demo import run_demo

    sys.exit(run_demo(as_json=as_json, nodes=nodes, timeout=timeout))


if __name__ == "__main__":
    main()
