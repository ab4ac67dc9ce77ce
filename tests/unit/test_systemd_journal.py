"""Logging to the journal in its native protocol, checked against a fake journal (a datagram
socket the test binds) that parses what journald would: `NAME=value` lines, the binary form
for values holding newlines, and a sealed memfd for a record too large for one datagram.
Without the socket, records go to stderr.
"""

from __future__ import annotations

import array
import fcntl
import io
import logging
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from eucareg.cli import logs
from eucareg.cli.logs import JournalHandler, journal_field, setup_logging, stderr_is_journal
from eucareg.config.file import from_mapping
from tests.unit.test_systemd_notify import socket_dir

Entry = dict[str, bytes]


def parse_native(data: bytes) -> Entry:
    """journald's reading of one native-protocol message."""
    entry: Entry = {}
    pos = 0
    while pos < len(data):
        end = data.index(b"\n", pos)
        line = data[pos:end]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            pos = end + 1
        else:  # NAME\n, 64-bit little-endian length, value, \n
            name = line
            (size,) = struct.unpack_from("<Q", data, end + 1)
            start = end + 1 + 8
            value = data[start : start + size]
            assert data[start + size : start + size + 1] == b"\n", "no newline after the value"
            pos = start + size + 1
        assert name.isupper() or name.replace(b"_", b"").isalnum(), name
        entry[name.decode()] = value
    return entry


