"""A test-only fault switch: `EUCAREG_CRASH_AT=<point>[:<n>]` ends the process abruptly the
n-th time (default: first) the registrar reaches that point, as a power cut would.

The crash tests use it to show that every step boundary is safe; unset, it costs one dict lookup.
Points: before-hook, after-hook, after-commit, after-certificate (see docs/registration.md).
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

POINTS = frozenset({"before-hook", "after-hook", "after-commit", "after-certificate"})
EXIT_CODE = 86


def _parse(spec: str) -> tuple[str, int] | None:
    if not spec:
        return None
    point, _, count = spec.partition(":")
    if point not in POINTS or (count and not count.isascii()) or (count and not count.isdigit()):
        raise ValueError(
            f"EUCAREG_CRASH_AT={spec!r}: expected one of {', '.join(sorted(POINTS))}[:N]"
        )
    return point, int(count) if count else 1


_armed = _parse(os.environ.get("EUCAREG_CRASH_AT", ""))
_seen: dict[str, int] = {}


def crash_point(point: str) -> None:
    """Die here if the switch names this point (and this is its n-th passage)."""
    if _armed is None or _armed[0] != point:
        return
    _seen[point] = _seen.get(point, 0) + 1
    if _seen[point] == _armed[1]:
        log.critical("EUCAREG_CRASH_AT=%s: crashing on purpose", point)
        sys.stderr.flush()
        os._exit(EXIT_CODE)
