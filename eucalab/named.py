"""A real BIND 9 `named` for the DNS-SD tests: one authoritative zone that takes TSIG-signed
dynamic updates, with the update-policy docs/dnssd.md tells operators to use.

`start_local` runs it on 127.0.0.1 at a free high port (unit tests; no root needed), and
`start_in_lab` inside a lab host's namespace through `Lab.spawn` (the lab stops it by PID).
Both run it in the foreground (`named -g`) from a work directory holding the generated
named.conf, the zone file and its journal; nothing of the machine's own BIND setup is read or
written (its named.service stays masked: scripts/system-deps.sh).
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from eucalab.errors import LabError
from eucalab.lab import Lab
from eucalab.process import LabProcess

__all__ = [
    "SERVICE",
    "NamedServer",
    "TsigKey",
    "named_binary",
    "named_conf",
    "site_policy",
    "start_in_lab",
    "start_local",
    "zone_text",
]

SERVICE = "_eucalyptus._tcp"  # eucareg.core.txt.SERVICE_TYPE without ".local."
READY = "running"  # what named -g logs once it answers
START_TIMEOUT = 30.0
_STOP_WAIT = 5.0
_POLL = 0.02


@dataclass(frozen=True)
class TsigKey:
    """A TSIG key as named.conf and eucareg's secret files hold it."""

    name: str  # absolute: "eucareg-prune." or "node-nc-0123456789ab._eucalyptus._tcp.site.test."
    secret: str  # base64
    algorithm: str = "hmac-sha256"

    @classmethod
    def make(cls, name: str, algorithm: str = "hmac-sha256") -> TsigKey:
        """A new key with a random 256-bit secret (what `tsig-keygen` makes)."""
        return cls(_absolute(name), base64.b64encode(secrets.token_bytes(32)).decode(), algorithm)

    def clause(self) -> str:
        return f'key "{self.name}" {{ algorithm {self.algorithm}; secret "{self.secret}"; }};'

    def write_secret(self, path: Path) -> Path:
        """The secret file eucareg's `tsig_secret_file` names (mode 0600)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.secret + "\n")
        path.chmod(0o600)
        return path


def _absolute(name: str) -> str:
    return name if name.endswith(".") else name + "."


def instance_key_name(instance: str, domain: str) -> str:
    """The key name a component's own key must have under the `selfsub` rule."""
    return f"{instance}.{SERVICE}.{_absolute(domain)}"


def site_policy(
    domain: str,
    *,
    prune_keys: Iterable[str] = (),
    site_keys: Iterable[str] = (),
) -> list[str]:
    """The update-policy of docs/dnssd.md: every component key named after its instance may
    change its own instance's names, and add or remove PTR records of the service type; a
    prune key may change anything under the service type; a site key (the simple variant, one
    key shared by all components) the same, but only the record types eucareg publishes."""
    service = f"{SERVICE}.{_absolute(domain)}"
    rules = [
        "grant * selfsub * SRV TXT A AAAA;",
        f"grant * name {service} PTR;",
        f"grant * name _registrar._sub.{service} PTR;",
    ]
    rules += [f"grant {_absolute(k)} subdomain {service} ANY;" for k in prune_keys]
    rules += [f"grant {_absolute(k)} subdomain {service} PTR SRV TXT A AAAA;" for k in site_keys]
    return rules


def zone_text(domain: str, ns_address: str) -> str:
    """A minimal zone: SOA, NS and the name server's address; eucareg adds the rest."""
    origin = _absolute(domain)
    return "\n".join(
        [
            f"$ORIGIN {origin}",
            "$TTL 60",
            "@ IN SOA ns hostmaster 1 3600 600 86400 60",
            "@ IN NS ns",
            f"ns IN A {ns_address}",
            "",
        ]
    )


def named_conf(
    workdir: Path,
    *,
    domain: str,
    address: str,
    port: int,
    keys: Sequence[TsigKey],
    policy: Sequence[str],
    max_records_per_type: int = 0,
) -> str:
    """named.conf for one primary zone with dynamic updates.

    `max_records_per_type` 0 lifts BIND's limit of 100 records per RRset (9.18.28 and later):
    a cluster of 1,000 NCs is one PTR RRset of 1,000 records.
    """
    zone = domain.rstrip(".")
    lines = [
        "options {",
        f'    directory "{workdir}";',
        "    pid-file none;",
        f'    session-keyfile "{workdir}/session.key";',
        f'    managed-keys-directory "{workdir}";',
        f"    listen-on port {port} {{ {address}; }};",
        "    listen-on-v6 { none; };",
        "    recursion no;",
        "    dnssec-validation no;",
        "    notify no;",
        "    allow-transfer { none; };",
        f"    max-records-per-type {max_records_per_type};",
        "};",
        "controls { };",
        "logging {",
        "    category update { default_stderr; };",
        "    category update-security { default_stderr; };",
        "};",
        *(k.clause() for k in keys),
        f'zone "{zone}" {{',
        "    type primary;",
        f'    file "{zone}.db";',
        # SRV targets and A records at instance names (under _eucalyptus._tcp) are not host
        # names by RFC 952; BIND would refuse them (docs/dnssd.md).
        "    check-names ignore;",
        "    update-policy {",
        *(f"        {rule}" for rule in policy),
        "    };",
        "};",
        "",
    ]
    return "\n".join(lines)


