"""An operator watching `eucareg status` during a burst: GET /v1/status on the registrar's
operator socket (STATE_DIR/api.sock, the one `eucareg status` uses), again and again, timed.

One request at a time: the next starts `interval` after the previous one started, or at once
when that one took longer. A latency is from connecting to the last byte of the answer (the
JSON is not parsed inside the timing); an answer that is not HTTP 200, or none within
`timeout`, is an error, counted apart and timed as well.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.procstat import percentiles


def get_status(sock_path: Path, token: str, timeout: float) -> int:
    """One GET /v1/status over the Unix socket; its HTTP status."""
    conn = http.client.HTTPConnection("localhost", timeout=timeout)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(str(sock_path))
        conn.sock = sock
        conn.request("GET", "/v1/status", headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


@dataclass
class StatusPoller:
    sock_path: Path
    token: str
    interval: float = 0.1
    timeout: float = 10.0
    max_requests: int = 6000  # bounded whatever happens (10 minutes at 100 ms)
    # (wall-clock start, milliseconds, error or "") of each request
    samples: list[tuple[float, float, str]] = field(default_factory=list)
    started_at: float = 0.0
    stopped_at: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> StatusPoller:
        self.started_at = time.time()
        self._thread = threading.Thread(target=self._run, name="status-poller", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout + 5)
        self.stopped_at = time.time()

    def _run(self) -> None:
        for _ in range(self.max_requests):
            at, began = time.time(), time.perf_counter()
            error = ""
            try:
                code = get_status(self.sock_path, self.token, self.timeout)
            except OSError as exc:
                error = str(exc) or type(exc).__name__
            else:
                if code != 200:
                    error = f"HTTP {code}"
            self.samples.append((at, (time.perf_counter() - began) * 1000, error))
            if self._stop.wait(max(0.0, self.interval - (time.perf_counter() - began))):
                return

    def summary(self, since: float = 0.0, until: float = float("inf")) -> dict[str, Any]:
        """The requests that started between `since` and `until` (wall clock): the burst."""
        chosen = [s for s in self.samples if since <= s[0] <= until]
        errors = [s[2] for s in chosen if s[2]]
        out = percentiles([s[1] for s in chosen])
        out.update(
            {
                "errors": len(errors),
                "first_errors": errors[:5],
                "interval_ms": self.interval * 1000,
                "window_s": round(min(until, self.stopped_at) - max(since, self.started_at), 3),
                "requests_outside_window": len(self.samples) - len(chosen),
            }
        )
        return out
