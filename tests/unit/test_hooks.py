"""Hook runs: arguments and environment, outcomes, and what a misbehaving script leaves."""

from __future__ import annotations

import time
from pathlib import Path

from eucareg.core.model import Role
from eucareg.registrar.hooks import OUTPUT_LIMIT, run_hook
from tests.factories import ann


def script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return tmp_path


async def test_arguments_and_environment_are_the_documented_ones(tmp_path: Path) -> None:
    nc = ann(Role.NC, "c1")
    hooks = script(tmp_path, "node", 'echo "$@|$EUCAREG_ROLE|$EUCAREG_CLUSTER|$EUCAREG_ID"')
    run = await run_hook(hooks, nc, 5)
    assert run.outcome == "ok" and run.exit_code == 0
    assert run.stdout.strip() == (
        f"{nc.address} c1 {nc.component_id} {nc.fingerprint}|nc|c1|{nc.component_id}"
    )


async def test_timeout_keeps_output_and_is_not_held_up_by_an_escaped_child(
    tmp_path: Path,
) -> None:
    # The escaped child keeps stdout open in a session of its own, beyond the group kill.
    hooks = script(tmp_path, "walrus", "echo before-the-hang\nsetsid sleep 30 &\nsleep 30")
    started = time.monotonic()
    run = await run_hook(hooks, ann(Role.WALRUS), 0.5)
    assert run.outcome == "timeout" and run.exit_code is None
    assert "before-the-hang" in run.stdout
    assert "killed after 0.5s" in run.stderr
    assert time.monotonic() - started < 4


async def test_output_is_bounded_to_the_tail(tmp_path: Path) -> None:
    hooks = script(tmp_path, "walrus", "head -c 1000000 /dev/zero | tr '\\\\0' x; echo END")
    run = await run_hook(hooks, ann(Role.WALRUS), 10)
    assert run.outcome == "ok"
    assert len(run.stdout) <= OUTPUT_LIMIT and run.stdout.endswith("END\n")


async def test_missing_and_non_executable_scripts(tmp_path: Path) -> None:
    skipped = await run_hook(tmp_path, ann(Role.CC, "c1"), 5)
    assert skipped.outcome == "skipped" and "no script" in skipped.stderr
    (tmp_path / "storage").write_text("#!/bin/sh\n")
    failed = await run_hook(tmp_path, ann(Role.SC, "c1"), 5)
    assert failed.outcome == "failed" and "not executable" in failed.stderr
