"""The deregister hook (issue 10, part 5): deregistering a component whose registration hook
ran runs `deregister-<type>` from hook_dir, journaled like a registration hook, retried with
backoff on failure and then reported, after any registration hook of it still running; the
operator's request waits for the outcome (or says how to follow it), and the CLI shows it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from eucareg.cli.main import main
from eucareg.core.model import Announcement, Role
from eucareg.registrar import deregistering
from tests.factories import ann, sighting
from tests.unit.test_api_harness import (
    ADMIN_TOKEN,
    CLC_SETTINGS,
    Harness,
    eventually,
    key_of,
    make_registrar,
    served,
    the_cloud,
)


@pytest.fixture
async def clc(tmp_path: Path) -> AsyncIterator[Harness]:
    async with served(tmp_path / "clc", CLC_SETTINGS) as harness:
        harness.registrar.hook_dir.mkdir(parents=True, exist_ok=True)
        yield harness


def script(h: Harness, name: str, body: str) -> Path:
    """A hook script in the registrar's hook_dir that logs its call, then runs `body`."""
    log = h.registrar.hook_dir / "calls"
    path = h.registrar.hook_dir / name
    path.write_text(
        f'#!/bin/sh\nprintf "%s %s %s\\n" "$0" "$EUCAREG_EVENT" "$*" >> "{log}"\n{body}\n'
    )
    path.chmod(0o755)
    return path


def calls(h: Harness) -> list[str]:
    log = h.registrar.hook_dir / "calls"
    return log.read_text().splitlines() if log.exists() else []


async def registered(h: Harness, a: Announcement) -> None:
    await h.post("/v1/trust/install-window", {"open": True, "for": "10m"})
    h.announce(a)
    await h.record_status(a.component_id, "awaiting-key")
    status, answer = await h.signed(
        "/v1/credentials", key_of(a), {"component_id": a.component_id}, query="?wait=10"
    )
    assert status == 200, answer


async def deregister(h: Harness, a: Announcement, wait: float = 10) -> dict[str, Any]:
    status, answer = await h.admin(
        "POST",
        "/v1/deregister",
        {"component_id": a.component_id},
        params={"wait": f"{wait:g}"},
    )
    assert status == 200, answer
    return dict(answer)


async def test_the_deregister_hook_runs_with_the_records_facts(clc: Harness) -> None:
    script(clc, "walrus", "exit 0")
    script(clc, "deregister-walrus", 'echo "removed $1"; exit 0')
    walrus = ann(Role.WALRUS)
    await registered(clc, walrus)
    answer = await deregister(clc, walrus)
    hook = answer["hook"]
    assert hook["state"] == "done", hook
    assert hook["run"]["outcome"] == "ok"
    assert hook["run"]["stdout"].strip() == f"removed {walrus.address}"
    [reg, dereg] = calls(clc)
    assert reg.endswith(
        f"/walrus register {walrus.address} - {walrus.component_id} {walrus.fingerprint}"
    )
    assert dereg.endswith(
        f"/deregister-walrus deregister {walrus.address} - "
        f"{walrus.component_id} {walrus.fingerprint}"
    )
    # Journaled like any hook run, and an event says what it did.
    runs = (await clc.get("/v1/hooks", component=walrus.component_id))[1]["hook_runs"]
    assert [r["hook"].rsplit("/", 1)[1] for r in runs] == ["walrus", "deregister-walrus"]
    events = (await clc.get("/v1/events", component_id=walrus.component_id))[1]["events"]
    assert any(e["code"] == "deregister-hook-ok" for e in events)


async def test_a_failing_hook_is_retried_then_reported(clc: Harness) -> None:
    script(clc, "deregister-walrus", 'echo "euca_conf: CLC unreachable" >&2; exit 3')
    walrus = ann(Role.WALRUS)
    await registered(clc, walrus)
    answer = await deregister(clc, walrus)
    run = answer["hook"]["run"]
    assert (run["outcome"], run["exit_code"], run["attempt"]) == (
        "failed",
        3,
        deregistering.ATTEMPTS,
    )
    assert len([c for c in calls(clc) if "deregister-walrus" in c]) == deregistering.ATTEMPTS
    events = (await clc.get("/v1/events", component_id=walrus.component_id))[1]["events"]
    codes = [e["reason"] for e in events if e["code"] == "deregister-hook-failed"]
    assert len(codes) == deregistering.ATTEMPTS
    assert codes[-1].endswith(
        "euca_conf: CLC unreachable; giving up: undo the registration by hand"
    )
    assert codes[0].endswith("; trying again")


