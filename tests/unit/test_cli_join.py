"""`eucareg join` against a registrar served over real TLS on 127.0.0.1: it believes only the
registrar proving the token's CA key, and changes nothing otherwise; it keeps the operator's
comments, names each bad argument, and reports where each component stands."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from eucareg.config import edit
from eucareg.config.values import ConfigError
from eucareg.core.model import Role
from tests.unit.test_agent_fakes import FakeCloud, FakeRegistrar, key
from tests.unit.test_cli_operator import run

pytestmark = pytest.mark.usefixtures("no_host_config")

CONFIG = """\
# the remote site's CC+SC (kept by join)
address = "10.0.2.10"
state_dir = "{state}"
fallback_after = "2s"

[preconditions]
sshd = false

[components.cc]
cluster = "cluster2"  # our cluster
installed = true

[components.sc]
cluster = "cluster2"
installed = true
"""


def token_for(cloud: FakeCloud, n: int = 1) -> str:
    secret = base64.urlsafe_b64encode(bytes([n]) * 32).rstrip(b"=").decode()
    return f"eucareg1.tok{n:09d}.{secret}.{cloud.fingerprint.removeprefix('sha256:')}"


def _bytes(path: Path) -> bytes:
    return path.read_bytes()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _exists(path: Path) -> bool:
    return path.exists()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "eucareg.toml"
    path.write_text(CONFIG.format(state=tmp_path / "state"))
    path.chmod(0o640)
    return path


async def test_join_writes_the_config_and_announces_each_component(config: Path) -> None:
    cloud = FakeCloud()
    registrar = FakeRegistrar(cloud=cloud)
    url = await registrar.start()
    try:
        t_cc, t_sc = token_for(cloud, 1), token_for(cloud, 2)
        result = await run(
            "join",
            url,
            "--token",
            f"cc={t_cc}",
            "--token",
            f"sc={t_sc}",
            "--config",
            str(config),
            "--json",
            "--wait",
            "1s",
        )
        assert result.exit_code == 0, result.output
        answer = json.loads(result.stdout)
        assert answer["registrar"] == url and answer["ca_fingerprint"] == cloud.fingerprint
        assert [c["role"] for c in answer["components"]] == ["cc", "sc"]
        assert {c["status"] for c in answer["components"]} == {"pending"}
        # Each announced with its token's proof, signed by its own (new) key.
        assert [a["txt"]["type"] for a in registrar.announced] == ["cluster", "storage"]
        assert [a["txt"]["tok"] for a in registrar.announced] == ["tok000000001", "tok000000002"]
    finally:
        await registrar.close()
    text = _bytes(config).decode()
    assert "# the remote site's CC+SC (kept by join)" in text and "# our cluster" in text
    assert f'fallback_registrar = "{url}"' in text
    assert f'token = "{t_cc}"' in text and f'token = "{t_sc}"' in text
    assert _mode(config) == 0o600  # 0640 before: the tokens are secrets
    backup = CONFIG.format(state=config.parent / "state").encode()
    assert _bytes(config.with_name("eucareg.toml.bak")) == backup


async def test_join_believes_only_the_registrar_with_the_tokens_ca_and_changes_nothing(
    config: Path,
) -> None:
    rogue = FakeRegistrar(cloud=FakeCloud(key=key(7)))
    url = await rogue.start()
    before = _bytes(config)
    try:
        genuine = FakeCloud()
        result = await run(
            "join",
            url,
            "--token",
            f"cc={token_for(genuine)}",
            "--config",
            str(config),
        )
    finally:
        await rogue.close()
    assert result.exit_code == 1, result.output
    assert "does not prove the cloud CA key the token names" in result.output
    assert "nothing changed" in result.output
    assert _bytes(config) == before and not _exists(config.with_name("eucareg.toml.bak"))
    assert rogue.announcements == 0
    assert not _exists(config.parent / "state")  # no identity made for a rogue either


async def test_join_to_nobody_changes_nothing(config: Path) -> None:
    before = _bytes(config)
    result = await run(
        "join",
        "https://127.0.0.1:9",
        "--token",
        f"cc={token_for(FakeCloud())}",
        "--config",
        str(config),
    )
    assert result.exit_code == 1 and "cannot reach https://127.0.0.1:9" in result.output
    assert _bytes(config) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--token", "TOKEN"], "this host runs cc, sc: say which one each token is for"),
        (["--token", "nc=TOKEN"], "this host has no nc component"),
        (["--token", "clc=TOKEN"], "this host has no clc component"),
        (["--token", "xx=TOKEN"], "xx=…: no such role"),
        (["--token", "cc=TOKEN", "--token", "cc=TOKEN"], "two tokens for the cc"),
        (["--token", "cc=eucareg1.short"], "--token for the cc: not an eucareg join token"),
        (["--token", "cc=TOKEN", "--wait", "forever"], "--wait"),
    ],
)
async def test_bad_arguments_are_named_and_change_nothing(
    config: Path, args: list[str], message: str
) -> None:
    token = token_for(FakeCloud())
    argv = [a.replace("TOKEN", token) for a in args]
    before = _bytes(config)
    result = await run("join", "https://127.0.0.1:9", *argv, "--config", str(config))
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output
    assert _bytes(config) == before


async def test_a_bad_url_is_named(config: Path) -> None:
    result = await run(
        "join", "ftp://x", "--token", f"cc={token_for(FakeCloud())}", "--config", str(config)
    )
    assert result.exit_code == 2 and "URL: expected 'https://HOST:PORT'" in result.output


async def test_tokens_of_two_clouds_are_refused(config: Path) -> None:
    one, other = FakeCloud(), FakeCloud(key=key(8))
    result = await run(
        "join",
        "https://127.0.0.1:9",
        "--token",
        f"cc={token_for(one)}",
        "--token",
        f"sc={token_for(other)}",
        "--config",
        str(config),
    )
    assert result.exit_code == 2 and "the tokens name different clouds" in result.output


def test_the_edit_keeps_layout_and_refuses_what_would_not_load() -> None:
    text = CONFIG.format(state="/srv/x")
    out = edit.joined(text, "https://10.0.2.1:8780", {Role.CC: token_for(FakeCloud())})
    assert out.startswith("# the remote site's CC+SC (kept by join)\n")
    with pytest.raises(ConfigError, match=r"components\.nc: this host has no nc"):
        edit.joined(text, "https://10.0.2.1:8780", {Role.NC: "t"})
    with pytest.raises(ConfigError, match="fallback_registrar"):
        edit.joined(text, "gopher://x", {Role.CC: token_for(FakeCloud())})
    with pytest.raises(ConfigError, match="not valid TOML"):
        edit.joined("address = ", "https://10.0.2.1:8780", {Role.CC: "t"})


def test_replace_file_is_atomic_and_keeps_the_mode(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("old\n")
    os.chmod(path, 0o600)
    edit.replace_file(path, "new\n")
    assert path.read_text() == "new\n" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.with_name("c.toml.bak").read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml", "c.toml.bak"]
