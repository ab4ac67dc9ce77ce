"""Attacks on batched hooks (registrar.batch_hooks): stops while a batch gathers or runs,
members that change under a running batch, re-announcements, odd batch sizes, abusive results
files and batch scripts, precedence of results over the exit status, timeouts and slots.

Real registrar, real SQLite file, real shell scripts, as in test_batch_hooks.py. Negative
checks wait for the event that proves the decision (idle, a journal row, a record's status),
never for a fixed time.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import replace
from pathlib import Path

from eucareg.core.model import Announcement, HookOutcome, HookRun, Role, Status
from eucareg.core.view import RegistrarSettings
from eucareg.mdns.types import Change
from eucareg.registrar.batch import BATCH_OUTPUT_LIMIT, Batching
from eucareg.registrar.engine import Registrar, Timing
from eucareg.registrar.hook_processes import group_alive
from eucareg.store.registry import Store, sqlite_url
from tests.factories import KEYS, ann, sighting
from tests.unit.test_api_harness import eventually
from tests.unit.test_batch_hooks import BATCH_LOG, lines
from tests.unit.test_registrar import (
    CLC_SETTINGS,
    make_registrar,
    registered_cc,
    settle,
    write_hook,
)

NODES = RegistrarSettings(registers=frozenset({Role.NC}), own_cluster="c1")
FAST = Timing(retry_base=0.05, retry_max=0.2, hook_timeout=5)
NO_RETRY = replace(FAST, retry_base=300, retry_max=300)  # a failure stays failed in a test


async def node_registrar(
    tmp_path: Path, *, timing: Timing = FAST, install_window: bool = True, **batching: object
) -> Registrar:
    return await make_registrar(
        tmp_path,
        NODES,
        timing=timing,
        me=[True],
        install_window=install_window,
        batching=Batching(frozenset({Role.NC}), **batching),  # type: ignore[arg-type]
    )


async def admit(reg: Registrar, node: Announcement) -> None:
    """Announce `node` and prove its key at once, as its agent would: it goes `registering`
    and its hook is owed (without settle(), which would wait for a gathering batch)."""
    reg.on_sighting(sighting(node))
    await reg.credentials(node.component_id, KEYS[node.fingerprint].public_key(), wait=0)


def gathering(reg: Registrar) -> int:
    """Members waiting in batches that have not started."""
    return sum(len(b.members) for b in reg.batcher._open.values())


def status(reg: Registrar, node: Announcement) -> Status | None:
    record = reg.record(node.component_id)
    return None if record is None else record.status


def stored(reg: Registrar, node: Announcement) -> Status:
    record = reg.store.get(node.component_id)
    assert record is not None
    return record.status


def reason(reg: Registrar, node: Announcement) -> str:
    record = reg.store.get(node.component_id)
    assert record is not None
    return record.reason


def one_run(reg: Registrar, node: Announcement) -> HookRun:
    [run] = reg.store.hook_runs(node.component_id)
    return run


def blocking(log: Path, started: Path, release: Path, tail: str = "") -> str:
    """A batch script that logs, says it started, and waits for the test to release it."""
    return (
        BATCH_LOG.format(log=log) + f"echo $$ > {started}.tmp && mv {started}.tmp {started}\n"
        f"while [ ! -e {release} ]; do sleep 0.02; done\n{tail}"
    )


def nodes(count: int, cluster: str = "c1") -> list[Announcement]:
    return [ann(Role.NC, cluster) for _ in range(count)]


# -- stops ---------------------------------------------------------------------------------


async def test_a_stop_while_a_batch_gathers_starts_nothing_and_the_restart_runs_it_once(
    tmp_path: Path,
) -> None:
    """Stopped while three members wait for the batch's timer: no script ran, nothing was
    journaled, the records stay `registering`; the restart runs the three once, in one
    batch, as first runs (the gate never opened, docs/hooks.md)."""
    log = tmp_path / "hooks.log"
    write_hook(tmp_path / "hooks", "node-batch", BATCH_LOG.format(log=log))
    reg = await node_registrar(tmp_path, wait=60)
    members = nodes(3)
    for node in members:
        await admit(reg, node)
    await eventually(lambda: gathering(reg) == 3, "three members gathering")
    await reg.close()
    assert gathering(reg) == 0  # the batch was dropped, its timer cancelled
    assert lines(log, "run") == []
    assert {stored(reg, n) for n in members} == {Status.REGISTERING}
    assert reg.store.hook_runs() == []
    reg.store.close()

    again = await node_registrar(tmp_path, wait=0.1, install_window=False)
    await settle(again)
    assert {stored(again, n) for n in members} == {Status.REGISTERED}
    [run_line] = lines(log, "run")
    assert run_line.startswith("run 3 nc c1: ")
    assert all(line.endswith("attempt=1 rerun=0") for line in lines(log, "member"))
    for node in members:
        run = one_run(again, node)
        assert run.outcome is HookOutcome.OK and not run.rerun
    await again.close()


async def test_a_stop_while_a_batch_runs_kills_it_and_the_restart_reruns_it_once_marked(
    tmp_path: Path,
) -> None:
    log, started, release = tmp_path / "hooks.log", tmp_path / "started", tmp_path / "go"
    write_hook(tmp_path / "hooks", "node-batch", blocking(log, started, release))
    reg = await node_registrar(tmp_path, wait=0.1)
    members = nodes(3)
    for node in members:
        await admit(reg, node)
    await eventually(started.exists, "the batch script to start")
    await reg.writer.flush()
    running = reg.store.hook_runs()
    assert len(running) == 3 and {r.outcome for r in running} == {HookOutcome.RUNNING}
    assert len({r.batch for r in running}) == 1 and len({r.pgid for r in running}) == 1
    await reg.close()
    pgid, since = running[0].pgid, running[0].proc_start
    assert pgid is not None and not group_alive(pgid, since)  # nothing of the batch is left
    assert {stored(reg, n) for n in members} == {Status.REGISTERING}
    assert {r.outcome for r in reg.store.hook_runs()} == {HookOutcome.RUNNING}
    reg.store.close()

    write_hook(tmp_path / "hooks", "node-batch", BATCH_LOG.format(log=log))
    again = await node_registrar(tmp_path, wait=0.1, install_window=False)
    await settle(again)
    assert {stored(again, n) for n in members} == {Status.REGISTERED}
    assert [line.split(":")[0] for line in lines(log, "run")] == ["run 3 nc c1"] * 2
    reruns = lines(log, "member")[3:]
    assert len(reruns) == 3 and all(line.endswith("attempt=1 rerun=1") for line in reruns)
    batches = set()
    for node in members:
        runs = again.store.hook_runs(node.component_id)
        assert [r.outcome for r in runs] == [HookOutcome.INTERRUPTED, HookOutcome.OK]
        assert runs[1].rerun
        batches.add(runs[1].batch)
    assert len(batches) == 1 and running[0].batch not in batches
    await again.close()


# -- members that change under a batch -------------------------------------------------------


async def test_a_member_deregistered_and_back_as_another_machine_while_its_batch_runs(
    tmp_path: Path,
) -> None:
    """The batch reports `ok` for a member that was deregistered meanwhile and came back under
    the same id with another key and address: that outcome only goes to the journal; the
    newcomer's own run (for its new address) decides."""
    log, started, release = tmp_path / "hooks.log", tmp_path / "started", tmp_path / "go"
    ok_all = 'for a in "$@"; do echo "ok $a" >> "$EUCAREG_RESULTS"; done\n'
    write_hook(tmp_path / "hooks", "node-batch", blocking(log, started, release, ok_all))
    reg = await node_registrar(tmp_path, wait=0.1)
    victim, other = nodes(2)
    await admit(reg, victim)
    await admit(reg, other)
    await eventually(started.exists, "the batch script to start")
    reg.on_sighting(sighting(victim, Change.REMOVED))
    await reg.deregister(reg.find(victim.component_id, None))
    moved = ann(Role.NC, "c1", component_id=victim.component_id)
    assert moved.address != victim.address and moved.fingerprint != victim.fingerprint
    await admit(reg, moved)
    assert status(reg, moved) is Status.REGISTERING
    release.touch()
    await settle(reg)
    record = reg.store.get(victim.component_id)
    assert record is not None and record.status is Status.REGISTERED
    assert record.address == str(moved.address) and record.fingerprint == moved.fingerprint
    assert lines(log, "run")[1] == f"run 1 nc c1: {moved.address}"
    runs = reg.store.hook_runs(victim.component_id)
    # The batch's run, the victim's deregister hook (after the batch; none installed here),
    # then the newcomer's own run.
    assert [r.outcome for r in runs] == [HookOutcome.OK, HookOutcome.SKIPPED, HookOutcome.OK]
    assert runs[1].hook.endswith("/deregister-node")
    registered = reg.store.events(component_id=victim.component_id, kind="registered")
    assert [e.address for e in registered] == [str(moved.address)]
    assert stored(reg, other) is Status.REGISTERED
    await reg.close()


