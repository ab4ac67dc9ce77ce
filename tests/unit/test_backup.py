"""`eucareg backup`, `restore` and `db status|upgrade` through click's CliRunner, on a real state
directory: identities, the cloud CA, secrets and a registry (the 0.1.0 fixture). Round trips
with and without a passphrase, every refusal leaving the state as it was, modes, and N+1.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from eucareg.agent.identity import ensure_cloud_ca, load_or_create_identity, read_or_create_secret
from eucareg.backup import container, contents
from eucareg.cli.main import main
from eucareg.config.file import load
from eucareg.core.model import Role
from eucareg.pki import certificates
from eucareg.pki import credentials as cred
from eucareg.store.registry import Store, sqlite_url
from tests.unit.test_migrations import HEAD, TABLES, counts, load_fixture, revision

PASSPHRASE = "correct horse battery staple"


def run(*args: str) -> Result:
    result = CliRunner().invoke(main, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    return result


def make_host(tmp_path: Path, roles: str = "clc") -> Path:
    """A CLC host's config and state as its agent leaves them; returns the config path."""
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / "eucareg.toml"
    state = tmp_path / "state"
    body = f'address = "10.0.2.31"\nstate_dir = "{state}"\n'
    if roles == "clc":
        body += "[components.clc]\ninstalled = true\n[components.walrus]\ninstalled = true\n"
    else:
        body += '[components.cc]\ncluster = "c1"\ninstalled = true\n'
    path.write_text(body)
    if roles != "clc":
        return path
    state.mkdir(mode=0o700)
    clc = load_or_create_identity(state, Role.CLC)
    load_or_create_identity(state, Role.WALRUS)
    keys = state / "keys"
    keys.mkdir(mode=0o700)
    ensure_cloud_ca(keys, clc)
    read_or_create_secret(state / "admin.token", b"admin-secret-token")
    read_or_create_secret(state / "registrar.key", b"ab" * 32)
    load_fixture(state / "registry.db")
    Store(sqlite_url(state / "registry.db")).close()  # as the agent leaves it: at head
    return path


def tree(root: Path) -> dict[str, tuple[int, str | None]]:
    """Every file under `root` (mode, SHA-256; a registry by its rows, its journal files left
    out), skipping the lock file an attempt may create."""
    return {
        str(p.relative_to(root)): (stat.S_IMODE(p.stat().st_mode), _digest(p))
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith((".lock", "-wal", "-shm"))
    }


