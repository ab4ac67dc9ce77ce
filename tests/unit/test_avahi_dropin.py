"""packaging/avahi/eucareg-avahi-limits: merging eucareg's limits into avahi-daemon.conf, which
has no include directory. Keys are added or raised, never lowered; everything else is kept; a
second run changes nothing; --check says what is short. (A real avahi-daemon taking the limits:
tests/integration/test_avahi_backend.py.)"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "packaging" / "avahi" / "eucareg-avahi-limits"
FRAGMENT = ROOT / "packaging" / "avahi" / "eucareg-limits.conf"

# The [server] section of Debian 12's avahi-daemon.conf, as shipped.
DEBIAN = """\
# This file is part of avahi.
[server]
#host-name=foo
#domain-name=local
use-ipv4=yes
use-ipv6=yes
#allow-interfaces=eth0
#check-response-ttl=no
#use-iff-running=no
#enable-dbus=yes
#disallow-other-stacks=no
#allow-point-to-point=no
#cache-entries-max=4096
#clients-max=4096
#objects-per-client-max=1024
#entries-per-entry-group-max=32
ratelimit-interval-usec=1000000
ratelimit-burst=1000

[wide-area]
enable-wide-area=yes

[publish]
publish-hinfo=no
"""


def load() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("eucareg_avahi_limits", str(SCRIPT))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def limits() -> ModuleType:
    return load()


def test_the_fragment_holds_what_1000_ncs_need(limits: ModuleType) -> None:
    wanted = limits.wanted(FRAGMENT.read_text())
    assert wanted == {
        "cache-entries-max": 16384,
        "objects-per-client-max": 8192,
        "entries-per-entry-group-max": 64,
        "clients-max": 4096,
    }
    assert wanted["cache-entries-max"] > 4 * 1000 + 100  # PTR, SRV, TXT, A per NC
    assert wanted["objects-per-client-max"] > 1000 + 100  # a resolver per service


def test_merging_into_debians_file_adds_each_key_after_its_default(limits: ModuleType) -> None:
    wanted = limits.wanted(FRAGMENT.read_text())
    merged, changes = limits.merge(DEBIAN, wanted)
    lines = merged.splitlines()
    at = lines.index("#cache-entries-max=4096")
    assert lines[at + 1] == "cache-entries-max=16384"
    assert lines[lines.index("#objects-per-client-max=1024") + 1] == "objects-per-client-max=8192"
    assert lines[lines.index("#clients-max=4096") + 1] == "clients-max=4096"
    assert len(changes) == 4
    # Nothing else moved or went away.
    assert [line for line in lines if line not in {f"{k}={v}" for k, v in wanted.items()}] == (
        DEBIAN.splitlines()
    )
    assert limits.merge(merged, wanted) == (merged, [])  # a second run changes nothing


def test_a_bigger_value_is_kept_and_a_smaller_one_raised(limits: ModuleType) -> None:
    text = "[server]\nobjects-per-client-max=20000\ncache-entries-max=100\n\n[publish]\nx=1\n"
    merged, changes = limits.merge(
        text, {"objects-per-client-max": 8192, "cache-entries-max": 16384, "clients-max": 4096}
    )
    assert merged == (
        "[server]\nobjects-per-client-max=20000\ncache-entries-max=16384\nclients-max=4096\n\n"
        "[publish]\nx=1\n"
    )
    assert changes == ["cache-entries-max: 100 -> 16384", "clients-max: (Avahi's default) -> 4096"]


def test_a_file_without_a_server_section_gets_one(limits: ModuleType) -> None:
    merged, _ = limits.merge("[publish]\nx=1\n", {"clients-max": 4096})
    assert merged == "[server]\nclients-max=4096\n\n[publish]\nx=1\n"


def test_a_broken_fragment_is_refused_with_its_line(limits: ModuleType) -> None:
    with pytest.raises(SystemExit, match="fragment line 2: expected KEY=NUMBER in \\[server\\]"):
        limits.wanted("[server]\ncache-entries-max=lots\n")


def test_the_command_checks_merges_once_and_keeps_a_backup(tmp_path: Path) -> None:
    config = tmp_path / "avahi-daemon.conf"
    config.write_text(DEBIAN)
    config.chmod(0o644)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, str(SCRIPT), "--config", str(config), *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)

    check = run("--check")
    assert check.returncode == 1 and "cache-entries-max: (Avahi's default) -> 16384" in check.stdout
    assert config.read_text() == DEBIAN  # --check changes nothing
    merge = run()
    assert merge.returncode == 0, merge.stderr
    assert "systemctl restart avahi-daemon" in merge.stdout
    assert (tmp_path / "avahi-daemon.conf.eucareg-bak").read_text() == DEBIAN
    assert "objects-per-client-max=8192" in config.read_text().splitlines()
    assert config.stat().st_mode & 0o777 == 0o644
    again = run("--check")
    assert again.returncode == 0 and "already has eucareg's limits" in again.stdout
    missing = run("--config", str(tmp_path / "nope.conf"))
    assert missing.returncode == 2 and "nope.conf" in missing.stderr
