"""Untrusted request input to typed values. Every malformed body or field becomes an ApiError
(a status, a message naming the field and what was expected, and a stable code), never an
exception that the server would answer with a 500.

Bodies are checked in one order: JSON text (UTF-8, no NaN or Infinity, no key twice, numbers
of at most 4300 digits), then nesting (at most MAX_DEPTH levels), then the route's JSON Schema
(`check`, with the schemas of eucareg/api/bodies.py, which docs/openapi.json publishes).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NoReturn

from aiohttp import web
from jsonschema import Draft202012Validator, ValidationError, validators
from jsonschema.exceptions import best_match
from jsonschema.protocols import Validator

from eucareg.config.values import ConfigError, parse_duration
from eucareg.core import grammar

MAX_BODY = 64 * 1024  # every legitimate body is a few kilobytes at most
MAX_DEPTH = 32  # levels of JSON nesting; our deepest body has 3
# A token or an install window longer than this is a typo, and much larger values would
# overflow timestamps (datetime, SQLite) further down.
MAX_DURATION = grammar.MAX_DURATION
MAX_USES = 1_000_000  # uses of one join token
MAX_SEQ = 2**63 - 1  # SQLite's largest integer
_ERRORS_SEEN = 50  # schema errors looked at for the best message (a body may hold thousands)

# The code each status has when the refusal names none (docs/cli.md, "HTTP API").
STATUS_CODES = {
    400: "bad-request",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    409: "conflict",
    410: "revoked",
    413: "body-too-large",
    429: "rate-limited",
    499: "client-closed",
    500: "internal-error",
    503: "unavailable",
}


def status_code(status: int) -> str:
    return STATUS_CODES.get(status, "client-error" if status < 500 else "server-error")


class ApiError(Exception):
    """A request the API refuses: answered as {"error": message, "code": code} with this
    status. `code` is stable (scripts may test it); without one, the status's code."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or status_code(status)


def error(status: int, message: str, code: str | None = None) -> web.Response:
    return web.json_response({"error": message, "code": code or status_code(status)}, status=status)


def bad(message: str, code: str = "bad-request") -> NoReturn:
    raise ApiError(400, message, code)


def http_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    """aiohttp's own refusals (no such path, a method the path does not take, a body over
    MAX_BODY) as our JSON errors; the Allow header of a 405 stays."""
    if exc.status == 404:
        message = f"no such endpoint: {grammar.shown(request.path)} (see GET /v1/openapi.json)"
    elif exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        message = f"{grammar.shown(request.method)} is not allowed here; this path takes {allowed}"
    elif exc.status == 413:
        message = f"the body is over {MAX_BODY} bytes"
    else:
        message = exc.reason
    response = error(exc.status, message)
    if "Allow" in exc.headers:
        response.headers["Allow"] = exc.headers["Allow"]
    return response


# -- JSON text -------------------------------------------------------------------------------


def _not_json_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity, which are not JSON and break every comparison.
    bad(f"body is not JSON: {name} is not a JSON value", "malformed-json")


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):
        # Parsers disagree on which of two values wins; we take neither.
        seen: set[str] = set()
        for key, _value in pairs:
            if key in seen:
                bad(
                    f"body is not JSON we accept: {grammar.shown(key)} appears twice",
                    "malformed-json",
                )
            seen.add(key)
    return data


def parse_json(body: bytes) -> Any:
    """Decode a JSON body, turning every way it can be malformed into a 400."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        bad("body is not JSON: it is not UTF-8 text", "malformed-json")
    try:
        data = json.loads(text, parse_constant=_not_json_constant, object_pairs_hook=_object)
    except RecursionError:
        # The decoder recurses once per nesting level; a deeply nested body exhausts the stack.
        _too_deep()
    except json.JSONDecodeError as exc:
        bad(f"body is not JSON: {exc}", "malformed-json")
    except ValueError as exc:
        # int() refuses numbers of more than 4300 digits (a denial-of-service guard).
        bad(f"body is not JSON we accept: {exc}", "malformed-json")
    if _deeper_than(data, MAX_DEPTH):
        _too_deep()
    return data


def _too_deep() -> NoReturn:
    bad(
        f"body is not JSON we accept: it is nested too deeply (over {MAX_DEPTH} levels)", "too-deep"
    )


def _deeper_than(data: Any, limit: int) -> bool:
    """Whether arrays and objects nest more than `limit` levels (without recursion)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        children: Iterable[Any]
        if isinstance(value, dict):
            children = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


