"""The API is described and typed (issue 7, part 2): GET /v1/openapi.json describes every route
of app.py, docs/openapi.json is its current copy, the schemas agree with the core grammar, every
error is {error, code} with a documented code, and the checks in front of the handlers hold
against what an attacker sends (huge numbers, NaN, deep nesting, other scripts' digits,
duplicate keys, any Content-Type, empty and compressed bodies).
"""

from __future__ import annotations

import gzip
import json
import re
import string
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eucareg.api import answers, bodies, fields, openapi
from eucareg.api.app import OPEN_ROUTES, OPERATOR_ROUTES
from eucareg.api.validate import (
    MAX_DEPTH,
    STATUS_CODES,
    ApiError,
    StrictValidator,
    compile_schema,
    parse_json,
)
from eucareg.core import grammar
from tests.unit.test_api_harness import ADMIN_TOKEN, CLC_SETTINGS, Harness, served

ROOT = Path(__file__).resolve().parents[2]
REGENERATE = "python -m eucareg.api.openapi > docs/openapi.json"


@pytest.fixture
async def clc(tmp_path: Path) -> AsyncIterator[Harness]:
    async with served(tmp_path, CLC_SETTINGS) as harness:
        yield harness


# -- the description -------------------------------------------------------------------------


def test_the_copy_in_docs_is_current() -> None:
    copy = (ROOT / "docs" / "openapi.json").read_text()
    assert copy == openapi.TEXT, f"docs/openapi.json is stale: regenerate it with `{REGENERATE}`"


async def test_the_description_is_served_to_anyone(clc: Harness) -> None:
    status, document = await clc.admin("GET", "/v1/openapi.json", token=None)
    assert status == 200
    assert document == json.loads(openapi.TEXT) == openapi.DOCUMENT
    assert document["openapi"] == "3.1.0"


def test_every_route_is_described_as_app_py_routes_it() -> None:
    routed = {(m, p): "operator" for m, p, _h in OPERATOR_ROUTES}
    routed.update({(m, p): "open" for m, p, _h in OPEN_ROUTES})
    described = {(r.method, r.path): r.who for r in openapi.ROUTES}
    assert set(described) == set(routed)
    for (method, path), who in described.items():
        assert (who == "operator") == (routed[(method, path)] == "operator"), (method, path)
        operation = openapi.DOCUMENT["paths"][path][method.lower()]
        security = {"operator": [{"admin": []}], "signed": [{"signed": []}], "open": []}[who]
        assert operation["security"] == security
        assert ("requestBody" in operation) == (method == "POST")
        assert {"200", "4XX", "5XX"} <= set(operation["responses"])
    assert set(bodies.REQUEST_BODIES) == {p for m, p in routed if m == "POST"}
    assert set(answers.RESPONSES) == set(routed)


def _schemas_in(document: Any) -> list[dict[str, Any]]:
    found = []
    if isinstance(document, dict):
        if "schema" in document and isinstance(document["schema"], dict):
            found.append(document["schema"])
        for value in document.values():
            found.extend(_schemas_in(value))
    elif isinstance(document, list):
        for value in document:
            found.extend(_schemas_in(value))
    return found


def test_every_schema_is_a_valid_draft_2020_12_schema() -> None:
    for schema in [
        *bodies.REQUEST_BODIES.values(),
        *(s for by_status in answers.RESPONSES.values() for s in by_status.values()),
        *openapi.DOCUMENT["components"]["schemas"].values(),
        *_schemas_in(openapi.DOCUMENT["paths"]),
    ]:
        StrictValidator.check_schema(schema)


