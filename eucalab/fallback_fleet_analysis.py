"""What a fallback fleet's requests came to, in the test process: the requests.json of each
fleet process (fallback_fleet.py) merged, each NC's collection attempts with their outcomes and
the waits between them, and text bars of them over time.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def load(paths: Iterable[Path]) -> dict[str, Any]:
    """The requests.json of each process of one fleet, merged."""
    merged: dict[str, Any] = {"requests": {}, "delays": {}, "registered_at": {}, "stalls": []}
    for path in paths:
        data = json.loads(path.read_text())
        if merged.setdefault("fallback_at", data["fallback_at"]) != data["fallback_at"]:
            raise ValueError(f"{path}: another fleet's fallback moment")
        merged.setdefault("wall_offset", data["wall_offset"])
        for key in ("requests", "delays", "registered_at"):
            merged[key].update(data[key])
        merged["stalls"].extend(data["stalls"])
    return merged


@dataclass
class Attempt:
    """One collection attempt of an NC not yet registered: an announcement and, if that was
    taken, a credential request. Times in seconds from the fallback moment."""

    component_id: str
    index: int  # 0: the NC's first attempt
    start: float  # when its announcement was sent
    end: float  # when its last request ended
    outcome: str  # "ok", "refused", "unreachable", "dropped", "http-429", …, "error"
    retry_after: float | None = None  # seconds the registrar asked for, when it sent us away
    logged_delay: float | None = None  # the wait the agent said it would make after it

    @property
    def failed(self) -> bool:
        return self.outcome != "ok"


def attempts(result: dict[str, Any]) -> dict[str, list[Attempt]]:
    """Each NC's attempts before it was registered, in order."""
    t0 = float(result["fallback_at"])
    out: dict[str, list[Attempt]] = {}
    for cid, requests in result["requests"].items():
        mine: list[Attempt] = []
        for req in requests:
            if req["registered"]:
                continue
            if req["path"] == "/v1/announce":
                mine.append(Attempt(cid, len(mine), req["start"] - t0, req["start"] - t0, "ok"))
            elif not mine:
                continue
            current = mine[-1]
            current.end = (req["end"] if req["end"] is not None else req["start"]) - t0
            if current.outcome == "ok":
                current.outcome = outcome(req)
                if req["status"] in (429, 503) and req["retry_after"] is not None:
                    with contextlib.suppress(ValueError):
                        current.retry_after = float(req["retry_after"])
        delays = sorted((at - t0, d) for at, d in result["delays"].get(cid, []))
        for attempt, after in zip(mine, [*mine[1:], None], strict=True):
            until = after.start if after is not None else math.inf
            said = [d for at, d in delays if attempt.end - 0.001 <= at <= until]
            if attempt.failed and said:
                attempt.logged_delay = said[0]
        out[cid] = mine
    return out


DROPPED = ("ServerDisconnectedError", "ClientOSError", "TimeoutError", "ServerTimeoutError")


def outcome(req: dict[str, Any]) -> str:
    """What one request came to, in a word."""
    error = req["error"]
    if error is not None:
        if error.startswith("CancelledError"):
            return "ok"  # the agent dropped it (its state changed): not a failure
        if "No route to host" in error or "unreachable" in error:
            return "unreachable"
        if "Connect call failed" in error or "Connection refused" in error:
            return "refused"
        if error.startswith(DROPPED):
            return "dropped"  # the connection broke, or nothing came back in time
        return "error"
    status = int(req["status"])
    return "ok" if status < 300 else f"http-{status}"


def histogram(
    items: Iterable[Attempt],
    width: float,
    *,
    label: Callable[[Attempt], str] = lambda a: a.outcome,
    bar: int = 50,
    marks: dict[float, str] | None = None,
) -> str:
    """Text bars: attempts per `width` seconds from the fallback moment, split by `label`;
    `marks` notes events (seconds: text) against the bucket they fall in."""
    items = list(items)
    if not items:
        return "(no attempts)"
    buckets: dict[int, list[Attempt]] = {}
    for a in items:
        buckets.setdefault(math.floor(a.start / width), []).append(a)
    peak = max(len(b) for b in buckets.values())
    kinds = sorted({label(a) for a in items})
    notes: dict[int, list[str]] = {}
    for at, text in (marks or {}).items():
        notes.setdefault(math.floor(at / width), []).append(text)
    first = min([*buckets, *notes])
    last = max([*buckets, *notes])
    lines = [f"  {'from':>7}  {'':{bar}}  {'n':>4}  " + "  ".join(kinds)]
    for k in range(first, last + 1):
        mine = buckets.get(k, [])
        shown = "#" * math.ceil(len(mine) * bar / peak) if mine else ""
        split = "  ".join(
            f"{sum(1 for a in mine if label(a) == kind):>{len(kind)}}" for kind in kinds
        )
        note = f"  <- {'; '.join(notes[k])}" if k in notes else ""
        lines.append(f"  {k * width:+7.2f}s {shown:{bar}}  {len(mine):>4}  {split}{note}")
    return "\n".join(lines)
