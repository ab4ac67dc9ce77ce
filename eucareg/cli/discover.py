"""`eucareg discover clc` and `eucareg discover clusters`: what announces itself on this LAN,
heard over mDNS for a few seconds, with no configuration and no registrar. For installers: the
CLC's address and the key fingerprint to pin, and which clusters have a CC, registered or not.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import click

from eucareg.cli.common import console, err_console, fail, print_json
from eucareg.config.values import ConfigError, parse_duration
from eucareg.core import txt
from eucareg.core.model import AnnouncedState, Announcement, Role
from eucareg.mdns.types import Change, Sighting

if TYPE_CHECKING:
    from rich.table import Table

DEFAULT_TIMEOUT = "3s"
MAX_TIMEOUT = 300.0  # longer is a typo: announcements answer a query within a second
# Exit statuses (docs/cli.md, "discover").
FOUND = 0
NOTHING = 1
AMBIGUOUS = 3  # more than one CLC: a script must not pin one of them blindly

FC = TypeVar("FC", bound=Callable[..., Any])


class Heard:
    """A browser's handler: the latest sighting of each instance still announced."""

    def __init__(self) -> None:
        self._latest: dict[str, Sighting] = {}

    def on_sighting(self, sighting: Sighting) -> None:
        if sighting.change is Change.REMOVED:
            self._latest.pop(sighting.instance, None)
        else:
            self._latest[sighting.instance] = sighting

    def sightings(self) -> list[Sighting]:
        return list(self._latest.values())


@dataclass(frozen=True)
class Survey:
    """The sightings decoded as a registrar decodes them; `ignored` are the refused ones."""

    announcements: tuple[Announcement, ...]
    ignored: tuple[dict[str, str], ...] = ()


@dataclass(frozen=True)
class Outcome:
    """What a discover command prints (`data` is its --json object) and how it exits."""

    data: dict[str, Any]
    status: int
    error: str | None = None
    warnings: tuple[str, ...] = ()


def survey(sightings: Iterable[Sighting]) -> Survey:
    """Decode every sighting with the registrar's checks (core/txt.py): anyone on the LAN can
    announce, so what fails is ignored, with the code and reason a registrar would log."""
    good: list[Announcement] = []
    bad: list[dict[str, str]] = []
    for sighting in sightings:
        result = txt.decode(sighting.instance, sighting.txt, sighting.addresses)
        if isinstance(result, Announcement):
            good.append(result)
        else:
            bad.append(
                {"instance": sighting.instance, "code": result.code, "reason": result.reason}
            )
    return Survey(tuple(good), tuple(sorted(bad, key=lambda b: b["instance"])))


def _address_key(address: str) -> tuple[int, int]:
    parsed = ipaddress.ip_address(address)
    return parsed.version, int(parsed)


def _merge(
    rows: dict[tuple[Any, ...], dict[str, Any]], key: tuple[Any, ...], row: dict[str, Any]
) -> None:
    """One row per distinct announced values: twins under other instance names (a responder's
    '#2' rename, another address family; lesson L2) add their instance name only."""
    instance = row.pop("instance")
    rows.setdefault(key, {**row, "instances": []})["instances"].append(instance)


def _sorted(rows: dict[tuple[Any, ...], dict[str, Any]]) -> list[dict[str, Any]]:
    for row in rows.values():
        row["instances"].sort()
    return sorted(rows.values(), key=lambda r: (_address_key(r["address"]), r["component_id"]))


def clc_rows(announcements: Iterable[Announcement]) -> list[dict[str, Any]]:
    """One row per CLC heard. The address is its TXT `addr=`, never one the responder offered
    (the design: a multi-homed host announces the address it wants used)."""
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    for ann in announcements:
        if ann.role is not Role.CLC:
            continue
        key = (ann.component_id, ann.fingerprint, str(ann.address), ann.api_port)
        _merge(
            rows,
            key,
            {
                "component_id": ann.component_id,
                "address": str(ann.address),
                "port": ann.api_port,
                "fingerprint": ann.fingerprint,
                "eucavers": ann.eucavers,
                "instance": ann.instance,
            },
        )
    return _sorted(rows)


@dataclass
class _Cluster:
    cc: dict[tuple[Any, ...], dict[str, Any]] = field(default_factory=dict)
    sc: dict[tuple[Any, ...], dict[str, Any]] = field(default_factory=dict)
    nc: set[tuple[str, str]] = field(default_factory=set)