def _digest(path: Path) -> str | None:
    if path.name.startswith("registry.db"):
        return contents.registry_digest(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ca_fingerprint(state: Path) -> str:
    return certificates.cert_fingerprint(certificates.load_cert(state / "keys" / cred.CLOUD_CERT))


@pytest.fixture
def passfile(tmp_path: Path) -> Path:
    path = tmp_path / "pass"
    path.write_text(PASSPHRASE + "\n")
    return path


def test_round_trip_without_a_passphrase_warns_and_restores_every_file(tmp_path: Path) -> None:
    cfg = make_host(tmp_path)
    state = tmp_path / "state"
    before = tree(state)
    fp = ca_fingerprint(state)
    rows = counts(state / "registry.db")
    out = tmp_path / "b.eucareg"
    made = run("backup", str(out), "--config", str(cfg))
    assert made.exit_code == 0, made.output
    assert "is NOT encrypted" in made.stderr and "WARNING" in made.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert not list(tmp_path.glob(".eucareg-backup-*")) and not list(tmp_path.glob(".b.eucareg*"))
    names = {
        f["name"]
        for f in json.loads(
            run("backup", str(tmp_path / "c"), "--config", str(cfg), "--json").stdout
        )["files"]
    }
    assert {
        "state/registry.db",
        "state/admin.token",
        "state/registrar.key",
        "state/identity/clc.id",
        "state/identity/clc.key.pem",
        "state/identity/walrus.key.pem",
        "keys/cloud-cert.pem",
        "keys/cloud-pk.pem",
        "config/eucareg.toml",
    } <= names

    # The host is lost: its whole state directory is gone.
    for p in sorted(state.rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    state.rmdir()
    restored = run("restore", str(out), "--config", str(cfg))
    assert restored.exit_code == 0, restored.output
    assert "create" in restored.stdout
    assert ca_fingerprint(state) == fp
    assert counts(state / "registry.db") == rows and revision(state / "registry.db") == HEAD
    after = tree(state)
    for name, (mode, digest) in before.items():
        if name.startswith("registry.db"):
            continue  # compared by its rows above
        assert after[name] == (mode, digest), name
    for directory in (state / "identity", state / "keys"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "registry.db").stat().st_mode) == 0o600

    # N+1: the same archive again changes nothing and sets nothing aside.
    again = run("restore", str(out), "--config", str(cfg), "--json")
    assert again.exit_code == 0, again.output
    data = json.loads(again.stdout)
    assert data["changed"] is False and data["replaced_into"] is None
    assert {f["action"] for f in data["files"]} == {"same"}
    assert not list(state.glob("replaced-*"))
    assert tree(state) == after


def test_encrypted_round_trip_sets_the_replaced_files_aside(tmp_path: Path, passfile: Path) -> None:
    cfg = make_host(tmp_path)
    state = tmp_path / "state"
    out = tmp_path / "b.eucareg"
    made = run("backup", str(out), "--config", str(cfg), "--passphrase-file", str(passfile))
    assert made.exit_code == 0 and "NOT encrypted" not in made.stderr
    raw = out.read_bytes()
    assert b"PRIVATE KEY" not in raw and b"admin-secret-token" not in raw
    assert container.is_encrypted(out)
    # Since the backup: a new admin token, and a registry that lost its components.
    (state / "admin.token").write_text("changed\n")
    conn = sqlite3.connect(state / "registry.db")
    conn.execute("DELETE FROM components")
    conn.commit()
    conn.close()
    restored = run("restore", str(out), "--config", str(cfg), "--passphrase-file", str(passfile))
    assert restored.exit_code == 0, restored.output
    assert (state / "admin.token").read_text() == "admin-secret-token\n"
    assert counts(state / "registry.db")["components"] == 5
    (aside,) = state.glob("replaced-*")
    assert stat.S_IMODE(aside.stat().st_mode) == 0o700
    assert (aside / "state/admin.token").read_text() == "changed\n"
    assert counts(aside / "state/registry.db")["components"] == 0
    assert not (state / "registry.db-wal").exists() or (aside / "state/registry.db-wal").exists()
    assert f"the files it replaced are in {aside}" in restored.stdout


def test_refusals_change_nothing(tmp_path: Path, passfile: Path) -> None:
    cfg = make_host(tmp_path)
    state = tmp_path / "state"
    plain, sealed = tmp_path / "plain", tmp_path / "sealed"
    run("backup", str(plain), "--config", str(cfg))
    run("backup", str(sealed), "--config", str(cfg), "--passphrase-file", str(passfile))
    (state / "admin.token").write_text("current\n")  # so that a restore would change it
    before = tree(state)
    wrong = tmp_path / "wrong"
    wrong.write_text("not the passphrase\n")

    def refused(args: list[str], message: str, code: int = 1) -> None:
        result = run("restore", *args, "--config", str(cfg))
        assert result.exit_code == code, (args, result.output)
        assert message in result.stderr, (args, result.stderr)
        assert tree(state) == before, args
        assert not list(state.glob("replaced-*")) and not list(state.rglob(".*restore-*"))

    refused([str(sealed), "--passphrase-file", str(wrong)], "wrong passphrase")
    refused([str(sealed)], "this backup is encrypted; give --passphrase-file")
    refused([str(plain), "--passphrase-file", str(passfile)], "not encrypted")
    data = plain.read_bytes()
    truncated = tmp_path / "truncated"
    truncated.write_bytes(data[: len(data) - 100])
    refused([str(truncated)], "truncated or damaged")
    flipped = tmp_path / "flipped"
    flipped.write_bytes(data[:-50] + bytes([data[-50] ^ 1]) + data[-49:])
    refused([str(flipped)], "damaged or altered")
    sealed_data = sealed.read_bytes()
    cut = tmp_path / "cut"
    cut.write_bytes(sealed_data[:-1])
    refused([str(cut), "--passphrase-file", str(passfile)], "truncated or altered")
    header_end = sealed_data.index(b"\n", len(container.MAGIC))
    edited = tmp_path / "edited"  # the header is sealed too: a changed length is caught
    edited.write_bytes(sealed_data.replace(b'"payload_bytes": ', b'"payload_bytes": 1', 1))
    assert edited.read_bytes()[:header_end] != sealed_data[:header_end]
    refused([str(edited), "--passphrase-file", str(passfile)], "wrong passphrase")
    greedy = tmp_path / "greedy"  # a header asking scrypt for 1 TiB is refused before deriving
    greedy.write_bytes(sealed_data.replace(b'"n": 32768', b'"n": 1073741824', 1))
    refused([str(greedy), "--passphrase-file", str(passfile)], "out of bounds")
    junk = tmp_path / "junk"
    junk.write_bytes(b"PK\x03\x04 a zip file")
    refused([str(junk)], "not an eucareg backup")
    refused([str(tmp_path / "absent")], "no such file")


def test_an_archive_that_would_write_outside_its_place_is_refused(tmp_path: Path) -> None:
    cfg = make_host(tmp_path)
    config = load(cfg)
    members = contents.collect(config, tmp_path)
    evil = contents.Member("state/../../evil", b"x", 0o600, 0, 0)
    payload = contents.pack(
        contents.manifest(config, [*members, evil], encrypted=False), [*members, evil]
    )
    archive = tmp_path / "evil.eucareg"
    container.write_private(archive, container.seal(payload, None))
    result = run("restore", str(archive), "--config", str(cfg))
    assert result.exit_code == 1 and "would write outside its place" in result.stderr
    assert not (tmp_path.parent / "evil").exists()


def test_restore_refuses_while_the_agent_runs(tmp_path: Path) -> None:
    cfg = make_host(tmp_path)
    state = tmp_path / "state"
    out = tmp_path / "b"
    run("backup", str(out), "--config", str(cfg))
    (state / "admin.token").write_text("current\n")
    before = tree(state)
    store = Store(sqlite_url(state / "registry.db"))
    store.claim()  # what a running registrar holds
    try:
        result = run("restore", str(out), "--config", str(cfg))
        assert result.exit_code == 5
        assert f"an agent (pid {os.getpid()}) holds" in result.stderr
        assert "stop the agent" in result.stderr
        upgrade = run("db", "upgrade", "--config", str(cfg))
        assert upgrade.exit_code == 5 and "stop it first" in upgrade.stderr
    finally:
        store.close()
    # An agent whose registry lock we cannot see still answers on its socket.
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(state / "api.sock"))
        sock.listen()
        result = run("restore", str(out), "--config", str(cfg))
        assert result.exit_code == 5 and "an agent answers on" in result.stderr
    (state / "api.sock").unlink()
    assert tree(state) == before
    assert run("restore", str(out), "--config", str(cfg)).exit_code == 0  # stopped: it goes


