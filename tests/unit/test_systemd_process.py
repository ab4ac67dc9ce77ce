"""The shipped unit and a real `eucareg agent` under it, without systemd: `systemd-analyze
verify` checks the unit against the installed entry point, and a real agent process (in a
private network namespace, as in test_agent_process.py) talks to a fake NOTIFY_SOCKET and a fake
journal the way it would to systemd and journald.
"""

from __future__ import annotations

import http.client
import itertools
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_agent_process import (
    ROOT,
    config_text,
    messages,
    private_network,  # noqa: F401 (a fixture)
    start_agent,
)
from tests.unit.test_systemd_journal import FakeJournal
from tests.unit.test_systemd_notify import NotifyListener, socket_dir

UNIT = ROOT / "packaging" / "systemd" / "eucareg-agent.service"
SHIPPED_EXEC = "ExecStart=/usr/bin/eucareg "
WATCHDOG_USEC = 1_000_000  # a ping every 0.5 s


# -- the unit file -------------------------------------------------------------------------


def installed_entry_point() -> Path:
    """The `eucareg` console script of the environment running the tests (pip put it there)."""
    return Path(sysconfig.get_path("scripts")) / "eucareg"


def systemd_analyze() -> str:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is missing (Debian package systemd; make test installs it)")
    return analyze


def installed_unit(tmp_path: Path) -> Path:
    """The shipped unit, its ExecStart naming the entry point installed here."""
    text = UNIT.read_text()
    assert text.count(SHIPPED_EXEC) == 1
    entry = installed_entry_point()
    assert os.access(entry, os.X_OK), f"no installed entry point at {entry}"
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(SHIPPED_EXEC, f"ExecStart={entry} "))
    return unit


def test_the_unit_verifies_against_the_installed_entry_point(tmp_path: Path) -> None:
    analyze = systemd_analyze()
    unit = installed_unit(tmp_path)
    done = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    # Lines about other units of this machine (the ones ours names) are not ours to judge.
    ours = [ln for ln in (done.stdout + done.stderr).splitlines() if UNIT.name in ln]
    assert done.returncode == 0 and not ours, done.stdout + done.stderr


