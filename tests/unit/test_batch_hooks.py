"""Batched hooks (registrar.batch_hooks): one script run for many components, a result per
component, retries alone, and a batch that a crash interrupted run again as one batch.

Real registrar, real SQLite file, real shell scripts; sightings are fed directly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from eucareg.core.model import HookOutcome, HookRun, Role, Status
from eucareg.core.transitions import Write
from eucareg.core.view import RegistrarSettings
from eucareg.registrar.batch import Batching, parse_results
from eucareg.registrar.engine import Registrar, Timing
from eucareg.registrar.hook_processes import proc_start_time
from eucareg.store.registry import Store, sqlite_url
from tests.factories import KEYS, ann, record_from, sighting
from tests.unit.test_registrar import make_registrar, settle, spawn_orphan, write_hook

NODES = RegistrarSettings(registers=frozenset({Role.NC}), own_cluster="c1")
FAST = Timing(retry_base=0.05, retry_max=0.2, hook_timeout=5)

# Logs one line per batch run (its arguments), and one per member from the batch file.
BATCH_LOG = """\
echo "run $EUCAREG_BATCH_SIZE $EUCAREG_ROLE $EUCAREG_CLUSTER: $*" >> {log}
while IFS='\t' read -r addr cluster id fp vers attempt rerun; do
  echo "member $addr $cluster $id $vers attempt=$attempt rerun=$rerun" >> {log}
