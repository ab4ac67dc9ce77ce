"""sd_notify without systemd: a fake NOTIFY_SOCKET (a datagram socket the test binds, with the
sender's credentials, as systemd reads them) hears READY=1, STATUS=, WATCHDOG=1 and STOPPING=1
from the Notifier and from an in-process agent; without NOTIFY_SOCKET nothing is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from eucareg.agent.host import Agent
from eucareg.agent.systemd import Notifier, registrar_counts, socket_address
from eucareg.agent.tasks import Supervisor
from eucareg.core.model import Record, Role, Status
from tests.unit.test_agent_fakes import FakeMdns, eventually, key, make_config, seed_identity
from tests.unit.test_agent_lifecycle import TIMING

CREDENTIALS = struct.Struct("iII")  # struct ucred: pid, uid, gid


@dataclasses.dataclass(frozen=True)
class Datagram:
    at: float  # time.monotonic() when it arrived
    pid: int  # the sender, as the kernel says (systemd's NotifyAccess=main checks it)
    lines: tuple[str, ...]


class NotifyListener:
    """systemd's end of NOTIFY_SOCKET: every datagram, its arrival time and its sender."""

    def __init__(self, address: str) -> None:
        self.address = address  # as NOTIFY_SOCKET spells it (`@name` for an abstract one)
        self.got: list[Datagram] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        bound = socket_address(address)
        assert bound is not None
        self._sock.bind(bound)
        self._sock.settimeout(0.1)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            try:
                data, ancillary, _, _ = self._sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except TimeoutError:
                continue
            except OSError:
                return
            pid = -1
            for level, kind, value in ancillary:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
                    pid = CREDENTIALS.unpack(value[: CREDENTIALS.size])[0]
            lines = tuple(data.decode().split("\n"))
            self.got.append(Datagram(time.monotonic(), pid, lines))

    def lines(self) -> list[str]:
        return [line for d in list(self.got) for line in d.lines]

    def times(self, line: str) -> list[float]:
        return [d.at for d in list(self.got) if line in d.lines]

    def statuses(self) -> list[str]:
        return [x.removeprefix("STATUS=") for x in self.lines() if x.startswith("STATUS=")]

    def wait_for(self, predicate: object, timeout: float = 30.0) -> None:
        """Block until `predicate(self)` holds (for tests outside the event loop)."""
        assert callable(predicate)
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() > deadline:
                raise AssertionError(f"not heard within {timeout} s; got {self.lines()}")
            time.sleep(0.02)

    def close(self) -> None:
        self._done.set()
        self._thread.join(timeout=5)
        self._sock.close()