def _objects(schema: Any, where: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = []
    if isinstance(schema, dict):
        if schema.get("type") == "object" or "properties" in schema:
            found.append((where, schema))
        for key, value in schema.items():
            found.extend(_objects(value, f"{where}/{key}"))
    elif isinstance(schema, list):
        for n, value in enumerate(schema):
            found.extend(_objects(value, f"{where}/{n}"))
    return found


def test_request_bodies_take_no_field_they_do_not_name() -> None:
    for path, body in bodies.REQUEST_BODIES.items():
        for where, schema in _objects(body):
            if schema is bodies.TXT:  # a TXT record: its own keys, bounded (decoding checks)
                assert schema["maxProperties"] <= 32
                assert schema["additionalProperties"]["maxLength"] == 255
                continue
            if where.endswith(("/if", "/then")) or "/anyOf/" in where:
                continue  # conditions on the object, not objects of their own
            assert schema.get("additionalProperties") is False, (path, where)


def test_every_error_code_is_documented() -> None:
    assert set(STATUS_CODES.values()) <= set(openapi.ERROR_CODES)
    cli = (ROOT / "docs" / "cli.md").read_text()
    section = cli[cli.index("## HTTP API") : cli.index("## EXIT STATUS")]
    missing = [code for code in openapi.ERROR_CODES if f"`{code}`" not in section]
    assert not missing, f"docs/cli.md (HTTP API) does not list {missing}"
    assert openapi.DOCUMENT["x-error-codes"] == dict(openapi.ERROR_CODES)


# -- the schemas agree with the grammar --------------------------------------------------------


def accepts(parse: Callable[[Any, str], object], value: Any) -> bool:
    try:
        parse(value, "field")
    except grammar.Invalid:
        return False
    return True


GRAMMARS = [
    (fields.COMPONENT_ID, grammar.COMPONENT_ID, grammar.component_id),
    (fields.CLUSTER, grammar.CLUSTER, grammar.cluster),
    (fields.FINGERPRINT, grammar.FINGERPRINT, grammar.fingerprint),
    (fields.TOKEN_ID, grammar.TOKEN_ID, grammar.token_id),
    (bodies.TXT["properties"]["id"], grammar.COMPONENT_ID, grammar.component_id),
    (bodies.TXT["properties"]["fp"], grammar.FINGERPRINT, grammar.fingerprint),
    (bodies.TXT["properties"]["cluster"], grammar.CLUSTER, grammar.cluster),
    (bodies.TXT["properties"]["eucavers"], grammar.VERSION, grammar.version),
    (bodies.TXT["properties"]["tok"], grammar.TOKEN_ID, grammar.token_id),
    (bodies.TXT["properties"]["tproof"], grammar.PROOF, grammar.proof),
]


@st.composite
def near(draw: st.DrawFn, pattern: re.Pattern[str]) -> str:
    """A value of the grammar, or one edit away from it."""
    text = draw(st.from_regex(pattern, fullmatch=True))
    at = draw(st.integers(0, len(text)))
    char = draw(st.characters() | st.sampled_from("\n\r\x00 -_.:\u0661\uff11\u00b2"))
    edit = draw(st.sampled_from(["keep", "insert", "delete", "append"]))
    if edit == "insert":
        return text[:at] + char + text[at:]
    if edit == "delete" and text:
        return text[: max(0, at - 1)] + text[at:]
    if edit == "append":
        return text + draw(st.sampled_from(["\n", "\r\n", " ", "\x00", "a" * 64]))
    return text


@pytest.mark.parametrize(("schema", "pattern", "parse"), GRAMMARS)
@settings(max_examples=300, deadline=None, database=None)
@given(data=st.data())
def test_a_pattern_accepts_exactly_what_its_grammar_accepts(
    schema: dict[str, Any],
    pattern: re.Pattern[str],
    parse: Callable[[Any, str], object],
    data: st.DataObject,
) -> None:
    value = data.draw(
        near(pattern)
        | st.text(max_size=80)
        | st.text(string.printable, max_size=80)
        | st.integers()
        | st.none()
    )
    assert compile_schema(schema).is_valid(value) == accepts(parse, value), repr(value)


@settings(
    max_examples=1000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    st.from_regex(grammar._DURATION, fullmatch=True)
    | st.text(string.digits + ".smhd \t\n", max_size=20)
    | st.floats(allow_nan=False)  # NaN is no JSON: parse_json refuses it before any schema
    | st.integers(-(10**12), 10**12)
    | st.booleans()
    | st.none()
)
def test_a_duration_is_refused_by_the_schema_only_if_the_grammar_refuses_it(value: Any) -> None:
    """A string such as '9999d' has a duration's form (the schema) but not its bound, which
    the handler's grammar check adds; everything the grammar takes, the schema takes."""
    in_schema = compile_schema(fields.DURATION).is_valid(value)
    by_grammar = accepts(lambda v, f: grammar.duration(v, f), value)
    assert in_schema or not by_grammar, repr(value)
    if not isinstance(value, str):
        assert in_schema == by_grammar, repr(value)


# -- what an attacker sends ------------------------------------------------------------------


def refusal(raw: bytes) -> ApiError:
    with pytest.raises(ApiError) as refused:
        parse_json(raw)
    return refused.value


def test_nesting_is_bounded_before_any_schema() -> None:
    assert parse_json(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH) is not None
    for depth in (MAX_DEPTH + 1, 1000, 100_000):
        body = b'{"a": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"
        error = refusal(body)
        assert (error.status, error.code) == (400, "too-deep")
        assert "nested too deeply" in error.message


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"mode": "any", "mode": "off"}', "'mode' appears twice"),
        (b'{"a": NaN}', "NaN is not a JSON value"),
        (b'{"a": -Infinity}', "-Infinity is not a JSON value"),
        (b'{"a": ' + b"9" * 5000 + b"}", "not JSON we accept"),
        (b"", "body is not JSON"),
        (b"\xef\xbb\xbf{}", "body is not JSON"),
        (b"{\xff}", "not UTF-8"),
        (b'{"a": \xd9\xa1}', "body is not JSON"),  # an Arabic-Indic digit is no JSON number
    ],
)
def test_json_that_is_not_quite_json_is_400(raw: bytes, message: str) -> None:
    error = refusal(raw)
    assert (error.status, error.code) == (400, "malformed-json")
    assert message in error.message


