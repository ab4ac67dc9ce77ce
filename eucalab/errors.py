"""The lab's errors: a description that does not parse, a lab that cannot be built, used or
torn down, and a checked command that failed (with its stderr in the message)."""

from __future__ import annotations

import subprocess

__all__ = ["LabCommandError", "LabError"]


class LabError(Exception):
    """A lab description is invalid, or building/using the lab failed."""


class LabCommandError(LabError, subprocess.CalledProcessError):
    """A ``check=True`` command exited non-zero; a CalledProcessError with stderr in str()."""

    def __str__(self) -> str:
        stderr = self.stderr if isinstance(self.stderr, str) else ""
        tail = stderr.strip()[-2000:]
        msg = f"command {list(self.cmd)!r} exited with status {self.returncode}"
        return f"{msg}: {tail}" if tail else msg