class FakeJournal:
    """/run/systemd/journal/socket, for a test: every entry it was sent, parsed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: list[Entry] = []
        self.sealed: list[bool] = []  # for each entry sent as a memfd: was it sealed?
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.1)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        fds = array.array("i")
        while not self._done.is_set():
            try:
                data, ancillary, _, _ = self._sock.recvmsg(1 << 20, socket.CMSG_SPACE(fds.itemsize))
            except TimeoutError:
                continue
            except OSError:
                return
            for level, kind, value in ancillary:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                    fd = array.array("i", value[: fds.itemsize])[0]
                    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
                    self.sealed.append(bool(seals & fcntl.F_SEAL_WRITE))
                    with os.fdopen(fd, "rb") as memfd:
                        memfd.seek(0)  # the offset is shared with the sender's writes
                        data = memfd.read()
            self.entries.append(parse_native(data))

    def messages(self) -> list[str]:
        return [e["MESSAGE"].decode() for e in list(self.entries)]

    def wait_for(self, needle: str, timeout: float = 30.0) -> Entry:
        deadline = time.monotonic() + timeout
        while True:
            for entry in list(self.entries):
                if needle in entry["MESSAGE"].decode():
                    return entry
            if time.monotonic() > deadline:
                raise AssertionError(f"no {needle!r} in the journal: {self.messages()}")
            time.sleep(0.02)

    def close(self) -> None:
        self._done.set()
        self._thread.join(timeout=5)
        self._sock.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with socket_dir() as path:
        yield path


@pytest.fixture
def journal(short_dir: Path) -> Iterator[FakeJournal]:
    fake = FakeJournal(short_dir / "journal.sock")
    try:
        yield fake
    finally:
        fake.close()


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """setup_logging replaces the root logger's handlers (pytest's own among them)."""
    root, ours = logging.getLogger(), logging.getLogger("eucareg")
    handlers, levels = root.handlers[:], (root.level, ours.level)
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(levels[0])
        ours.setLevel(levels[1])


def handler_pair(path: Path, retry_after: float = 1.0) -> tuple[JournalHandler, io.StringIO]:
    stderr = io.StringIO()
    fallback = logging.StreamHandler(stderr)
    fallback.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    return JournalHandler(fallback, str(path), retry_after=retry_after), stderr


def make_record(msg: str, level: int = logging.INFO, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("eucareg.registrar.engine", level, "/x/engine.py", 42, msg, (), None)
    record.funcName = "decide"
    record.__dict__.update(extra)
    return record


# -- the protocol --------------------------------------------------------------------------


def test_a_field_with_a_newline_takes_the_binary_form() -> None:
    assert journal_field("MESSAGE", "one line") == b"MESSAGE=one line\n"
    two = journal_field("MESSAGE", "first\nsecond")
    assert two == b"MESSAGE\n" + struct.pack("<Q", 12) + b"first\nsecond\n"
    both = journal_field("A", "x=y") + two + journal_field("B", "")
    assert parse_native(both) == {"A": b"x=y", "MESSAGE": b"first\nsecond", "B": b""}


def test_a_record_carries_its_fields_and_the_decision(journal: FakeJournal) -> None:
    handler, stderr = handler_pair(journal.path)
    try:
        handler.handle(
            make_record(
                "pending nc nc-4cd29190ad54 (10.77.1.11): waiting for the operator",
                component_id="nc-4cd29190ad54",
                role="nc",
                decision_code="needs-approval",
            )
        )
        entry = journal.wait_for("pending nc")
    finally:
        handler.close()
    assert entry == {
        "MESSAGE": b"pending nc nc-4cd29190ad54 (10.77.1.11): waiting for the operator",
        "PRIORITY": b"6",
        "SYSLOG_IDENTIFIER": b"eucareg",
        "LOGGER": b"eucareg.registrar.engine",
        "CODE_FILE": b"/x/engine.py",
        "CODE_LINE": b"42",
        "CODE_FUNC": b"decide",
        "COMPONENT_ID": b"nc-4cd29190ad54",
        "ROLE": b"nc",
        "DECISION_CODE": b"needs-approval",
    }
    assert stderr.getvalue() == ""


def test_levels_become_priorities_and_tracebacks_stay_in_the_message(
    journal: FakeJournal,
) -> None:
    handler, _ = handler_pair(journal.path)
    log = logging.getLogger("eucareg.test.journal")
    log.propagate, log.handlers = False, [handler]
    log.setLevel(logging.DEBUG)
    try:
        for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR):
            log.log(level, "at %s", logging.getLevelName(level))
        log.critical("critical")
        try:
            raise ValueError("broken\nacross lines")
        except ValueError:
            log.exception("task flaky failed")
        entry = journal.wait_for("task flaky failed")
    finally:
        log.handlers = []
        handler.close()
    got = {e["MESSAGE"].decode().split("\n")[0]: e["PRIORITY"] for e in journal.entries}
    assert got["at DEBUG"] == b"7" and got["at INFO"] == b"6" and got["at WARNING"] == b"4"
    assert got["at ERROR"] == b"3" and got["critical"] == b"3"
    message = entry["MESSAGE"].decode()
    assert message.startswith("task flaky failed\nTraceback (most recent call last):")
    assert message.endswith("ValueError: broken\nacross lines")
    assert entry["CODE_FUNC"] == b"test_levels_become_priorities_and_tracebacks_stay_in_the_message"
    assert "COMPONENT_ID" not in entry  # only when the record carries one


def test_a_record_too_large_for_a_datagram_travels_as_a_sealed_memfd(
    journal: FakeJournal,
) -> None:
    handler, stderr = handler_pair(journal.path)
    big = "x" * 400_000 + "\nend"  # over the socket's send buffer (EMSGSIZE)
    try:
        handler.handle(make_record(big, level=logging.ERROR))
        entry = journal.wait_for("end")
    finally:
        handler.close()
    assert entry["MESSAGE"].decode() == big and entry["PRIORITY"] == b"3"
    assert journal.sealed == [True]
    assert stderr.getvalue() == ""


def test_without_the_journal_records_go_to_stderr_until_it_is_back(short_dir: Path) -> None:
    path = short_dir / "journal.sock"
    handler, stderr = handler_pair(path, retry_after=0.2)  # nothing listens there yet
    try:
        handler.handle(make_record("first"))
        handler.handle(make_record("second"))
        lines = stderr.getvalue().splitlines()
        assert lines[0].startswith(f"WARNING eucareg.logs: cannot log to the journal ({path}: ")
        assert lines[1:] == [
            "INFO eucareg.registrar.engine: first",
            "INFO eucareg.registrar.engine: second",
        ]
        fake = FakeJournal(path)
        try:
            handler.handle(make_record("third"))  # within retry_after: not tried yet
            time.sleep(0.25)
            handler.handle(make_record("fourth"))
            fake.wait_for("fourth", 5)
        finally:
            fake.close()
        assert fake.messages() == ["fourth"]
        assert stderr.getvalue().splitlines()[3:] == [
            "INFO eucareg.registrar.engine: third",
            f"INFO eucareg.logs: logging to the journal ({path}) again",
        ]
    finally:
        handler.close()


def test_a_full_journal_queue_costs_one_short_wait_then_stderr(short_dir: Path) -> None:
    path = short_dir / "journal.sock"
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # journald, not reading
    stuck.bind(str(path))
    handler, stderr = handler_pair(path)
    try:
        # The kernel queues net.unix.max_dgram_qlen datagrams (10; 512 under systemd).
        sent, waited = 0, 0.0
        while not stderr.getvalue() and sent < 5000:
            began = time.monotonic()
            handler.handle(make_record(f"record {sent}"))
            waited = time.monotonic() - began
            sent += 1
        lines = stderr.getvalue().splitlines()
        assert lines, "the queue never filled up"
        assert "Resource temporarily unavailable" in lines[0], lines[0]
        assert lines[1] == f"INFO eucareg.registrar.engine: record {sent - 1}"
        assert logs.SEND_WAIT / 2 < waited < logs.SEND_WAIT + 0.5, waited  # one short wait
        began = time.monotonic()
        for n in range(20):  # then stderr at once, for retry_after
            handler.handle(make_record(f"later {n}"))
        assert time.monotonic() - began < logs.SEND_WAIT, "waited again"
        assert stderr.getvalue().splitlines()[-1] == "INFO eucareg.registrar.engine: later 19"
    finally:
        handler.close()
        stuck.close()


# -- choosing the journal ------------------------------------------------------------------


def test_stderr_is_the_journal_only_when_journal_stream_names_it(tmp_path: Path) -> None:
    with (tmp_path / "stream").open("w") as stream, (tmp_path / "other").open("w") as other:
        st = os.fstat(stream.fileno())
        here = f"{st.st_dev}:{st.st_ino}"
        assert stderr_is_journal({"JOURNAL_STREAM": here}, stream)
        # Our stderr went elsewhere (redirected by a wrapper): the variable is inherited noise.
        assert not stderr_is_journal({"JOURNAL_STREAM": here}, other)
        for bad in ("", "12", "a:b", f"{st.st_dev}:", ":1"):
            assert not stderr_is_journal({"JOURNAL_STREAM": bad}, stream)
        assert not stderr_is_journal({}, stream)
    assert not stderr_is_journal({"JOURNAL_STREAM": here}, io.StringIO())  # no file at all


def test_setup_logging_picks_the_journal_when_stderr_is_it_or_when_asked(
    journal: FakeJournal,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    restored_logging: None,
) -> None:
    root = logging.getLogger()
    with (tmp_path / "stderr").open("w") as stderr:
        monkeypatch.setattr(sys, "stderr", stderr)
        st = os.fstat(stderr.fileno())
        env = {
            "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}",
            logs.JOURNAL_SOCKET_ENV: str(journal.path),
        }
        setup_logging("info", "json", environ=env)
        assert isinstance(root.handlers[0], JournalHandler)
        logging.getLogger("eucareg.agent.host").info("agent started: nc=nc-1", extra={"role": "nc"})
        entry = journal.wait_for("agent started")
        assert entry["LOGGER"] == b"eucareg.agent.host" and entry["ROLE"] == b"nc"

        setup_logging("info", "text", environ={})
        assert type(root.handlers[0]) is logging.StreamHandler
        setup_logging("info", "journal", environ={}, journal_socket=str(journal.path))
        handler = root.handlers[0]
        assert isinstance(handler, JournalHandler) and handler.path == str(journal.path)
        assert isinstance(handler.fallback.formatter, logging.Formatter)
        setup_logging("info", "journal", environ={})
        handler = root.handlers[0]
        assert isinstance(handler, JournalHandler) and handler.path == logs.JOURNAL_SOCKET


def test_log_format_journal_is_a_configuration_choice() -> None:
    raw = {"address": "10.0.2.10", "log_format": "journal", "components": {"nc": {"cluster": "c"}}}
    assert from_mapping(raw).log_format == "journal"
