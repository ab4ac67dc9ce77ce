"""`eucareg setup ROLE`: the clusters and the CLC heard are offered, the CLC's key is pinned
once confirmed, the registrar's host is asked for when nothing suitable is heard, and the
configuration is written (comments kept) only when it would load. The listener is canned; one
test drives the real command, and a real listener, through a pseudo-terminal.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import pty
import select
import shutil
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from eucareg.cli import discover
from eucareg.cli.main import main
from eucareg.config import values as config_values
from eucareg.core.model import IPAddress, Role
from eucareg.mdns.types import Sighting
from tests.unit.test_cli_discover import CLC_FP, clc, member

HOST_ADDRESS = ipaddress.ip_address("10.0.2.31")


def a_token(fingerprint: str = CLC_FP, n: int = 1) -> str:
    secret = base64.urlsafe_b64encode(bytes([n]) * 32).rstrip(b"=").decode()
    return f"eucareg1.tok{n:09d}.{secret}.{fingerprint.removeprefix('sha256:')}"


@pytest.fixture(autouse=True)
def canned(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Sighting]]:
    """What `listen` hears (it never opens a socket); the host has one usable address."""
    heard: list[Sighting] = []
    LISTENED.clear()
    BACKENDS.clear()

    async def listen(
        seconds: float, *, ipv6: bool = False, backend_name: str = "auto"
    ) -> list[Sighting]:
        LISTENED.append(seconds)
        BACKENDS.append(backend_name)
        return list(heard)

    monkeypatch.setattr(discover, "listen", listen)
    monkeypatch.setattr(config_values, "usable_addresses", lambda: [HOST_ADDRESS])
    yield heard


LISTENED: list[float] = []
BACKENDS: list[str] = []  # the --backend each listen was asked to use


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "etc" / "eucareg.toml"


def run(path: Path, *args: str, answers: str = "") -> Result:
    result = CliRunner().invoke(main, ["setup", *args, "--config", str(path)], input=answers)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    return result


def written(path: Path) -> dict[str, object]:
    return tomllib.loads(path.read_text())


def test_an_sc_chooses_the_second_of_three_clusters_and_pins_the_clc(
    canned: list[Sighting], path: Path
) -> None:
    canned += [
        clc(),
        member(Role.CC, "cluster1", 11, registered=True),
        member(Role.CC, "cluster2", 12),
        member(Role.NC, "cluster3", 13),
    ]
    result = run(path, "sc", answers="2\ny\n")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "1) cluster1: CC cc-00000000000b at 10.77.1.11, registered" in out
    assert "2) cluster2: CC cc-00000000000c at 10.77.1.12, not registered yet" in out
    assert "3) cluster3: no CC heard" in out and "4) another cluster" in out
    assert CLC_FP in out and "ca_fingerprint" in out
    assert written(path) == {
        "ca_fingerprint": CLC_FP,
        "components": {"sc": {"cluster": "cluster2"}},
    }
    assert LISTENED == [3.0]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755
    assert "Next: start the agent" in out


def test_an_nc_that_hears_nothing_asks_for_its_cc(path: Path) -> None:
    result = run(path, "nc", "--timeout", "200ms", answers="cluster1\ncc1.example:8781\n")
    assert result.exit_code == 0, result.output
    assert (
        "No cluster heard" in result.stdout and "no CC of cluster cluster1 heard" in result.stdout
    )
    assert written(path) == {
        "fallback_registrar": "https://cc1.example:8781",
        "components": {"nc": {"cluster": "cluster1"}},
    }
    assert LISTENED == [0.2]


def test_an_nc_of_a_cluster_whose_cc_is_heard_needs_no_registrar(
    canned: list[Sighting], path: Path
) -> None:
    canned += [member(Role.CC, "cluster1", 11, registered=True)]
    result = run(path, "nc", answers="1\n")
    assert result.exit_code == 0, result.output
    assert written(path) == {"components": {"nc": {"cluster": "cluster1"}}}


def test_a_cc_names_its_cluster_and_confirms_the_clc_fingerprint(
    canned: list[Sighting], path: Path
) -> None:
    canned += [clc(), member(Role.CC, "cluster1", 11, registered=True)]
    result = run(path, "cc", answers="cluster2\ny\n")
    assert result.exit_code == 0, result.output
    assert "cluster1: CC cc-00000000000b" in result.stdout  # names taken are shown
    assert "Is this the fingerprint the CLC shows?" in result.stdout
    assert written(path) == {
        "ca_fingerprint": CLC_FP,
        "components": {"cc": {"cluster": "cluster2"}},
    }


def test_a_cc_that_does_not_confirm_the_clc_is_asked_for_its_host(
    canned: list[Sighting], path: Path
) -> None:
    canned += [clc(), member(Role.CC, "cluster1", 11, registered=True)]
    result = run(path, "cc", answers="cluster1\nn\n10.0.2.10\n")
    assert result.exit_code == 0, result.output
    assert "a CC already announces cluster cluster1" in result.stderr
    assert written(path) == {
        "fallback_registrar": "https://10.0.2.10:8780",
        "components": {"cc": {"cluster": "cluster1"}},
    }


def test_a_bad_cluster_name_is_asked_again(path: Path) -> None:
    result = run(path, "sc", answers="my cluster\ncluster-1\nclc.example\n")
    assert result.exit_code == 0, result.output
    assert "'my cluster' is not a cluster name" in result.output
    assert result.stdout.count("Name of this sc's cluster") == 2
    assert written(path)["components"] == {"sc": {"cluster": "cluster-1"}}


def test_yes_with_everything_asks_nothing_and_does_not_listen(path: Path) -> None:
    token = a_token()
    result = run(path, "sc", "--cluster", "c1", "--clc", "clc.example", "--token", token, "--yes")
    assert result.exit_code == 0, result.output
    assert "?" not in result.stdout and LISTENED == []
    assert written(path) == {
        "fallback_registrar": "https://clc.example:8780",
        "components": {"sc": {"cluster": "c1", "token": token}},
    }
    assert token not in result.output  # a secret: shown as set
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_it_listens_through_the_backend_asked_for(canned: list[Sighting], path: Path) -> None:
    canned += [clc()]
    assert run(path, "walrus", "--yes").exit_code == 0
    assert run(path, "walrus", "--yes", "--backend", "avahi").exit_code == 0
    assert BACKENDS == ["auto", "avahi"]
    result = run(path, "walrus", "--yes", "--backend", "bonjour")
    assert result.exit_code == 2 and "bonjour" in result.output


def test_yes_pins_the_one_clc_heard(canned: list[Sighting], path: Path) -> None:
    canned += [clc()]
    result = run(path, "walrus", "--yes")
    assert result.exit_code == 0, result.output
    assert written(path) == {"ca_fingerprint": CLC_FP, "components": {"walrus": {}}}


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (("sc", "--clc", "clc.example"), "--cluster NAME"),
        (("nc", "--cluster", "cluster1"), "--cc HOST"),
        (("cc", "--cluster", "cluster1"), "--clc HOST"),
        (("sc", "--cluster", "c1", "--clc", "h.example", "--token"), "--token TOKEN"),
    ],
)
def test_yes_with_something_missing_names_the_option(
    path: Path, args: tuple[str, ...], option: str
) -> None:
    result = run(path, *args, "--yes")
    assert result.exit_code == 2
    assert f"give {option} (--yes asks nothing)" in result.stderr
    assert not path.exists()


def test_yes_on_a_host_with_several_addresses_names_address(
    monkeypatch: pytest.MonkeyPatch, path: Path
) -> None:
    two: list[IPAddress] = [HOST_ADDRESS, ipaddress.ip_address("10.0.3.31")]
    monkeypatch.setattr(config_values, "usable_addresses", lambda: two)
    args = ("nc", "--cluster", "c1", "--cc", "cc.example", "--yes")
    result = run(path, *args)
    assert result.exit_code == 2 and "give --address" in result.stderr
    assert "2 usable addresses (10.0.2.31, 10.0.3.31)" in result.stderr
    result = run(path, *args, "--address", "10.0.3.31")
    assert result.exit_code == 0, result.output
    assert written(path)["address"] == "10.0.3.31"
    path.unlink()
    result = run(path, *args[:-1], answers="10.0.3.31\n")  # asked, without --yes
    assert result.exit_code == 0 and written(path)["address"] == "10.0.3.31"


EXISTING = """\
# the CC host (kept by setup)
address = "10.0.2.20"