# -- JSON Schema -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern[str]:
    """A schema pattern as ECMA-262 (which JSON Schema specifies) reads it: `$` at the end
    is the end of the string, not "before a final newline" as in Python; \\d is ASCII."""
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    return re.compile(pattern, re.ASCII)


def _pattern(
    validator: Validator, pattern: str, instance: Any, _schema: dict[str, Any]
) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _regex(pattern).search(instance):
        yield ValidationError(f"does not match {pattern!r}")


def _is_integer(_checker: Any, instance: Any) -> bool:
    # jsonschema counts 1.0 as an integer; we store Python ints, so it is not one here.
    return isinstance(instance, int) and not isinstance(instance, bool)


StrictValidator = validators.extend(  # type: ignore[no-untyped-call]
    Draft202012Validator,
    validators={"pattern": _pattern},
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer),
)


def compile_schema(schema: dict[str, Any]) -> Validator:
    StrictValidator.check_schema(schema)
    validator: Validator = StrictValidator(schema)
    return validator


# Values whose grammar (eucareg/core/grammar.py) says better than a schema keyword what is
# wrong; a schema names it as "x-grammar".
GRAMMARS: dict[str, Callable[[Any, str], object]] = {
    "component_id": grammar.component_id,
    "cluster": grammar.cluster,
    "fingerprint": grammar.fingerprint,
    "token_id": grammar.token_id,
    "proof": grammar.proof,
    "version": grammar.version,
    "duration": lambda value, field: grammar.duration(value, field),
}


def check(data: Any, validator: Validator) -> dict[str, Any]:
    """`data` (a parsed body) if its schema holds, else the ApiError naming the field."""
    found = best_match(itertools.islice(validator.iter_errors(data), _ERRORS_SEEN))
    if found is None:
        return as_object(data)
    raise ApiError(400, _say(found), _code(found))


def _lineage(error: ValidationError) -> Iterator[ValidationError]:
    """The error, then the anyOf/oneOf/if errors it came from."""
    current: ValidationError | None = error
    while current is not None:
        yield current
        current = current.parent  # type: ignore[assignment]


def _field(path: Iterable[object]) -> str:
    name = ""
    for part in path:
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            text = str(part)
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]{0,63}", text, re.ASCII):
                text = grammar.shown(text)
            name += f".{text}" if name else text
    return name or "body"


def _schema(error: ValidationError) -> dict[str, Any]:
    return error.schema if isinstance(error.schema, dict) else {}


# A schema's "x-error" and "x-code" say what none of its alternatives matching means.
_COMBINED = ("anyOf", "oneOf")


def _say(error: ValidationError) -> str:
    for outer in _lineage(error):
        schema, field = _schema(outer), _field(outer.absolute_path)
        parse = GRAMMARS.get(schema.get("x-grammar", ""))
        if parse is not None:
            try:
                parse(outer.instance, field)
            except (grammar.Invalid, ConfigError) as exc:
                return str(exc)
        if "x-error" in schema and outer.validator in _COMBINED:
            return f"{field} {schema['x-error']}" if outer.absolute_path else schema["x-error"]
    return _keyword_message(error, _schema(error), _field(error.absolute_path))


def _code(error: ValidationError) -> str:
    for outer in _lineage(error):
        if "x-code" in _schema(outer) and outer.validator in _COMBINED:
            return str(_schema(outer)["x-code"])
    if error.validator == "required":
        return "missing-field"
    if error.validator in ("additionalProperties", "unevaluatedProperties"):
        return "unknown-field"
    return "invalid-field" if error.absolute_path else "invalid-body"


_EXPECTED = {
    "object": "a JSON object",
    "array": "a list",
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "null": "null",
}


