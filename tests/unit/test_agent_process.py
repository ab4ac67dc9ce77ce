"""A real `python -m eucareg agent` for a CLC+CC host, in a private network namespace made by
`unshare -rn` (only lo, with multicast routed to lo, so nothing reaches the machine's own
interfaces): SIGTERM stops it within 3 s, exit status 0, goodbyes sent, while its own CC holds
a long-poll open to its own CLC.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
ADDRESS = "10.99.0.1"  # exists only inside the namespace, on its lo
NAMESPACE_SETUP = (
    "ip link set lo up && ip link set lo multicast on"
    f" && ip addr add {ADDRESS}/32 dev lo && ip route add 224.0.0.0/4 dev lo"
)
STOP_LIMIT = 3.0


@pytest.fixture(scope="module")
def private_network() -> None:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs unshare and ip (util-linux, iproute2)")
    probe = subprocess.run(
        ["unshare", "-rn", "sh", "-c", NAMESPACE_SETUP], capture_output=True, timeout=20
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot make a private network namespace: {probe.stderr.decode().strip()}")


def config_text(base: Path) -> str:
    """What eucalab writes for a lab host (eucalab/cloud_files.py), for one CLC+CC host."""
    return f"""\
address = "{ADDRESS}"
state_dir = "{base / "state"}"
hook_dir = "{base / "hooks"}"
api_port = 8780
log_format = "json"
log_level = "debug"

[mdns]
backend = "zeroconf"  # as the lab does: never the host's own avahi-daemon

[preconditions]
sshd = false
recheck_interval = "1s"

[components.clc]
installed = true

[components.cc]
cluster = "cluster1"
installed = true
"""


def entries(log: Path) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and "msg" in entry:
            out.append(entry)
    return out


def messages(log: Path) -> list[str]:
    return [str(e["msg"]) for e in entries(log)]


def start_agent(config: Path, log: Path, *python_options: str) -> subprocess.Popen[bytes]:
    """`python -m eucareg agent` in a private network namespace, logging to `log`."""
    with log.open("wb") as out:
        # unshare and then sh exec, so the PID we hold is the agent's own.
        return subprocess.Popen(
            [
                "unshare",
                "-rn",
                "sh",
                "-c",
                # umask 022, as a shell would give it: the agent must not rely on the caller's.
                f'{NAMESPACE_SETUP} && umask 022 && exec "$0" '
                f'{" ".join(python_options)} -m eucareg agent --config "$1"',
                sys.executable,
                str(config),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )


@pytest.fixture
def agent_process(
    tmp_path: Path, private_network: None
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    config = tmp_path / "eucareg.toml"
    config.write_text(config_text(tmp_path))
    log = tmp_path / "agent.log"
    proc = start_agent(config, log)
    try:
        yield proc, log
    finally:
        if proc.poll() is None:
            proc.kill()  # by its PID, and only if the test left it running
            proc.wait(timeout=10)


def wait_for_messages(proc: subprocess.Popen[bytes], log: Path, needle: str, count: int) -> None:
    deadline = time.monotonic() + 30
    while sum(needle in m for m in messages(log)) < count:
        if proc.poll() is not None:
            raise AssertionError(f"agent exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {count}x {needle!r} in the log:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def test_sigterm_stops_a_real_agent_within_3_seconds_with_goodbyes(
    agent_process: tuple[subprocess.Popen[bytes], Path],
) -> None:
    proc, log = agent_process
    wait_for_messages(proc, log, "agent started", 1)
    # The CC finds its own CLC over mDNS on lo and asks for credentials. Pending approval, the
    # first answer may come at once; the second request is held (a 25 s long-poll).
    wait_for_messages(proc, log, "requesting credentials for cc-", 2)

    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    status = proc.wait(timeout=15)
    took = time.monotonic() - began

    said = messages(log)
    assert status == 0, log.read_text()[-3000:]
    assert took < STOP_LIMIT, f"stopping took {took:.2f} s"
    assert any(m.startswith("withdrew cloud-clc-") for m in said)
    assert any(m.startswith("withdrew cluster-cc-") for m in said)
    assert any(m.startswith("agent stopped") for m in said)
    assert not [e for e in entries(log) if e.get("level") == "error"]


def test_a_fresh_agent_under_umask_022_keeps_its_state_private(
    agent_process: tuple[subprocess.Popen[bytes], Path], tmp_path: Path
) -> None:
    proc, log = agent_process
    wait_for_messages(proc, log, "requesting credentials for cc-", 1)
    state = tmp_path / "state"
    found = {p.name for p in state.rglob("*")}
    # Keys, the admin token, the master key and the registry with its WAL journal exist by now.
    assert {"admin.token", "registry.db", "registry.db-wal", "clc.key.pem"} <= found, found
    assert oct(state.stat().st_mode & 0o777) == oct(0o700)
    readable = [
        f"{p} {p.stat().st_mode & 0o777:04o}"
        for p in state.rglob("*")
        if not p.is_symlink() and p.stat().st_mode & 0o077
    ]
    assert not readable, readable
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0


NODE_ONLY = """\
[components.nc]
cluster = "cluster1"
installed = true
"""

# What only a registrar needs. A node's agent that loads them carries 15 MiB it never uses
# (SQLAlchemy alone is 12 MiB): the lean-agent part of docs/performance.md.
REGISTRAR_ONLY = (
    "sqlalchemy",
    "rich",
    "aiohttp.web",
    "eucareg.registrar",
    "eucareg.store.registry",
)


def test_a_node_agent_never_imports_what_only_a_registrar_needs(
    tmp_path: Path, private_network: None
) -> None:
    config = tmp_path / "eucareg.toml"
    # The CLC+CC host's settings, with a node's component instead of the CLC and the CC.
    head = config_text(tmp_path).split("[components.clc]")[0]
    config.write_text(head + NODE_ONLY)
    log = tmp_path / "agent.log"
    # -X importtime: every module the process imports, as it imports it, on stderr.
    proc = start_agent(config, log, "-X", "importtime")
    try:
        wait_for_messages(proc, log, "agent started", 1)
        # It announces its NC and looks for its CC: a node's whole steady work. Then it stops.
        wait_for_messages(proc, log, "announcing nc", 1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in log.read_text(errors="replace").splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "eucareg.agent.host" in imported and "zeroconf" in imported  # the list is real
    loaded = sorted(
        m
        for m in imported
        if m.split(".")[0] in {"sqlalchemy", "rich"}
        or any(m == p or m.startswith(p + ".") or m.startswith(p + "_") for p in REGISTRAR_ONLY)
    )
    assert loaded == []
