"""Batched hooks: first runs of one role and cluster, gathered for a moment, are handed to one
run of the `<hook>-batch` script, as `euca_conf --register-nodes "h1 h2 …"` takes many at once.
The script's results file decides for each component; retries run alone (docs/hooks.md)."""

from __future__ import annotations

import asyncio
import tempfile
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
    without its line break (the script was killed while writing it)."""
    verdicts: dict[str, tuple[bool, str]] = {}
    for line in text.split("\n")[:-1]:
        parts = line.strip().split(None, 2)
        if len(parts) < 2 or parts[0] not in ("ok", "failed"):
            continue
        reason = parts[2][:REASON_LIMIT] if len(parts) == 3 else ""
        verdicts[parts[1]] = (parts[0] == "ok", reason)
    return verdicts


def member_outcome(
    run: HookRun,
    member: Member,
    verdicts: Mapping[str, tuple[bool, str]],
    ended: Ended,
    timeout: float,
) -> HookRun:
    """One component's outcome: its own line in the results file if there is one, else the
    exit status of the whole batch."""
    base = outcome_of(run, ended, timeout, BATCH_OUTPUT_LIMIT)
    record = member.record
    verdict = verdicts.get(record.component_id) or verdicts.get(record.address)
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
    with tempfile.TemporaryDirectory(prefix="eucareg-batch-") as tmp:
        batch_file, results = Path(tmp) / "batch", Path(tmp) / "results"
        batch_file.write_text("".join(batch_line(m) for m in members))
        results.touch()  # the script runs as the agent's user, in a directory of ours
        env = base_environment() | batch_environment(members, batch_file, results)
        args = [m.record.address for m in members]
        async with runner.slots:
            started, ended = await runner.execute(script, args, env, runs)
        verdicts = parse_results(_read_head(results))
    return [
        member_outcome(run, member, verdicts, ended, runner.timeout)
        for run, member in zip(started, members, strict=True)
    ]


def _read_head(path: Path) -> str:
    try:
        with path.open("rb") as handle:
            return handle.read(RESULTS_LIMIT).decode("utf-8", errors="replace")
    except OSError:
        return ""


@dataclass
class _Open:
    members: list[tuple[Member, asyncio.Future[HookRun]]] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


class Batcher:
    """Gathers first runs by (role, cluster) and starts a batch when `batching.wait` has
    passed since its first member, or when it is full."""

    def __init__(
        self,
        runner: HookRunner,
        batching: Batching,
        spawn: Callable[[Coroutine[Any, Any, None]], object],
    ) -> None:
        self.runner = runner
        self.batching = batching
        self._spawn = spawn
        self._open: dict[tuple[Role, str | None], _Open] = {}

    def takes(self, record: Record) -> bool:
        """Whether `record`'s hook runs through the batch script: its role is batched and the
        script exists (without it the role's single script runs, as before)."""
        return (
            record.role in self.batching.roles
            and batch_script_for(self.runner.hook_dir, record.role).exists()
        )

    async def run(self, member: Member) -> HookRun:
        """The member's run. A first attempt (or its re-run after a crash) joins a batch; a
        retry after a failure runs alone, as a batch of one, so that one bad component cannot
        fail a batch again and again."""
        if member.attempt > 1:
            [run] = await run_batch(self.runner, [member])
            return run
        loop = asyncio.get_running_loop()
        key = (member.record.role, member.record.cluster)
        batch = self._open.get(key)
        if batch is None:
            batch = self._open[key] = _Open()
            batch.timer = loop.call_later(self.batching.wait, self._start, key, batch)
        done: asyncio.Future[HookRun] = loop.create_future()
        batch.members.append((member, done))
        if len(batch.members) >= self.batching.max_size:
            self._start(key, batch)
        return await done

    def _start(self, key: tuple[Role, str | None], batch: _Open) -> None:
        if self._open.get(key) is batch:
            del self._open[key]
        if batch.timer is not None:
            batch.timer.cancel()
        self._spawn(self._run(batch))

    async def _run(self, batch: _Open) -> None:
        waiting = [(m, f) for m, f in batch.members if not f.done()]
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