def _keyword_message(error: ValidationError, schema: dict[str, Any], field: str) -> str:
    keyword = error.validator
    value: Any = error.validator_value
    instance: Any = error.instance
    if keyword == "type":
        kinds = [value] if isinstance(value, str) else [t for t in value if t != "null"]
        expected = " or ".join(_EXPECTED.get(str(t), str(t)) for t in kinds)
        return f"{field} must be {expected}, got {_kind(instance)}"
    if keyword == "required":
        missing = next((k for k in value if k not in instance), value[0])
        inner = _field([*error.absolute_path, missing])
        return f"{inner} is required"
    if keyword in ("additionalProperties", "unevaluatedProperties"):
        known = sorted(schema.get("properties", {}))
        extra = sorted(k for k in instance if k not in known)
        where = "" if field == "body" else f"{field}: "
        takes = f"; it takes {', '.join(known)}" if known else ""
        return f"{where}unknown field {grammar.shown(extra[0] if extra else '?')}{takes}"
    if keyword in ("enum", "const"):
        choices = value if keyword == "enum" else [value]
        if all(isinstance(c, str) for c in choices) and not isinstance(instance, str):
            return f"{field} must be {_or(choices)}, got {_kind(instance)}"
        return f"{field} {grammar.shown(instance)}: expected {_or(choices)}"
    if keyword in _COMBINED and error.context:
        # No alternative matched, none more nearly than another: say what the first wanted.
        first = error.context[0]
        return _keyword_message(first, _schema(first), _field(first.absolute_path))
    if keyword in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        return _range_message(schema, field, instance)
    if keyword in ("minLength", "maxLength"):
        low, high = schema.get("minLength", 0), schema.get("maxLength")
        span = f"{low}-{high}" if high is not None else f"at least {low}"
        return f"{field} must be {span} characters long, got {len(instance)}"
    if keyword in ("minItems", "maxItems", "uniqueItems"):
        return f"{field} must be a list of at most {schema.get('maxItems', '?')} different items"
    if keyword in ("minProperties", "maxProperties"):
        return f"{field} may have at most {schema.get('maxProperties', '?')} fields"
    if keyword == "pattern":
        return f"{field}: {grammar.shown(instance)} does not match {value}"
    return f"{field} is not valid here ({keyword})"


def _range_message(schema: dict[str, Any], field: str, instance: Any) -> str:
    low = schema.get("minimum", schema.get("exclusiveMinimum"))
    high = schema.get("maximum", schema.get("exclusiveMaximum"))
    got = grammar.shown(instance)
    if "minimum" in schema and "maximum" in schema:
        return f"{field} must be between {low} and {high}, got {got}"
    parts = []
    if low is not None:
        parts.append(f"{'at least' if 'minimum' in schema else 'more than'} {low}")
    if high is not None:
        parts.append(f"{'at most' if 'maximum' in schema else 'less than'} {high}")
    return f"{field} must be {' and '.join(parts)}, got {got}"


def _or(choices: Iterable[Any]) -> str:
    names = [c if isinstance(c, str) else json.dumps(c) for c in choices]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


# -- fields the handlers read ----------------------------------------------------------------


def as_object(data: Any, what: str = "body") -> dict[str, Any]:
    if not isinstance(data, dict):
        bad(f"{what} must be a JSON object, got {_kind(data)}", "invalid-body")
    return data


def duration(value: Any, key: str) -> float:
    """A duration as the configuration file writes it ('30m', '1h', or seconds), bounded: a
    schema's DURATION says its form, this its value ('9999d' has the form)."""
    try:
        seconds = parse_duration(value, key)
    except ConfigError as exc:
        bad(str(exc), "invalid-field")
    if not math.isfinite(seconds) or seconds > MAX_DURATION:
        bad(f"{key}: must be at most 3650d, got {_short(value)}", "invalid-field")
    return seconds


_QUERY_INT = re.compile(r"-?[0-9]{1,40}", re.ASCII)


def query_int(request: web.Request, key: str, default: int) -> int:
    """An integer query parameter, in ASCII digits (int() would take '١٢', ' 12' or '1_2')."""
    raw = request.query.get(key)
    if raw is None or raw == "":
        return default
    if not _QUERY_INT.fullmatch(raw):
        bad("since and limit must be integers", "invalid-query")
    return int(raw)


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"the number {_short(value)}"
    return names.get(type(value), type(value).__name__)


def _short(value: Any) -> str:
    return grammar.shown(value)