async def test_a_member_deregistered_while_its_batch_gathers_is_not_handed_to_the_script(
    tmp_path: Path,
) -> None:
    """Deregistered (and gone) while its batch waits for others: with batch_wait up to 60 s
    the window is long, and the script would register in Eucalyptus a component the operator
    has just removed. A single run checks the record when it starts; a batch member must be
    checked when its batch starts."""
    log = tmp_path / "hooks.log"
    write_hook(tmp_path / "hooks", "node-batch", BATCH_LOG.format(log=log))
    reg = await node_registrar(tmp_path, max_size=2, wait=60)
    victim, other = nodes(2)
    await admit(reg, victim)
    await eventually(lambda: gathering(reg) == 1, "the victim gathering")
    reg.on_sighting(sighting(victim, Change.REMOVED))
    await reg.deregister(reg.find(victim.component_id, None))
    assert reg.record(victim.component_id) is None
    await admit(reg, other)  # fills the batch: it starts
    await settle(reg)
    assert stored(reg, other) is Status.REGISTERED
    assert reg.store.get(victim.component_id) is None
    assert lines(log, "run") == [f"run 1 nc c1: {other.address}"]
    await reg.close()


async def test_twice_deregistered_and_back_while_running_never_runs_two_hooks_at_once(
    tmp_path: Path,
) -> None:
    """One hook at a time per component (docs/hooks.md). The run of a component that was
    deregistered and accepted again waits for the old run; when the old one ends, the
    per-component lock is dropped although a run still waits on it, so a third run (the
    component deregistered and accepted once more) takes a new lock and runs beside it: here
    both join the same batch, the same component twice in one script run."""
    log, started, release = tmp_path / "hooks.log", tmp_path / "started", tmp_path / "go"
    write_hook(tmp_path / "hooks", "node-batch", blocking(log, started, release))
    reg = await node_registrar(tmp_path, wait=1.5)  # the third run comes well within it
    first = ann(Role.NC, "c1")
    await admit(reg, first)
    await eventually(started.exists, "the first batch to start")

    async def replace_it() -> Announcement:
        current = reg.live[first.component_id]
        reg.on_sighting(sighting(current, Change.REMOVED))
        await reg.deregister(reg.find(first.component_id, None))
        newer = ann(Role.NC, "c1", component_id=first.component_id)
        await admit(reg, newer)
        return newer

    await replace_it()  # its run waits for the running one
    release.touch()
    await eventually(lambda: gathering(reg) == 1, "the second run gathering")
    await replace_it()  # a third run while the second gathers
    await settle(reg)
    members = lines(log, "member")
    ids = [line.split()[3] for line in members[1:]]
    runs = lines(log, "run")
    assert all(line.startswith("run 1 ") for line in runs), (runs, ids)
    await reg.close()


