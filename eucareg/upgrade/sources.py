"""What a Eucalyptus 1.6.2 front end says it registered: the output of `euca_conf
--list-walruses --list-clusters --list-scs --list-nodes` (the truth to import), and the shell
files /etc/eucalyptus/eucalyptus.conf, eucalyptus-ipaddr.conf and nodes.list (cross-checks).
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import stat
from dataclasses import dataclass, field
from pathlib import Path

from eucareg.core import grammar
from eucareg.core.model import Role

CONF = "etc/eucalyptus/eucalyptus.conf"
IPADDR_CONF = "etc/eucalyptus/eucalyptus-ipaddr.conf"
NODES_LIST = "var/lib/eucalyptus/nodes.list"
# What euca_conf 1.6.2 prints before each list (one header per --list-* option given).
HEADERS = {
    "registered walruses:": Role.WALRUS,
    "registered clusters:": Role.CC,
    "registered storage controllers:": Role.SC,
    "registered nodes:": Role.NC,
}
MAX_TEXT = 4 * 1024 * 1024  # a listing or conf file larger than this is not one
IPADDR_KEYS = {"WALRUS_IP_ADDR": Role.WALRUS, "CC_IP_ADDR": Role.CC, "SC_IP_ADDR": Role.SC}


@dataclass(frozen=True)
class Problem:
    """Something wrong or odd in a source. `fatal` problems stop the import: the source must
    be fixed first; the others are shown and the import goes on."""

    where: str
    message: str
    fatal: bool = False

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass(frozen=True)
class Listed:
    """One registration `euca_conf --list-*` shows: role, cluster (CC, SC, NC) and address."""

    role: Role
    cluster: str | None
    address: str
    where: str  # FILE:LINE, for the operator


@dataclass(frozen=True)
class Listing:
    components: tuple[Listed, ...] = ()
    problems: tuple[Problem, ...] = ()


@dataclass(frozen=True)
class ShellFile:
    """A shell file's plain assignments (NAME=value), values unquoted, `$VAR` left as is."""

    path: str
    exists: bool
    values: dict[str, str] = field(default_factory=dict)
    problems: tuple[Problem, ...] = ()


def read_text(path: Path, *, regular: bool = False) -> str | None:
    """A source file's text, or None when it does not exist; OSError/ValueError otherwise.
    `regular`: only a plain file is read (a FIFO or a device planted in the old front end
    would block or never end); a listing the operator pipes in (`<(euca_conf ...)`) is not."""
    try:
        data = read_regular(path, MAX_TEXT) if regular else _read_bounded(path, MAX_TEXT)
    except FileNotFoundError:
        return None
    if len(data) > MAX_TEXT:
        raise ValueError(f"{path}: larger than {MAX_TEXT} bytes; not a Eucalyptus file")
    return data.decode("utf-8", errors="replace")


def _read_bounded(path: Path, limit: int) -> bytes:
    with path.open("rb") as f:
        return f.read(limit + 1)