def test_the_unit_keeps_its_exposure_low(tmp_path: Path) -> None:
    """systemd-analyze's exposure score (0-10) of the hardening: 3.1 with systemd 252, and a
    coarse 3.5 at most here (the score moves between systemd versions); losing the capability
    bounds alone makes it 4.1. The lines themselves are checked below."""
    analyze = systemd_analyze()
    version = subprocess.run([analyze, "--version"], capture_output=True, text=True).stdout
    found = re.match(r"systemd (\d+)", version)
    if found is None or int(found.group(1)) < 250:
        pytest.skip(f"systemd-analyze security --offline needs systemd 250: {version[:40]!r}")
    unit = installed_unit(tmp_path)
    done = subprocess.run(
        [analyze, "security", "--offline=yes", "--threshold=35", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr


def test_the_unit_runs_the_agent_command_under_notify_and_the_watchdog() -> None:
    keys: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            name, _, value = line.partition("=")
            keys.setdefault(name, []).append(value)
    assert keys["ExecStart"] == ["/usr/bin/eucareg agent --config /etc/eucareg/eucareg.toml"]
    assert keys["Type"] == ["notify"] and keys["NotifyAccess"] == ["main"]
    assert keys["WatchdogSec"] == ["30s"] and keys["Restart"] == ["on-failure"]
    assert keys["RestartPreventExitStatus"] == [
        "2"
    ]  # what `eucareg agent` exits with on a bad file
    assert keys["ProtectSystem"] == ["strict"] and keys["NoNewPrivileges"] == ["yes"]
    assert keys["PrivateTmp"] == ["yes"] and keys["KillMode"] == ["mixed"]
    # What hooks running euca_conf as root need, and nothing more (docs/systemd.md).
    assert set(keys["CapabilityBoundingSet"][0].split()) == {
        "CAP_CHOWN",
        "CAP_FOWNER",
        "CAP_DAC_OVERRIDE",
        "CAP_DAC_READ_SEARCH",
        "CAP_KILL",
        "CAP_SETUID",
        "CAP_SETGID",
        "CAP_AUDIT_WRITE",
    }
    writable = keys["ReadWritePaths"][0].split()
    assert {"-/etc/eucalyptus", "-/var/lib/eucalyptus"} <= set(writable)
    assert keys["StateDirectory"] == ["eucareg"]  # /var/lib/eucareg, the default state_dir
    # The command line is one the installed entry point accepts.
    helped = subprocess.run(
        [str(installed_entry_point()), "agent", "--help"], capture_output=True, text=True
    )
    assert helped.returncode == 0 and "--config" in helped.stdout


# -- a real agent --------------------------------------------------------------------------


@pytest.fixture
def sockets() -> Iterator[Path]:
    with socket_dir() as path:
        os.chmod(path, 0o755)  # the agent's namespace root is us, but keep it reachable
        yield path


def operator_get(state: Path, path: str) -> int:
    """GET `path` on the registrar's operator socket, as `eucareg status` would: the status."""

    class UnixConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(5)
            self.sock.connect(str(state / "api.sock"))

    token = (state / "admin.token").read_text().strip()
    conn = UnixConnection("localhost")
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        return conn.getresponse().status
    finally:
        conn.close()


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=15)


def reap(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()  # by its PID, and only if the test left it running
        proc.wait(timeout=10)


def test_a_real_agent_is_ready_once_its_api_answers_pings_and_says_stopping(
    tmp_path: Path,
    sockets: Path,
    private_network: None,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    listener = NotifyListener(str(sockets / "notify.sock"))
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    # The CLC registers the CC with this hook: it records what a hook inherits.
    (tmp_path / "hooks").mkdir()
    hook = tmp_path / "hooks" / "cluster"
    hook.write_text(f"#!/bin/sh\nenv > {tmp_path / 'hook-env'}\n")
    hook.chmod(0o755)
    config = tmp_path / "eucareg.toml"
    config.write_text(config_text(tmp_path))
    log = tmp_path / "agent.log"
    proc = start_agent(config, log)
    try:
        listener.wait_for(lambda got: "READY=1" in got.lines() or proc.poll() is not None)
        assert proc.poll() is None, log.read_text()[-3000:]
        # READY=1 means the API answers: asked at once, it does.
        assert operator_get(tmp_path / "state", "/v1/trust") == 200
        ready = next(d for d in listener.got if "READY=1" in d.lines)
        assert ready.pid == proc.pid  # the main process, as NotifyAccess=main requires
        status = next(x for x in ready.lines if x.startswith("STATUS="))
        assert re.fullmatch(
            r"STATUS=clc clc-[0-9a-f]{12}; cc cc-[0-9a-f]{12} (not announced|announced, not"
            r" registered yet); registered here: none",
            status,
        ), status

        # The watchdog: a ping every WATCHDOG_USEC / 2, from the agent itself.
        listener.wait_for(lambda got: len(got.times("WATCHDOG=1")) >= 4, 10)
        pings = [d for d in listener.got if "WATCHDOG=1" in d.lines]
        assert {d.pid for d in pings} == {proc.pid}
        gaps = [b.at - a.at for a, b in itertools.pairwise(pings)]
        assert 0.4 < statistics.median(gaps) < 0.75, gaps

        # Registering the CC (the operator opens an install window): the status line says so,
        # and the hook that ran got no NOTIFY_SOCKET or WATCHDOG_* of ours.
        opened = subprocess.run(
            [sys.executable, "-m", "eucareg", "install-mode", "open", "--config", str(config)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=30,
        )
        assert opened.returncode == 0, opened.stderr
        listener.wait_for(
            lambda got: any(" registered; registered here: 1 CC" in s for s in got.statuses()),
            30,
        )
        hook_env = (tmp_path / "hook-env").read_text()
        assert "EUCAREG_ROLE=cc" in hook_env
        assert "NOTIFY_SOCKET" not in hook_env and "WATCHDOG_" not in hook_env

        assert stop(proc) == 0, log.read_text()[-3000:]
        stopping = listener.times("STOPPING=1")
        assert len(stopping) == 1
        assert not [t for t in listener.times("WATCHDOG=1") if t > stopping[0]]
        assert not [m for m in messages(log) if "cannot notify systemd" in m]
    finally:
        reap(proc)
        listener.close()


def test_a_real_agent_logs_to_the_journal_when_its_stderr_is_the_journal(
    tmp_path: Path,
    sockets: Path,
    private_network: None,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    journal = FakeJournal(sockets / "journal.sock")
    config = tmp_path / "eucareg.toml"
    config.write_text(config_text(tmp_path))  # log_format = "json", as in the lab
    log = tmp_path / "agent.log"
    log.touch()
    st = log.stat()  # start_agent opens this same file as the agent's stderr
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    monkeypatch.setenv("EUCAREG_JOURNAL_SOCKET", str(journal.path))
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)  # and nothing fails without it
    proc = start_agent(config, log)
    try:
        started = journal.wait_for("agent started: clc=clc-")
        assert started["PRIORITY"] == b"6" and started["SYSLOG_IDENTIFIER"] == b"eucareg"
        assert started["LOGGER"] == b"eucareg.agent.host"
        assert started["CODE_FILE"].endswith(b"/eucareg/agent/host.py")
        assert started["CODE_FUNC"] == b"start" and started["CODE_LINE"].isdigit()
        # The registrar's decision about its own CC, with the decision's fields.
        decided = journal.wait_for("pending cc cc-")
        cc_id = decided["MESSAGE"].split()[2]
        assert decided["COMPONENT_ID"] == cc_id and decided["ROLE"] == b"cc"
        assert decided["DECISION_CODE"], decided
        assert decided["LOGGER"] == b"eucareg.registrar.engine"
        assert stop(proc) == 0
        journal.wait_for("agent stopped", 5)
        # Nothing went to stderr instead: not a log line, not a warning.
        assert messages(log) == [], log.read_text()[-3000:]
        assert "Traceback" not in log.read_text()
    finally:
        reap(proc)
        journal.close()