async def test_a_component_announced_again_and_again_while_gathering_runs_once(
    tmp_path: Path,
) -> None:
    log = tmp_path / "hooks.log"
    write_hook(tmp_path / "hooks", "node-batch", BATCH_LOG.format(log=log))
    reg = await node_registrar(tmp_path, max_size=3, wait=0.5)
    members = nodes(3)
    for _ in range(3):
        for node in members:
            await admit(reg, node)
            reg.on_sighting(sighting(node, Change.UPDATED))
            reg.on_sighting(sighting(node, instance=node.instance + " #2"))
    await settle(reg)
    assert {stored(reg, n) for n in members} == {Status.REGISTERED}
    [run_line] = lines(log, "run")
    assert run_line == "run 3 nc c1: " + " ".join(str(n.address) for n in members)
    for node in members:
        assert one_run(reg, node).outcome is HookOutcome.OK
    await reg.close()


# -- sizes and keys ---------------------------------------------------------------------------


async def test_five_at_once_with_batch_max_two_are_batches_of_two_two_and_one(
    tmp_path: Path,
) -> None:
    log = tmp_path / "hooks.log"
    write_hook(tmp_path / "hooks", "node-batch", BATCH_LOG.format(log=log))
    reg = await node_registrar(tmp_path, max_size=2, wait=0.3)
    members = nodes(5)
    for node in members:
        reg.on_sighting(sighting(node))
    await settle(reg)
    assert {stored(reg, n) for n in members} == {Status.REGISTERED}
    sizes = sorted(int(line.split()[1]) for line in lines(log, "run"))
    assert sizes == [1, 2, 2]
    ran = [line.split()[1] for line in lines(log, "member")]
    assert sorted(ran) == sorted(str(n.address) for n in members)  # each exactly once
    assert len({r.batch for r in reg.store.hook_runs()}) == 3
    await reg.close()


