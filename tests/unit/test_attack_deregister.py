"""An attack review of the deregister hooks (issue 10): two deregistrations of one component at
once, hook names planted as links in hook_dir, a hook that never ends, floods its output or
leaves a daemon behind, the limits of `--wait`, and a run interrupted by a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from eucareg.cli.main import main
from eucareg.core.model import HookOutcome, HookRun, Role
from eucareg.core.registering import hook_interrupted
from eucareg.registrar import deregistering, hooks
from tests.factories import ann, sighting
from tests.unit.test_api_harness import CLC_SETTINGS, Harness, eventually, key_of, served
from tests.unit.test_deregister_hooks import calls, deregister, registered, script


@pytest.fixture
async def clc(tmp_path: Path) -> AsyncIterator[Harness]:
    async with served(tmp_path / "clc", CLC_SETTINGS) as harness:
        harness.registrar.hook_dir.mkdir(parents=True, exist_ok=True)
        yield harness


async def test_two_deregistrations_at_once_run_the_hook_once(clc: Harness) -> None:
    script(clc, "walrus", "exit 0")
    script(clc, "deregister-walrus", "exit 0")
    walrus = ann(Role.WALRUS)
    await registered(clc, walrus)
    body = {"component_id": walrus.component_id}
    answers = await asyncio.gather(
        *(clc.admin("POST", "/v1/deregister", body, params={"wait": "10"}) for _ in range(2))
    )
    # One deregisters; the other is told, as for any unknown id, that it is gone (no 500).
    [(first, _), (second, refused)] = sorted(answers, key=lambda a: a[0])
    assert (first, second, refused["code"]) == (200, 400, "unknown-component"), answers
    await asyncio.sleep(0.3)  # a second hook, if one was started, has logged by now
    assert [c.split()[1] for c in calls(clc)] == ["register", "deregister"]
    # Still announcing into the open window it is admitted again; that record owes no hook.
    again = await clc.admin("POST", "/v1/deregister", body, params={"wait": "1"})
    assert again[0] == 200 and again[1]["hook"]["state"] == "none", again


async def test_a_dangling_link_planted_as_the_hook_is_a_failure_not_a_skip(
    clc: Harness, tmp_path: Path
) -> None:
    """`deregister-walrus` a link to a script that is gone (a package removed it): the
    operator must hear that Eucalyptus was not told, not "no script; nothing to run"."""
    script(clc, "walrus", "exit 0")
    (clc.registrar.hook_dir / "deregister-walrus").symlink_to(tmp_path / "gone.sh")
    walrus = ann(Role.WALRUS)
    await registered(clc, walrus)
    answer = await deregister(clc, walrus, wait=20)
    run = answer["hook"]["run"]
    assert run["outcome"] == "failed", answer
    assert "symbolic link" in run["stderr"] and "gone.sh" in run["stderr"]


async def test_a_link_to_a_script_elsewhere_runs_it(clc: Harness, tmp_path: Path) -> None:
    script(clc, "walrus", "exit 0")
    target = tmp_path / "shared-hook.sh"
    target.write_text(f'#!/bin/sh\necho "$EUCAREG_EVENT" > "{tmp_path / "ran"}"\n')
    target.chmod(0o755)
    (clc.registrar.hook_dir / "deregister-walrus").symlink_to(target)
    walrus = ann(Role.WALRUS)
    await registered(clc, walrus)
    answer = await deregister(clc, walrus, wait=20)
    assert answer["hook"]["run"]["outcome"] == "ok"
    assert (tmp_path / "ran").read_text() == "deregister\n"


async def test_a_hook_that_never_ends_is_killed_and_reported_after_its_attempts(
    clc: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(deregistering, "ATTEMPTS", 2)
    clc.registrar.hooks.timeout = 0.5
    script(clc, "walrus", "exit 0")
    script(clc, "deregister-walrus", "while true; do sleep 0.05; done")
    walrus = ann(Role.WALRUS)
    await registered(clc, walrus)
    answer = await deregister(clc, walrus, wait=30)
    run = answer["hook"]["run"]
    assert answer["hook"]["state"] == "done" and run["outcome"] == "timeout", answer
    assert run["attempt"] == 2
    events = (await clc.get("/v1/events", component_id=walrus.component_id))[1]["events"]
    codes = [e["code"] for e in events if e["kind"] == "hook"]
    assert codes.count("deregister-hook-timeout") == 2
    assert any("giving up" in e["reason"] for e in events)


async def test_a_hook_that_floods_its_output_keeps_only_a_bounded_tail(clc: Harness) -> None:
    script(clc, "walrus", "exit 0")
    script(
        clc,
        "deregister-walrus",
        "head -c 3000000 /dev/zero | tr '\\0' x; echo; echo the-last-line; "
        "head -c 3000000 /dev/zero | tr '\\0' y >&2; echo >&2; echo gave-up >&2; exit 3",
    )
    walrus = ann(Role.WALRUS)
    await registered(clc, walrus)
    answer = await deregister(clc, walrus, wait=60)
    run = answer["hook"]["run"]
    assert run["outcome"] == "failed"
    assert len(run["stdout"]) <= hooks.OUTPUT_LIMIT and "the-last-line" in run["stdout"]
    assert len(run["stderr"]) <= hooks.OUTPUT_LIMIT and "gave-up" in run["stderr"]
    events = (await clc.get("/v1/events", component_id=walrus.component_id))[1]["events"]
    reasons = [e["reason"] for e in events if e["code"] == "deregister-hook-failed"]
    assert len(reasons) == 3, reasons
    for reason in reasons:
        assert len(reason) < 400 and ": gave-up; " in reason, reason


async def test_a_hook_that_leaves_a_daemon_behind_is_done_when_it_exits(
    clc: Harness, tmp_path: Path
) -> None:
    pidfile = tmp_path / "daemon.pid"
    script(clc, "walrus", "exit 0")
    script(clc, "deregister-walrus", f'sleep 300 & echo $! > "{pidfile}"; exit 0')
    walrus = ann(Role.WALRUS)
    await registered(clc, walrus)
    try:
        answer = await asyncio.wait_for(deregister(clc, walrus, wait=20), 15)
        assert answer["hook"]["run"]["outcome"] == "ok"
    finally:
        if pidfile.exists():
            pid = int(pidfile.read_text())
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_wait_limits_on_the_command_line(tmp_path: Path) -> None:
    """600 s (10m) is the longest `--wait`; one more second is refused before any request."""
    token = tmp_path / "token"
    token.write_text("x" * 32)
    token.chmod(0o600)
    base = [
        "deregister",
        "nc-1",
        "--api",
        f"unix:{tmp_path / 'no.sock'}",
        "--admin-token-file",
        str(token),
    ]
    over = CliRunner().invoke(main, [*base, "--wait", "601s"])
    assert over.exit_code == 2 and "--wait" in over.output, over.output
    at = CliRunner().invoke(main, [*base, "--wait", "10m"])
    assert "--wait" not in at.output, at.output  # accepted: it fails only at the socket


@pytest.mark.parametrize("role", [r for r in Role if r is not Role.CLC])
def test_an_interrupted_deregister_hook_is_reported_never_run_again(role: Role) -> None:
    run = HookRun(
        run_id="a" * 32,
        component_id="x-1",
        hook=f"/etc/eucareg/hooks/deregister-{role.hook_name}",
        started_at=10.0,
        outcome=HookOutcome.RUNNING,
    )
    step = hook_interrupted(None, run, 20.0)
    assert step.effects == ()
    [done] = step.change.hook_runs
    assert done.outcome is HookOutcome.INTERRUPTED and done.duration == 10.0
    [event] = step.change.events
    assert event.code == "deregister-hook-interrupted" and event.role == role.value


def test_a_registration_hook_in_a_directory_named_like_a_deregister_hook_is_not_one() -> None:
    """The decision looks at the script's name, not its directory's."""
    run = HookRun(
        run_id="b" * 32,
        component_id="w-1",
        hook="/srv/deregister-hooks/walrus",
        started_at=10.0,
        outcome=HookOutcome.RUNNING,
    )
    step = hook_interrupted(None, run, 20.0)
    assert all(e.code != "deregister-hook-interrupted" for e in step.change.events)


async def test_a_hook_flooding_its_output_cannot_fill_the_disk_while_it_runs(
    clc: Harness,
) -> None:
    hook_dir = clc.registrar.hook_dir
    pidfile, release = hook_dir / "pid", hook_dir / "release"
    script(clc, "walrus", "exit 0")
    script(
        clc,
        "deregister-walrus",
        f'head -c 30000000 /dev/zero; echo $$ > "{pidfile}"; '
        f'while [ ! -e "{release}" ]; do sleep 0.05; done',
    )
    walrus = ann(Role.WALRUS)
    await registered(clc, walrus)
    await deregister(clc, walrus, wait=0)
    try:
        await eventually(lambda: pidfile.exists() and bool(pidfile.read_text()), "the flood")
        pid = int(pidfile.read_text())
        out = os.stat(f"/proc/{pid}/fd/1")
        # A pipe the registrar reads as the hook writes (tests/unit/test_hooks_output.py
        # bounds what it holds), not a file: nothing of it reaches the disk.
        assert stat.S_ISFIFO(out.st_mode), "the hook's output goes to a file"
        assert out.st_size <= 4 * hooks.OUTPUT_LIMIT, f"{out.st_size} bytes held"
    finally:
        release.touch()
        outcome = clc.registrar.deregistering.outcome(walrus.component_id)
        assert outcome is not None
        await asyncio.wait_for(asyncio.shield(outcome), 10)


async def test_a_node_deregistered_while_its_batch_gathers_is_left_out_of_it(
    tmp_path: Path,
) -> None:
    """Three nodes gather for one `node-batch` run; one is deregistered before the batch
    starts: the batch registers the other two only, and the deregister hook of the third runs
    once, after its place in the batch is given up (never beside the batch)."""
    from tests.unit.test_batch_hooks import BATCH_LOG, lines, node_registrar
    from tests.unit.test_registrar import write_hook

    log = tmp_path / "hooks.log"
    hook_dir = tmp_path / "hooks"
    write_hook(hook_dir, "node-batch", BATCH_LOG.format(log=log))
    write_hook(hook_dir, "deregister-node", f'echo "deregister $EUCAREG_ID" >> {log}')
    reg = await node_registrar(tmp_path, wait=1.5)
    try:
        nodes = [ann(Role.NC, "c1") for _ in range(3)]
        for node in nodes:
            reg.on_sighting(sighting(node))

        def registering() -> bool:
            return all(
                (r := reg.record(n.component_id)) is not None and r.status.value == "registering"
                for n in nodes
            )

        # Each proves its key as its agent would; then all three wait for the batch window.
        await eventually(
            lambda: all(
                (r := reg.record(n.component_id)) is not None and r.status.value == "awaiting-key"
                for n in nodes
            ),
            "admission",
        )
        for node in nodes:
            await reg.credentials(node.component_id, key_of(node).public_key(), wait=0)
        await eventually(registering, "all three gathering for the batch")
        assert lines(log, "run") == []  # still gathering
        gone = reg.record(nodes[0].component_id)
        assert gone is not None
        outcome = await reg.deregister(gone)
        assert outcome is not None
        run = await asyncio.wait_for(asyncio.shield(outcome), 20)
        assert run.outcome is HookOutcome.OK

        def registered() -> bool:
            return all(
                (r := reg.record(n.component_id)) is not None and r.status.value == "registered"
                for n in nodes[1:]
            )

        await eventually(registered, "the other two registered by their batch")
        # Its place given up, the deregistered node's hook ran before the batch (which it is
        # not in); still announcing, it is a newcomer again, awaiting its key.
        first, batch, *members = log.read_text().splitlines()
        assert first == f"deregister {nodes[0].component_id}"
        assert batch == "run 2 nc c1: " + " ".join(str(n.address) for n in nodes[1:])
        assert sorted(m.split()[3] for m in members) == sorted(n.component_id for n in nodes[1:])
    finally:
        await reg.close()
