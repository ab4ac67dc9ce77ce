"""The output of a running hook: its stdout and stderr pipes, read on the event loop as the
script writes, holding no more than the tail of each stream however much it prints. What is
left when the script ends is read at once, and the pipes closed: nothing waits on its children.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from types import TracebackType
from typing import IO

# One read per wake-up of the loop: a flood cannot hold the loop for longer than that takes;
# it only slows the script, whose writes wait while the pipe is full.
CHUNK = 64 * 1024
# When the pipe cannot say how much it holds, at most this much is read once the script ended
# (the largest pipe an unprivileged process may ask for, by default).
PIPE_MAX = 1024 * 1024


class Tail:
    """The last `limit` bytes of one stream. Held in memory, trimmed as it grows, so a script
    printing for as long as its timeout allows costs at most about twice that."""

    def __init__(self, stream: IO[bytes], limit: int) -> None:
        self._stream = stream
        self._fd = stream.fileno()
        self._limit = limit
        self._held = bytearray()
        self._loop = asyncio.get_running_loop()
        self._reading = False
        os.set_blocking(self._fd, False)
        self._loop.add_reader(self._fd, self._take, CHUNK)
        self._reading = True

    @property
    def held(self) -> int:
        return len(self._held)

    def _take(self, size: int) -> int:
        """Read what is there, up to `size`: the bytes read, 0 when nothing more will come
        (end of file) or nothing is there now."""
        try:
            data = os.read(self._fd, size)
        except BlockingIOError:
            return 0
        except OSError:
            data = b""  # a reader that raised would be called again and again: stop instead
        if not data:
            self._stop()
            return 0
        self._held += data
        if len(self._held) > 2 * self._limit:
            del self._held[: -self._limit]
        return len(data)

    def take_rest(self) -> bytes:
        """The tail, once the script ended: what it wrote is in the pipe by now, so what the
        pipe holds is read, no more (a child it left running may write on). The pipe stays
        open until the caller closes it, once every stream of the run has been read."""
        try:
            budget = fcntl.fcntl(self._fd, fcntl.F_GETPIPE_SZ)
        except OSError:
            budget = PIPE_MAX
        while budget > 0 and (taken := self._take(min(CHUNK, budget))):
            budget -= taken
        return bytes(self._held[-self._limit :])

    def _stop(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def close(self) -> None:
        # The reader goes first: a descriptor closed under it could be reused by another.
        self._stop()
        with contextlib.suppress(OSError):
            self._stream.close()


class HookOutput:
    """Both streams of one running hook; closed on every way out of the run."""

    def __init__(self, stdout: IO[bytes], stderr: IO[bytes], limit: int) -> None:
        self._tails: list[Tail] = []
        try:
            self._tails.append(Tail(stdout, limit))
            self._tails.append(Tail(stderr, limit))
        except BaseException:
            self.close()
            for stream in (stdout, stderr):
                with contextlib.suppress(OSError):
                    stream.close()
            raise

    @property
    def held(self) -> int:
        """Bytes of output held for the run now (what a flood costs us while it lasts)."""
        return sum(tail.held for tail in self._tails)

    def drain(self) -> tuple[bytes, bytes]:
        """The tails of stdout and stderr, once the script ended (or was killed). Both are read
        before either is closed. A child the script left writing then gets EPIPE, as it would
        with a closed terminal; had one pipe closed first, the child's complaint about it could
        land in the other's tail as if the script wrote it (CI saw "echo: I/O error" there)."""
        out, err = (tail.take_rest() for tail in self._tails)
        self.close()
        return out, err

    def close(self) -> None:
        for tail in self._tails:
            tail.close()

    def __enter__(self) -> HookOutput:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
