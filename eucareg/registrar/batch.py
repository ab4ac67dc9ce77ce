"""Batched hooks: first runs of one role and cluster, gathered for a moment, are handed to one
run of the `<hook>-batch` script, as `euca_conf --register-nodes "h1 h2 …"` takes many at once.
The script's results file decides for each component; retries run alone (docs/hooks.md)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from eucareg.core.model import HookOutcome, HookRun, Record, Role
from eucareg.registrar.hooks import (
    Ended,
    HookRunner,
    base_environment,
    outcome_of,
    unrunnable,
)

log = logging.getLogger(__name__)

# Each run of a batch keeps this much of the batch's output: a thousand rows of 64 KiB would
# be 64 MB of history for one burst, and the script's results file names who failed and why.
BATCH_OUTPUT_LIMIT = 4 * 1024
RESULTS_LIMIT = 4 * 1024 * 1024  # a results file is read up to here; the rest is ignored
REASON_LIMIT = 1024


@dataclass(frozen=True)
class Batching:
    """Which roles' hooks may be batched (registrar.batch_hooks), how many at most in one
    run (batch_max), and how long the first waits for others to join (batch_wait)."""

    roles: frozenset[Role] = frozenset()
    max_size: int = 100
    wait: float = 0.5


@dataclass(frozen=True)
class Member:
    """One component's place in a batch, with what its single run would have been told."""

    record: Record
    eucavers: str = ""
    rerun: bool = False
    attempt: int = 1


def batch_script_for(hook_dir: Path, role: Role) -> Path:
    return hook_dir / f"{role.hook_name}-batch"


def batch_line(member: Member) -> str:
    """ADDRESS CLUSTER ID FINGERPRINT EUCAVERS ATTEMPT RERUN, tab-separated, '-' for empty.
    Every value passed the announcement grammar: none holds a tab or a line break."""
    record = member.record
    fields = (
        record.address,
        record.cluster or "-",
        record.component_id,
        record.fingerprint,
        member.eucavers or "-",
        str(member.attempt),
        "1" if member.rerun else "0",
    )
    return "\t".join(fields) + "\n"


def batch_environment(members: Sequence[Member], batch_file: Path, results: Path) -> dict[str, str]:
    first = members[0].record
    return {
        "EUCAREG_EVENT": "register",
        "EUCAREG_ROLE": first.role.value,
        "EUCAREG_TYPE": first.role.txt_type,
        "EUCAREG_CLUSTER": first.cluster or "",
        "EUCAREG_BATCH": str(batch_file),
        "EUCAREG_BATCH_SIZE": str(len(members)),
        "EUCAREG_RESULTS": str(results),
    }


def parse_results(text: str) -> dict[str, tuple[bool, str]]:
    """`ok KEY` or `failed KEY [reason]` per line, KEY an address or a component id; a later
    line about the same key wins. Lines of any other form are ignored, and so is a last line
    without its line break (the script was killed while writing it).

    The dict's order is that of each key's last line, so that a member named both by its
    address and by its id takes the later of the two (member_outcome)."""
    verdicts: dict[str, tuple[bool, str]] = {}
    for line in text.split("\n")[:-1]:
        parts = line.strip().split(None, 2)
        if len(parts) < 2 or parts[0] not in ("ok", "failed"):
            continue
        reason = _one_line(parts[2][:REASON_LIMIT]) if len(parts) == 3 else ""
        verdicts.pop(parts[1], None)
        verdicts[parts[1]] = (parts[0] == "ok", reason)
    return verdicts


def _one_line(text: str) -> str:
    """A reason becomes the last line of a run's stderr and so the record's reason: no line
    breaks of any kind (str.splitlines() also splits at \\r, \\f, U+2028…) and no control
    characters (a terminal escape in `eucareg status`)."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def verdict_for(
    record: Record,
    verdicts: Mapping[str, tuple[bool, str]],
    order: Mapping[str, int] | None = None,
) -> tuple[bool, str] | None:
    """The member's verdict: the later of the lines naming its id and its address."""
    by_id = verdicts.get(record.component_id)
    by_address = verdicts.get(record.address)
    if by_id is None or by_address is None:
        return by_id if by_address is None else by_address
    if order is None:
        order = {key: n for n, key in enumerate(verdicts)}
    return by_id if order[record.component_id] > order[record.address] else by_address