async def test_no_hook_is_owed_for_a_component_never_registered(clc: Harness) -> None:
    script(clc, "deregister-walrus", "exit 0")
    walrus = ann(Role.WALRUS)
    clc.announce(walrus)  # mode local and no window: it stays pending
    await clc.record_status(walrus.component_id, "pending")
    answer = await deregister(clc, walrus)
    assert answer["hook"] == {
        "state": "none",
        "reason": "no deregister hook: its registration hook never ran",
        "run": None,
    }
    await clc.registrar.idle()
    assert calls(clc) == []


async def test_without_a_script_the_run_is_skipped(clc: Harness) -> None:
    walrus = ann(Role.WALRUS)
    await registered(clc, walrus)
    answer = await deregister(clc, walrus)
    assert answer["hook"]["state"] == "done"
    assert answer["hook"]["run"]["outcome"] == "skipped"
    # Journaled, but no event: a site without deregister hooks hears nothing new.
    runs = (await clc.get("/v1/hooks", component=walrus.component_id))[1]["hook_runs"]
    assert [(r["hook"].rsplit("/", 1)[1], r["outcome"]) for r in runs][-1] == (
        "deregister-walrus",
        "skipped",
    )
    events = (await clc.get("/v1/events", component_id=walrus.component_id))[1]["events"]
    assert not [e for e in events if e["code"].startswith("deregister-hook")]


async def test_not_waiting_says_how_to_follow_the_hook(clc: Harness) -> None:
    release = clc.registrar.hook_dir / "release"
    script(clc, "deregister-walrus", f'while [ ! -e "{release}" ]; do sleep 0.05; done')
    walrus = ann(Role.WALRUS)
    await registered(clc, walrus)
    answer = await deregister(clc, walrus, wait=0)
    assert answer["hook"]["state"] == "running"
    assert (
        f"eucareg events --component {walrus.component_id} --kind hook"
        in (answer["hook"]["reason"])
    )
    outcome = clc.registrar.deregistering.outcome(walrus.component_id)
    assert outcome is not None and not outcome.done()
    release.touch()
    run = await asyncio.wait_for(asyncio.shield(outcome), 10)
    assert run.outcome.value == "ok"


async def test_the_hook_waits_for_a_registration_hook_still_running(clc: Harness) -> None:
    """Deregistered while its `walrus` hook runs: `deregister-walrus` runs after it ends,
    never beside it (Eucalyptus must not end up with the walrus registered)."""
    release = clc.registrar.hook_dir / "release"
    log = clc.registrar.hook_dir / "calls"
    script(clc, "walrus", f'while [ ! -e "{release}" ]; do sleep 0.05; done; echo end >> "{log}"')
    script(clc, "deregister-walrus", "exit 0")
    walrus = ann(Role.WALRUS)
    await clc.post("/v1/trust/install-window", {"open": True, "for": "10m"})
    clc.announce(walrus)
    await clc.record_status(walrus.component_id, "awaiting-key")
    await clc.signed(
        "/v1/credentials", key_of(walrus), {"component_id": walrus.component_id}, query="?wait=0"
    )
    await clc.record_status(walrus.component_id, "registering")
    await eventually(lambda: len(calls(clc)) == 1, "the registration hook to start")
    answer = await deregister(clc, walrus, wait=0)
    assert answer["hook"]["state"] == "running"
    outcome = clc.registrar.deregistering.outcome(walrus.component_id)
    assert outcome is not None
    # Time for a deregister hook that did not wait to show itself in the log (the order
    # below is the proof; a hook run beside the other would have logged before "end").
    await asyncio.sleep(0.3)
    release.touch()
    run = await asyncio.wait_for(asyncio.shield(outcome), 10)
    assert run.outcome.value == "ok"
    [first, end, last] = calls(clc)
    assert (first.split()[1], end, last.split()[1]) == ("register", "end", "deregister")


async def test_the_cli_shows_the_outcome_and_fails_with_the_hook(
    clc: Harness, tmp_path: Path
) -> None:
    script(clc, "deregister-walrus", 'echo "no such walrus here" >&2; exit 2')
    walrus = ann(Role.WALRUS)
    await registered(clc, walrus)
    token = tmp_path / "admin.token"
    token.write_text(ADMIN_TOKEN)
    token.chmod(0o600)
    args = ["deregister", walrus.component_id, "--api", clc.socket, "--admin-token-file"]

    def run(*more: str) -> Any:
        return CliRunner().invoke(main, [*args, str(token), *more])

    result = await asyncio.to_thread(run)
    assert result.exit_code == 1, result.output
    assert f"deregistered {walrus.component_id}; its credentials are revoked" in result.output
    assert "deregister-walrus: failed (exit 2), attempt 3: no such walrus here" in result.output
    # Still announcing in an open install window, it is admitted again at once (awaiting its
    # key): deregistered now, it owes no hook, and --json shows the whole answer.
    await clc.record_status(walrus.component_id, "awaiting-key")
    again = await asyncio.to_thread(run, "--json")
    assert again.exit_code == 0, again.output
    answer = json.loads(again.output)
    assert answer["deregistered"] == walrus.component_id
    assert answer["hook"]["state"] == "none"
    bad = await asyncio.to_thread(run, "--wait", "soon")
    assert bad.exit_code == 2 and "--wait" in bad.output