@pytest.mark.parametrize(
    ("path", "body", "code", "message"),
    [
        ("/v1/tokens", {"role": "cc", "uses": 10**4000}, "invalid-field", "uses must be between"),
        ("/v1/tokens", {"role": "cc", "uses": 1.0}, "invalid-field", "uses must be an integer"),
        ("/v1/tokens", {"role": "cc", "uses": -0.0}, "invalid-field", "uses must be an integer"),
        ("/v1/tokens", {"role": "cc", "ttl": "\u0661h"}, "invalid-field", "ttl: expected a"),
        ("/v1/tokens", {"role": "cc", "ttl": "1h\n"}, "invalid-field", "ttl: expected a"),
        ("/v1/tokens", {"role": "cc", "cluster": "c1\n"}, "invalid-field", "is not a cluster"),
        ("/v1/tokens", {"role": "cc", "cluster": "\ud800"}, "invalid-field", "is not a cluster"),
        ("/v1/tokens", {"role": "cc", "x" * 60_000: 1}, "unknown-field", "unknown field 'xxx"),
        ("/v1/tokens", {"role": "cc", "cluster": "c" * 60_000}, "invalid-field", "cluster: 'ccc"),
        ("/v1/tokens", {}, "missing-field", "role is required"),
        ("/v1/trust/lock", {"tasks": ["clc"] * 8000}, "invalid-field", "tasks must be clc"),
        # Regression: uniqueItems compared these pairwise, 15 s of blocked event loop.
        ("/v1/trust/lock", {"tasks": [{"a": n} for n in range(5000)]}, "invalid-field", "tasks"),
        ("/v1/trust/lock", {f"k{n}": n for n in range(4000)}, "unknown-field", "unknown field"),
        ("/v1/trust/mode", {"mode": "ANY"}, "invalid-field", "mode 'ANY': expected local"),
        ("/v1/approve", {}, "missing-field", "component_id or fingerprint is required"),
        ("/v1/approve", [], "invalid-body", "body must be a JSON object, got a list"),
        ("/v1/approve", {"component_id": "walrus-00000000000\u0661"}, "invalid-field", "is not"),
    ],
)
async def test_hostile_fields_are_400_naming_the_field_and_stay_short(
    clc: Harness, path: str, body: Any, code: str, message: str
) -> None:
    raw = json.dumps(body).encode()
    started = time.monotonic()
    status, answer = await clc.raw_post(path, raw)
    assert time.monotonic() - started < 2
    assert (status, answer["code"]) == (400, code), answer
    assert message in answer["error"]
    assert len(answer["error"]) < 300  # an echoed value is cut short
    assert (await clc.get("/v1/tokens"))[1] == {"tokens": []}


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "application/json; charset=latin-1"],
)
async def test_a_body_is_read_as_json_whatever_its_declared_type(
    clc: Harness, content_type: str | None
) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    if content_type is not None:
        headers["Content-Type"] = content_type
    body = b'{"mode": "off"}'
    async with clc.client.post("/v1/trust/mode", data=body, headers=headers) as response:
        assert response.status == 200
        assert (await response.json())["mode"] == "off"
    async with clc.client.post("/v1/trust/mode", data=b"mode=any", headers=headers) as response:
        assert (response.status, (await response.json())["code"]) == (400, "malformed-json")