def cluster_rows(announcements: Iterable[Announcement]) -> list[dict[str, Any]]:
    """One row per cluster name heard from a CC, an SC or an NC, sorted by name: its CCs with
    the state each announces, its SCs, and how many distinct NCs (id and key) announce it."""
    clusters: dict[str, _Cluster] = {}
    for ann in announcements:
        if ann.cluster is None or not ann.role.needs_cluster:
            continue
        cluster = clusters.setdefault(ann.cluster, _Cluster())
        row: dict[str, Any] = {"component_id": ann.component_id, "address": str(ann.address)}
        if ann.role is Role.CC:
            registered = ann.state is AnnouncedState.REGISTERED
            row.update(port=ann.api_port, state=ann.state.value, registered=registered)
            row.update(fingerprint=ann.fingerprint, instance=ann.instance)
            key = (ann.component_id, ann.fingerprint, str(ann.address), ann.api_port, ann.state)
            _merge(cluster.cc, key, row)
        elif ann.role is Role.SC:
            row.update(fingerprint=ann.fingerprint, instance=ann.instance)
            _merge(cluster.sc, (ann.component_id, ann.fingerprint, str(ann.address)), row)
        else:
            cluster.nc.add((ann.component_id, ann.fingerprint))
    return [
        {
            "name": name,
            "cc": _sorted(cluster.cc),
            "sc": _sorted(cluster.sc),
            "nc_count": len(cluster.nc),
        }
        for name, cluster in sorted(clusters.items())
    ]


def _seconds(seconds: float) -> str:
    return f"{seconds:g}s"


def clc_outcome(heard: Survey, seconds: float) -> Outcome:
    """Exit 0 for one CLC, 1 for none, 3 for several: they are all printed, but an installer
    pinning a fingerprint must choose among them out of band."""
    rows = clc_rows(heard.announcements)
    data = {"clcs": rows, "ignored": list(heard.ignored), "listened": seconds}
    if not rows:
        return Outcome(data, NOTHING, f"no CLC heard on this LAN within {_seconds(seconds)}")
    if len(rows) == 1:
        return Outcome(data, FOUND)
    ids = ", ".join(f"{r['component_id']} at {r['address']}" for r in rows)
    warning = (
        f"{len(rows)} CLCs heard on this LAN ({ids}), where the design expects one: confirm "
        "the fingerprint out of band before pinning one"
    )
    return Outcome(data, AMBIGUOUS, warnings=(warning,))


def clusters_outcome(heard: Survey, seconds: float) -> Outcome:
    """Exit 0 when a cluster was heard, 1 otherwise; a cluster that several CCs announce is
    listed with all of them and a warning (the CLC registers one of them only)."""
    rows = cluster_rows(heard.announcements)
    data = {"clusters": rows, "ignored": list(heard.ignored), "listened": seconds}
    if not rows:
        return Outcome(data, NOTHING, f"no cluster heard on this LAN within {_seconds(seconds)}")
    warnings = tuple(
        f"cluster {row['name']}: {len(row['cc'])} CCs announce it; the CLC registers one only "
        "(`eucareg status` on the CLC says which)"
        for row in rows
        if len(row["cc"]) > 1
    )
    return Outcome(data, FOUND, warnings=warnings)


# -- listening -----------------------------------------------------------------------------------


async def listen(
    seconds: float, *, ipv6: bool = False, backend_name: str = "auto"
) -> list[Sighting]:
    """Browse `_eucalyptus._tcp` for `seconds`; the services still announced at the end."""
    # The agent's choice of backend ([mdns] backend), loaded only for this command: other
    # commands need no mDNS at all.
    from eucareg.mdns.choice import ChosenBackend

    heard = Heard()
    backend = ChosenBackend(backend_name, ipv6=ipv6)
    try:
        await backend.start()
        backend.watch(heard.on_sighting)
        await asyncio.sleep(seconds)
    finally:
        await backend.close()
    return heard.sightings()


def _listened(timeout: str, ipv6: bool, backend: str) -> tuple[Survey, float]:
    try:
        seconds = parse_duration(timeout, "--timeout", MAX_TIMEOUT)
    except ConfigError as exc:
        fail(str(exc))
    try:
        sightings = asyncio.run(listen(seconds, ipv6=ipv6, backend_name=backend))
    except (OSError, RuntimeError) as exc:
        # (python-zeroconf says "No interfaces to listen on" with a RuntimeError.)
        fail(f"cannot listen for mDNS announcements: {exc}", 1)
    return survey(sightings), seconds