def member_outcome(
    run: HookRun,
    member: Member,
    verdicts: Mapping[str, tuple[bool, str]],
    ended: Ended,
    timeout: float,
    order: Mapping[str, int] | None = None,
) -> HookRun:
    """One component's outcome: its own line in the results file if there is one, else the
    exit status of the whole batch."""
    base = outcome_of(run, ended, timeout, BATCH_OUTPUT_LIMIT)
    verdict = verdict_for(member.record, verdicts, order)
    if verdict is None or ended.broke is not None:
        return base
    ok, reason = verdict
    said = f"the batch's results file says: {'ok' if ok else 'failed'}" + (
        f" ({reason})" if reason else ""
    )
    return replace(
        base,
        outcome=HookOutcome.OK if ok else HookOutcome.FAILED,
        # Last, so that the record's reason (the last line of stderr) names it.
        stderr=(base.stderr.rstrip("\n") + "\n" + said)[-BATCH_OUTPUT_LIMIT:],
    )


async def run_batch(runner: HookRunner, members: Sequence[Member]) -> list[HookRun]:
    """One run of the role's batch script for `members` (one role and cluster); a run per
    member, each with its own outcome."""
    script = batch_script_for(runner.hook_dir, members[0].record.role)
    if not script.exists():
        # Removed since the members joined: without it the single script runs (docs/hooks.md),
        # and a missing batch script must not register them all as "skipped".
        return await _single_runs(runner, members)
    batch_id = "b-" + uuid.uuid4().hex[:16]
    now = time.time()
    runs = tuple(
        HookRun(
            run_id=uuid.uuid4().hex,
            component_id=m.record.component_id,
            hook=str(script),
            started_at=now,
            outcome=HookOutcome.RUNNING,
            attempt=m.attempt,
            rerun=m.rerun,
            batch=batch_id,
        )
        for m in members
    )
    refused = unrunnable(script)
    if refused is not None:
        return [replace(r, outcome=refused[0], stderr=refused[1]) for r in runs]
    tmp = Path(tempfile.mkdtemp(prefix="eucareg-batch-"))
    try:
        batch_file, results = tmp / "batch", tmp / "results"
        batch_file.write_text("".join(batch_line(m) for m in members))
        results.touch()  # the script runs as the agent's user, in a directory of ours
        env = base_environment() | batch_environment(members, batch_file, results)
        args = [m.record.address for m in members]
        async with runner.slots:
            started, ended = await runner.execute(script, args, env, runs)
        # The runs are journaled now: nothing below may raise, or their outcomes would be
        # lost and their rows left "running". Read off the loop: up to 4 MiB to parse.
        verdicts, order = await asyncio.to_thread(_results_of, results)
    except BaseException:
        _remove_later(tmp)
        raise
    # The script may have left anything in it (a tree deeper than the recursion limit, a
    # link in its place, thousands of files): removed off the loop, and never an error.
    await asyncio.to_thread(_remove_tree, tmp)
    return [
        member_outcome(run, member, verdicts, ended, runner.timeout, order)
        for run, member in zip(started, members, strict=True)
    ]


async def _single_runs(runner: HookRunner, members: Sequence[Member]) -> list[HookRun]:
    async def one(member: Member) -> HookRun:
        record = member.record
        try:
            return await runner.run(
                record, eucavers=member.eucavers, rerun=member.rerun, attempt=member.attempt
            )
        except Exception as exc:  # one member's fault must not lose the others' outcomes
            log.exception("hook for %s could not run", record.component_id)
            return HookRun(
                run_id=uuid.uuid4().hex,
                component_id=record.component_id,
                hook=str(runner.hook_dir / record.role.hook_name),
                started_at=time.time(),
                outcome=HookOutcome.FAILED,
                stderr=f"cannot run the hook: {exc!r}",
                attempt=member.attempt,
                rerun=member.rerun,
            )

    return list(await asyncio.gather(*(one(m) for m in members)))


def _results_of(path: Path) -> tuple[dict[str, tuple[bool, str]], dict[str, int]]:
    verdicts = parse_results(_read_head(path))
    return verdicts, {key: n for n, key in enumerate(verdicts)}


