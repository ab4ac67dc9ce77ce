"""docs/protocol.md against the code: every TXT key and its grammar, the refused address
ranges, the constants, every example record (as the agent would announce it, and decoded),
the rejection vectors, the token-proof test vector, the signed request example (verified by
the registrar's own check) and the credential bundle layout.

The document is the specification another implementation is written from: when the code
changes what crosses the wire, this test fails until the document says so too.
"""

from __future__ import annotations

import importlib
import ipaddress
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from eucareg.agent import announce
from eucareg.agent.identity import Identity
from eucareg.api import auth
from eucareg.config.file import from_mapping
from eucareg.core import grammar, txt
from eucareg.core.model import AnnouncedState, Announcement, Role
from eucareg.core.trust import make_proof, parse_token, proof_message
from eucareg.mdns.types import ServiceSpec
from eucareg.pki import credentials as cred
from eucareg.pki import keypairs, signing, tls

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
DOC = DOC_PATH.read_text()
TOKEN_KEYS = {"tok", "tts", "tproof"}


def section(number: str) -> str:
    """The text of section `number` ("3.2"), up to the next heading of its level or above."""
    level = number.count(".") + 2
    start = re.search(rf"^#{{{level}}} {re.escape(number)}\.? .*$", DOC, re.M)
    assert start is not None, f"docs/protocol.md has no section {number}"
    end = re.compile(rf"^#{{2,{level}}} ", re.M).search(DOC, start.end())
    return DOC[start.end() : end.start() if end else len(DOC)]


def code_blocks(text: str) -> list[str]:
    return re.findall(r"^```[a-z]*\n(.*?)^```", text, re.M | re.S)


def table_rows(text: str) -> list[list[str]]:
    """The cells of every markdown table row in `text` (header and rule rows included);
    an escaped '\\|' stays inside its cell, unescaped."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|"):
            cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
            rows.append([c.strip().replace("\\|", "|") for c in cells])
    return rows


def ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]*)`", cell)


# -- keys and grammars -----------------------------------------------------------------------


def every_key_encode_makes() -> set[str]:
    return set(
        txt.encode(
            role=Role.CC,
            component_id="cc-0123456789ab",
            cluster="cluster1",
            state=AnnouncedState.REGISTERED,
            address=ipaddress.ip_address("10.0.0.1"),
            fingerprint="sha256:" + "0" * 64,
            api_port=8780,
            eucavers="3.4",
            token=("abcdefghijkl", 1, "A" * 43),
        )
    )


def key_table() -> dict[str, list[str]]:
    rows = table_rows(section("3.2"))
    return {ticked(r[0])[0]: r for r in rows if r and ticked(r[0])}


def test_every_txt_key_is_documented_and_nothing_else() -> None:
    assert set(key_table()) == every_key_encode_makes()


@pytest.mark.parametrize(
    ("key", "pattern"),
    [
        ("id", grammar.COMPONENT_ID),
        ("fp", grammar.FINGERPRINT),
        ("cluster", grammar.CLUSTER),
        ("eucavers", grammar.VERSION),
        ("tok", grammar.TOKEN_ID),
        ("tproof", grammar.PROOF),
        ("port", grammar._DIGITS),
        ("tts", grammar._DIGITS),
    ],
)
def test_each_key_names_the_grammar_decoding_applies(key: str, pattern: re.Pattern[str]) -> None:
    assert pattern.pattern in ticked(key_table()[key][1])


def test_fixed_values_and_number_bounds_are_the_codes() -> None:
    table = key_table()
    assert f"exactly `{txt.TXT_VERSION}`" in table["txtvers"][1]
    assert f"exactly `{txt.PROTOCOL_VERSION}`" in table["protovers"][1]
    types = [role.txt_type for role in Role]
    assert ticked(table["type"][1]) == types
    assert ticked(table["state"][1]) == [s.value for s in AnnouncedState]
    assert "1\N{EN DASH}65535" in table["port"][1]
    assert f"0\N{EN DASH}{grammar.MAX_TIME}" in table["tts"][1]
    roles = table_rows(section("1.1"))
    assert [ticked(r[1])[0] for r in roles[2:]] == types
    assert [ticked(r[0])[0] for r in roles[2:]] == [role.value for role in Role]


def test_every_refused_and_usable_address_range_is_documented() -> None:
    text = section("3.3")
    documented = set(re.findall(r"`([0-9a-f.:]+/\d+)`", text))
    refused = {str(row.network) for row in grammar.REFUSED}
    usable = {str(row.network) for row in grammar.USABLE} - {"0.0.0.0/0"}
    assert documented == refused | usable


# -- constants ---------------------------------------------------------------------------------


def test_constants_are_the_codes() -> None:
    rows = [r for r in table_rows(section("1.2"))[2:]]
    assert len(rows) >= 16
    for name_cell, value_cell, module_cell in rows:
        name, value, module = ticked(name_cell)[0], ticked(value_cell)[0], ticked(module_cell)[0]
        actual = getattr(
            importlib.import_module(module.removesuffix(".py").replace("/", ".")), name
        )
        if isinstance(actual, int | float):
            assert actual == float(value), name
        else:
            assert str(actual) == value, name
    assert all(name in DOC for name in tls.SERVER_NAMES.values())


# -- example records ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    instance: str
    srv_port: int
    target: str
    addresses: tuple[str, ...]
    txt: dict[str, str]


SRV_LINE = re.compile(
    r"^(?P<instance>\S+)\s+SRV 0 0 (?P<port>\d+) (?P<target>\S+)\s+A (?P<a>[0-9., ]+?)\s*(\(.*\))?$"
)


def examples() -> list[Example]:
    found = []
    lines = code_blocks(section("3.5"))[0].splitlines()
    for srv, record in zip(lines[::2], lines[1::2], strict=True):
        match = SRV_LINE.match(srv)
        assert match is not None, srv
        pairs = re.findall(r'"([a-z]+)=([^"]*)"', record)
        assert pairs and pairs[0][0] == "txtvers", record
        found.append(
            Example(
                instance=match["instance"],
                srv_port=int(match["port"]),
                target=match["target"],
                addresses=tuple(a.strip() for a in match["a"].split(",")),
                txt=dict(pairs),
            )
        )
    return found


def example(txt_type: str, state: str = "ready", token: bool = False) -> Example:
    return next(
        e
        for e in examples()
        if e.txt["type"] == txt_type
        and e.txt["state"] == state
        and (set(e.txt) >= TOKEN_KEYS) == token
    )


KEY = keypairs.generate_key()


def spec_of(
    e: Example, monkeypatch: pytest.MonkeyPatch, *, registered: bool, token: bool
) -> ServiceSpec:
    """What eucareg's agent announces for the component the example describes."""
    role = Role.from_txt_type(e.txt["type"])
    component = {"cluster": e.txt["cluster"]} if "cluster" in e.txt else {}
    cfg = from_mapping(
        {
            "address": e.txt["addr"],
            "state_dir": "/nonexistent/eucareg",
            "eucalyptus_version": e.txt["eucavers"],
            "components": {role.value: component},
        }
    )
    comp = cfg.component(role)
    assert comp is not None
    identity = Identity(e.txt["id"], KEY, e.txt["fp"])
    prover = None
    if token:
        prover = announce.TokenProver(parse_token(token_vector()["token"]))
        monkeypatch.setattr(
            "eucareg.agent.announce.time.time", lambda: float(e.txt.get("tts", 1795599669))
        )
    others = [ipaddress.ip_address(a) for a in e.addresses]
    monkeypatch.setattr(announce, "usable_addresses", lambda: others)
    return announce.service_spec(
        cfg, comp, identity, registered=registered, api_port=cfg.api_port, prover=prover
    )