[components.cc]
cluster = "cluster2"  # our cluster
installed = true
"""


def test_an_existing_config_keeps_its_comments_and_components(path: Path) -> None:
    path.parent.mkdir()
    path.write_text(EXISTING)
    path.chmod(0o644)
    args = ("--cluster", "cluster2", "--clc", "10.0.2.10", "--address", "10.0.3.20", "--yes")
    result = run(path, "sc", *args)
    assert result.exit_code == 0, result.output
    text = path.read_text()
    assert text.startswith(EXISTING.split("\n[")[0])
    assert '[components.cc]\ncluster = "cluster2"  # our cluster\ninstalled = true\n' in text
    assert written(path)["components"] == {
        "cc": {"cluster": "cluster2", "installed": True},
        # The host's address is another one: the SC announces its own.
        "sc": {"cluster": "cluster2", "address": "10.0.3.20"},
    }
    assert Path(f"{path}.bak").read_text() == EXISTING
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # no token: the mode is kept
    result = run(path, "sc", "--token", a_token(), "--yes", "--clc", "10.0.2.10")
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # now it holds a secret
    assert written(path)["components"]["sc"]["cluster"] == "cluster2"  # type: ignore[index]


def test_a_result_that_would_not_load_writes_nothing(path: Path) -> None:
    path.parent.mkdir()
    path.write_text(EXISTING)
    result = run(path, "nc", "--cluster", "cluster1", "--cc", "cc.example", "--yes")
    assert result.exit_code == 2
    assert "the result would not load: components.nc.cluster: 'cluster1' differs" in result.stderr
    assert "nothing written" in result.stderr
    assert path.read_text() == EXISTING and not Path(f"{path}.bak").exists()


def test_an_invalid_token_is_refused(path: Path) -> None:
    result = run(path, "sc", "--cluster", "c1", "--token", "eucareg1.nope", "--yes")
    assert result.exit_code == 2
    assert "--token: not an eucareg join token" in result.stderr
    assert not path.exists()
    # Asked for (not echoed): a bad one is asked again.
    result = run(
        path,
        "sc",
        "--cluster",
        "c1",
        "--clc",
        "h.example",
        "--token",
        answers=f"bad\n{a_token()}\n",
    )
    assert result.exit_code == 0, result.output
    assert "not an eucareg join token" in result.output
    assert written(path)["components"]["sc"]["token"] == a_token()  # type: ignore[index]


def test_a_token_ignores_a_clc_of_another_cloud(canned: list[Sighting], path: Path) -> None:
    canned += [clc()]
    other = a_token("sha256:" + "ab" * 32)
    result = run(path, "walrus", "--token", other, answers="clc.example\n")
    assert result.exit_code == 0, result.output
    assert "No CLC heard" in result.stdout
    assert written(path)["fallback_registrar"] == "https://clc.example:8780"


# -- a real terminal -----------------------------------------------------------------------------


def _can_unshare() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    return subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0


def _read_until(fd: int, text: str, seen: bytearray, deadline: float) -> None:
    while text.encode() not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {text!r} on the terminal; it shows {seen.decode(errors='replace')!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                chunk = b""
            assert chunk, f"terminal closed; it showed {seen.decode(errors='replace')!r}"
            seen += chunk


@pytest.mark.skipif(not _can_unshare(), reason="needs unprivileged `unshare -rn` and ip")
def test_setup_through_a_pseudo_terminal_in_an_empty_network(tmp_path: Path) -> None:
    """The real command and listener, in a new network namespace with only loopback: nothing
    is heard, so it asks for the cluster, the CLC's host and the address, on a terminal."""
    path = tmp_path / "etc" / "eucareg.toml"
    command = f"ip link set lo up && exec {sys.executable} -m eucareg setup sc"
    argv = ["unshare", "-rn", "sh", "-c", f"{command} --config {path} --timeout 0.2s"]
    pid, fd = pty.fork()
    if pid == 0:  # the child: its terminal is the pty
        try:
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)
    seen = bytearray()
    deadline = time.monotonic() + 30
    try:
        for question, answer in [
            ("Name of this sc's cluster: ", "cluster1"),
            ("The CLC's hostname or address: ", "clc.example"),
            ("The address this sc announces: ", "10.0.2.31"),
        ]:
            _read_until(fd, question, seen, deadline)
            os.write(fd, answer.encode() + b"\n")
        _read_until(fd, "Next: start the agent", seen, deadline)
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, seen.decode(errors="replace")
    assert "No cluster heard on this LAN." in seen.decode()
    assert tomllib.loads(path.read_text()) == {
        "address": "10.0.2.31",
        "fallback_registrar": "https://clc.example:8780",
        "components": {"sc": {"cluster": "cluster1"}},
    }