def _read_head(path: Path) -> str:
    """The head of the results file: a regular file only. The script may have put a link in
    its place (to a file of its choice), or a FIFO or a device that would block a read."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return ""
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped since the lstat
            return ""
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read(RESULTS_LIMIT).decode("utf-8", errors="replace")
    except OSError:
        return ""
    finally:
        os.close(fd)


def _remove_tree(path: Path) -> None:
    """Remove the batch's directory, whatever the script left in it; never raises."""
    # ignore_errors covers OSError only: a tree deeper than the recursion limit raises
    # RecursionError; rm below takes what is left.
    with contextlib.suppress(Exception):
        shutil.rmtree(path, ignore_errors=True)
    if not os.path.lexists(path):
        return
    try:
        # rm removes a link put in the directory's place, not what it points to.
        subprocess.run(
            ["rm", "-rf", "--", str(path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
    except Exception:
        log.warning("could not remove the batch directory %s", path, exc_info=True)


def _remove_later(path: Path) -> None:
    """The batch was stopped: remove its directory in the background, not holding up the stop."""
    threading.Thread(
        target=_remove_tree, args=(path,), name="eucareg-batch-rm", daemon=True
    ).start()


@dataclass
class _Open:
    members: list[tuple[Member, asyncio.Future[HookRun | None]]] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


class Batcher:
    """Gathers first runs by (role, cluster) and starts a batch when `batching.wait` has
    passed since its first member, or when it is full."""

    def __init__(
        self,
        runner: HookRunner,
        batching: Batching,
        spawn: Callable[[Coroutine[Any, Any, None]], object],
        still_owed: Callable[[Record], bool] = lambda _record: True,
    ) -> None:
        self.runner = runner
        self.batching = batching
        self._spawn = spawn
        # Whether a member's record still waits for this run (checked when its batch starts:
        # it may have been deregistered or replaced while the batch gathered, up to 60 s).
        self._still_owed = still_owed
        self._open: dict[tuple[Role, str | None], _Open] = {}

    def takes(self, record: Record) -> bool:
        """Whether `record`'s hook runs through the batch script: its role is batched and the
        script exists (without it the role's single script runs, as before)."""
        return (
            record.role in self.batching.roles
            and batch_script_for(self.runner.hook_dir, record.role).exists()
        )

    async def run(self, member: Member) -> HookRun | None:
        """The member's run. A first attempt (or its re-run after a crash) joins a batch; a
        retry after a failure runs alone, as a batch of one, so that one bad component cannot
        fail a batch again and again. None: dropped before its batch started (its record no
        longer waits for it), so nothing ran."""
        if member.attempt > 1:
            [run] = await run_batch(self.runner, [member])
            return run
        loop = asyncio.get_running_loop()
        key = (member.record.role, member.record.cluster)
        batch = self._open.get(key)
        if batch is None:
            batch = self._open[key] = _Open()
            batch.timer = loop.call_later(self.batching.wait, self._start, key, batch)
        done: asyncio.Future[HookRun | None] = loop.create_future()
        batch.members.append((member, done))
        if len(batch.members) >= self.batching.max_size:
            self._start(key, batch)
        return await done

    def close(self) -> None:
        """Stop gathering: the batches not started yet never start (their members' records
        stay `registering`, unjournaled, and a restart runs them as first runs)."""
        for batch in self._open.values():
            if batch.timer is not None:
                batch.timer.cancel()
            for _, done in batch.members:
                done.cancel()
        self._open.clear()

    def _start(self, key: tuple[Role, str | None], batch: _Open) -> None:
        if self._open.get(key) is batch:
            del self._open[key]
        if batch.timer is not None:
            batch.timer.cancel()
        self._spawn(self._run(batch))

    async def _run(self, batch: _Open) -> None:
        waiting = []
        for member, done in batch.members:
            if done.done():
                continue
            if self._still_owed(member.record):
                waiting.append((member, done))
            else:
                done.set_result(None)
        if not waiting:
            return
        try:
            runs = await run_batch(self.runner, [m for m, _ in waiting])
        except BaseException as exc:
            for _, done in waiting:
                if done.done():
                    continue
                if isinstance(exc, Exception):
                    done.set_exception(exc)
                else:
                    done.cancel()
            raise
        for (_, done), run in zip(waiting, runs, strict=True):
            if not done.done():
                done.set_result(run)
