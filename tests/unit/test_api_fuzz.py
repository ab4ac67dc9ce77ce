"""The running API fuzzed against its OpenAPI description (issue 7, part 2).

A CLC registrar is served on 127.0.0.1 (in a thread of its own, so hypothesis drives it with
plain blocking HTTP), seeded with pending components, a registered one and join tokens. Each
example is one request built from a route's description (eucareg/api/bodies.py): a body valid
by its schema, or one mutated field by field (unknown fields, wrong types, huge numbers, odd
strings, deep nesting) or byte by byte (duplicate keys, NaN, truncated, not UTF-8, too large),
with any Content-Type, with the admin token or without, signed by a component's key, the cloud
key or a stranger's; and unknown paths and methods. Then:

- no answer is a 5xx;
- every answer matches the route's answer schema, and every error is {error, code} with a
  documented code;
- a refused request (4xx) changes nothing stored: every table of the registry is the same
  before and after it, except that a refused announcement may add its own `refused` event
  (the audit log; docs/security.md).

Bounded for `make test`: a fixed number of examples, derandomized, no example database.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import re
import sqlite3
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema.protocols import Validator

from eucareg.api import answers, bodies, fields, openapi
from eucareg.api.validate import MAX_BODY, compile_schema
from eucareg.core.model import Announcement, Role
from eucareg.core.trust import parse_token
from eucareg.pki import certificates, keypairs, signatures
from eucareg.pki import credentials as cred
from eucareg.pki.signing import SIGNATURE_HEADER, signed_body, socket_audience
from tests.factories import ann, pool_key, sighting
from tests.unit.test_api_harness import ADMIN_TOKEN, CLC_SETTINGS, Harness, key_of, served

# About 15 s together on a developer machine (1,150 requests), well inside `make test`.
EXAMPLES = {"operator": 500, "signed": 400, "anything": 250}
AUDIT_KINDS = {"refused", "summary"}  # the only rows a refusal may add: events about itself


def budget(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )


# -- the registrar under test -------------------------------------------------------------------


@dataclass
class Seeded:
    """What the fuzzer may name to get past "no such component" into the handlers."""

    ids: list[str]
    fingerprints: list[str]
    token_ids: list[str]
    serials: list[str]
    txts: list[dict[str, str]]
    keys: list[keypairs.PrivateKey]


class Served:
    """A registrar and its API on 127.0.0.1, run by an event loop in another thread."""

    def __init__(self, tmp: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._served = served(tmp, CLC_SETTINGS)
        self.h: Harness = self.run(self._served.__aenter__())
        self.db = tmp / "registry.db"
        self.port = self.h.client.port or 0
        self.audience = socket_audience("127.0.0.1", self.port)
        self.seeded = self.run(seed(self.h))
        # An install window opened here must not close by itself in the middle of a refused
        # request (a timer writing while we compare): the fuzzer opens and closes them itself.
        admin = self.h.registrar.admin
        admin.close()
        admin.arm_install_close = lambda: None  # type: ignore[method-assign]
        self.last = self.snapshot()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def close(self) -> None:
        self.run(self._served.__aexit__(None, None, None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def send(self, request: Request) -> tuple[int, http.client.HTTPMessage, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(request.method, request.target, body=request.body, headers=request.headers)
            response = conn.getresponse()
            return response.status, response.headers, response.read()
        finally:
            conn.close()

    def snapshot(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every table, once the registrar has finished what it started."""
        self.run(self.h.registrar.idle())
        with contextlib.closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)) as db:
            names = [
                row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")
            ]
            return {n: db.execute(f'SELECT * FROM "{n}" ORDER BY rowid').fetchall() for n in names}


def txt_of(a: Announcement) -> dict[str, str]:
    return dict(sighting(a).txt)