def read_regular(path: Path, limit: int) -> bytes:
    """At most limit + 1 bytes of a plain file; ValueError for anything else. Opened without
    blocking, so a FIFO with no writer is refused rather than waited on for ever."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file (a FIFO, a device?); not read")
        return f.read(limit + 1)


# -- euca_conf --list-* ------------------------------------------------------------------------


def parse_listing(text: str, origin: str) -> Listing:
    """The registrations in `euca_conf --list-walruses --list-clusters --list-scs
    --list-nodes` output as Eucalyptus 1.6.2 prints it:

        registered walruses:
           walrus  10.12.10.100
        registered clusters:
           cluster1  10.12.10.100
        registered storage controllers:
           cluster1  10.12.10.100
        registered nodes:
           10.12.10.102  cluster1   i-4493083A  i-595C0A8A

    Any line that is none of these is a fatal problem naming its line: a listing we do not
    understand is never half-imported."""
    components: list[Listed] = []
    problems: list[Problem] = []
    seen: dict[tuple[Role, str | None, str], str] = {}
    role: Role | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        where = f"{origin}:{number}"
        line = raw.strip()
        if not line:
            continue
        header = HEADERS.get(" ".join(line.split()).lower())
        if header is not None:
            role = header
            continue
        if role is None:
            problems.append(
                _fatal(
                    where,
                    f"{grammar.shown(line)} comes before any "
                    "'registered ...:' header of euca_conf --list-*",
                )
            )
            continue
        entry = _entry(role, line.split(), where)
        if isinstance(entry, Problem):
            problems.append(entry)
            continue
        key = (entry.role, entry.cluster, entry.address)
        if key in seen:
            problems.append(
                Problem(
                    where, f"{_what(entry)} is listed twice (first at {seen[key]}); imported once"
                )
            )
            continue
        seen[key] = where
        components.append(entry)
    return Listing(tuple(components), tuple(problems))


def _entry(role: Role, words: list[str], where: str) -> Listed | Problem:
    if role is Role.NC:
        # ADDRESS CLUSTER [instance ids running there]
        if len(words) < 2 or not all(w.startswith("i-") for w in words[2:]):
            return _fatal(
                where,
                f"expected 'ADDRESS CLUSTER [i-...]' under 'registered nodes:',"
                f" got {grammar.shown(' '.join(words))}",
            )
        address, name = words[0], words[1]
    else:
        if len(words) != 2:
            return _fatal(
                where,
                f"expected 'NAME ADDRESS' under the {role.value} list, got "
                f"{grammar.shown(' '.join(words))}",
            )
        name, address = words
    problem = _address_problem(address)
    if problem is not None:
        return _fatal(where, problem)
    cluster = None if role is Role.WALRUS else name
    if cluster is not None and not grammar.CLUSTER.fullmatch(cluster):
        return _fatal(
            where,
            f"{grammar.shown(cluster)} is not a cluster name eucareg can "
            "register (1-64 of A-Z a-z 0-9 _ . -)",
        )
    return Listed(role, cluster, address, where)


def _address_problem(address: str) -> str | None:
    """Only a literal IP address is imported: a host name would have to be resolved, and
    which of its addresses the component uses is a guess (lesson L3)."""
    if "%" in address:  # ip_address takes fe80::1%eth0; a scoped address is never registered
        return f"{grammar.shown(address)} carries an IPv6 scope: never registered (lesson L3)"
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return (
            f"{grammar.shown(address)} is not an IP address (a host name?): eucareg "
            "registers addresses; write the component's address in the listing"
        )
    return None


def _what(entry: Listed) -> str:
    cluster = f" of cluster {entry.cluster}" if entry.cluster else ""
    return f"{entry.role.value}{cluster} at {entry.address}"


def _fatal(where: str, message: str) -> Problem:
    return Problem(where, message, fatal=True)


# -- shell files ------------------------------------------------------------------------------


def parse_shell(text: str, origin: str) -> tuple[dict[str, str], tuple[Problem, ...]]:
    """Plain `NAME=value` lines of a shell file (optionally `export NAME=value`), the value
    unquoted as the shell would, comments dropped, `$VAR` not expanded (it is kept as written,
    and whatever uses it says so). A name set twice: the last one counts, as in the shell."""
    values: dict[str, str] = {}
    lines: dict[str, int] = {}
    problems: list[Problem] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        name, sep, rest = line.partition("=")
        if not sep or not name.isidentifier() or line.startswith("#"):
            continue  # a comment, a blank line, or shell code that is not an assignment
        where = f"{origin}:{number}"
        try:
            words = shlex.split(rest, comments=True, posix=True)
        except ValueError as exc:
            problems.append(Problem(where, f"{name}: cannot read the value ({exc}); ignored"))
            continue
        if len(words) > 1:
            problems.append(
                Problem(
                    where,
                    f"{name}: the value is not quoted; the shell would "
                    f"take {grammar.shown(words[0])} only",
                )
            )
        if name in lines:
            problems.append(
                Problem(
                    where,
                    f"{name} is set twice (also at line {lines[name]}); "
                    "the last one counts, as in the shell",
                )
            )
        values[name] = words[0] if words else ""
        lines[name] = number
    return values, tuple(problems)


def read_shell(root: Path, relative: str) -> ShellFile:
    path = root / relative
    try:
        text = read_text(path, regular=True)
    except (OSError, ValueError) as exc:  # a cross-check only: said, and the import goes on
        return ShellFile(str(path), True, {}, (Problem(str(path), f"cannot be read: {exc}"),))
    if text is None:
        return ShellFile(str(path), False)
    values, problems = parse_shell(text, str(path))
    return ShellFile(str(path), True, values, problems)


def parse_nodes_list(text: str, origin: str) -> tuple[tuple[str, ...], tuple[Problem, ...]]:
    """Node addresses from a NODES value or a nodes.list file: whitespace-separated, `#`
    comments dropped, each once (a repeat is reported)."""
    found: list[str] = []
    problems: list[Problem] = []
    for number, raw in enumerate(text.splitlines(), 1):
        for word in raw.split("#", 1)[0].split():
            where = f"{origin}:{number}" if "\n" in text else origin
            if "$" in word:
                problems.append(
                    Problem(
                        where,
                        f"{grammar.shown(word)} names a shell variable; not expanded, not compared",
                    )
                )
            elif word in found:
                problems.append(Problem(where, f"node {word} is named twice"))
            else:
                found.append(word)
    return tuple(found), tuple(problems)


@dataclass(frozen=True)
class Conf:
    """What the shell files of a 1.6.2 install say, for the cross-checks."""

    conf: ShellFile
    ipaddr: ShellFile
    nodes: tuple[str, ...]  # NODES, or nodes.list when NODES is empty or absent
    nodes_from: str  # where `nodes` was read ("" when nowhere)
    problems: tuple[Problem, ...]


def read_conf(root: Path) -> Conf:
    """Read eucalyptus.conf, eucalyptus-ipaddr.conf and nodes.list under `root`. A missing
    file is not a problem (not every host has each); an unreadable one is one (a warning)."""
    conf = read_shell(root, CONF)
    ipaddr = read_shell(root, IPADDR_CONF)
    problems = [*conf.problems, *ipaddr.problems]
    nodes: tuple[str, ...] = ()
    nodes_from = ""
    if conf.values.get("NODES", "").strip():
        nodes_from = f"{conf.path} (NODES)"
        nodes, found = parse_nodes_list(conf.values["NODES"], nodes_from)
        problems += found
    else:
        try:
            listed = read_text(root / NODES_LIST, regular=True)
        except (OSError, ValueError) as exc:
            listed = None
            problems.append(Problem(str(root / NODES_LIST), f"cannot be read: {exc}"))
        if listed is not None:
            nodes_from = str(root / NODES_LIST)
            nodes, found = parse_nodes_list(listed, nodes_from)
            problems += found
    return Conf(conf, ipaddr, nodes, nodes_from, tuple(problems))


PIN_ROLES = {r.value: r for r in (Role.WALRUS, Role.CC, Role.SC, Role.NC)}


def parse_pins(text: str, origin: str) -> tuple[dict[tuple[Role, str], str], tuple[Problem, ...]]:
    """The keys given for listed components (`eucareg import --fingerprints FILE`): lines of
    `ROLE ADDRESS FINGERPRINT` (what `eucareg fingerprint` prints on the component's host, with
    its address), `#` comments. Every problem is fatal: a key is a trust decision."""
    pins: dict[tuple[Role, str], str] = {}
    problems: list[Problem] = []
    for number, raw in enumerate(text.splitlines(), 1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        where = f"{origin}:{number}"
        if len(words) != 3 or words[0] not in PIN_ROLES:
            problems.append(
                _fatal(
                    where,
                    "expected 'ROLE ADDRESS sha256:…' (ROLE walrus, cc, "
                    f"sc or nc), got {grammar.shown(raw.strip())}",
                )
            )
            continue
        role, address, key = PIN_ROLES[words[0]], words[1], words[2]
        problem = _address_problem(address)
        if problem is None and not grammar.FINGERPRINT.fullmatch(key):
            problem = f"{grammar.shown(key)} is not a key fingerprint (sha256: and 64 hex digits)"
        if problem is None and (role, canonical_address(address)) in pins:
            problem = f"a key for {role.value} at {address} is given twice"
        if problem is not None:
            problems.append(_fatal(where, problem))
            continue
        pins[(role, canonical_address(address))] = key
    return pins, tuple(problems)


def canonical_address(address: str) -> str:
    """The address as the registry writes it (ipaddress's form); as given if not one."""
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address