def _finish(outcome: Outcome, as_json: bool, verbose: bool, table: Callable[[], Table]) -> None:
    """Print the outcome (JSON even when nothing was heard: it lists what was ignored), its
    warnings and error on standard error, and exit with its status."""
    if as_json:
        print_json(outcome.data)
    elif outcome.status != NOTHING:
        console.print(table())
    ignored = outcome.data["ignored"]
    if verbose:
        for item in ignored:
            # Anyone on the LAN chooses these names and values: never read them as markup.
            err_console.print(
                f"ignored {item['instance']!r}: {item['code']}: {item['reason']}",
                highlight=False,
                markup=False,
            )
    elif ignored and not as_json:
        err_console.print(
            f"note: {len(ignored)} announcement(s) with an invalid TXT record ignored "
            "(--verbose lists them)",
            highlight=False,
        )
    for warning in outcome.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    if outcome.error is not None:
        fail(outcome.error, outcome.status)
    if outcome.status != FOUND:
        raise SystemExit(outcome.status)


def _listen_options(func: FC) -> FC:
    options = [
        click.option(
            "--timeout",
            default=DEFAULT_TIMEOUT,
            show_default=True,
            help="How long to listen, e.g. 3s, 500ms, 1m (at most 300s).",
        ),
        click.option("--ipv6", is_flag=True, help="Listen over IPv6 too (IPv4 only by default)."),
        click.option(
            "--backend",
            type=click.Choice(["auto", "avahi", "zeroconf"]),
            default="auto",
            show_default=True,
            help="Listen through python-zeroconf, the host's avahi-daemon, or (auto) Avahi when "
            "it runs in this network namespace, as the agent's [mdns] backend.",
        ),
        click.option(
            "--verbose", "-v", is_flag=True, help="Also name each announcement ignored, and why."
        ),
        click.option("--json", "as_json", is_flag=True, help="Machine-readable output."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@click.group()
def discover() -> None:
    """Listen to this LAN's mDNS announcements for a while (--timeout) and say who announces
    itself: the CLC, or the clusters. Needs no configuration and no registrar."""


@discover.command("clc")
@_listen_options
def discover_clc(timeout: str, ipv6: bool, backend: str, verbose: bool, as_json: bool) -> None:
    """Print the CLC's address (its announced addr=), API port, id and key fingerprint.

    Exit status: 0 when one CLC was heard, 1 when none was, 3 when several were (all printed).
    """
    heard, seconds = _listened(timeout, ipv6, backend)
    outcome = clc_outcome(heard, seconds)
    _finish(outcome, as_json, verbose, lambda: clc_table(outcome.data["clcs"]))


@discover.command("clusters")
@_listen_options
def discover_clusters(timeout: str, ipv6: bool, backend: str, verbose: bool, as_json: bool) -> None:
    """List the clusters heard: each one's CCs (registered or ready, as they announce it), its
    SCs and how many NCs announce it.

    Exit status: 0 when a cluster was heard, 1 when none was.
    """
    heard, seconds = _listened(timeout, ipv6, backend)
    outcome = clusters_outcome(heard, seconds)
    _finish(outcome, as_json, verbose, lambda: clusters_table(outcome.data["clusters"]))


# -- tables (rich, imported only to print) -------------------------------------------------------


def clc_table(rows: list[dict[str, Any]]) -> Table:
    from rich.table import Table

    table = Table(header_style="bold")
    for column in ("CLC", "address", "port", "fingerprint"):
        table.add_column(column, overflow="fold")
    for row in rows:
        port = "-" if row["port"] is None else str(row["port"])
        table.add_row(row["component_id"], row["address"], port, row["fingerprint"])
    return table


def clusters_table(rows: list[dict[str, Any]]) -> Table:
    from rich.table import Table

    table = Table(header_style="bold")
    for column in ("cluster", "CC", "SC", "NCs"):
        table.add_column(column, overflow="fold")
    for row in rows:
        ccs = "\n".join(
            f"{cc['component_id']} {cc['address']} "
            + ("[green]registered[/]" if cc["registered"] else "[yellow]ready[/]")
            for cc in row["cc"]
        )
        scs = "\n".join(f"{sc['component_id']} {sc['address']}" for sc in row["sc"])
        table.add_row(row["name"], ccs or "-", scs or "-", str(row["nc_count"]))
    return table