done < "$EUCAREG_BATCH"
"""


def lines(log: Path, prefix: str) -> list[str]:
    if not log.exists():
        return []
    return [line for line in log.read_text().splitlines() if line.startswith(prefix)]


async def node_registrar(tmp_path: Path, **batching: object) -> Registrar:
    return await make_registrar(
        tmp_path,
        NODES,
        timing=FAST,
        me=[True],
        batching=Batching(frozenset({Role.NC}), **batching),  # type: ignore[arg-type]
    )


async def wait_until(reg: Registrar, done: Callable[[], bool], rounds: int = 200) -> None:
    """Settle again and again (retries are timers) until `done()` holds; bounded."""
    for _ in range(rounds):
        await settle(reg)
        if done():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the registrar did not get there")


async def test_a_burst_of_nodes_is_one_batch_run_with_every_member_recorded(
    tmp_path: Path,
) -> None:
    log = tmp_path / "hooks.log"
    write_hook(tmp_path / "hooks", "node-batch", BATCH_LOG.format(log=log))
    write_hook(tmp_path / "hooks", "node", f'echo "single $EUCAREG_ID" >> {log}')
    reg = await node_registrar(tmp_path, wait=0.2)
    nodes = [ann(Role.NC, "c1") for _ in range(5)]
    for node in nodes:
        reg.on_sighting(sighting(node))
    await settle(reg)
    records = reg.store.records()
    assert {r.status for r in records.values()} == {Status.REGISTERED}
    assert lines(log, "single") == []
    [run_line] = lines(log, "run")
    assert run_line == "run 5 nc c1: " + " ".join(str(n.address) for n in nodes)
    assert sorted(lines(log, "member")) == sorted(
        f"member {n.address} c1 {n.component_id} 3.4 attempt=1 rerun=0" for n in nodes
    )
    runs = reg.store.hook_runs()
    assert len(runs) == 5 and all(r.outcome is HookOutcome.OK for r in runs)
    assert len({r.batch for r in runs}) == 1 and runs[0].batch is not None
    assert len({r.pgid for r in runs}) == 1
    assert {r.hook for r in runs} == {str(tmp_path / "hooks" / "node-batch")}
    await reg.close()


async def test_a_batch_failing_for_one_registers_the_rest_and_retries_that_one_alone(
    tmp_path: Path,
) -> None:
    """The script reports one member failed (and exits non-zero, as euca_conf does when one
    host of many is bad): the others are registered, the bad one is retried in a batch of
    its own until it works."""
    log = tmp_path / "hooks.log"
    bad = ann(Role.NC, "c1")
    good = [ann(Role.NC, "c1") for _ in range(4)]
    fixed = tmp_path / "fixed"
    write_hook(
        tmp_path / "hooks",
        "node-batch",
        BATCH_LOG.format(log=log) + f'for a in "$@"; do\n'
        f'  if [ "$a" = "{bad.address}" ] && [ ! -e {fixed} ]; then\n'
        f'    echo "failed $a host unreachable" >> "$EUCAREG_RESULTS"; touch {fixed}.tried\n'
        f'  else echo "ok $a" >> "$EUCAREG_RESULTS"; fi\n'
        "done\n"
        f"[ -e {fixed}.tried ] && [ ! -e {fixed} ] && {{ touch {fixed}; exit 1; }}\n"
        "exit 0",
    )
    reg = await node_registrar(tmp_path, wait=1.0)
    for node in [*good, bad]:
        reg.on_sighting(sighting(node))
    await settle(reg)
    for node in good:
        assert reg.store.get(node.component_id).status is Status.REGISTERED  # type: ignore[union-attr]
    failed = reg.store.get(bad.component_id)
    assert failed is not None and failed.status is Status.FAILED
    assert "host unreachable" in failed.reason and "exit 1" in failed.reason
    # Newcomers open a batch that waits a second; the retry (due in 0.05 s) must not join it.
    late = [ann(Role.NC, "c1") for _ in range(2)]
    for node in late:
        reg.on_sighting(sighting(node))
        # Their agents prove their keys at once (settle() would wait for the retry first).
        await reg.credentials(node.component_id, KEYS[node.fingerprint].public_key(), wait=0)
    await wait_until(
        reg,
        lambda: all(
            reg.store.get(n.component_id).status is Status.REGISTERED  # type: ignore[union-attr]
            for n in [bad, *late]
        ),
    )
    assert lines(log, "run")[1:] == [
        f"run 1 nc c1: {bad.address}",  # alone, once
        f"run 2 nc c1: {late[0].address} {late[1].address}",
    ]
    assert f"member {bad.address} c1 {bad.component_id} 3.4 attempt=2 rerun=0" in lines(
        log, "member"
    )
    bad_runs = reg.store.hook_runs(bad.component_id)
    assert [r.outcome for r in bad_runs] == [HookOutcome.FAILED, HookOutcome.OK]
    assert bad_runs[0].batch != bad_runs[1].batch
    for node in good:
        assert len(reg.store.hook_runs(node.component_id)) == 1  # never run again
    await reg.close()


async def test_a_full_batch_starts_at_once_and_the_rest_wait_for_the_next(tmp_path: Path) -> None:
    log = tmp_path / "hooks.log"
    write_hook(tmp_path / "hooks", "node-batch", BATCH_LOG.format(log=log))
    # A wait far longer than the test: only batch_max can start the full batches.
    reg = await node_registrar(tmp_path, max_size=2, wait=60)
    nodes = [ann(Role.NC, "c1") for _ in range(4)]
    for node in nodes:
        reg.on_sighting(sighting(node))
    await settle(reg)
    assert sorted(lines(log, "run")) == [
        f"run 2 nc c1: {nodes[0].address} {nodes[1].address}",
        f"run 2 nc c1: {nodes[2].address} {nodes[3].address}",
    ]
    assert {r.status for r in reg.store.records().values()} == {Status.REGISTERED}
    await reg.close()


async def test_a_batch_killed_at_the_timeout_keeps_the_results_it_wrote(tmp_path: Path) -> None:
    log = tmp_path / "hooks.log"
    done, hung = ann(Role.NC, "c1"), ann(Role.NC, "c1")
    write_hook(
        tmp_path / "hooks",
        "node-batch",
        BATCH_LOG.format(log=log) + f'echo "ok {done.component_id}" >> "$EUCAREG_RESULTS"\n'
        # Killed mid-line: a result without its line break must not count.
        f'printf "ok {hung.component_id}" >> "$EUCAREG_RESULTS"\nexec sleep 30',
    )
    reg = await make_registrar(
        tmp_path,
        NODES,
        timing=replace(FAST, hook_timeout=1, retry_base=30),
        me=[True],
        batching=Batching(frozenset({Role.NC}), wait=0.1),
    )
    reg.on_sighting(sighting(done))
    reg.on_sighting(sighting(hung))
    await settle(reg)
    assert reg.store.get(done.component_id).status is Status.REGISTERED  # type: ignore[union-attr]
    record = reg.store.get(hung.component_id)
    assert record is not None and record.status is Status.FAILED
    [run] = reg.store.hook_runs(hung.component_id)
    assert run.outcome is HookOutcome.TIMEOUT and "killed after 1s" in run.stderr
    await reg.close()


async def test_an_interrupted_batch_is_killed_and_run_again_as_one_batch_marked(
    tmp_path: Path,
) -> None:
    """A registrar died while a batch of three ran: the batch's process group is killed at
    start, and the three run again in one batch, each marked as a re-run."""
    log = tmp_path / "hooks.log"
    write_hook(tmp_path / "hooks", "node-batch", BATCH_LOG.format(log=log))
    nodes = [ann(Role.NC, "c1") for _ in range(3)]
    orphan = spawn_orphan()
    try:
        runs = tuple(
            HookRun(
                run_id=f"dead-{i}",
                component_id=n.component_id,
                hook=str(tmp_path / "hooks" / "node-batch"),
                started_at=time.time() - 5,
                outcome=HookOutcome.RUNNING,
                pgid=orphan.pid,
                proc_start=proc_start_time(orphan.pid),
                batch="b-dead",
            )
            for i, n in enumerate(nodes)
        )
        records = tuple(record_from(n, Status.REGISTERING) for n in nodes)
        seed = Store(sqlite_url(tmp_path / "registry.db"))
        seed.apply([Write(records=records, hook_runs=runs)])
        seed.close()
        reg = await node_registrar(tmp_path, wait=0.2)
        assert orphan.wait(timeout=10) < 0
        await settle(reg)
    finally:
        orphan.kill()
        orphan.wait()
    assert {r.status for r in reg.store.records().values()} == {Status.REGISTERED}
    [run_line] = lines(log, "run")
    assert run_line.startswith("run 3 nc c1: ")
    assert all(line.endswith("rerun=1") for line in lines(log, "member"))
    for node in nodes:
        outcomes = [r.outcome for r in reg.store.hook_runs(node.component_id)]
        assert outcomes == [HookOutcome.INTERRUPTED, HookOutcome.OK]
    await reg.close()


async def test_without_a_batch_script_the_single_script_runs_per_component(
    tmp_path: Path,
) -> None:
    log = tmp_path / "hooks.log"
    write_hook(tmp_path / "hooks", "node", f'echo "single $EUCAREG_ID" >> {log}')
    reg = await node_registrar(tmp_path, wait=0.1)
    nodes = [ann(Role.NC, "c1") for _ in range(3)]
    for node in nodes:
        reg.on_sighting(sighting(node))
    await settle(reg)
    assert sorted(lines(log, "single")) == sorted(f"single {n.component_id}" for n in nodes)
    assert all(r.batch is None for r in reg.store.hook_runs())
    await reg.close()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "ok 10.0.0.1\nfailed n-1 no route to host\n",
            {"10.0.0.1": (True, ""), "n-1": (False, "no route to host")},
        ),
        ("failed a first\nok a\n", {"a": (True, "")}),  # a later line wins
        ("ok a\nok b", {"a": (True, "")}),  # b's line was cut short by a kill
        ("OK a\nfine b\nok\n\n  ok   c  \n", {"c": (True, "")}),
        ("failed x " + "y" * 5000 + "\n", {"x": (False, "y" * 1024)}),
        ("\x00\x01 junk\nok \u00e9\n", {"\u00e9": (True, "")}),
    ],
)
def test_results_lines(text: str, expected: dict[str, tuple[bool, str]]) -> None:
    assert parse_results(text) == expected