def named_binary() -> str | None:
    return shutil.which("named", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


@dataclass
class NamedServer:
    """A running named: where it answers, and how to stop it."""

    address: str
    port: int
    domain: str
    workdir: Path
    keys: dict[str, TsigKey] = field(default_factory=dict)
    popen: subprocess.Popen[bytes] | None = None  # start_local
    lab: Lab | None = None  # start_in_lab
    proc: LabProcess | None = None

    @property
    def server(self) -> str:
        """The `dnssd.server` value for eucareg's configuration."""
        return f"{self.address}:{self.port}"

    @property
    def log(self) -> Path:
        return self.workdir / "named.log"

    def log_text(self) -> str:
        if self.proc is not None:
            return self.proc.log_text()
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, its process group; reap it. Safe to call again."""
        if self.proc is not None and self.lab is not None:
            self.lab.stop(self.proc, timeout=_STOP_WAIT)
            return
        popen = self.popen
        if popen is None or popen.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGTERM)  # safe: the leader is not reaped yet
        try:
            popen.wait(timeout=_STOP_WAIT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGKILL)
            popen.wait(timeout=_STOP_WAIT)

    def __enter__(self) -> NamedServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _prepare(
    workdir: Path,
    domain: str,
    address: str,
    port: int,
    keys: Sequence[TsigKey],
    policy: Sequence[str] | None,
    max_records_per_type: int,
) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    zone = domain.rstrip(".")
    for stale in (f"{zone}.db.jnl", "session.key"):
        with contextlib.suppress(FileNotFoundError):
            (workdir / stale).unlink()
    (workdir / f"{zone}.db").write_text(zone_text(zone, address))
    conf = workdir / "named.conf"
    rules = policy if policy is not None else site_policy(zone)
    conf.write_text(
        named_conf(
            workdir,
            domain=zone,
            address=address,
            port=port,
            keys=keys,
            policy=rules,
            max_records_per_type=max_records_per_type,
        )
    )
    return conf


def _argv(conf: Path) -> list[str]:
    binary = named_binary()
    if binary is None:
        raise LabError("named not found; install it with: apt-get install bind9")
    # -g: foreground, log to stderr; -n 1: one worker thread is plenty for a test zone.
    return [binary, "-g", "-n", "1", "-c", str(conf)]


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child, before exec
    """Runs between fork and exec: named gets SIGTERM if the test process dies first, even
    by SIGKILL, so no named outlives the run that started it."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def free_port(address: str = "127.0.0.1") -> int:
    """A port free on `address` for both UDP and TCP right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((address, 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((address, port))
                except OSError:
                    continue
            return port
    raise LabError(f"no free port found on {address}")


def start_local(
    workdir: Path,
    *,
    domain: str = "site.test",
    keys: Sequence[TsigKey] = (),
    policy: Sequence[str] | None = None,
    max_records_per_type: int = 0,
    port: int | None = None,
    attempts: int = 3,
) -> NamedServer:
    """named on 127.0.0.1 at `port`, or a free high port, in its own process group; the caller
    stops it (`with start_local(...) as named:`). A free port taken between the probe and
    named's bind is retried on another port, `attempts` times in all."""
    workdir = workdir.absolute()
    last = ""
    for _ in range(attempts if port is None else 1):
        chosen = free_port() if port is None else port
        conf = _prepare(workdir, domain, "127.0.0.1", chosen, keys, policy, max_records_per_type)
        server = NamedServer("127.0.0.1", chosen, domain, workdir, {k.name: k for k in keys})
        with server.log.open("wb") as log:
            server.popen = subprocess.Popen(
                _argv(conf),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        atexit.register(server.stop)
        try:
            _wait_ready(server)
            return server
        except LabError as exc:
            server.stop()
            last = str(exc)
            if "address in use" not in last:
                raise
    raise LabError(f"named could not bind a port in {attempts} attempts: {last}")


def start_in_lab(
    lab: Lab,
    host: str,
    workdir: Path,
    *,
    domain: str = "site.test",
    keys: Sequence[TsigKey] = (),
    policy: Sequence[str] | None = None,
    port: int = 53,
    max_records_per_type: int = 0,
) -> NamedServer:
    """named on a lab host's address (port 53 by default), spawned in its namespace; the lab
    stops it at teardown if the caller does not."""
    address = str(lab.address(host))
    conf = _prepare(workdir.absolute(), domain, address, port, keys, policy, max_records_per_type)
    proc = lab.spawn(host, "named", _argv(conf))
    server = NamedServer(
        address, port, domain, workdir.absolute(), {k.name: k for k in keys}, lab=lab, proc=proc
    )
    try:
        _wait_ready(server)
    except BaseException:
        server.stop()
        raise
    return server


def _exited(server: NamedServer) -> bool:
    if server.proc is not None:
        return server.proc.exited()
    return server.popen is not None and server.popen.poll() is not None


def _wait_ready(server: NamedServer, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        text = server.log_text()
        if "\nrunning" in text or f" {READY}\n" in text:
            return
        if _exited(server):
            raise LabError(f"named exited before it was ready:\n{_tail(text)}")
        if time.monotonic() >= deadline:
            raise LabError(f"named not ready within {timeout}s:\n{_tail(text)}")
        time.sleep(_POLL)


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])