def test_a_backup_of_another_role_is_refused(tmp_path: Path) -> None:
    cfg = make_host(tmp_path / "clc")
    out = tmp_path / "b"
    run("backup", str(out), "--config", str(cfg))
    other = make_host(tmp_path / "cc", roles="cc")
    result = run("restore", str(out), "--config", str(other))
    assert result.exit_code == 1
    assert "this backup is of a host with clc, walrus; this configuration has cc" in result.stderr
    assert not (tmp_path / "cc" / "state").exists()
    # The same roles, another cluster: also not this host.
    cc = make_host(tmp_path / "cc1", roles="cc")
    cc_backup = tmp_path / "cc1.b"
    (tmp_path / "cc1" / "state" / "identity").mkdir(parents=True)
    (tmp_path / "cc1" / "state" / "identity" / "cc.id").write_text("cc-000000000001\n")
    assert run("backup", str(cc_backup), "--config", str(cc)).exit_code == 0
    cc.write_text(cc.read_text().replace('cluster = "c1"', 'cluster = "c2"'))
    result = run("restore", str(cc_backup), "--config", str(cc))
    assert result.exit_code == 1
    assert "this backup's cc is of cluster c1; this configuration's is of cluster c2" in (
        result.stderr
    )


def test_a_backup_whose_registry_is_newer_than_this_code_is_refused(tmp_path: Path) -> None:
    cfg = make_host(tmp_path)
    state = tmp_path / "state"
    conn = sqlite3.connect(state / "registry.db")
    conn.execute("UPDATE alembic_version SET version_num = '0099'")
    conn.commit()
    conn.close()
    out = tmp_path / "b"
    assert run("backup", str(out), "--config", str(cfg)).exit_code == 0
    status = run("db", "status", "--config", str(cfg), "--json")
    assert status.exit_code == 1 and json.loads(status.stdout)["state"] == "newer"
    before = tree(state)
    result = run("restore", str(out), "--config", str(cfg))
    assert result.exit_code == 1
    assert (
        f"schema revision 0099, which this eucareg does not know (it knows up to {HEAD})"
        in result.stderr
    )
    assert tree(state) == before