async def test_on_a_clc_components_of_different_clusters_never_share_a_batch(
    tmp_path: Path,
) -> None:
    log = tmp_path / "hooks.log"
    hooks = tmp_path / "hooks"
    for name in ("cluster-batch", "storage-batch"):
        write_hook(hooks, name, f"echo '{name}' >> {log}\n" + BATCH_LOG.format(log=log))
    reg = await make_registrar(
        tmp_path,
        CLC_SETTINGS,
        batching=Batching(frozenset({Role.CC, Role.SC}), wait=0.3),
    )
    ccs = [ann(Role.CC, f"c{i}") for i in range(1, 4)]
    for cc in ccs:
        reg.on_sighting(sighting(cc))
    await settle(reg)
    for cc in ccs:
        reg.on_sighting(sighting(registered_cc(cc), Change.UPDATED))
    await settle(reg)
    scs = [ann(Role.SC, f"c{i}") for i in range(1, 4)]
    for sc in scs:
        reg.on_sighting(sighting(sc))
    await settle(reg)
    assert {stored(reg, c) for c in [*ccs, *scs]} == {Status.REGISTERED}
    assert sorted(lines(log, "run")) == sorted(
        [f"run 1 cc {c.cluster}: {c.address}" for c in ccs]
        + [f"run 1 sc {s.cluster}: {s.address}" for s in scs]
    )
    await reg.close()


# -- results files -----------------------------------------------------------------------------


async def run_nodes(
    tmp_path: Path, body: str, count: int = 2, timing: Timing = NO_RETRY, **batching: object
) -> tuple[Registrar, list[Announcement]]:
    """`count` nodes through one run of a node-batch script with `body`; settled."""
    write_hook(tmp_path / "hooks", "node-batch", body)
    reg = await node_registrar(tmp_path, timing=timing, wait=0.2, **batching)
    members = nodes(count)
    for node in members:
        reg.on_sighting(sighting(node))
    await settle(reg)
    return reg, members


async def test_a_later_line_wins_also_when_it_names_the_member_by_its_other_key(
    tmp_path: Path,
) -> None:
    """docs/hooks.md: "KEY is the member's address or its component id. A later line about
    the same member wins." The id must not win over a later line naming the address."""
    body = (
        'set -- $(cut -f3 "$EUCAREG_BATCH")\n'  # ids
        'a1=$(sed -n 1p "$EUCAREG_BATCH" | cut -f1); a2=$(sed -n 2p "$EUCAREG_BATCH" | cut -f1)\n'
        'echo "failed $1 first thought" >> "$EUCAREG_RESULTS"\n'
        'echo "ok $a1" >> "$EUCAREG_RESULTS"\n'
        'echo "ok $2" >> "$EUCAREG_RESULTS"\n'
        'echo "failed $a2 second thought" >> "$EUCAREG_RESULTS"\n'
        "exit 0"
    )
    reg, (one, two) = await run_nodes(tmp_path, body)
    assert stored(reg, one) is Status.REGISTERED
    assert stored(reg, two) is Status.FAILED
    assert "second thought" in reason(reg, two)
    await reg.close()


