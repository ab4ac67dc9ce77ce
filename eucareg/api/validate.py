"""Untrusted request input to typed values. Every malformed body or field becomes an ApiError
(400 with a message naming the field and what was expected), never an exception that the
server would answer with a 500.
"""

from __future__ import annotations

import json
import math
from typing import Any, NoReturn

from aiohttp import web

from eucareg.config.file import ConfigError, parse_duration

MAX_BODY = 64 * 1024  # every legitimate body is a few kilobytes at most
# A token or an install window longer than this is a typo, and much larger values would
# overflow timestamps (datetime, SQLite) further down.
MAX_DURATION = 10 * 365 * 86400.0
MAX_USES = 1_000_000
MAX_SEQ = 2**63 - 1  # SQLite's largest integer


class ApiError(Exception):
    """A request the API refuses: answered as {"error": message} with this status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def bad(message: str) -> NoReturn:
    raise ApiError(400, message)


def _not_json_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity, which are not JSON and break every comparison.
    bad(f"body is not JSON: {name} is not a JSON value")


def parse_json(body: bytes) -> Any:
    """Decode a JSON body, turning every way it can be malformed into a 400."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        bad("body is not JSON: it is not UTF-8 text")
    try:
        return json.loads(text, parse_constant=_not_json_constant)
    except RecursionError:
        # The decoder recurses once per nesting level; a deeply nested body exhausts the stack.
        bad("body is not JSON we accept: it is nested too deeply")
    except json.JSONDecodeError as exc:
        bad(f"body is not JSON: {exc}")
    except ValueError as exc:
        # int() refuses numbers of more than 4300 digits (a denial-of-service guard).
        bad(f"body is not JSON we accept: {exc}")


def as_object(data: Any, what: str = "body") -> dict[str, Any]:
    if not isinstance(data, dict):
        bad(f"{what} must be a JSON object, got {_kind(data)}")
    return data


async def json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object."""
    return as_object(parse_json(await request.read()))


def text(data: dict[str, Any], key: str) -> str | None:
    """A string field; missing, null and "" are None."""
    value = data.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        bad(f"{key} must be a string, got {_kind(value)}")
    return value


def required_text(data: dict[str, Any], key: str) -> str:
    value = text(data, key)
    if value is None:
        bad(f"{key} is required")
    return value


def flag(data: dict[str, Any], key: str, default: bool) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        bad(f"{key} must be true or false, got {_kind(value)}")
    return value


def count(data: dict[str, Any], key: str, high: int) -> int | None:
    """A positive integer field no larger than `high`, or None when missing or null."""
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        bad(f"{key} must be an integer, got {_kind(value)}")
    if not 1 <= value <= high:
        bad(f"{key} must be between 1 and {high}, got {_short(value)}")
    return value


def duration(value: Any, key: str) -> float:
    """A duration as the configuration file writes it ('30m', '1h', or seconds), bounded."""
    try:
        seconds = parse_duration(value, key)
    except ConfigError as exc:
        bad(str(exc))
    if not math.isfinite(seconds) or seconds > MAX_DURATION:
        bad(f"{key}: must be at most 3650d, got {_short(value)}")
    return seconds


def query_int(request: web.Request, key: str, default: int) -> int:
    raw = request.query.get(key)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        bad("since and limit must be integers")


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"the number {_short(value)}"
    return names.get(type(value), type(value).__name__)


def _short(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 40 else shown[:37] + "..."