async def test_registered_again_at_once_its_hook_waits_for_the_deregister_hook(
    clc: Harness,
) -> None:
    """Still announcing into an open install window, a deregistered component is admitted
    again at once: its new `walrus` hook runs only after `deregister-walrus` ended, so
    Eucalyptus ends with it registered, as eucareg says."""
    release = clc.registrar.hook_dir / "release"
    script(clc, "walrus", "exit 0")
    script(clc, "deregister-walrus", f'while [ ! -e "{release}" ]; do sleep 0.05; done')
    walrus = ann(Role.WALRUS)
    await registered(clc, walrus)
    answer = await deregister(clc, walrus, wait=0)
    assert answer["hook"]["state"] == "running"
    await clc.record_status(walrus.component_id, "awaiting-key")
    asking = asyncio.ensure_future(
        clc.signed(
            "/v1/credentials", key_of(walrus), {"component_id": walrus.component_id}, "?wait=20"
        )
    )
    await clc.record_status(walrus.component_id, "registering")
    # Time for a hook that did not wait to show itself in the log; the order is the proof.
    await asyncio.sleep(0.3)
    assert [c.split()[1] for c in calls(clc)] == ["register", "deregister"]
    release.touch()
    status, _ = await asyncio.wait_for(asking, 20)
    assert status == 200
    assert [c.split()[1] for c in calls(clc)] == ["register", "deregister", "register"]


async def test_a_registrar_stopped_while_the_hook_runs_reports_it_after_restart(
    tmp_path: Path,
) -> None:
    """Stopped mid-hook: the script's process group is killed, the waiting operator is told
    the registrar stopped, and the restarted registrar records the run interrupted with an
    event saying it is not run again (the record it needs is gone)."""
    where = tmp_path / "clc"
    hooks = where / "hooks"
    hooks.mkdir(parents=True)
    log = hooks / "calls"
    (hooks / "deregister-walrus").write_text(
        f'#!/bin/sh\necho "$$" >> "{log}"\nwhile true; do sleep 0.05; done\n'
    )
    (hooks / "deregister-walrus").chmod(0o755)
    reg = await make_registrar(where, CLC_SETTINGS, the_cloud())
    await reg.open_install_window(600)
    walrus = ann(Role.WALRUS)
    reg.on_sighting(sighting(walrus))
    await eventually(lambda: status_of(reg, walrus) == "awaiting-key", "admission")
    record = reg.record(walrus.component_id)
    assert record is not None
    reg.key_proven(record)
    await eventually(lambda: status_of(reg, walrus) == "registered", "registration")
    outcome = await reg.deregister(record)
    assert outcome is not None
    await eventually(lambda: log.exists() and bool(log.read_text().strip()), "the hook")
    pid = int(log.read_text().split()[0])
    await reg.close()
    assert outcome.cancelled()
    again = await make_registrar(where, CLC_SETTINGS, the_cloud())
    try:
        runs = await again.hook_runs(walrus.component_id)
        assert runs[-1].outcome.value == "interrupted"
        assert runs[-1].hook.endswith("/deregister-walrus")
        events = await again.events(component_id=walrus.component_id, kind="hook")
        [event] = [e for e in events if e.code == "deregister-hook-interrupted"]
        assert event.role == "walrus"
        assert "undo the Eucalyptus registration by hand" in event.reason
        assert _state(pid) == "Z"  # gone (or a zombie): the stop killed its group
    finally:
        await again.close()


def status_of(reg: Any, a: Announcement) -> str | None:
    record = reg.record(a.component_id)
    return None if record is None else str(record.status.value)


def _state(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "Z"
    return raw[raw.rindex(")") + 2]


@pytest.mark.parametrize("wait", ["abc", "1e9", "-1", "inf", " 1", "\uff11"])
async def test_a_bad_wait_is_refused_before_anything_is_deregistered(
    clc: Harness, wait: str
) -> None:
    walrus = ann(Role.WALRUS)
    await registered(clc, walrus)
    status, answer = await clc.admin(
        "POST", "/v1/deregister", {"component_id": walrus.component_id}, params={"wait": wait}
    )
    assert status == 400 and answer["code"] == "invalid-query", answer
    record = clc.registrar.record(walrus.component_id)
    assert record is not None and record.status.value == "registered"
