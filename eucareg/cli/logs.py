"""Structured logging for the agent: readable text for people, JSON lines for log collectors,
or the systemd journal's native protocol, with the component, role and decision as fields.

Text and JSON carry the same fields (time, level, logger, message), so switching loses nothing.
"""

from __future__ import annotations

import array
import errno
import fcntl
import json
import logging
import os
import socket
import struct
import sys
import time
from collections.abc import Mapping
from typing import TextIO

JOURNAL_SOCKET = "/run/systemd/journal/socket"
# Where to find the journal instead (the tests' fake journal; nothing else needs it).
JOURNAL_SOCKET_ENV = "EUCAREG_JOURNAL_SOCKET"
IDENTIFIER = "eucareg"
# Log-record attributes (set with `extra=`) sent as journal fields of the same name in capitals.
STRUCTURED = ("component_id", "role", "decision_code")
PRIORITIES = ((logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))  # else 7 (debug)
# journald's queue holds 512 datagrams (systemd raises the kernel's 10); a burst may still fill
# it for a moment. The longest a record waits for room, on the event loop, before stderr:
SEND_WAIT = 0.05
RETRY_AFTER = 1.0  # after a failed send, stderr only for this long: no wait per record
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 6),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def journal_field(name: str, value: str) -> bytes:
    """One field in the native protocol: `NAME=value\\n`, or, for a value holding a newline,
    `NAME\\n`, its length as 64-bit little-endian, the value and `\\n`."""
    data = value.encode(errors="replace")
    if b"\n" in data:
        return name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return name.encode() + b"=" + data + b"\n"


def priority(levelno: int) -> int:
    return next((p for level, p in PRIORITIES if levelno >= level), 7)


class JournalHandler(logging.Handler):
    """Each record as one datagram to journald. A record the journal does not take (no
    socket, journald gone, or its queue still full after SEND_WAIT) goes to `fallback`
    instead, and so do the records of the next `retry_after` seconds: logging never holds
    the event loop for long, and no record is lost without trace."""

    def __init__(
        self,
        fallback: logging.Handler,
        path: str = JOURNAL_SOCKET,
        *,
        retry_after: float = RETRY_AFTER,
    ) -> None:
        super().__init__()
        self.fallback = fallback
        self.path = path
        self.retry_after = retry_after
        self.setFormatter(logging.Formatter("%(message)s"))  # message, then any traceback
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.settimeout(None)  # blocking, but the kernel gives up after SO_SNDTIMEO
        wait = struct.pack("ll", 0, int(SEND_WAIT * 1e6))  # struct timeval
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, wait)
        self._failing = False
        self._skip_until = 0.0  # time.monotonic() before which the journal is not tried

    def encode(self, record: logging.LogRecord) -> bytes:
        fields = [
            ("MESSAGE", self.format(record)),
            ("PRIORITY", str(priority(record.levelno))),
            ("SYSLOG_IDENTIFIER", IDENTIFIER),
            ("LOGGER", record.name),
            ("CODE_FILE", record.pathname),
            ("CODE_LINE", str(record.lineno)),
            ("CODE_FUNC", record.funcName),
        ]
        for attr in STRUCTURED:
            value = record.__dict__.get(attr)
            if value is not None:
                fields.append((attr.upper(), str(value)))
        return b"".join(journal_field(name, value) for name, value in fields)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            payload = self.encode(record)
        except Exception:
            self.handleError(record)
            return
        now = time.monotonic()
        problem = self._send(payload) if now >= self._skip_until else "still failing"
        if problem is None:
            if self._failing:
                self._failing = False
                self._note(f"logging to the journal ({self.path}) again", logging.INFO)
            return
        if not self._failing:
            self._failing = True
            self._note(f"cannot log to the journal ({self.path}: {problem}); using stderr")
        if now >= self._skip_until:
            self._skip_until = now + self.retry_after
        self.fallback.handle(record)

    def _send(self, payload: bytes) -> str | None:
        """None once sent, else why not."""
        try:
            self._sock.sendto(payload, self.path)
        except OSError as exc:
            if exc.errno != errno.EMSGSIZE:
                return exc.strerror or str(exc)
            return self._send_large(payload)
        return None

    def _send_large(self, payload: bytes) -> str | None:
        """A record over the datagram limit (a long traceback) travels as a sealed memfd,
        as sd_journal_send does: journald reads it and takes it only sealed."""
        try:
            fd = os.memfd_create("eucareg-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError as exc:
            return exc.strerror or str(exc)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
            self._sock.sendmsg([], rights, 0, self.path)
        except OSError as exc:
            return exc.strerror or str(exc)
        finally:
            os.close(fd)
        return None

    def _note(self, text: str, level: int = logging.WARNING) -> None:
        note = logging.LogRecord("eucareg.logs", level, __file__, 0, text, None, None)
        self.fallback.handle(note)

    def close(self) -> None:
        self._sock.close()
        super().close()


def stderr_is_journal(
    environ: Mapping[str, str] | None = None, stream: TextIO | None = None
) -> bool:
    """Whether systemd connected our stderr to the journal: JOURNAL_STREAM holds the device and
    inode of that stream, and a stderr redirected elsewhere (a file, a pipe) will not match."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError):  # closed, or not a real file
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


def setup_logging(
    level: str,
    fmt: str,
    *,
    environ: Mapping[str, str] | None = None,
    journal_socket: str | None = None,
) -> None:
    """`fmt` is text, json or journal; the journal is also chosen whenever stderr is already
    the journal (a systemd service), since its fields say more than a line can."""
    env = os.environ if environ is None else environ
    handler: logging.Handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    if fmt == "journal" or stderr_is_journal(env):
        path = journal_socket or env.get(JOURNAL_SOCKET_ENV) or JOURNAL_SOCKET
        handler = JournalHandler(handler, path)
    root = logging.getLogger()
    for old in root.handlers:
        if isinstance(old, JournalHandler):
            old.close()  # its socket; a stream handler's stream is not ours to close
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("eucareg").setLevel(level.upper())