async def seed(h: Harness) -> Seeded:
    # One registered CC (through an install window) with its certificate...
    assert (await h.post("/v1/trust/install-window", {"open": True, "for": "10m"}))[0] == 200
    cc = ann(Role.CC, "cluster2")
    h.announce(cc)
    await h.record_status(cc.component_id, "awaiting-key")
    status, answer = await h.signed(
        "/v1/credentials", key_of(cc), {"component_id": cc.component_id}, "?wait=10"
    )
    assert status == 200, answer
    cert = certificates.load_cert_pem(answer["files"][cred.LAYOUTS[Role.CC].cert])
    assert (await h.post("/v1/trust/install-window", {"open": False}))[0] == 200
    # ...pending ones, waiting for the operator or for their CC...
    pending = [ann(Role.WALRUS), ann(Role.CC, "cluster1"), ann(Role.SC, "cluster1")]
    for a in pending:
        h.announce(a)
        await h.record_status(a.component_id, "pending")
    # ...and join tokens.
    tokens = []
    for role in ("cc", "sc"):
        status, answer = await h.post("/v1/tokens", {"role": role, "ttl": "2h"})
        assert status == 200, answer
        tokens.append(parse_token(answer["token"]).token_id)
    # Announcements it has not heard (one of them carries a made-up token proof).
    unheard = ann(Role.SC, "cluster2")
    with_token = {**txt_of(ann(Role.CC, "cluster3")), "tok": tokens[0], "tts": "1800000000"}
    with_token["tproof"] = "A" * 43
    components = [cc, *pending]
    return Seeded(
        ids=[a.component_id for a in components] + ["walrus-0000000fffff"],
        fingerprints=[a.fingerprint for a in components],
        token_ids=tokens,
        serials=[format(cert.serial_number, "x")],
        txts=[txt_of(a) for a in [*components, unheard]] + [with_token],
        keys=[key_of(a) for a in [*components, unheard]],
    )


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    served_api = Served(tmp_path_factory.mktemp("fuzz"))
    try:
        yield served_api
    finally:
        served_api.close()


# -- requests from the description -----------------------------------------------------------


@dataclass
class Request:
    method: str
    path: str  # the route's path (what the answer schema is looked up by)
    target: str  # path and query, as sent
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        body = self.body[:300] if self.body is not None else None
        return f"{self.method} {self.target} {self.headers} {body!r}"


