"""The commands about this host, through click's CliRunner: check-config (text and --json, exit 2
on a bad file), fingerprint (creates the identity once, exit 1 when it cannot), the group's
help and version, and the agent's exit 2 on a bad configuration. No network is used.
"""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner, Result

from eucareg.cli.main import main
from eucareg.cli.render import render_tree
from eucareg.cli.render import render_tree as render_tree_home


def run(*args: str) -> Result:
    result = CliRunner().invoke(main, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    return result


def config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "eucareg.toml"
    path.write_text(
        f'address = "10.0.2.31"\nstate_dir = "{tmp_path / "state"}"\n'
        '[components.cc]\ncluster = "cluster1"\ninstalled = true\n'
        '[components.nc]\ncluster = "cluster1"\n' + extra
    )
    return path


def test_check_config_text_and_json(tmp_path: Path) -> None:
    path = config(tmp_path)
    result = run("check-config", "--config", str(path))
    assert result.exit_code == 0
    assert result.stdout.startswith(f"ok: {path}\n")
    assert "  api_port           8780\n" in result.stdout
    assert "  component          nc      cluster=cluster1 address=10.0.2.31\n" in result.stdout
    data = json.loads(run("check-config", "--config", str(path), "--json").stdout)
    assert data["address"] == "10.0.2.31" and data["runs_registrar"] is True
    assert (data["fallback_after"], data["report_interval"], data["dnssd"]) == (10.0, 30.0, None)
    assert data["state_dir"] == str(tmp_path / "state")
    assert [(c["role"], c["cluster"], c["installed"]) for c in data["components"]] == [
        ("cc", "cluster1", None),
        ("nc", "cluster1", "/var/lib/dpkg/info/eucalyptus-nc.list"),
    ]
    assert not (tmp_path / "state").exists()  # nothing is created


def test_check_config_errors_are_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    result = run("check-config", "--config", str(missing))
    assert (result.exit_code, result.stderr) == (2, f"error: {missing}: no such file\n")
    bad = config(tmp_path, "[bogus]\n")
    result = run("check-config", "--config", str(bad))
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {bad}: ")
    assert "bogus" in result.stderr
    assert run("agent", "--config", str(missing)).exit_code == 2
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b'address = "\xff"\n')
    result = run("check-config", "--config", str(binary))
    assert (result.exit_code, result.stderr) == (
        2,
        f"error: {binary}: not UTF-8 text (byte 11)\n",
    )


def test_fingerprint_creates_each_identity_once(tmp_path: Path) -> None:
    path = config(tmp_path)
    first = json.loads(run("fingerprint", "--config", str(path), "--json").stdout)
    assert [row["role"] for row in first] == ["cc", "nc"]
    assert all(row["fingerprint"].startswith("sha256:") for row in first)
    assert first == json.loads(run("fingerprint", "--config", str(path), "--json").stdout)
    text = run("fingerprint", "--config", str(path)).stdout.splitlines()
    assert text == [f"{r['role']:7} {r['component_id']:20} {r['fingerprint']}" for r in first]


def test_fingerprint_without_a_usable_state_dir_is_exit_1(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    path = tmp_path / "eucareg.toml"
    path.write_text(
        f'address = "10.0.2.31"\nstate_dir = "{blocker / "state"}"\n'
        '[components.nc]\ncluster = "cluster1"\n'
    )
    result = run("fingerprint", "--config", str(path))
    assert result.exit_code == 1
    assert result.stderr.startswith("error: cannot read or create the nc identity: ")


def test_help_version_and_unknown_commands() -> None:
    result = run("-h")
    assert result.exit_code == 0
    for command in ("agent", "status", "events", "pending", "approve", "token", "install-mode"):
        assert command in result.stdout
    assert "demo" not in result.stdout  # the demo is `eucalab demo` now
    version = run("--version")
    assert version.exit_code == 0 and "version 0." in version.stdout
    assert run("token", "-h").exit_code == 0
    assert run("nosuch").exit_code == 2


def test_render_tree_is_importable_from_main_and_render() -> None:
    assert render_tree is render_tree_home
