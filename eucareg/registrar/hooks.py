"""Registration hooks: the per-type scripts (walrus, cluster, storage, node) a registrar runs.

This keeps the 10.04 split: CLC and CC share one registrar, and what "register" means on a site
lives in replaceable scripts. A missing script is skipped; a failing or hanging one is recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import IO

from eucareg.core.model import Announcement
from eucareg.store.registry import HookRun

# Keep what a chatty script prints bounded; the tail is what explains a failure.
OUTPUT_LIMIT = 64 * 1024


def hook_environment(ann: Announcement) -> dict[str, str]:
    """The documented environment of a hook (see docs/hooks.md)."""
    return {
        "EUCAREG_EVENT": "register",
        "EUCAREG_ROLE": ann.role.value,
        "EUCAREG_TYPE": ann.role.txt_type,
        "EUCAREG_CLUSTER": ann.cluster or "",
        "EUCAREG_ADDRESS": str(ann.address),
        "EUCAREG_ID": ann.component_id,
        "EUCAREG_FINGERPRINT": ann.fingerprint,
        "EUCAREG_EUCAVERS": ann.eucavers,
    }


def hook_arguments(ann: Announcement) -> list[str]:
    """Positional arguments: ADDRESS CLUSTER ID FINGERPRINT (cluster is '-' when none)."""
    return [str(ann.address), ann.cluster or "-", ann.component_id, ann.fingerprint]


def _tail(data: bytes) -> str:
    return data[-OUTPUT_LIMIT:].decode("utf-8", errors="replace")


async def run_hook(hook_dir: Path, ann: Announcement, timeout: float) -> HookRun:
    """Run the hook for `ann`'s type and return what happened; never raises for script faults."""
    script = hook_dir / ann.role.hook_name
    started = time.time()

    def result(outcome: str, code: int | None, out: bytes = b"", err: bytes | str = b"") -> HookRun:
        return HookRun(
            component_id=ann.component_id,
            hook=str(script),
            started_at=started,
            duration=time.time() - started,
            outcome=outcome,
            exit_code=code,
            stdout=_tail(out),
            stderr=err if isinstance(err, str) else _tail(err),
        )

    if not script.exists():
        return result("skipped", None, err=f"no script {script}; nothing to run")
    if not os.access(script, os.X_OK):
        return result("failed", None, err=f"{script} is not executable")
    env = {**os.environ, **hook_environment(ann)}
    # Output goes to unlinked temporary files, not pipes: a child the script leaves running
    # can then hold nothing of ours open, and we keep only the tail of what was written.
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            proc = await asyncio.create_subprocess_exec(
                str(script),
                *hook_arguments(ann),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                cwd=str(hook_dir),
                start_new_session=True,
            )
        except OSError as exc:
            return result("failed", None, err=f"cannot run {script}: {exc}")
        try:
            code: int | None = await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            code = None
            # The script started its own session, so its whole process group goes with it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            await proc.wait()
        stdout, stderr = _tail_of(out), _tail_of(err)
    if code is None:
        return result("timeout", None, stdout, stderr + f"\nkilled after {timeout:g}s".encode())
    return result("ok" if code == 0 else "failed", code, stdout, stderr)


def _tail_of(handle: IO[bytes]) -> bytes:
    size = handle.seek(0, os.SEEK_END)
    handle.seek(max(0, size - OUTPUT_LIMIT))
    return handle.read()