_HUGE = st.sampled_from([19, 20, 63, 64, 300, 4000]).flatmap(
    lambda digits: st.sampled_from([10**digits, -(10**digits), 10**digits - 1])
)
_ODD_TEXT = st.sampled_from(
    ["", " ", "\n", "\x00", "\u0661\u0662", "\uff11", "\u00b2", "\ud800", "a" * 5000, "Infinity"]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | _HUGE
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([0.0, -0.0, 1e308, -1e308, 5e-324, 1.0, 2.0])
    | st.text(max_size=20)
    | _ODD_TEXT
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def _inner(pattern: str) -> str:
    """A JSON Schema pattern anchored at both ends as a regex for hypothesis' fullmatch."""
    return pattern.removeprefix("^").removesuffix("$")


class FromSchema:
    """Values valid by a schema of eucareg/api/bodies.py (the subset of JSON Schema it uses),
    with `hints` (by schema identity) mixed in: names the registrar knows."""

    def __init__(self, hints: dict[int, st.SearchStrategy[Any]]) -> None:
        self.hints = hints

    def __call__(self, schema: dict[str, Any]) -> st.SearchStrategy[Any]:
        made = self._make(schema)
        hint = self.hints.get(id(schema))
        return made if hint is None else st.one_of(hint, hint, made)

    def _make(self, schema: dict[str, Any]) -> st.SearchStrategy[Any]:
        if "const" in schema:
            return st.just(schema["const"])
        if "enum" in schema:
            return st.sampled_from(schema["enum"])
        if "anyOf" in schema and "type" not in schema:
            return st.one_of([self(branch) for branch in schema["anyOf"]])
        kinds = schema.get("type", "string")
        kinds = [kinds] if isinstance(kinds, str) else kinds
        return st.one_of([self._typed(schema, kind) for kind in kinds])

    def _typed(self, schema: dict[str, Any], kind: str) -> st.SearchStrategy[Any]:
        if kind == "null":
            return st.none()
        if kind == "boolean":
            return st.booleans()
        if kind == "integer":
            return st.integers(schema.get("minimum"), schema.get("maximum"))
        if kind == "number":
            low = schema.get("minimum", schema.get("exclusiveMinimum"))
            high = schema.get("maximum", schema.get("exclusiveMaximum"))
            return st.floats(
                low,
                high,
                exclude_min="exclusiveMinimum" in schema,
                exclude_max="exclusiveMaximum" in schema,
                allow_nan=False,
                allow_infinity=False,
            )
        if kind == "string":
            low, high = schema.get("minLength", 0), schema.get("maxLength", 40)
            if "pattern" in schema:
                regex = re.compile(_inner(schema["pattern"]), re.ASCII)
                return st.from_regex(regex, fullmatch=True).filter(lambda s: low <= len(s) <= high)
            return st.text(min_size=low, max_size=min(high, 40))
        if kind == "array":
            items = schema.get("items", {})
            return st.lists(
                self(items),
                max_size=min(schema.get("maxItems", 3), 3),
                unique=schema.get("uniqueItems", False),
            )
        assert kind == "object", kind
        properties = schema.get("properties", {})
        required = set(schema.get("required", []))
        fixed = st.fixed_dictionaries(
            {k: self(v) for k, v in properties.items() if k in required},
            optional={k: self(v) for k, v in properties.items() if k not in required},
        )
        more = schema.get("additionalProperties", False)
        if more is False:
            return fixed
        extra = st.dictionaries(st.text(min_size=1, max_size=8), self(more), max_size=3)
        return st.tuples(extra, fixed).map(lambda pair: {**pair[0], **pair[1]})


def _mutated(draw: st.DrawFn, fields: Any) -> Any:
    """A body one step off its schema (or left as it is)."""
    how = draw(
        st.sampled_from(
            ["keep"] * 4
            + ["unknown", "drop", "wrong", "wrong", "not-an-object", "deep", "huge", "odd"]
        )
    )
    if how == "not-an-object" or not isinstance(fields, dict):
        return draw(JSON)
    fields = dict(fields)
    keys = sorted(fields)
    key = draw(st.sampled_from(keys)) if keys else None
    if how == "unknown":
        fields[
            draw(st.sampled_from(["bogus", "force", "", "component_id "]) | st.text(max_size=8))
        ] = draw(JSON)
    elif how == "drop" and key is not None:
        del fields[key]
    elif how == "wrong" and key is not None:
        fields[key] = draw(JSON)
    elif how == "deep" and key is not None:
        value: Any = fields[key]
        for _ in range(draw(st.integers(20, 40))):
            value = [value]
        fields[key] = value
    elif how == "huge" and key is not None:
        fields[key] = draw(_HUGE)
    elif how == "odd" and key is not None:
        fields[key] = draw(_ODD_TEXT.map(lambda odd: f"{fields[key]}{odd}"))
    return fields


def _raw(draw: st.DrawFn, body: bytes) -> bytes:
    """The body's bytes, or the same body broken as JSON text."""
    how = draw(
        st.sampled_from(
            ["keep"] * 8
            + ["duplicate", "nan", "truncate", "empty", "utf8", "bom", "large", "nested", "digits"]
        )
    )
    if how == "duplicate" and body.startswith(b"{") and b":" in body:
        first = body[1 : body.index(b":")]
        return b"{" + first + b": null, " + body[1:]
    if how == "nan":
        return body.replace(b"1", b"NaN", 1) if b"1" in body else b'{"x": Infinity}'
    if how == "truncate":  # (drawn as a fraction: a signed body's length varies)
        return body[: int(len(body) * draw(st.floats(0, 0.99)))]
    if how == "empty":
        return b""
    if how == "utf8":
        return b"\xff" + body
    if how == "bom":
        return b"\xef\xbb\xbf" + body
    if how == "large":
        return b'{"x": "' + b"a" * (MAX_BODY + 10) + b'"}'
    if how == "nested":
        depth = draw(st.sampled_from([32, 33, 1000, 60_000]))
        return b"[" * depth + b"]" * depth
    if how == "digits":
        return b'{"uses": ' + b"9" * 5000 + b"}"
    return body


CONTENT_TYPES = st.sampled_from(
    [None, "application/json"] * 3
    + ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"]
    + ["application/json; charset=latin-1", "application/octet-stream"]
)


def _headers(draw: st.DrawFn, headers: dict[str, str]) -> dict[str, str]:
    kind = draw(CONTENT_TYPES)
    headers = {k: v for k, v in headers.items() if k != "Content-Type"}
    if kind is not None:
        headers["Content-Type"] = kind
    return headers


def _query(draw: st.DrawFn, route: openapi.Route) -> str:
    pairs = []
    for param in route.query:
        if draw(st.booleans()):
            continue
        schema = param["schema"]
        value = draw(
            st.one_of(
                st.sampled_from([str(v) for v in schema.get("enum", [])] or ["0"]),
                st.integers(-5, 10**6).map(str),
                st.sampled_from(["", "-1", "abc", "1.5", "nan", "%FF", "\u0661", "1e9", "9" * 30]),
                st.text(max_size=10),
            )
        )
        pairs.append(f"{param['name']}={urllib.parse.quote(value, safe='%')}")
    return "?" + "&".join(pairs) if pairs else ""


def _admin(draw: st.DrawFn) -> dict[str, str]:
    token = draw(st.sampled_from([ADMIN_TOKEN] * 8 + [None, "wrong", "\xe4\xff", ""]))
    return {} if token is None else {"Authorization": f"Bearer {token}"}


def _route_fields(path: str) -> dict[str, Any]:
    """A signed route's schema without the envelope signed_body adds."""
    schema = bodies.REQUEST_BODIES[path]
    properties = {k: v for k, v in schema["properties"].items() if k not in bodies.ENVELOPE}
    required = [k for k in schema["required"] if k not in bodies.ENVELOPE]
    return {**schema, "properties": properties, "required": required}


def _signed_for(
    draw: st.DrawFn, key: keypairs.PrivateKey, fields: Any, method: str, target: str, audience: str
) -> tuple[bytes, dict[str, str]]:
    if not isinstance(fields, dict):
        body = json.dumps(fields).encode()
        return body, {
            SIGNATURE_HEADER: signatures.sign(key, body),
            "Content-Type": "application/json",
        }
    body, headers = signed_body(key, fields, method=method, path=target, audience=audience)
    if draw(st.integers(0, 5)) == 0:
        # The envelope itself one step off, signed as it is (auth.py checks it first).
        envelope = _mutated(draw, json.loads(body))
        body = json.dumps(envelope).encode()
        headers[SIGNATURE_HEADER] = signatures.sign(key, body)
    return body, headers


def requests(api: Served, who: str) -> st.SearchStrategy[Request]:
    seeded = api.seeded
    hints: dict[int, st.SearchStrategy[Any]] = {
        id(fields.COMPONENT_ID): st.sampled_from(seeded.ids),
        id(fields.FINGERPRINT): st.sampled_from(seeded.fingerprints),
        id(fields.TOKEN_ID): st.sampled_from(seeded.token_ids),
        id(fields.SERIAL): st.sampled_from(seeded.serials),
        id(fields.DURATION): st.sampled_from(["1h", "10m", 7200, "2d", " 90 m", "1.5h"]),
        id(bodies.TXT): st.sampled_from(seeded.txts),
    }
    valid = FromSchema(hints)
    # The open GET routes go with the operator's (they take no body and no credential).
    routes = [r for r in openapi.ROUTES if r.who == who or (who, r.who) == ("operator", "open")]
    keys = [*seeded.keys, api.h.cloud.key, pool_key(200)]

    @st.composite
    def build(draw: st.DrawFn) -> Request:
        route = draw(st.sampled_from(routes))
        target = route.path + _query(draw, route)
        if route.method == "GET":
            headers = _admin(draw) if route.who == "operator" else {}
            return Request(
                draw(st.sampled_from(["GET"] * 5 + ["HEAD"])), route.path, target, None, headers
            )
        if who == "signed":
            if route.path == "/v1/credentials":
                target = route.path + draw(
                    st.sampled_from(["?wait=0"] * 6 + ["", "?wait=", "?wait=-1", "?wait=%D9%A1"])
                )
            fields = _mutated(draw, draw(valid(_route_fields(route.path))))
            key = draw(st.sampled_from(keys))
            body, headers = _signed_for(draw, key, fields, "POST", target, api.audience)
        else:
            schema = bodies.REQUEST_BODIES[route.path]
            fields = draw(valid(schema).filter(_validator(schema).is_valid))
            body = json.dumps(_mutated(draw, fields)).encode()
            headers = {"Content-Type": "application/json", **_admin(draw)}
        return Request("POST", route.path, target, _raw(draw, body), _headers(draw, headers))

    return build()


@st.composite
def anything(draw: st.DrawFn) -> Request:
    """Unknown paths, methods a path does not take, and bodies that are not JSON at all."""
    known = [r.path for r in openapi.ROUTES]
    path = draw(
        st.sampled_from(known)
        | st.text(max_size=12).map(lambda t: "/v1/" + urllib.parse.quote(t, safe=""))
    )
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]))
    body = draw(st.none() | st.binary(max_size=64) | JSON.map(lambda v: json.dumps(v).encode()))
    headers = {**_admin(draw), SIGNATURE_HEADER: draw(st.sampled_from(["", "x", "A" * 400]))}
    return Request(method, path, path, body, _headers(draw, headers))