async def test_results_for_strangers_junk_and_nul_bytes_fall_back_to_the_exit_status(
    tmp_path: Path,
) -> None:
    body = (
        'printf "ok 10.255.255.254\\nok nc-000000000bad\\nok\\n\\0\\377\\376 garbage\\n"'
        ' >> "$EUCAREG_RESULTS"\n'
        'for a in "$@"; do printf "ok %s\\0\\n\\0ok %s\\n" "$a" "$a" >> "$EUCAREG_RESULTS"; done\n'
        "echo 'the real reason' >&2; exit 4"
    )
    reg, members = await run_nodes(tmp_path, body)
    for node in members:
        assert stored(reg, node) is Status.FAILED
        assert "hook failed (exit 4): the real reason" in reason(reg, node)
    await reg.close()


async def test_a_reason_with_control_characters_is_named_whole_in_the_record(
    tmp_path: Path,
) -> None:
    """The reason of a `failed` line ends up as the record's reason (the last line of the
    run's stderr). A carriage return, a form feed or U+2028 inside it must neither cut it
    (str.splitlines() splits there) nor put control characters into the record."""
    body = (
        'for a in "$@"; do\n'
        '  printf "failed %s disk\\rfull\\014on \\342\\200\\250host\\033[2J now\\n" "$a"'
        ' >> "$EUCAREG_RESULTS"\n'
        "done\nexit 1"
    )
    reg, members = await run_nodes(tmp_path, body)
    for node in members:
        text = reason(reg, node)
        assert stored(reg, node) is Status.FAILED
        assert "the batch's results file says: failed (disk" in text, text
        assert "now)" in text, text
        assert all(c.isprintable() for c in text), text
    await reg.close()


async def test_a_results_file_past_the_limit_is_read_up_to_it(tmp_path: Path) -> None:
    """Results before 4 MiB of junk count; a verdict after it is not read (the exit status
    decides), and the registrar is not stalled by it."""
    body = (
        'set -- $(cut -f1 "$EUCAREG_BATCH")\n'
        'echo "ok $1" >> "$EUCAREG_RESULTS"\n'
        "head -c 5000000 /dev/zero | tr '\\0' 'x' >> \"$EUCAREG_RESULTS\"\n"
        'printf "\\nok $2\\n" >> "$EUCAREG_RESULTS"\n'
        "exit 1"
    )
    reg, (one, two) = await run_nodes(tmp_path, body)
    assert stored(reg, one) is Status.REGISTERED
    assert stored(reg, two) is Status.FAILED
    await reg.close()


async def test_a_script_that_removes_its_files_or_directory_is_judged_by_its_exit_status(
    tmp_path: Path,
) -> None:
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "canary").touch()
    for n, how in enumerate(
        [
            'rm -f "$EUCAREG_RESULTS" "$EUCAREG_BATCH"',
            'rm -f "$EUCAREG_RESULTS"; mkdir "$EUCAREG_RESULTS"',
            'rm -rf "$(dirname "$EUCAREG_RESULTS")"',
            # The directory replaced by a link: it is removed, not what it points to.
            f'd=$(dirname "$EUCAREG_RESULTS"); rm -rf "$d"; ln -s {tmp_path / "keep"} "$d"',
        ]
    ):
        case = tmp_path / str(n)
        body = f'for a in "$@"; do echo "failed $a no" >> "$EUCAREG_RESULTS"; done\n{how}\nexit 0'
        reg, members = await run_nodes(case, body)
        assert {stored(reg, m) for m in members} == {Status.REGISTERED}, how
        assert {r.outcome for r in reg.store.hook_runs()} == {HookOutcome.OK}, how
        await reg.close()
    assert (tmp_path / "keep" / "canary").exists()