@contextlib.contextmanager
def socket_dir() -> Iterator[Path]:
    """A directory for sockets: a Unix socket path must fit in 108 bytes, tmp_path may not."""
    path = Path(tempfile.mkdtemp(prefix="eucsd-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with socket_dir() as path:
        yield path


@pytest.fixture
def listener(short_dir: Path) -> Iterator[NotifyListener]:
    got = NotifyListener(str(short_dir / "notify.sock"))
    try:
        yield got
    finally:
        got.close()


# -- the environment -----------------------------------------------------------------------


async def test_without_notify_socket_nothing_is_sent_and_nothing_fails(
    caplog: pytest.LogCaptureFixture,
) -> None:
    env = {"WATCHDOG_USEC": "30000000", "PATH": "/bin"}
    notifier = Notifier.from_environment(env)
    assert not notifier.enabled and notifier.watchdog is None
    assert env == {"PATH": "/bin"}  # a watchdog without a socket is not ours either
    assert notifier.notify("READY=1") is False
    supervisor = Supervisor()
    notifier.started(supervisor, lambda: "never asked")
    notifier.stopping()
    assert await supervisor.close() == []
    assert supervisor.restarts == {}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_the_environment_is_read_once_and_unset_so_children_do_not_inherit_it(
    monkeypatch: pytest.MonkeyPatch, listener: NotifyListener
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = Notifier.from_environment()
    assert notifier.enabled and notifier.watchdog == 3.0
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        assert name not in os.environ
    child = subprocess.run(["env"], capture_output=True, text=True, check=True).stdout
    assert "NOTIFY_SOCKET" not in child and "WATCHDOG_" not in child
    assert notifier.notify("STATUS=hello")
    listener.wait_for(lambda got: "STATUS=hello" in got.lines(), 5)
    assert listener.got[0].pid == os.getpid()
    notifier.stopping()
    assert Notifier.from_environment().enabled is False  # read once: a second agent is silent


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("3000000", "", 3.0),
        ("3000000", "1", None),  # the watchdog is meant for another process
        ("0", "", None),
        ("-5", "", None),
        ("soon", "", None),
    ],
)
def test_the_watchdog_is_ours_only_with_a_timeout_and_no_other_pid(
    usec: str, pid: str, expected: float | None
) -> None:
    env = {"NOTIFY_SOCKET": "/run/nowhere.sock", "WATCHDOG_USEC": usec}
    if pid:
        env["WATCHDOG_PID"] = pid
    notifier = Notifier.from_environment(env)
    assert notifier.enabled and notifier.watchdog == expected
    assert env == {}
    notifier.stopping()


def test_addresses_are_paths_or_abstract_names() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@org/systemd/x") == "\0org/systemd/x"
    for unusable in ("run/notify", "@", "vsock:2:1234", ""):
        assert socket_address(unusable) is None
    assert Notifier.from_environment({"NOTIFY_SOCKET": "relative/path"}).enabled is False


def test_an_abstract_notify_socket_is_reached() -> None:
    name = f"@eucareg-test-{os.getpid()}-{time.monotonic_ns()}"
    got = NotifyListener(name)
    try:
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": name})
        assert notifier.notify("READY=1", "STATUS=up")
        got.wait_for(lambda g: g.lines() == ["READY=1", "STATUS=up"], 5)
        notifier.stopping()
    finally:
        got.close()


def test_a_notify_socket_that_is_gone_warns_once_and_never_raises(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": str(short_dir / "gone.sock")})
    assert notifier.enabled
    assert notifier.notify("READY=1") is False
    assert notifier.notify("WATCHDOG=1") is False
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cannot notify systemd at" in warnings[0], warnings
    notifier.stopping()


# -- the watchdog --------------------------------------------------------------------------


async def test_the_watchdog_pings_only_while_the_event_loop_runs(
    listener: NotifyListener, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier(socket_address(listener.address), watchdog=0.2)  # a ping every 0.1 s
    task = asyncio.create_task(notifier.watchdog_loop())
    try:
        await asyncio.sleep(0.55)
        before = len(listener.times("WATCHDOG=1"))
        assert before >= 4, listener.lines()
        blocked_at = time.monotonic()
        # A wedged loop: a blocking call on it, for four times the interval.
        time.sleep(0.8)  # noqa: ASYNC251
        unblocked_at = time.monotonic()
        await asyncio.sleep(0.35)
    finally:
        task.cancel()
        notifier.stopping()
    pings = listener.times("WATCHDOG=1")
    during = [t for t in pings if blocked_at + 0.05 < t < unblocked_at]
    assert during == [], "pinged while the loop was blocked"
    assert [t for t in pings if t > unblocked_at], "no ping once the loop ran again"
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) >= 0.75 and sorted(gaps)[len(gaps) // 2] < 0.2, gaps
    # The near miss is in the log, before systemd would have acted.
    assert any("the event loop was stuck" in r.getMessage() for r in caplog.records)


# -- the agent -----------------------------------------------------------------------------


async def test_an_agent_is_ready_with_a_status_pings_and_says_stopping(
    tmp_path: Path, listener: NotifyListener
) -> None:
    seed_identity(tmp_path / "state", Role.CLC, "clc-00000000c10d", key(4))
    seed_identity(tmp_path / "state", Role.CC, "cc-00000000cc01", key(5))
    cfg = make_config(tmp_path, {"clc": {}, "cc": {"cluster": "c1"}})
    notifier = Notifier(socket_address(listener.address), watchdog=0.2, status_every=0.02)
    agent = Agent(
        dataclasses.replace(cfg, api_port=0),
        backend=FakeMdns(),
        timing=TIMING,
        notifier=notifier,
    )
    await agent.start()
    try:
        assert agent.service is not None and agent.service.socket_path.exists()
        await eventually(lambda: "READY=1" in listener.lines())
        first = listener.got[0]
        assert first.lines[0] == "READY=1" and first.pid == os.getpid()
        assert first.lines[1].startswith("STATUS=clc clc-00000000c10d; cc cc-00000000cc01 ")
        assert first.lines[1].endswith("; registered here: none")
        await eventually(lambda: len(listener.times("WATCHDOG=1")) >= 3)
        # The CC's announce loop publishes it: the status line follows within status_every.
        await eventually(
            lambda: any(
                "cc cc-00000000cc01 announced, not registered yet" in s for s in listener.statuses()
            )
        )
    finally:
        await agent.stop()
    lines = listener.lines()
    assert lines[-2:] == ["STOPPING=1", "STATUS=stopping"]
    await asyncio.sleep(0.3)  # more than a watchdog interval: nothing follows STOPPING=1
    assert listener.lines() == lines


def record(component_id: str, role: Role, status: Status) -> Record:
    return Record(component_id, role, "c1", "10.0.2.30", "sha256:00", status, "")


def test_the_status_line_counts_what_this_registrar_registered() -> None:
    assert registrar_counts([]) == "registered here: none"
    records = [
        record("walrus-1", Role.WALRUS, Status.REGISTERED),
        record("cc-1", Role.CC, Status.REGISTERED),
        record("cc-2", Role.CC, Status.REGISTERED),
        record("nc-1", Role.NC, Status.REGISTERED),
        record("nc-2", Role.NC, Status.PENDING),
        record("nc-3", Role.NC, Status.AWAITING_KEY),
        record("nc-4", Role.NC, Status.FAILED),
        record("nc-5", Role.NC, Status.REFUSED),
    ]
    assert registrar_counts(records) == (
        "registered here: 1 Walrus, 2 CCs, 1 NC; 2 waiting; 1 failed"
    )
    three = [record(f"nc-{n}", Role.NC, Status.REGISTERED) for n in range(3)]
    assert registrar_counts(three) == "registered here: 3 NCs"
