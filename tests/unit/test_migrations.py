"""Registry schema migrations (eucareg/store/upgrade.py): a new database at head, the previous
release's registry (tests/data/registry-0.1.0.sql, made by 0.1.0 itself) opened with every row,
an older one, a newer one refused untouched, two upgraders at once, and a crash mid-way.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from eucareg.core.model import HookOutcome, Role, Status
from eucareg.core.trust import Mode, Task
from eucareg.store.errors import SchemaTooNew
from eucareg.store.migrations import v010
from eucareg.store.registry import Store, sqlite_url
from eucareg.store.schema import metadata
from eucareg.store.upgrade import schema_state, scripts, upgrade

FIXTURE = Path(__file__).parent.parent / "data" / "registry-0.1.0.sql"
TABLES = (
    "components",
    "settings",
    "tokens",
    "token_uses",
    "revocations",
    "certificates",
    "events",
    "hook_runs",
)
ROOT = Path(__file__).parent.parent.parent
# This code's newest revision, and the one after it (the tests' own failing revision).
HEAD = str(scripts().get_current_head())
NEXT = f"{int(HEAD) + 1:04d}"


def load_fixture(path: Path) -> Path:
    conn = sqlite3.connect(path)
    conn.executescript(FIXTURE.read_text())
    conn.close()
    return path


def counts(path: Path) -> dict[str, int]:
    conn = sqlite3.connect(path)
    try:
        return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}
    finally:
        conn.close()


def dump(path: Path, table: str) -> list[tuple[object, ...]]:
    """Every row, in the columns 0.1.0 had (later revisions only add columns)."""
    columns = ", ".join(f'"{c.name}"' for c in v010.metadata.tables[table].columns)
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"SELECT {columns} FROM {table} ORDER BY 1, 2").fetchall()
    finally:
        conn.close()


def revision(path: Path) -> str | None:
    engine = sa.create_engine(sqlite_url(path))
    try:
        return schema_state(engine).current
    finally:
        engine.dispose()


def test_a_new_database_is_created_at_head_with_exactly_the_tables_the_code_uses(
    tmp_path: Path,
) -> None:
    db = tmp_path / "registry.db"
    store = Store(sqlite_url(db))
    assert store.migrated == [f"created the registry at revision {HEAD}"]
    with store.engine.connect() as conn:
        # What the migrations made is what schema.py declares: no difference at all.
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    store.close()
    assert revision(db) == HEAD
    assert not list(tmp_path.glob("registry.db.pre-*"))  # nothing to copy when new
    assert Store(sqlite_url(db)).migrated == []


def test_the_previous_release_registry_opens_with_every_row(tmp_path: Path) -> None:
    db = load_fixture(tmp_path / "registry.db")
    before = counts(db)
    assert all(before.values()), before  # the fixture fills every table
    rows_before = {t: dump(db, t) for t in TABLES}

    store = Store(sqlite_url(db))
    assert store.migrated[-int(HEAD) :] == [
        "stamped 0001 (the schema of eucareg 0.1.0)",
        *(f"applied revision {n:04d}" for n in range(2, int(HEAD) + 1)),
    ]
    snap = store.load()
    history = store.events()
    runs = store.hook_runs()
    store.close()

    assert counts(db) == before
    assert {t: dump(db, t) for t in TABLES} == rows_before  # every value, unchanged
    assert revision(db) == HEAD
    cc = snap.records["cc-0000000000b1"]
    assert (cc.role, cc.cluster, cc.status) == (Role.CC, "cluster01", Status.REGISTERED)
    assert cc.approved and cc.admitted_by == "token:tok0000000000001"
    sc = snap.records["sc-0000000000b2"]
    assert (sc.status, sc.waiting_for, sc.claimable) == (Status.PENDING, "approval", True)
    token = snap.tokens["tok0000000000001"]
    assert token.used_by == {"cc-0000000000b1", "walrus-0000000000a2"}
    assert token.spent_by == {"cc-0000000000b0"}
    assert snap.tokens["tok0000000000002"].revoked_at == 1_780_000_050.0
    assert snap.trust.mode is Mode.ANY and snap.trust.locked == {Task.CC}
    assert snap.trust.install_until == 1_780_001_800.0
    assert set(snap.certificates) == {"walrus-0000000000a1", "cc-0000000000b1"}
    assert snap.certificates["cc-0000000000b1"].cert_pem.startswith("-----BEGIN CERTIFICATE")
    assert snap.revoked == {"1002"}
    assert snap.interrupted == {"walrus-0000000000a2"}  # its latest journal row: interrupted
    assert [e.seq for e in history] == list(range(1, before["events"] + 1))
    assert {r.run_id: r.outcome for r in runs}["run-failed-0"] is HookOutcome.INTERRUPTED
    assert {r.run_id: r.batch for r in runs}["run-cc-1"] == "batch-0001"

    # The copy taken before the upgrade is the 0.1.0 database, private, and opens as one.
    copy = tmp_path / f"registry.db.pre-{HEAD}"  # named after the revision it upgrades to
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    assert counts(copy) == before
    assert revision(copy) is None  # as 0.1.0 left it: no alembic_version


def test_a_database_from_before_0_1_0_gets_its_missing_columns_then_the_revisions(
    tmp_path: Path,
) -> None:
    db = tmp_path / "registry.db"
    conn = sqlite3.connect(db)
    # An early registry: components without `claimable`, hook runs without the journal's
    # columns, and no token tables at all.
    conn.executescript(
        """
        CREATE TABLE components (component_id VARCHAR(64) PRIMARY KEY, role VARCHAR(16) NOT NULL,
          cluster VARCHAR(64), address VARCHAR(64) NOT NULL, fingerprint VARCHAR(80) NOT NULL,
          status VARCHAR(16) NOT NULL, reason TEXT NOT NULL, waiting_for VARCHAR(128),
          instance VARCHAR(255) NOT NULL, first_seen FLOAT NOT NULL, updated_at FLOAT NOT NULL,
          registered_at FLOAT, expires_at FLOAT, attempts INTEGER NOT NULL, next_retry_at FLOAT,
          credentials_issued_at FLOAT, credentials_collected_at FLOAT, approved BOOLEAN NOT NULL,
          admitted_by VARCHAR(64) NOT NULL, replaces VARCHAR(64));
        INSERT INTO components VALUES ('nc-000000000001','nc','c1','10.0.0.5','sha256:ab',
          'registered','ok',NULL,'i',1.0,2.0,2.0,NULL,0,NULL,NULL,NULL,0,'',NULL);
        CREATE TABLE hook_runs (seq INTEGER PRIMARY KEY, component_id VARCHAR(64) NOT NULL,
          hook VARCHAR(255) NOT NULL, started_at FLOAT NOT NULL, duration FLOAT NOT NULL,
          outcome VARCHAR(16) NOT NULL, exit_code INTEGER, stdout TEXT NOT NULL,
          stderr TEXT NOT NULL);
        INSERT INTO hook_runs VALUES (1,'nc-000000000001','node',1.5,0.2,'ok',0,'done','');
        CREATE TABLE settings (key VARCHAR(64) PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO settings VALUES ('mode','"off"');
        """
    )
    conn.close()
    store = Store(sqlite_url(db))
    assert "added components.claimable (pre-0.1.0 database)" in store.migrated
    assert "added tokens (pre-0.1.0 database)" in store.migrated
    assert "added hook_runs.run_id (pre-0.1.0 database)" in store.migrated
    snap = store.load()
    (run,) = store.hook_runs()
    store.close()
    record = snap.records["nc-000000000001"]
    assert (record.status, record.claimable) == (Status.REGISTERED, False)
    assert (run.run_id, run.attempt, run.rerun, run.stdout) == ("seq-1", 1, False, "done")
    assert snap.trust.mode is Mode.OFF
    assert revision(db) == HEAD


def _file_state(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_a_database_newer_than_this_code_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    db = tmp_path / "registry.db"
    Store(sqlite_url(db)).close()
    conn = sqlite3.connect(db)
    conn.execute("UPDATE alembic_version SET version_num = '0099'")
    conn.commit()
    conn.close()
    before = _file_state(tmp_path)
    with pytest.raises(SchemaTooNew) as raised:
        Store(sqlite_url(db))
    message = str(raised.value)
    assert "0099" in message and HEAD in message and str(db) in message
    assert _file_state(tmp_path) == before  # not a byte changed, no copy taken


def test_two_upgraders_at_once_leave_one_upgraded_database(tmp_path: Path) -> None:
    db = load_fixture(tmp_path / "registry.db")
    before = counts(db)
    gate = tmp_path / "go"
    program = textwrap.dedent(
        f"""
        import json, os, sys, time
        from pathlib import Path
        from eucareg.store.registry import Store, sqlite_url
        gate = Path({str(gate)!r})
        deadline = time.monotonic() + 30
        while not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.001)
        store = Store(sqlite_url(Path({str(db)!r})))
        print(json.dumps(store.migrated))
        store.close()
        """
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", program],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for _ in range(2)
    ]
    gate.touch()
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    results = [json.loads(out) for out, _ in outputs]
    # One did the work, the other found it done (under the lock) and did nothing.
    assert sorted(len(r) for r in results)[0] == 0, results
    assert f"applied revision {HEAD}" in [step for r in results for step in r]
    assert len(list(tmp_path.glob("registry.db.pre-*"))) == 1
    assert counts(db) == before
    assert revision(db) == HEAD
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    conn.close()


FAILING = '''
"""A revision that dies half-way (tests only)."""
import os
import sqlalchemy as sa
from alembic import op
revision = "{next}"
down_revision = "{head}"
branch_labels = None
depends_on = None
def upgrade() -> None:
    with op.batch_alter_table("components") as batch:
        batch.add_column(sa.Column("extra", sa.Integer, nullable=True))
    op.execute("UPDATE components SET extra = 1")
    {how}
def downgrade() -> None:
    pass
'''


def _failing(tmp_path: Path, how: str) -> Path:
    versions = tmp_path / "versions"
    versions.mkdir()
    script = FAILING.replace("{how}", how).replace("{next}", NEXT).replace("{head}", HEAD)
    (versions / f"{NEXT}_fails.py").write_text(script)
    return versions


def test_a_migration_that_fails_changes_nothing(tmp_path: Path) -> None:
    db = load_fixture(tmp_path / "registry.db")
    rows = {t: dump(db, t) for t in TABLES}
    versions = _failing(tmp_path, 'raise RuntimeError("disk on fire")')
    engine = sa.create_engine(sqlite_url(db))
    with pytest.raises(RuntimeError, match="disk on fire"):
        upgrade(engine, [versions])
    engine.dispose()
    # All of it rolled back: not stamped, not indexed, no new column; the copy is there.
    assert revision(db) is None
    assert "extra" not in {
        c["name"] for c in sa.inspect(sa.create_engine(sqlite_url(db))).get_columns("components")
    }
    assert {t: dump(db, t) for t in TABLES} == rows
    assert counts(tmp_path / f"registry.db.pre-{NEXT}") == counts(db)
    # And it opens with this code's revisions as if nothing had happened.
    assert Store(sqlite_url(db)).migrated[-1] == f"applied revision {HEAD}"


def test_a_process_killed_mid_migration_leaves_a_usable_database(tmp_path: Path) -> None:
    db = load_fixture(tmp_path / "registry.db")
    rows = {t: dump(db, t) for t in TABLES}
    versions = _failing(tmp_path, "os._exit(9)")  # no cleanup, no rollback: a crash
    program = (
        "import sqlalchemy as sa, sys\n"
        "from pathlib import Path\n"
        "from eucareg.store.upgrade import upgrade\n"
        f"upgrade(sa.create_engine('sqlite:///{db}'), [Path({str(versions)!r})])\n"
    )
    done = subprocess.run([sys.executable, "-c", program], cwd=ROOT, timeout=120, check=False)
    assert done.returncode == 9
    assert revision(db) is None
    assert {t: dump(db, t) for t in TABLES} == rows
    store = Store(sqlite_url(db))
    assert store.migrated[-1] == f"applied revision {HEAD}"
    assert len(store.load().records) == len(rows["components"])
    store.close()
    assert os.path.exists(tmp_path / f"registry.db.pre-{NEXT}")


def test_a_registry_owned_by_a_running_registrar_is_not_upgraded_under_it(tmp_path: Path) -> None:
    from eucareg.store.errors import StoreBusy
    from eucareg.store.owner import hold

    db = load_fixture(tmp_path / "registry.db")
    rows = {t: dump(db, t) for t in TABLES}
    with hold(db) as pid:  # what an older, running agent holds
        assert pid is None
        with pytest.raises(StoreBusy, match="its schema is not upgraded under it"):
            Store(sqlite_url(db))
    assert revision(db) is None and {t: dump(db, t) for t in TABLES} == rows
    assert not list(tmp_path.glob("registry.db.pre-*"))
    assert Store(sqlite_url(db)).migrated[-1] == f"applied revision {HEAD}"  # once it stopped


def test_the_migrations_are_plain_sql_for_postgresql_too() -> None:
    """No server here: Alembic's offline mode renders what the revisions run on PostgreSQL."""
    from eucareg.store.upgrade import sql_script

    script = sql_script("postgresql")
    assert "PRAGMA" not in script.upper() and "sqlite" not in script.lower()
    for table in TABLES:
        assert f"CREATE TABLE {table} (" in script
    assert "seq SERIAL NOT NULL" in script  # autoincrement the PostgreSQL way
    assert "CREATE UNIQUE INDEX ix_hook_runs_run_id ON hook_runs (run_id);" in script
    assert "CREATE INDEX ix_hook_runs_outcome ON hook_runs (outcome);" in script
    assert script.rstrip().endswith("COMMIT;")  # one transaction, DDL included
    assert f"UPDATE alembic_version SET version_num='{HEAD}'" in script


def test_opening_a_rollback_journal_database_while_another_writes_waits_for_it(
    tmp_path: Path,
) -> None:
    """SQLite refuses a switch to WAL at once (no waiting) while another connection holds a
    lock; an older database not yet in WAL mode must still open, not fail "locked"."""
    import threading

    db = load_fixture(tmp_path / "registry.db")  # journal_mode=delete, as a script leaves it
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    opened: list[object] = []

    def open_store() -> None:
        try:
            store = Store(sqlite_url(db))
            opened.append(store.migrated)
            store.close()
        except Exception as exc:
            opened.append(exc)

    thread = threading.Thread(target=open_store)
    thread.start()
    thread.join(timeout=1.0)  # it waits for the lock (up to its busy timeout)
    assert thread.is_alive() and opened == []
    other.execute("COMMIT")
    other.close()
    thread.join(timeout=60)
    assert len(opened) == 1 and isinstance(opened[0], list), opened
    assert f"applied revision {HEAD}" in opened[0]
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()
