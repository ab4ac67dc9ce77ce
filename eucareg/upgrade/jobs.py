"""Stopping the 10.04 registration machinery: the `uec-component-listener` job (which ran
euca_conf --register-* for every announcement it heard) and the `eucalyptus-*-publication`
jobs (which announced each component the old way). Left running, they register components a
second time. Upstart jobs are stopped with `initctl stop` and disabled with a `.override`
holding `manual`; on a systemd host, `systemctl disable --now`. Each step says what it did.
"""

from __future__ import annotations

import fnmatch
import os
import stat
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

PATTERNS = ("uec-component-listener", "eucalyptus-*-publication")
UPSTART_DIR = "etc/init"
SYSTEMD_DIRS = ("etc/systemd/system", "lib/systemd/system", "usr/lib/systemd/system")
COMMAND_TIMEOUT = 60.0
# Runs a command; returns (exit status, combined output). OSError when it cannot be started.
Runner = Callable[[Sequence[str]], tuple[int, str]]


@dataclass(frozen=True)
class JobResult:
    name: str
    system: str  # "upstart" or "systemd"
    stopped: str  # what stopping did, in words
    disabled: str  # what disabling did, in words
    ok: bool
    undo: str  # how to undo it

    def json(self) -> dict[str, str | bool]:
        return {
            "name": self.name,
            "system": self.system,
            "stopped": self.stopped,
            "disabled": self.disabled,
            "ok": self.ok,
            "undo": self.undo,
        }


def run_command(argv: Sequence[str]) -> tuple[int, str]:
    done = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
    )
    return done.returncode, (done.stdout + done.stderr).strip()


def _legacy(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in PATTERNS)


def systemd_running(root: Path) -> bool:
    """systemd's own test (sd_booted): /run/systemd/system exists."""
    return (root / "run/systemd/system").is_dir()


def find_jobs(root: Path) -> tuple[str, list[str]]:
    """The init system and the legacy jobs it has, sorted."""
    if systemd_running(root):
        names = {
            path.name.removesuffix(".service")
            for d in SYSTEMD_DIRS
            if (root / d).is_dir()
            for path in (root / d).glob("*.service")
        }
        return "systemd", sorted(n for n in names if _legacy(n))
    upstart = root / UPSTART_DIR
    if not upstart.is_dir():
        return "upstart", []
    return "upstart", sorted(p.stem for p in upstart.glob("*.conf") if _legacy(p.stem))


def stop_legacy_jobs(root: Path, runner: Runner = run_command) -> list[JobResult]:
    """Stop and disable every legacy job found under `root`; never raises for one job's
    failure (the result says it, `ok` false)."""
    system, names = find_jobs(root)
    if system == "systemd":
        return [_systemd(name, runner) for name in names]
    outside = _leads_outside(root, root / UPSTART_DIR)
    if outside:
        # A copy of the old front end whose etc/init leads elsewhere (this host's own
        # /etc/init, say): nothing is stopped or written there on its word.
        return [JobResult(name, "upstart", outside, outside, False, "") for name in names]
    return [_upstart(root, name, runner) for name in names]


def _leads_outside(root: Path, directory: Path) -> str:
    """Why `directory` is not followed ("" when it is inside `root` once resolved)."""
    try:
        target, base = directory.resolve(strict=True), root.resolve(strict=True)
    except OSError as exc:
        return f"not stopped: {directory} cannot be resolved ({exc.strerror or exc})"
    if target != base and base not in target.parents:
        return (
            f"not stopped: {directory} leads outside {root} (to {target}); not followed, "
            "stop and disable the job by hand where it runs"
        )
    return ""


def _run(runner: Runner, argv: Sequence[str]) -> tuple[int, str]:
    try:
        return runner(argv)
    except (OSError, subprocess.SubprocessError) as exc:
        return -1, f"cannot run {argv[0]}: {exc}"


def _upstart(root: Path, name: str, runner: Runner) -> JobResult:
    code, output = _run(runner, ["initctl", "stop", name])
    if code == 0:
        stopped, stop_ok = "stopped", True
    elif "Unknown instance" in output or "not running" in output.lower():
        stopped, stop_ok = "was not running", True
    else:
        stopped, stop_ok = f"initctl stop failed ({code}): {output[-300:] or 'no output'}", False
    override = root / UPSTART_DIR / f"{name}.override"
    try:
        disabled, undo = _write_override(override, name)
        disable_ok = True
    except OSError as exc:
        disabled, undo, disable_ok = f"cannot write {override}: {exc.strerror or exc}", "", False
    return JobResult(name, "upstart", stopped, disabled, stop_ok and disable_ok, undo)


def _write_override(override: Path, name: str) -> tuple[str, str]:
    """Append `manual` to NAME.override (made if absent); (what was done, how to undo it).
    Never through a symbolic link or into anything but a plain file: run as root, that would
    append to whatever file the link names (O_NOFOLLOW closes the race with the check)."""
    try:
        fd = os.open(override, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if override.is_symlink():
            raise OSError(f"is a symbolic link (to {os.readlink(override)}); not followed") from exc
        raise
    with os.fdopen(fd, "r+") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError("not a plain file; not written")
        text = f.read(64 * 1024)
        if "manual" in (line.strip() for line in text.splitlines()):
            return (
                f"already disabled ({override} says manual)",
                f"remove the line 'manual' from {override}",
            )
        f.write(("" if not text or text.endswith("\n") else "\n") + "manual\n")
    undo = f"rm {override}" if not text else f"remove the line 'manual' from {override}"
    return f"disabled: wrote 'manual' to {override}", f"{undo}; start {name}"


def _systemd(name: str, runner: Runner) -> JobResult:
    unit = f"{name}.service"
    code, output = _run(runner, ["systemctl", "disable", "--now", unit])
    if code == 0:
        return JobResult(
            name, "systemd", "stopped", "disabled", True, f"systemctl enable --now {unit}"
        )
    failed = f"systemctl disable --now failed ({code}): {output[-300:] or 'no output'}"
    return JobResult(name, "systemd", failed, failed, False, "")
