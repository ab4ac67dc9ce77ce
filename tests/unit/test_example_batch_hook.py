"""The example `hooks/node-batch` against a fake `euca_conf` (the one of
test_example_hooks.py): one call for many nodes, a result line per node, idempotent."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from eucareg.core.model import HookOutcome, HookRun, Role, Status
from eucareg.registrar.batch import Member, run_batch
from eucareg.registrar.hooks import HookRunner
from tests.factories import ann, record_from
from tests.unit.test_example_hooks import EXAMPLES, FakeEucaConf, euca_conf

__all__ = ["euca_conf"]  # the fixture, used by name


@pytest.fixture
def batch_dir(tmp_path: Path) -> Path:
    target = tmp_path / "hooks"
    target.mkdir()
    shutil.copy2(EXAMPLES / "node-batch", target / "node-batch")
    (target / "node-batch").chmod(0o755)
    return target


def nodes(count: int) -> list[Member]:
    return [Member(record_from(ann(Role.NC, "cluster1"), Status.REGISTERING)) for _ in range(count)]


async def batch(hook_dir: Path, members: list[Member]) -> dict[str, HookRun]:
    """Each member's run, by address."""

    async def journal(*_runs: HookRun) -> None:
        return None

    runs = await run_batch(HookRunner(hook_dir, 20, journal), members)
    return {m.record.address: r for m, r in zip(members, runs, strict=True)}


def registered(euca_conf: FakeEucaConf) -> list[str]:
    return sorted(row[2] for row in euca_conf.registered())


def test_the_example_is_a_posix_sh_script() -> None:
    text = (EXAMPLES / "node-batch").read_text()
    assert text.startswith("#!/bin/sh\n")
    assert (EXAMPLES / "node-batch").stat().st_mode & 0o111


async def test_one_call_registers_every_node(euca_conf: FakeEucaConf, batch_dir: Path) -> None:
    members = nodes(4)
    runs = await batch(batch_dir, members)
    assert {r.outcome for r in runs.values()} == {HookOutcome.OK}
    [call] = euca_conf.registrations("--register-nodes")
    assert call == ["--register-nodes", " ".join(runs)]
    assert registered(euca_conf) == sorted(runs)


async def test_one_unreachable_node_fails_alone_and_its_retry_registers_only_it(
    euca_conf: FakeEucaConf, batch_dir: Path
) -> None:
    members = nodes(3)
    bad = members[1].record.address
    euca_conf.fault(f"refuse-{bad}")
    runs = await batch(batch_dir, members)
    assert runs[bad].outcome is HookOutcome.FAILED
    assert f"cannot reach node {bad}" in runs[bad].stderr.splitlines()[-1]
    others = sorted(a for a in runs if a != bad)
    assert [runs[a].outcome for a in others] == [HookOutcome.OK, HookOutcome.OK]
    assert registered(euca_conf) == others
    # The node is reachable again; eucareg retries it alone.
    (euca_conf.state / f"refuse-{bad}").unlink()
    again = await batch(batch_dir, [members[1]])
    assert again[bad].outcome is HookOutcome.OK
    assert euca_conf.registrations("--register-nodes")[-1] == ["--register-nodes", bad]
    assert registered(euca_conf) == sorted(runs)


async def test_a_rerun_registers_only_the_nodes_not_listed_yet(
    euca_conf: FakeEucaConf, batch_dir: Path
) -> None:
    members = nodes(3)
    done = members[0].record.address
    euca_conf.add("NODE", "-", done, done)
    runs = await batch(batch_dir, members)
    assert {r.outcome for r in runs.values()} == {HookOutcome.OK}
    [call] = euca_conf.registrations("--register-nodes")
    assert call == ["--register-nodes", " ".join(a for a in runs if a != done)]
    assert "already registered" in runs[done].stdout
    assert registered(euca_conf) == sorted(runs)


async def test_a_cloud_that_does_not_answer_fails_every_node_with_the_reason(
    euca_conf: FakeEucaConf, batch_dir: Path
) -> None:
    euca_conf.fault("down")
    runs = await batch(batch_dir, nodes(2))
    for run in runs.values():
        assert run.outcome is HookOutcome.FAILED and run.exit_code == 3
        assert run.stderr.splitlines()[-1] == (
            "euca_conf --register-nodes failed (exit 3): euca_conf: cannot reach CLC web service"
        )
    assert registered(euca_conf) == []