def test_there_is_an_example_of_each_role_and_state() -> None:
    seen = {(e.txt["type"], e.txt["state"], set(e.txt) >= TOKEN_KEYS) for e in examples()}
    assert {(t, s) for t, s, _ in seen} == {
        *((role.txt_type, "ready") for role in Role),
        ("cluster", "registered"),
    }
    assert any(with_token for *_, with_token in seen)


def test_each_example_is_what_the_agent_announces(monkeypatch: pytest.MonkeyPatch) -> None:
    for e in examples():
        token = set(e.txt) >= TOKEN_KEYS
        spec = spec_of(e, monkeypatch, registered=e.txt["state"] == "registered", token=token)
        assert spec.txt == e.txt, e.instance
        assert (spec.instance, spec.server, spec.port) == (e.instance, e.target, e.srv_port)
        assert spec.addresses == e.addresses, e.instance
        hyphenated = e.txt["addr"].replace(".", "-")
        assert e.target == f"eucareg-{hyphenated}.local."


def test_each_example_decodes_to_the_component_it_describes() -> None:
    for e in examples():
        ann = txt.decode(e.instance, e.txt, e.addresses)
        assert isinstance(ann, Announcement), (e.instance, ann)
        assert ann.role.txt_type == e.txt["type"]
        assert (ann.component_id, ann.fingerprint) == (e.txt["id"], e.txt["fp"])
        assert str(ann.address) == e.txt["addr"]
        assert ann.api_port == (int(e.txt["port"]) if "port" in e.txt else None)


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize("registered", [False, True])
@pytest.mark.parametrize("token", [False, True])
def test_the_keys_of_each_role_in_each_state_are_the_examples(
    role: Role, registered: bool, token: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = "registered" if role is Role.CC and registered else "ready"
    base = example(role.txt_type, state)
    spec = spec_of(base, monkeypatch, registered=registered, token=token)
    proves = token and not registered and role is not Role.CLC
    assert set(spec.txt) == set(base.txt) | (TOKEN_KEYS if proves else set())


# -- rejection vectors -------------------------------------------------------------------------

VECTOR = re.compile(
    r"^(?P<changes>\S.*?)\s{2,}(?P<code>bad-txt|no-address|bad-address|replayed)\s{2,}(?P<reason>.+)$"
)


def rejection_vectors() -> list[tuple[str, str, str]]:
    block = next(b for b in code_blocks(section("3.4")) if "bad-txt" in b)
    out = []
    for line in block.splitlines():
        match = VECTOR.match(line)
        assert match is not None, line
        out.append((match["changes"].strip(), match["code"], match["reason"]))
    return out


def test_there_are_rejection_vectors_for_every_code() -> None:
    codes = {code for _, code, _ in rejection_vectors()}
    assert codes == {"bad-txt", "no-address", "bad-address", "replayed"}


@pytest.mark.parametrize(("changes", "code", "reason"), rejection_vectors())
def test_rejection_vectors_are_what_decoding_says(changes: str, code: str, reason: str) -> None:
    base = example("walrus")
    record = dict(base.txt)
    for change in changes.split():
        if change.startswith("-"):
            del record[change[1:]]
        else:
            key, _, value = change.partition("=")
            record[key] = value
    assert txt.decode(base.instance, record, base.addresses) == txt.Rejected(code, reason)


def test_the_decoding_table_lists_the_codes_in_decoding_order() -> None:
    rows = table_rows(section("3.4"))[2:]
    assert [int(r[0]) for r in rows] == list(range(1, len(rows) + 1))
    codes = [ticked(r[2])[0] for r in rows]
    assert codes == ["bad-txt"] * 11 + ["no-address", "bad-address", "replayed"]


# -- the join-token proof ----------------------------------------------------------------------


def token_vector() -> dict[str, str]:
    block = next(b for b in code_blocks(section("4")) if b.startswith("token "))
    return dict(line.split(maxsplit=1) for line in block.splitlines())


def test_token_proof_vector() -> None:
    vector = token_vector()
    node = example("node", token=True)
    message = proof_message(
        component_id=node.txt["id"],
        fingerprint=node.txt["fp"],
        role=Role.from_txt_type(node.txt["type"]),
        cluster=node.txt["cluster"],
        address=node.txt["addr"],
        stamp=int(node.txt["tts"]),
    )
    assert message == vector["message"].encode("ascii")
    proof = make_proof(parse_token(vector["token"]).secret, message)
    assert proof == vector["tproof"] == node.txt["tproof"]
    assert parse_token(vector["token"]).token_id == node.txt["tok"]


# -- the signed request ------------------------------------------------------------------------


def signed_example() -> tuple[str, dict[str, str], bytes]:
    block = next(b for b in code_blocks(section("7.6")) if b.startswith("POST "))
    head, _, body = block.partition("\n\n")
    request_line, *header_lines = head.splitlines()
    headers = dict(line.split(": ", 1) for line in header_lines)
    return request_line, headers, body.rstrip("\n").encode()


def test_signed_request_example_passes_the_registrars_check() -> None:
    request_line, headers, body = signed_example()
    method, target, _ = request_line.split()
    payload = json.loads(body)
    assert int(headers["Content-Length"]) == len(body)
    nonces = auth.NonceCache(started=payload["timestamp"] - 1)
    verified, key = auth.verify_signed(
        body,
        headers[signing.SIGNATURE_HEADER],
        nonces,
        method=method,
        path=target,
        audiences={example("cloud").txt["id"]},
        now=payload["timestamp"] + 1,
    )
    assert verified == payload
    # Signed by the Walrus of the examples, for the CLC of the examples.
    assert keypairs.fingerprint(key) == example("walrus").txt["fp"]
    assert payload["component_id"] == example("walrus").txt["id"]


def test_signed_request_example_has_the_fields_in_the_senders_order() -> None:
    _, _, body = signed_example()
    payload = json.loads(body)
    made, made_headers = signing.signed_body(
        KEY,
        {"component_id": payload["component_id"]},
        method=payload["method"],
        path=payload["path"],
        audience=payload["audience"],
    )
    assert list(json.loads(made)) == list(payload)
    assert set(made_headers) == {signing.SIGNATURE_HEADER, "Content-Type"}
    envelope = [ticked(r[0])[0] for r in table_rows(section("7.1"))[2:]]
    assert envelope == list(payload)[1:]
    assert payload["v"] == signing.SIGNED_VERSION


# -- the credential bundle ---------------------------------------------------------------------


def test_bundle_layout_is_the_codes() -> None:
    rows = table_rows(section("9"))[2:]
    names = {"Walrus": Role.WALRUS, "CC": Role.CC, "SC": Role.SC, "NC": Role.NC}
    assert [r[0] for r in rows] == list(names)
    for role_cell, bundle_cell, own_cell in rows:
        layout = cred.LAYOUTS[names[role_cell]]
        assert set(ticked(bundle_cell)) == {cred.CLOUD_CERT, layout.cert} | (
            {layout.issuer} if layout.issuer else set()
        )
        assert ticked(own_cell) == [layout.key]
        assert sorted({*ticked(bundle_cell), *ticked(own_cell)}) == cred.required_files(
            names[role_cell]
        )