def test_an_older_registry_is_migrated_on_restore_and_a_second_restore_is_a_no_op(
    tmp_path: Path,
) -> None:
    cfg = make_host(tmp_path)
    state = tmp_path / "state"
    (state / "registry.db").unlink()
    (state / f"registry.db.pre-{HEAD}").unlink()  # make_host's own upgrade of the fixture
    load_fixture(state / "registry.db")  # the 0.1.0 registry, never opened by this code
    out = tmp_path / "b"
    assert run("backup", str(out), "--config", str(cfg)).exit_code == 0
    (state / "registry.db").unlink()
    first = run("restore", str(out), "--config", str(cfg))
    assert first.exit_code == 0, first.output
    assert f"registry: applied revision {HEAD}" in first.stdout
    assert revision(state / "registry.db") == HEAD
    assert not list(state.glob("*.pre-*")) and not list(state.glob(".registry*"))
    second = run("restore", str(out), "--config", str(cfg))
    assert second.exit_code == 0 and "nothing to do" in second.stdout


def test_dry_run_shows_and_changes_nothing(tmp_path: Path) -> None:
    cfg = make_host(tmp_path)
    state = tmp_path / "state"
    out = tmp_path / "b"
    run("backup", str(out), "--config", str(cfg))
    (state / "admin.token").write_text("current\n")
    (state / "identity" / "walrus.id").unlink()
    before = tree(state)
    result = run("restore", str(out), "--config", str(cfg), "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    actions = {f["name"]: f["action"] for f in json.loads(result.stdout)["files"]}
    assert actions["state/admin.token"] == "replace"
    assert actions["state/identity/walrus.id"] == "create"
    assert actions["state/registry.db"] == "same"
    assert tree(state) == before


def test_backup_never_overwrites_and_db_commands_show_and_upgrade(tmp_path: Path) -> None:
    cfg = make_host(tmp_path)
    state = tmp_path / "state"
    out = tmp_path / "b"
    out.write_text("something else\n")
    result = run("backup", str(out), "--config", str(cfg))
    assert result.exit_code == 2 and "already exists" in result.stderr
    assert out.read_text() == "something else\n"
    (state / "registry.db").unlink()
    (state / f"registry.db.pre-{HEAD}").unlink()  # make_host's own upgrade of the fixture
    load_fixture(state / "registry.db")
    status = json.loads(run("db", "status", "--config", str(cfg), "--json").stdout)
    assert (status["state"], status["revision"], status["pending"]) == (
        "unversioned",
        None,
        [f"{n:04d}" for n in range(2, int(HEAD) + 1)],  # every revision after the baseline
    )
    text = run("db", "status", "--config", str(cfg)).stdout
    assert "state     unversioned" in text and f"head      {HEAD}" in text
    upgraded = run("db", "upgrade", "--config", str(cfg))
    assert upgraded.exit_code == 0 and f"applied revision {HEAD}" in upgraded.stdout
    assert (state / f"registry.db.pre-{HEAD}").exists()
    status = json.loads(run("db", "status", "--config", str(cfg), "--json").stdout)
    assert (status["state"], status["revision"], status["pending"]) == ("current", HEAD, [])
    assert "nothing to do" in run("db", "upgrade", "--config", str(cfg)).stdout
    assert set(counts(state / "registry.db")) == set(TABLES)


def test_a_short_passphrase_is_refused(tmp_path: Path) -> None:
    cfg = make_host(tmp_path)
    short = tmp_path / "short"
    short.write_text("abc\n")
    result = run(
        "backup", str(tmp_path / "b"), "--config", str(cfg), "--passphrase-file", str(short)
    )
    assert result.exit_code == 2 and "the passphrase is 3 bytes; use at least 8" in result.stderr
    assert not (tmp_path / "b").exists()


def test_a_symlink_planted_at_a_target_is_set_aside_not_followed(tmp_path: Path) -> None:
    cfg = make_host(tmp_path)
    state = tmp_path / "state"
    out = tmp_path / "b"
    run("backup", str(out), "--config", str(cfg))
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (state / "admin.token").unlink()
    (state / "admin.token").symlink_to(victim)
    assert run("restore", str(out), "--config", str(cfg)).exit_code == 0
    assert victim.read_text() == "precious\n"
    token = state / "admin.token"
    assert not token.is_symlink() and token.read_text() == "admin-secret-token\n"
    (aside,) = state.glob("replaced-*")
    assert (aside / "state" / "admin.token").is_symlink()


def test_a_backup_taken_while_the_registry_is_written_is_consistent(tmp_path: Path) -> None:
    import threading

    from eucareg.core.model import NewEvent
    from eucareg.core.transitions import Write

    cfg = make_host(tmp_path)
    store = Store(sqlite_url(tmp_path / "state" / "registry.db"))
    stop, started = threading.Event(), threading.Event()

    def write() -> None:
        n = 0
        while not stop.is_set() and n < 20_000:
            n += 1
            if n == 50:
                started.set()  # the backup starts while batches keep coming
            store.apply(
                [
                    Write(
                        events=tuple(
                            NewEvent(
                                float(n),
                                f"nc-{n:012x}",
                                "nc",
                                "c1",
                                "10.0.0.9",
                                "pending",
                                "x",
                                "y",
                            )
                            for _ in range(20)
                        )
                    )
                ]
            )

    writer = threading.Thread(target=write)
    writer.start()
    try:
        assert started.wait(timeout=60)
        result = run("backup", str(tmp_path / "b"), "--config", str(cfg))
    finally:
        stop.set()
        writer.join(timeout=60)
        store.close()
    assert result.exit_code == 0, result.output
    archive = contents.unpack(container.unseal(tmp_path / "b", None), tmp_path / "b")
    copy = tmp_path / "copy.db"
    copy.write_bytes(archive.files["state/registry.db"])
    conn = sqlite3.connect(copy)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    # Whole transactions only: every batch of 20 events is in the copy entirely or not at all.
    per_batch = conn.execute(
        "SELECT count(*) FROM events WHERE component_id LIKE 'nc-%' GROUP BY component_id"
    ).fetchall()
    conn.close()
    assert per_batch and {n for (n,) in per_batch} == {20}


def test_a_registry_that_is_not_a_database_is_named_not_a_traceback(tmp_path: Path) -> None:
    cfg = make_host(tmp_path)
    db = tmp_path / "state" / "registry.db"
    db.write_bytes(b"garbage, not SQLite\n" * 10)
    result = run("backup", str(tmp_path / "b"), "--config", str(cfg))
    assert result.exit_code == 1
    assert f"{db}: not a readable registry" in result.stderr
    assert not (tmp_path / "b").exists()
    status = run("db", "status", "--config", str(cfg))
    assert status.exit_code == 1 and "not a readable registry" in status.stderr


def test_an_archive_whose_registry_is_not_a_database_is_refused_unchanged(tmp_path: Path) -> None:
    cfg = make_host(tmp_path)
    state = tmp_path / "state"
    config = load(cfg)
    garbage = b"not sqlite" * 50
    members = [m for m in contents.collect(config, tmp_path) if m.name != "state/registry.db"]
    manifest = contents.manifest(config, members, encrypted=False)
    manifest["files"].append(
        {
            "name": "state/registry.db",
            "bytes": len(garbage),
            "sha256": hashlib.sha256(garbage).hexdigest(),
            "mode": "0600",
            "uid": 0,
            "gid": 0,
        }
    )
    members.append(contents.Member("state/registry.db", garbage, 0o600, 0, 0))
    archive = tmp_path / "bad.eucareg"
    container.write_private(archive, container.seal(contents.pack(manifest, members), None))
    (state / "admin.token").write_text("current\n")
    before = tree(state)
    result = run("restore", str(archive), "--config", str(cfg))
    assert (
        result.exit_code == 1
        and "the backup's registry is not a readable database" in result.stderr
    )
    assert tree(state) == before
    assert not list(state.rglob(".*restore-*")) and not list(state.glob("replaced-*"))


def test_a_forged_archive_cannot_write_outside_the_files_the_config_names(tmp_path: Path) -> None:
    """Whoever can write an unencrypted backup can recompute its checksums; it still cannot
    make restore write /etc/… as root, nor a file of its choosing into state_dir."""
    cfg = make_host(tmp_path)
    config = load(cfg)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    for name in (f"files/{str(victim).lstrip('/')}", "state/api.sock", "state/tls/x/clc.pem"):
        members = [*contents.collect(config, tmp_path), contents.Member(name, b"x", 0o600, 0, 0)]
        archive = tmp_path / f"forged-{len(name)}"
        manifest = contents.manifest(config, members, encrypted=False)
        container.write_private(archive, container.seal(contents.pack(manifest, members), None))
        result = run("restore", str(archive), "--config", str(cfg))
        assert result.exit_code == 1, name
        assert f"the backup holds {name}, which is no file of this host's configuration" in (
            result.stderr
        )
    assert victim.read_text() == "precious\n"
    assert not (tmp_path / "state" / "api.sock").exists()


def test_dnssd_key_files_are_kept_and_restored(tmp_path: Path) -> None:
    cfg = make_host(tmp_path)
    keys = tmp_path / "dnssd"
    keys.mkdir()
    (keys / "clc.key").write_text("clc secret\n")
    (keys / "walrus.key").write_text("walrus secret\n")
    (keys / "prune.key").write_text("prune secret\n")
    (keys / "other.key").write_text("not named by the config\n")
    for key in keys.iterdir():
        key.chmod(0o640)
    cfg.write_text(
        cfg.read_text().replace(
            "[components.clc]",
            "[dnssd]\n"
            'domain = "site.example."\n'
            'server = "127.0.0.1:53"\n'
            f'tsig_secret_file = "{keys}/{{role}}.key"\n'
            'prune_key_name = "prune.site.example."\n'
            f'prune_secret_file = "{keys}/prune.key"\n'
            "[components.clc]",
        )
    )
    out = tmp_path / "b"
    made = run("backup", str(out), "--config", str(cfg), "--json")
    assert made.exit_code == 0, made.output
    names = {f["name"] for f in json.loads(made.stdout)["files"]}
    held = {n for n in names if n.startswith("files/")}
    assert held == {
        f"files/{str(keys / k).lstrip('/')}" for k in ("clc.key", "walrus.key", "prune.key")
    }
    (keys / "clc.key").unlink()
    (keys / "prune.key").write_text("changed\n")
    result = run("restore", str(out), "--config", str(cfg))
    assert result.exit_code == 0, result.output
    assert (keys / "clc.key").read_text() == "clc secret\n"
    assert stat.S_IMODE((keys / "clc.key").stat().st_mode) == 0o640
    assert (keys / "prune.key").read_text() == "prune secret\n"
    (aside,) = (tmp_path / "state").glob("replaced-*")
    assert (aside / f"files/{str(keys / 'prune.key').lstrip('/')}").read_text() == "changed\n"


@pytest.mark.parametrize("failing", [1, 2, 3, 5, 8])
def test_a_restore_that_fails_half_way_loses_nothing_and_can_be_run_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: int
) -> None:
    """The N-th rename of a restore fails (a full disk, say): every rename done is undone, the
    host is exactly as before (no secret missing for an agent to make anew), and restore run
    again does it all."""
    from eucareg.backup import restore as rst

    cfg = make_host(tmp_path)
    state = tmp_path / "state"
    out = tmp_path / "b"
    run("backup", str(out), "--config", str(cfg))
    (state / "registry.db").chmod(0o600)  # as the agent (umask 077) makes it, and restore does
    wanted = tree(state)
    for name in ("admin.token", "registrar.key", "identity/clc.id", "identity/walrus.id"):
        (state / name).write_text("current\n")
    conn = sqlite3.connect(state / "registry.db")
    conn.execute("DELETE FROM events")
    conn.commit()
    conn.close()
    before = tree(state)
    real_rename, calls = os.rename, []

    def rename(src: object, dst: object) -> None:
        calls.append(1)
        if len(calls) == failing:
            raise OSError(28, "No space left on device")
        real_rename(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "rename", rename)
    archive = contents.unpack(container.unseal(out, None), out)
    with pytest.raises(OSError, match="No space left"):
        rst.apply(archive, load(cfg))
    monkeypatch.setattr(os, "rename", real_rename)
    assert not list(state.rglob(".*.restore-*"))  # staged files are cleaned up
    assert tree(state) == before and not list(state.glob("replaced-*"))
    again = run("restore", str(out), "--config", str(cfg))
    assert again.exit_code == 0, again.output
    restored = {k: v for k, v in tree(state).items() if not k.startswith("replaced-")}
    assert restored == wanted