# -- what every answer must be -------------------------------------------------------------


_VALIDATORS: dict[int, Validator] = {}


def _validator(schema: dict[str, Any]) -> Validator:
    if id(schema) not in _VALIDATORS:
        _VALIDATORS[id(schema)] = compile_schema(schema)
    return _VALIDATORS[id(schema)]


def check_answer(api: Served, request: Request, seen: Callable[[int], None]) -> None:
    status, headers, raw = api.send(request)
    seen(status)
    where = f"{status} for {request}: {raw[:300]!r}"
    assert status < 500, where
    after = api.snapshot()
    if request.method != "HEAD":
        assert headers.get_content_type() == "application/json", where
        answer = json.loads(raw)
        by_status = answers.RESPONSES.get((request.method, request.path), {})
        schema = by_status.get(status, answers.ERROR if status >= 400 else None)
        assert schema is not None, f"undocumented status {where}"
        errors = sorted(_validator(schema).iter_errors(answer), key=str)
        assert not errors, f"answer not as described: {errors[0].message[:300]} in {where}"
        if "error" in answer:
            assert answer["code"] in openapi.ERROR_CODES, where
    if 400 <= status < 500:
        unchanged_but_audit(api.last, after, where)
    api.last = after


def unchanged_but_audit(
    before: dict[str, list[tuple[Any, ...]]], after: dict[str, list[tuple[Any, ...]]], where: str
) -> None:
    for table in sorted(set(before) | set(after)):
        old, new = before.get(table, []), after.get(table, [])
        if table == "events":
            assert new[: len(old)] == old, f"a refusal changed past events: {where}"
            added = new[len(old) :]
            kinds = {row[6] for row in added}  # seq, at, component_id, role, cluster, ...
            assert kinds <= AUDIT_KINDS, f"a refusal wrote {sorted(kinds)} events: {where}"
        else:
            assert old == new, f"a refusal changed table {table}: {where}"