async def test_a_compressed_body_is_bounded_after_decompression(clc: Harness) -> None:
    bomb = gzip.compress(b'{"mode": "' + b"a" * 10_000_000 + b'"}')
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Encoding": "gzip"}
    async with clc.client.post("/v1/trust/mode", data=bomb, headers=headers) as response:
        assert response.status == 413
        assert await response.json() == {
            "error": "the body is over 65536 bytes",
            "code": "body-too-large",
        }


async def test_aiohttps_own_refusals_are_json_errors_too(clc: Harness) -> None:
    status, answer = await clc.get("/v1/nosuch")
    assert (status, answer["code"]) == (404, "not-found")
    async with clc.client.delete("/v1/trust") as response:
        assert response.status == 405
        assert response.headers["Allow"] == "GET,HEAD"
        assert (await response.json())["code"] == "method-not-allowed"
    status, answer = await clc.raw_post("/v1/trust/mode", b"x" * 70_000)
    assert (status, answer["code"]) == (413, "body-too-large")


@pytest.mark.parametrize(
    "query",
    [
        "component=%ED%A0%80",  # a lone surrogate, UTF-8-encoded
        "kind=%00&role=%FF&cluster=" + "c" * 4000,
        "since=%D9%A1",  # an Arabic-Indic 1
        "limit=1_0",
        "since=+5",
    ],
)
async def test_odd_query_strings_are_answered_not_500(clc: Harness, query: str) -> None:
    async with clc.client.get(
        f"/v1/events?{query}", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    ) as response:
        answer = await response.json()
        assert response.status in (200, 400), answer
        if response.status == 400:
            assert answer == {"error": "since and limit must be integers", "code": "invalid-query"}


async def test_a_refused_request_is_answered_with_what_it_did_not_change(clc: Harness) -> None:
    """Regression: `{"bogus": 1}` posted to /v1/trust/lock locked both tasks (issue 7)."""
    status, answer = await clc.post("/v1/trust/lock", {"bogus": 1})
    assert (status, answer["code"]) == (400, "unknown-field")
    trust = (await clc.get("/v1/trust"))[1]
    assert trust["locked"] == []
    status, answer = await clc.post("/v1/trust/install-window", {"open": True, "for": "Infinity"})
    assert (status, answer["code"]) == (400, "invalid-field")
    assert (await clc.get("/v1/trust"))[1]["install_until"] is None
