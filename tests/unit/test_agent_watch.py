"""The file watch (eucareg/agent/watch.py) on real files in tmp_path: a file created, replaced by
rename, written, deleted; its directory made later, removed, made again, swapped; lost events;
and inotify unavailable. Every negative check waits for a positive event first.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from eucareg.agent import watch as watch_module
from eucareg.agent.watch import IN_Q_OVERFLOW, Event, FileWatch
from eucareg.pki import credentials as cred
from tests.unit.test_agent_fakes import eventually

NAMES = frozenset({"node-cert.pem", "cloud-cert.pem"})


class Recorder:
    """A FileWatch whose batches and change calls are counted."""

    def __init__(self, paths: list[Path]) -> None:
        self.changes = 0
        self.batches: list[list[Event]] = []
        self.watch = FileWatch(paths, self._changed)
        real = self.watch.dispatch

        def dispatch(events: Iterable[Event]) -> None:
            self.batches.append(list(events))
            real(events)

        self.watch.dispatch = dispatch  # type: ignore[method-assign]

    def _changed(self) -> None:
        self.changes += 1

    def saw(self, name: str) -> bool:
        return any(n == name for batch in self.batches for _, _, n in batch)

    async def change(self, before: int) -> None:
        await eventually(lambda: self.changes > before)


@pytest.fixture
def recorder(tmp_path: Path) -> Iterator[Recorder]:
    keys = tmp_path / "state" / "keys"
    keys.mkdir(parents=True)
    rec = Recorder([keys / name for name in NAMES])
    yield rec
    rec.watch.close()


async def test_a_file_created_replaced_written_and_deleted_is_each_a_change(
    recorder: Recorder, tmp_path: Path
) -> None:
    keys = tmp_path / "state" / "keys"
    recorder.watch.start()
    assert not recorder.watch.polling
    assert recorder.watch.watched == {keys: NAMES, keys.parent: {"keys"}}

    cert = keys / "node-cert.pem"
    cert.write_bytes(b"one")  # created
    await recorder.change(0)
    seen = recorder.changes
    cred.write_atomic(cert, b"two")  # a temporary file renamed over it
    await recorder.change(seen)
    seen = recorder.changes
    with cert.open("ab") as handle:  # written in place
        handle.write(b"three")
    await recorder.change(seen)
    seen = recorder.changes
    cert.unlink()
    await recorder.change(seen)


async def test_other_names_in_the_directory_are_no_change(
    recorder: Recorder, tmp_path: Path
) -> None:
    keys = tmp_path / "state" / "keys"
    recorder.watch.start()
    (keys / "unrelated.pem").write_bytes(b"x")
    (keys.parent / "registry.db").write_bytes(b"x")
    await eventually(lambda: recorder.saw("unrelated.pem") and recorder.saw("registry.db"))
    assert recorder.changes == 0


async def test_a_busy_neighbour_of_the_directory_sends_nothing(
    recorder: Recorder, tmp_path: Path
) -> None:
    """A registrar host's state_dir holds key_dir and the registry's SQLite files: writes to
    those must not wake the agent (the directory above key_dir is watched for names only)."""
    database = tmp_path / "state" / "registry.db-wal"
    database.write_bytes(b"x")
    recorder.watch.start()
    with database.open("ab") as handle:
        handle.write(b"y")
    (tmp_path / "state" / "sentinel").write_bytes(b"")
    await eventually(lambda: recorder.saw("sentinel"))
    assert not recorder.saw("registry.db-wal")
    assert recorder.changes == 0


async def test_a_directory_made_later_is_watched_once_it_exists(tmp_path: Path) -> None:
    keys = tmp_path / "var" / "lib" / "keys"  # none of it there yet
    rec = Recorder([keys / "node-cert.pem"])
    rec.watch.start()
    try:
        assert rec.watch.watched == {tmp_path: {"var"}}
        keys.mkdir(parents=True)
        await eventually(lambda: keys in rec.watch.watched)
        seen = rec.changes
        (keys / "node-cert.pem").write_bytes(b"x")
        await rec.change(seen)
        assert rec.watch.watched == {keys: {"node-cert.pem"}, keys.parent: {"keys"}}
    finally:
        rec.watch.close()


async def test_a_directory_removed_and_made_again_is_followed(
    recorder: Recorder, tmp_path: Path
) -> None:
    keys = tmp_path / "state" / "keys"
    (keys / "node-cert.pem").write_bytes(b"x")
    recorder.watch.start()
    shutil.rmtree(keys)
    await eventually(lambda: keys not in recorder.watch.watched)
    assert recorder.changes >= 1
    assert recorder.watch.watched == {keys.parent: {"keys"}}

    seen = recorder.changes
    keys.mkdir()
    await eventually(lambda: keys in recorder.watch.watched)
    await recorder.change(seen)  # the directory made again may already hold the files
    seen = recorder.changes
    cred.write_atomic(keys / "cloud-cert.pem", b"x")
    await recorder.change(seen)


async def test_a_directory_swapped_by_rename_or_symlink_is_followed(
    recorder: Recorder, tmp_path: Path
) -> None:
    keys = tmp_path / "state" / "keys"
    recorder.watch.start()
    fresh = tmp_path / "state" / "keys.new"
    fresh.mkdir()
    (fresh / "node-cert.pem").write_bytes(b"x")
    keys.rename(tmp_path / "state" / "keys.old")
    fresh.rename(keys)
    await eventually(lambda: recorder.saw("keys"))  # the swap's last event, acted upon
    assert recorder.watch.watched.get(keys) == NAMES
    seen = recorder.changes
    (keys / "node-cert.pem").unlink()  # the watch is on the new directory, not the old one
    await recorder.change(seen)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = tmp_path / "state" / "keys.link"
    link.symlink_to(elsewhere)
    seen = recorder.changes
    shutil.rmtree(keys)
    os.replace(link, keys)  # keys is now a symlink to another directory
    await eventually(lambda: recorder.changes > seen and keys in recorder.watch.watched)
    seen = recorder.changes
    (elsewhere / "cloud-cert.pem").write_bytes(b"x")
    await recorder.change(seen)


async def test_lost_events_count_as_a_change_and_re_arm(recorder: Recorder) -> None:
    recorder.watch.start()
    arms = recorder.watch.arms
    recorder.watch.dispatch([(-1, IN_Q_OVERFLOW, "")])  # what the kernel sends when its queue fills
    assert recorder.changes == 1
    assert recorder.watch.arms == arms + 1
    assert not recorder.watch.polling


async def test_without_inotify_the_owner_is_told_to_poll_and_it_is_logged_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def unavailable() -> None:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(watch_module, "Inotify", unavailable)
    monkeypatch.setattr(watch_module, "_fallback_logged", False)
    caplog.set_level(logging.DEBUG, logger="eucareg.agent.watch")
    first, second = Recorder([tmp_path / "a"]), Recorder([tmp_path / "b"])
    with first.watch, second.watch:
        assert first.watch.polling and second.watch.polling
        assert first.changes == second.changes == 1  # woken, to start polling
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "re-checking every recheck_interval" in warnings[0].getMessage()


async def test_nothing_to_watch_is_neither_watched_nor_polled() -> None:
    with FileWatch([], lambda: None) as files:
        assert not files.polling and files.watched == {}