def _counting(counts: dict[int, int]) -> Callable[[int], None]:
    def seen(status: int) -> None:
        counts[status] = counts.get(status, 0) + 1

    return seen


# -- the runs ------------------------------------------------------------------------------


def _run(api: Served, strategy: st.SearchStrategy[Request], examples: int) -> dict[int, int]:
    counts: dict[int, int] = {}
    seen = _counting(counts)

    @budget(examples)
    @given(strategy)
    def fuzz(request: Request) -> None:
        check_answer(api, request, seen)

    fuzz()
    return counts


def test_operator_routes_fuzzed_with_and_without_the_admin_token(api: Served) -> None:
    counts = _run(api, requests(api, "operator"), EXAMPLES["operator"])
    # The run reached the handlers, not only the checks in front of them.
    assert counts.get(200, 0) >= 20 and counts.get(400, 0) >= 50 and counts.get(401, 0) >= 5, counts


def test_signed_routes_fuzzed_with_known_and_unknown_keys(api: Served) -> None:
    counts = _run(api, requests(api, "signed"), EXAMPLES["signed"])
    assert counts.get(400, 0) >= 20 and counts.get(403, 0) + counts.get(202, 0) >= 5, counts


def test_any_path_method_and_body(api: Served) -> None:
    counts = _run(api, anything(), EXAMPLES["anything"])
    assert counts.get(404, 0) >= 5 and counts.get(405, 0) >= 5, counts
