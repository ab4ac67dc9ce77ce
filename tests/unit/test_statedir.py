"""The state directory is private to the agent, or the agent refuses to start."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from eucareg.agent.statedir import StateDirError, secure_state_dir


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_a_new_state_dir_is_made_0700_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        state = tmp_path / "a" / "state"
        assert secure_state_dir(state) == []
    finally:
        os.umask(old)
    assert mode(state) == 0o700


def test_an_older_installs_readable_files_are_tightened_and_reported(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "keys").mkdir(parents=True)
    os.chmod(state, 0o755)
    os.chmod(state / "keys", 0o755)
    db = state / "registry.db"
    db.write_text("x")
    os.chmod(db, 0o644)
    key = state / "keys" / "node-pk.pem"
    key.write_text("k")
    os.chmod(key, 0o640)
    tightened = secure_state_dir(state)
    assert len(tightened) == 4 and any("registry.db: 0644 -> 0600" in t for t in tightened)
    assert (mode(state), mode(state / "keys"), mode(db), mode(key)) == (0o700, 0o700, 0o600, 0o600)


@pytest.mark.parametrize("where", ["dir", "file"])
def test_a_state_dir_others_can_write_is_refused(tmp_path: Path, where: str) -> None:
    state = tmp_path / "state"
    state.mkdir()
    victim = state if where == "dir" else state / "registry.db"
    victim.touch()
    os.chmod(victim, 0o777 if where == "dir" else 0o666)
    with pytest.raises(StateDirError, match="writable by others"):
        secure_state_dir(state)
    assert mode(victim) in (0o777, 0o666)  # refused, not silently changed


def test_a_state_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    # Whoever we run as, the directory is "another user's" when we claim a different uid.
    with pytest.raises(StateDirError, match="belongs to uid"):
        secure_state_dir(state, uid=os.geteuid() + 1)


def test_a_symlink_as_state_dir_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "state"
    link.symlink_to(real)
    with pytest.raises(StateDirError, match="not a directory"):
        secure_state_dir(link)


def test_an_uncreatable_state_dir_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StateDirError, match="cannot create it"):
        secure_state_dir(blocker / "state")
