"""An attack review of `eucareg backup` / `restore` (issue 10): forged, tampered and truncated
archives, files planted in state_dir before a restore (symbolic links, hard links), a wrong
passphrase again and again, and secrets that must not leak into what the commands print.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from eucareg.backup import container, contents, restore
from eucareg.config.file import load
from tests.unit.test_backup import PASSPHRASE, make_host, run, tree


@pytest.fixture
def passfile(tmp_path: Path) -> Path:
    path = tmp_path / "pass"
    path.write_text(PASSPHRASE + "\n")
    return path


def forged(tmp_path: Path, cfg: Path, extra: list[contents.Member], name: str) -> Path:
    """An unencrypted archive of this host plus `extra`, checksums recomputed (as whoever can
    write an unencrypted backup can do)."""
    config = load(cfg)
    members = [*contents.collect(config, tmp_path), *extra]
    archive = tmp_path / name
    manifest = contents.manifest(config, members, encrypted=False)
    container.write_private(archive, container.seal(contents.pack(manifest, members), None))
    return archive


def test_a_symlinked_directory_planted_in_state_dir_is_not_written_through(
    tmp_path: Path,
) -> None:
    """state_dir/identity replaced by a link to another directory: restore must not put the
    identity files (or anything the archive names under identity/) there as root."""
    cfg = make_host(tmp_path)
    state = tmp_path / "state"
    out = tmp_path / "b"
    assert run("backup", str(out), "--config", str(cfg)).exit_code == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "passwd").write_text("root:x:0:0\n")
    for path in (state / "identity").iterdir():
        path.unlink()
    (state / "identity").rmdir()
    (state / "identity").symlink_to(elsewhere)
    result = run("restore", str(out), "--config", str(cfg))
    assert result.exit_code == 1, result.output
    assert "symbolic link" in result.stderr and "identity" in result.stderr
    assert sorted(p.name for p in elsewhere.iterdir()) == ["passwd"]
    assert (elsewhere / "passwd").read_text() == "root:x:0:0\n"


def test_a_hard_link_planted_at_the_staging_name_is_not_written_through(tmp_path: Path) -> None:
    """The staging file's name is predictable (the second): a hard link to another file planted
    there must be replaced, never truncated, rewritten or chmod-ed."""
    cfg = make_host(tmp_path)
    config = load(cfg)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    victim.chmod(0o644)
    stamp = "20260101T000000Z"
    os.link(victim, config.state_dir / f".admin.token.restore-{stamp}")
    staged = restore._stage(config, "state/admin.token", b"new token\n", {"mode": "0600"}, stamp)
    assert staged.read_bytes() == b"new token\n"
    assert victim.read_text() == "precious\n"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644
    staged.unlink()


def test_a_symlink_planted_at_the_dry_runs_scratch_name_is_not_followed(tmp_path: Path) -> None:
    """`restore --dry-run` compares registries through a scratch copy named by our pid."""
    cfg = make_host(tmp_path)
    state = tmp_path / "state"
    out = tmp_path / "b"
    assert run("backup", str(out), "--config", str(cfg)).exit_code == 0
    run("db", "status", "--config", str(cfg))
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (state / f".registry.db.compare-{os.getpid()}").symlink_to(victim)
    result = run("restore", str(out), "--config", str(cfg), "--dry-run")
    assert victim.read_text() == "precious\n"
    assert result.exit_code in (0, 1), result.output


def test_a_forged_tsig_name_cannot_reach_below_the_key_directory(tmp_path: Path) -> None:
    """`{role}` stands for one path component: a forged `files/.../x/deeper.key` is no file
    the `[dnssd]` table names, so restore refuses it (and makes no directory)."""
    cfg = make_host(tmp_path)
    keys = tmp_path / "dnssd"
    keys.mkdir()
    (keys / "clc.key").write_text("clc secret\n")
    cfg.write_text(
        cfg.read_text().replace(
            "[components.clc]",
            "[dnssd]\n"
            'domain = "site.example."\n'
            'server = "127.0.0.1:53"\n'
            f'tsig_secret_file = "{keys}/{{role}}.key"\n'
            "[components.clc]",
        )
    )
    name = f"files/{str(keys).lstrip('/')}/sub/dir/evil.key"
    archive = forged(tmp_path, cfg, [contents.Member(name, b"x", 0o666, 0, 0)], "forged")
    result = run("restore", str(archive), "--config", str(cfg))
    assert result.exit_code == 1, result.output
    assert "refusing all of it" in result.stderr
    assert not (keys / "sub").exists()


def test_a_wrong_passphrase_again_and_again_changes_nothing(tmp_path: Path, passfile: Path) -> None:
    cfg = make_host(tmp_path)
    state = tmp_path / "state"
    out = tmp_path / "b"
    assert (
        run("backup", str(out), "--config", str(cfg), "--passphrase-file", str(passfile)).exit_code
        == 0
    )
    (state / "admin.token").write_text("changed since\n")
    before = tree(state)
    wrong = tmp_path / "wrong"
    for n in range(4):
        wrong.write_text(f"not the passphrase {n}\n")
        result = run("restore", str(out), "--config", str(cfg), "--passphrase-file", str(wrong))
        assert result.exit_code == 1
        assert "wrong passphrase" in result.stderr
        assert f"not the passphrase {n}" not in result.output + result.stderr
    assert tree(state) == before


def test_the_passphrase_and_secrets_never_appear_in_what_is_printed(
    tmp_path: Path, passfile: Path
) -> None:
    cfg = make_host(tmp_path)
    out = tmp_path / "b"
    made = run(
        "backup", str(out), "--config", str(cfg), "--passphrase-file", str(passfile), "--json"
    )
    assert made.exit_code == 0, made.output
    shown = run(
        "restore",
        str(out),
        "--config",
        str(cfg),
        "--passphrase-file",
        str(passfile),
        "--dry-run",
        "--json",
    )
    for result in (made, shown):
        text = result.output + result.stderr
        assert PASSPHRASE not in text
        assert "admin-secret-token" not in text
        assert "PRIVATE KEY" not in text
    assert PASSPHRASE.encode() not in out.read_bytes()
    assert b"admin-secret-token" not in out.read_bytes()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def _sealed(tmp_path: Path, header: bytes, body: bytes, name: str) -> Path:
    path = tmp_path / name
    path.write_bytes(container.MAGIC + header + body)
    return path


def test_a_header_without_end_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    path = _sealed(tmp_path, b"{" + b" " * (container.MAX_HEADER * 4), b"", "long")
    with pytest.raises(container.BackupError, match="no complete header"):
        container.unseal(path, None)


def test_key_derivation_parameters_beyond_the_bound_are_refused_before_deriving(
    tmp_path: Path,
) -> None:
    """The header is read before it is authenticated: n = 2**30 would take 1 TiB of memory."""
    enc = {
        "cipher": "AES-256-GCM",
        "kdf": "scrypt",
        "n": 2**30,
        "r": 8,
        "p": 1,
        "salt": base64.b64encode(b"s" * 16).decode(),
        "nonce": base64.b64encode(b"n" * 12).decode(),
    }
    header = json.dumps({"payload_bytes": 1, "payload_sha256": "0" * 64, "encryption": enc})
    path = _sealed(tmp_path, header.encode() + b"\n", b"x" * 32, "greedy")
    with pytest.raises(container.BackupError, match="out of bounds"):
        container.unseal(path, b"whatever-passphrase")


@pytest.mark.parametrize("cut", [1, 17, 100, -1])
def test_a_flipped_or_cut_encrypted_backup_is_named_and_changes_nothing(
    tmp_path: Path, passfile: Path, cut: int
) -> None:
    cfg = make_host(tmp_path)
    state = tmp_path / "state"
    out = tmp_path / "b"
    assert (
        run("backup", str(out), "--config", str(cfg), "--passphrase-file", str(passfile)).exit_code
        == 0
    )
    data = bytearray(out.read_bytes())
    if cut == -1:
        data = data[: len(data) // 2]
    else:
        data[-cut] ^= 0x01
    out.write_bytes(bytes(data))
    before = tree(state)
    result = run("restore", str(out), "--config", str(cfg), "--passphrase-file", str(passfile))
    assert result.exit_code == 1
    assert "the seal does not open" in result.stderr
    assert tree(state) == before


def test_a_tampered_unencrypted_payload_is_named_before_it_is_unpacked(tmp_path: Path) -> None:
    cfg = make_host(tmp_path)
    state = tmp_path / "state"
    out = tmp_path / "b"
    assert run("backup", str(out), "--config", str(cfg)).exit_code == 0
    data = bytearray(out.read_bytes())
    data[-10] ^= 0xFF
    out.write_bytes(bytes(data))
    before = tree(state)
    result = run("restore", str(out), "--config", str(cfg))
    assert result.exit_code == 1 and "SHA-256 does not match" in result.stderr
    assert tree(state) == before


def test_a_member_that_is_a_link_is_refused(tmp_path: Path) -> None:
    import io
    import tarfile

    cfg = make_host(tmp_path)
    config = load(cfg)
    members = contents.collect(config, tmp_path)
    payload = contents.pack(contents.manifest(config, members, encrypted=False), members)
    buffer = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(payload), mode="r:gz") as src,
        tarfile.open(fileobj=buffer, mode="w:gz") as dst,
    ):
        for info in src:
            dst.addfile(info, src.extractfile(info))
        link = tarfile.TarInfo("keys/evil")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
        dst.addfile(link)
    archive = tmp_path / "linked"
    container.write_private(archive, container.seal(buffer.getvalue(), None))
    result = run("restore", str(archive), "--config", str(cfg))
    assert result.exit_code == 1 and "is not a file" in result.stderr
    assert not (tmp_path / "state" / "keys" / "evil").exists()


@pytest.mark.parametrize("command", ["restore", "db upgrade"])
@pytest.mark.parametrize("link", ["symbolic", "hard"])
def test_a_link_planted_as_the_registry_lock_is_never_truncated(
    tmp_path: Path, command: str, link: str
) -> None:
    """Holding the lock truncates the lock file and writes our pid into it: run as root
    through a planted link, that would empty /etc/shadow. It is refused, by name."""
    cfg = make_host(tmp_path)
    state = tmp_path / "state"
    out = tmp_path / "b"
    assert run("backup", str(out), "--config", str(cfg)).exit_code == 0
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    lock = state / "registry.db.lock"
    lock.unlink(missing_ok=True)
    if link == "symbolic":
        lock.symlink_to(victim)
    else:
        os.link(victim, lock)
    args = [str(out)] if command == "restore" else []
    result = run(*command.split(), *args, "--config", str(cfg))
    assert result.exit_code == 1, result.output
    assert "registry.db.lock" in result.stderr and "remove it" in result.stderr
    assert victim.read_text() == "precious\n"


@pytest.mark.parametrize("link", ["symbolic", "hard"])
def test_the_registrar_never_claims_its_registry_through_a_planted_lock_link(
    tmp_path: Path, link: str
) -> None:
    """The registrar's own claim (Store.claim, at every agent start) truncates the lock file
    and writes its pid: through a planted link that is refused by name, the target intact."""
    from eucareg.store.owner import LockRefused
    from eucareg.store.registry import Store, sqlite_url

    db = tmp_path / "registry.db"
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    lock = tmp_path / "registry.db.lock"
    store = Store(sqlite_url(db))  # opening refuses such a link too: plant it afterwards
    lock.unlink(missing_ok=True)
    if link == "symbolic":
        lock.symlink_to(victim)
    else:
        os.link(victim, lock)
    try:
        with pytest.raises(LockRefused, match=r"registry\.db\.lock .*remove it"):
            store.claim(patience=0)
    finally:
        store.close()
    assert victim.read_text() == "precious\n"


def test_a_second_restore_or_an_agent_starting_meanwhile_is_refused(tmp_path: Path) -> None:
    """Restore holds the registrar's lock while it swaps files: a second restore is refused
    (exit 5), and an agent starting then cannot claim the registry."""
    from eucareg.cli.backup import RUNNING
    from eucareg.store.errors import StoreBusy
    from eucareg.store.owner import hold
    from eucareg.store.registry import Store, sqlite_url

    cfg = make_host(tmp_path)
    state = tmp_path / "state"
    out = tmp_path / "b"
    assert run("backup", str(out), "--config", str(cfg)).exit_code == 0
    (state / "admin.token").write_text("changed since\n")
    before = tree(state)
    with hold(state / "registry.db") as pid:
        assert pid is None
        result = run("restore", str(out), "--config", str(cfg))
        assert result.exit_code == RUNNING, result.output
        assert f"(pid {os.getpid()})" in result.stderr
        store = Store(sqlite_url(state / "registry.db"))
        try:
            with pytest.raises(StoreBusy, match=f"pid {os.getpid()}"):
                store.claim(patience=0.1)
        finally:
            store.close()
    assert tree(state) == before
    assert run("restore", str(out), "--config", str(cfg)).exit_code == 0


def test_every_file_a_restore_writes_is_the_agents_alone(tmp_path: Path) -> None:
    """Restored files, the replaced ones set aside and the configuration kept beside them:
    nothing under state_dir readable by group or others, whatever the umask."""
    cfg = make_host(tmp_path)
    state = tmp_path / "state"
    (state / "registry.db").chmod(0o600)  # as the agent (umask 077) makes it
    out = tmp_path / "b"
    assert run("backup", str(out), "--config", str(cfg)).exit_code == 0
    (state / "admin.token").write_text("changed since\n")
    (state / "identity" / "walrus.id").unlink()
    (state / "registry.db").unlink()
    cfg.write_text(cfg.read_text() + "# edited since\n")
    old = os.umask(0o022)
    try:
        result = run("restore", str(out), "--config", str(cfg))
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    (aside,) = state.glob("replaced-*")
    assert (aside / "config" / "eucareg.toml").exists()
    loose = {
        str(p.relative_to(state)): oct(stat.S_IMODE(p.stat().st_mode))
        for p in [state, *state.rglob("*")]
        if stat.S_IMODE(p.stat().st_mode) & 0o077 and not p.name.endswith(".lock")
    }
    assert loose == {}


def test_a_key_dir_the_operator_made_a_link_is_still_restored_through(tmp_path: Path) -> None:
    """state_dir/keys a link to keys kept elsewhere (the agent follows it): restore does too;
    only links below key_dir or state_dir are refused."""
    cfg = make_host(tmp_path)
    state = tmp_path / "state"
    out = tmp_path / "b"
    assert run("backup", str(out), "--config", str(cfg)).exit_code == 0
    elsewhere = tmp_path / "secure-keys"
    (state / "keys").rename(elsewhere)
    (state / "keys").symlink_to(elsewhere)
    (elsewhere / "cloud-pk.pem").unlink()
    result = run("restore", str(out), "--config", str(cfg))
    assert result.exit_code == 0, result.output
    assert (state / "keys").is_symlink() and (elsewhere / "cloud-pk.pem").is_file()
    (elsewhere / "sub").mkdir()
    nested = contents.Member("keys/sub/x.pem", b"x", 0o600, 0, 0)
    (elsewhere / "sub").rmdir()
    (elsewhere / "sub").symlink_to(tmp_path / "outside")
    (tmp_path / "outside").mkdir()
    archive = forged(tmp_path, cfg, [nested], "nested")
    result = run("restore", str(archive), "--config", str(cfg))
    assert result.exit_code == 1 and "sub is a symbolic link" in result.stderr
    assert list((tmp_path / "outside").iterdir()) == []


@pytest.mark.parametrize("source", ["fifo", "zero"])
def test_a_passphrase_from_a_pipe_or_a_device_is_read_to_its_first_line_only(
    tmp_path: Path, source: str
) -> None:
    """`--passphrase-file <(pass show backup)` is a pipe whose writer may stay open; a slip of
    the fingers names /dev/zero. Neither may hang the command or fill its memory."""
    import threading
    import time

    cfg = make_host(tmp_path)
    out = tmp_path / "b"
    if source == "zero":
        result = run("backup", str(out), "--config", str(cfg), "--passphrase-file", "/dev/zero")
        assert result.exit_code == 2 and "holds NUL bytes" in result.stderr, result.output
        assert not out.exists()
        return
    fifo = tmp_path / "pass.fifo"
    os.mkfifo(fifo)
    done = threading.Event()

    def writer() -> None:
        with open(fifo, "wb") as pipe:
            pipe.write(PASSPHRASE.encode() + b"\n")
            pipe.flush()
            done.wait(10)  # a writer that stays open until the command is over

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        started = time.monotonic()
        result = run("backup", str(out), "--config", str(cfg), "--passphrase-file", str(fifo))
        took = time.monotonic() - started
    finally:
        done.set()
        thread.join(15)
    assert result.exit_code == 0, result.output
    assert took < 8, f"{took:.1f}s: it waited for the pipe's writer to close"
    assert container.is_encrypted(out)
    assert container.unseal(out, PASSPHRASE.encode())