async def test_a_results_file_replaced_by_a_link_elsewhere_is_not_followed(
    tmp_path: Path,
) -> None:
    """The registrar reads $EUCAREG_RESULTS itself; a script that replaced it by a symbolic
    link made the registrar read another file of its choice (any file the registrar may
    read). Only the file itself counts: the exit status decides."""
    elsewhere = tmp_path / "elsewhere"
    body = (
        f'for a in "$@"; do echo "ok $a" >> {elsewhere}; done\n'
        f'rm "$EUCAREG_RESULTS" && ln -s {elsewhere} "$EUCAREG_RESULTS"\n'
        "echo 'nothing worked' >&2; exit 1"
    )
    reg, members = await run_nodes(tmp_path, body)
    assert {stored(reg, m) for m in members} == {Status.FAILED}
    await reg.close()


async def test_a_results_fifo_does_not_block_the_registrar(tmp_path: Path) -> None:
    """A script that replaced $EUCAREG_RESULTS by a FIFO (or a link to one, or to a device):
    opening it for reading blocks until someone writes. The registrar read it on its event
    loop: mDNS, HTTP and every other hook stopped. A helper thread opens the FIFO for writing
    after 2 s if the registrar is still stuck on it, so that this test ends either way."""
    where = tmp_path / "fifo-at"
    body = (
        'rm -f "$EUCAREG_RESULTS" && mkfifo "$EUCAREG_RESULTS"\n'
        f'echo "$EUCAREG_RESULTS" > {where}.tmp && mv {where}.tmp {where}\nexit 0'
    )
    finished, stuck_on = threading.Event(), []

    def rescue() -> None:
        while not where.exists():
            if finished.wait(0.01):
                return
        finished.wait(2.0)
        try:
            fd = os.open(where.read_text().strip(), os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            return  # no reader: nobody was stuck on it
        stuck_on.append(fd)
        os.close(fd)

    helper = threading.Thread(target=rescue, daemon=True)
    helper.start()
    try:
        reg, members = await run_nodes(tmp_path, body)
    finally:
        finished.set()
        helper.join(10)
    assert stuck_on == [], "the registrar blocked on the results FIFO"
    assert {stored(reg, m) for m in members} == {Status.REGISTERED}
    await reg.close()


async def test_a_deep_tree_left_in_the_batch_directory_loses_no_outcome(tmp_path: Path) -> None:
    """The script leaves a directory tree deeper than Python's recursion limit next to its
    results. Removing the batch's temporary directory raised (RecursionError) after the runs
    were journaled: every member's outcome was lost ("cannot run the hook") and their journal
    rows stayed `running`, to be "interrupted" (and their process group killed) at the next
    start."""
    body = (
        'deep=$(printf "d/%.0s" $(seq 1200))\n'
        'mkdir -p "$(dirname "$EUCAREG_RESULTS")/$deep"\n'
        'for a in "$@"; do echo "ok $a" >> "$EUCAREG_RESULTS"; done\nexit 0'
    )
    reg, members = await run_nodes(tmp_path, body)
    assert {stored(reg, m) for m in members} == {Status.REGISTERED}
    runs = reg.store.hook_runs()
    assert {r.outcome for r in runs} == {HookOutcome.OK}
    assert len(runs) == len(members)
    await reg.close()


async def test_a_flood_of_output_keeps_the_last_4_kib_per_member(tmp_path: Path) -> None:
    body = (
        "head -c 100000000 /dev/zero | tr '\\0' 'x'\necho\necho the-end\n"
        "head -c 10000000 /dev/zero | tr '\\0' 'y' >&2\necho >&2\necho err-end >&2\nexit 0"
    )
    reg, members = await run_nodes(tmp_path, body, count=3)
    for node in members:
        run = one_run(reg, node)
        assert run.outcome is HookOutcome.OK
        assert len(run.stdout.encode()) <= BATCH_OUTPUT_LIMIT
        assert len(run.stderr.encode()) <= BATCH_OUTPUT_LIMIT
        assert run.stdout.endswith("the-end\n") and run.stderr.endswith("err-end\n")
    await reg.close()


# -- which script -------------------------------------------------------------------------------


async def test_a_batch_script_removed_while_its_batch_gathers_falls_back_to_the_single_script(
    tmp_path: Path,
) -> None:
    """docs: without `<hook>-batch` the single script runs. When the batch script goes away
    between a member joining and the batch starting, the members were registered as
    `skipped` ("no script …/node-batch"), and the `node` script that is installed never
    ran."""
    log = tmp_path / "hooks.log"
    hooks = tmp_path / "hooks"
    write_hook(hooks, "node-batch", BATCH_LOG.format(log=log))
    write_hook(hooks, "node", f'echo "single $EUCAREG_ID" >> {log}')
    reg = await node_registrar(tmp_path, wait=1.0)
    one, two = nodes(2)
    await admit(reg, one)
    await admit(reg, two)
    await eventually(lambda: gathering(reg) == 2, "both gathering")
    (hooks / "node-batch").unlink()  # before the batch's timer fires
    await settle(reg)
    assert sorted(lines(log, "single")) == sorted(f"single {n.component_id}" for n in (one, two))
    for node in (one, two):
        assert stored(reg, node) is Status.REGISTERED
        assert one_run(reg, node).outcome is HookOutcome.OK
    await reg.close()


async def test_a_batch_script_that_is_not_executable_fails_loudly_like_a_single_one(
    tmp_path: Path,
) -> None:
    """Installed without its x bit: as for a single script ("the file exists but is not
    executable"), the members fail with that reason; the single script does not silently
    take over, and nothing is registered without a run."""
    log = tmp_path / "hooks.log"
    hooks = tmp_path / "hooks"
    write_hook(hooks, "node-batch", BATCH_LOG.format(log=log))
    (hooks / "node-batch").chmod(0o644)
    write_hook(hooks, "node", f'echo "single $EUCAREG_ID" >> {log}')
    reg = await node_registrar(tmp_path, timing=NO_RETRY, wait=0.1)
    members = nodes(2)
    for node in members:
        reg.on_sighting(sighting(node))
    await settle(reg)
    assert lines(log, "") == []
    for node in members:
        assert stored(reg, node) is Status.FAILED
        assert "node-batch is not executable" in reason(reg, node)
    await reg.close()


async def test_with_neither_script_a_batched_role_registers_as_skipped(tmp_path: Path) -> None:
    reg = await node_registrar(tmp_path, wait=0.1)
    members = nodes(2)
    for node in members:
        reg.on_sighting(sighting(node))
    await settle(reg)
    for node in members:
        assert reason(reg, node) == "registered (no hook script)"
        run = one_run(reg, node)
        assert run.outcome is HookOutcome.SKIPPED and run.batch is None
        assert run.hook == str(tmp_path / "hooks" / "node")
    await reg.close()


# -- exit status, timeout, slots --------------------------------------------------------------


async def test_results_win_over_the_exit_status_either_way_and_the_rest_follow_it(
    tmp_path: Path,
) -> None:
    for code in (0, 3):
        case = tmp_path / str(code)
        body = (
            'set -- $(cut -f1 "$EUCAREG_BATCH")\n'
            'echo "ok $1" >> "$EUCAREG_RESULTS"\n'
            'echo "failed $2 refused by the CLC" >> "$EUCAREG_RESULTS"\n'
            f"echo 'exit status said {code}' >&2\nexit {code}"
        )
        reg, (good, bad, silent) = await run_nodes(case, body, count=3)
        assert stored(reg, good) is Status.REGISTERED
        assert stored(reg, bad) is Status.FAILED
        assert "refused by the CLC" in reason(reg, bad)
        assert stored(reg, silent) is (Status.REGISTERED if code == 0 else Status.FAILED)
        if code:
            assert f"exit status said {code}" in reason(reg, silent)
        await reg.close()


async def test_the_timeout_applies_to_the_whole_batch_once_and_reported_failures_stand(
    tmp_path: Path,
) -> None:
    body = (
        'set -- $(cut -f1 "$EUCAREG_BATCH")\n'
        'echo "failed $1 gave up early" >> "$EUCAREG_RESULTS"\n'
        'echo "ok $2" >> "$EUCAREG_RESULTS"\nexec sleep 30'
    )
    timing = replace(NO_RETRY, hook_timeout=1)
    begun = time.monotonic()
    reg, (early, done, hung, also_hung) = await run_nodes(tmp_path, body, count=4, timing=timing)
    assert time.monotonic() - begun < 4  # one timeout for the batch, not one per member
    runs = {r.component_id: r for r in reg.store.hook_runs()}
    assert runs[early.component_id].outcome is HookOutcome.FAILED
    assert "gave up early" in reason(reg, early)
    assert runs[done.component_id].outcome is HookOutcome.OK
    for node in (hung, also_hung):
        assert runs[node.component_id].outcome is HookOutcome.TIMEOUT
        assert stored(reg, node) is Status.FAILED
    [run] = {(r.pgid, r.proc_start) for r in runs.values()}
    assert run[0] is not None and not group_alive(run[0], run[1])
    await reg.close()


async def test_a_retry_never_joins_a_gathering_batch(tmp_path: Path) -> None:
    """batch_max 2, batch_wait 60 s: the failed member of a full batch is retried alone at
    once while a newcomer waits in the next batch; only a second newcomer starts that one."""
    log = tmp_path / "hooks.log"
    first = tmp_path / "first-done"
    body = BATCH_LOG.format(log=log) + (
        f"[ -e {first} ] && exit 0\ntouch {first}\n"
        'set -- $(cut -f1 "$EUCAREG_BATCH")\n'
        'echo "ok $1" >> "$EUCAREG_RESULTS"; echo "failed $2 flaky" >> "$EUCAREG_RESULTS"'
    )
    write_hook(tmp_path / "hooks", "node-batch", body)
    reg = await node_registrar(tmp_path, max_size=2, wait=60)
    good, flaky, late, later = nodes(4)
    await admit(reg, good)
    await admit(reg, flaky)
    await eventually(lambda: status(reg, flaky) is Status.FAILED, "the flaky one failing")
    await admit(reg, late)
    await eventually(lambda: status(reg, flaky) is Status.REGISTERED, "the retry alone")
    assert gathering(reg) == 1 and status(reg, late) is Status.REGISTERING
    await admit(reg, later)
    await settle(reg)
    assert [line.split(":")[0] for line in lines(log, "run")] == [
        "run 2 nc c1",
        "run 1 nc c1",
        "run 2 nc c1",
    ]
    assert lines(log, "run")[1].endswith(str(flaky.address))
    assert {stored(reg, n) for n in (good, flaky, late, later)} == {Status.REGISTERED}
    await reg.close()


async def test_one_hook_slot_is_shared_by_batches_and_single_runs(tmp_path: Path) -> None:
    """max_hooks_running = 1 on a CLC that batches cluster hooks only: the batch of CCs and
    the Walrus's single run never overlap, and none is lost."""
    log = tmp_path / "hooks.log"
    hooks = tmp_path / "hooks"
    write_hook(
        hooks,
        "cluster-batch",
        f'echo "start batch $#" >> {log}; sleep 0.2\necho "end batch" >> {log}',
    )
    write_hook(
        hooks, "walrus", f'echo "start walrus" >> {log}; sleep 0.2\necho "end walrus" >> {log}'
    )
    store = Store(sqlite_url(tmp_path / "registry.db"))
    reg = Registrar(
        store,
        CLC_SETTINGS,
        hook_dir=hooks,
        timing=FAST,
        issuer_for=lambda _role: None,
        master_key=b"test-master-key",
        hooks_at_once=1,
        batching=Batching(frozenset({Role.CC}), wait=0.05),
    )
    await reg.start()
    await reg.open_install_window(3600)
    parts = [ann(Role.WALRUS), ann(Role.CC, "c1"), ann(Role.CC, "c1"), ann(Role.CC, "c2")]
    for part in parts:
        reg.on_sighting(sighting(part))
    await settle(reg)
    events = lines(log, "")
    depth = most = 0
    for line in events:
        depth += 1 if line.startswith("start") else -1
        most = max(most, depth)
    assert most == 1, events
    # c1's second CC is refused (one CC per cluster); c2's CC ran in a batch of its own.
    assert sorted(e for e in events if e.startswith("start")) == [
        "start batch 1",
        "start batch 1",
        "start walrus",
    ]
    await reg.close()
