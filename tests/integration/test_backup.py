"""Backup and restore of a running lab CLC: back it up while it serves, lose its whole state
directory, restore, restart, and find the same cloud — every registration, token and the CA
fingerprint back, its components still registered (no hook runs, nothing registered again).
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import pytest

from eucalab.cloud import LabCloud
from eucalab.cloud_probes import all_registered
from eucareg.pki import certificates
from eucareg.pki import credentials as cred
from tests.integration.conftest import CloudFactory
from tests.unit.test_migrations import HEAD

pytestmark = pytest.mark.integration

PLAN: dict[str, dict[str, str | None]] = {
    "cloud": {"clc": None, "cc": "cluster1"},
    "node1": {"nc": "cluster1"},
}
WAIT = 90.0
PASSPHRASE = "lab passphrase, long enough"


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.2)


def rows(cloud: LabCloud) -> dict[str, dict[str, Any]]:
    return {r["component_id"]: r for r in cloud.registry("cloud")}


def kept(row: dict[str, Any]) -> tuple[Any, ...]:
    keys = ("role", "cluster", "address", "fingerprint", "status", "registered_at", "admitted_by")
    return tuple(row.get(k) for k in keys)


def ca_fingerprint(cloud: LabCloud) -> str:
    return certificates.cert_fingerprint(
        certificates.load_cert(cloud.key_dir("cloud") / cred.CLOUD_CERT)
    )


def test_a_restored_clc_is_the_same_registrar(cloud_factory: CloudFactory) -> None:
    cloud = cloud_factory(PLAN)
    cloud.start_all()
    cloud.wait_for("cloud", all_registered(cloud.expected()), timeout=WAIT)
    wait_until(cloud.credentials_complete, WAIT, "credentials written on every host")
    token = cloud.cli("cloud", "token", "create", "--role", "nc", "--cluster", "cluster1")
    assert token.stdout.startswith("eucareg1.")
    before = {cid: kept(r) for cid, r in rows(cloud).items()}
    assert {r[4] for r in before.values()} == {"registered"}
    tokens = cloud.api("cloud", "/v1/tokens")["tokens"]
    hook_runs = cloud.hook_runs("cloud")
    hooks_log = cloud.hook_log("cloud")
    fingerprint = ca_fingerprint(cloud)
    identity = {
        p.name: p.read_bytes() for p in (cloud.host_dir("cloud") / "state" / "identity").iterdir()
    }
    passfile = cloud.workdir / "passphrase"
    passfile.write_text(PASSPHRASE + "\n")
    archive = cloud.workdir / "cloud.eucareg"

    # Backed up while it runs (a consistent snapshot); a restore now is refused.
    made = cloud.cli("cloud", "backup", str(archive), "--passphrase-file", str(passfile))
    assert "NOT encrypted" not in made.stderr
    busy = cloud.cli(
        "cloud", "restore", str(archive), "--passphrase-file", str(passfile), check=False
    )
    # Rich wraps the message at the terminal's width (the path's length decides where).
    assert busy.returncode == 5 and "stop the agent before restoring" in " ".join(
        busy.stderr.split()
    )

    # The CLC's disk is lost: the agent stops, its state directory goes.
    cloud.stop("cloud")
    shutil.rmtree(cloud.host_dir("cloud") / "state")
    restored = cloud.cli("cloud", "restore", str(archive), "--passphrase-file", str(passfile))
    assert "create" in restored.stdout and "replace" not in restored.stdout
    db = sqlite3.connect(cloud.host_dir("cloud") / "state" / "registry.db")
    seq_restored = db.execute("SELECT max(seq) FROM events").fetchone()[0]
    db.close()
    cloud.start("cloud")
    cloud.wait_for_api("cloud")

    assert ca_fingerprint(cloud) == fingerprint
    assert {
        p.name: p.read_bytes() for p in (cloud.host_dir("cloud") / "state" / "identity").iterdir()
    } == identity
    assert cloud.api("cloud", "/v1/tokens")["tokens"] == tokens
    # The proof that it heard its components again: each one online, as registered as before.
    wait_until(
        lambda: all(r.get("online") for r in rows(cloud).values()),
        WAIT,
        "every component heard again by the restored registrar",
    )
    assert {cid: kept(r) for cid, r in rows(cloud).items()} == before
    assert cloud.hook_runs("cloud") == hook_runs
    assert cloud.hook_log("cloud") == hooks_log
    since = [e for e in cloud.events("cloud") if e["seq"] > seq_restored]
    assert not [e for e in since if e["kind"] in ("registering", "registered", "hook")], since

    # A registry a newer eucareg upgraded: the agent refuses it, naming both revisions, and
    # leaves it as it was.
    cloud.stop("cloud")
    db = sqlite3.connect(cloud.host_dir("cloud") / "state" / "registry.db")
    db.execute("UPDATE alembic_version SET version_num = '0099'")
    db.commit()
    count = db.execute("SELECT count(*) FROM components").fetchone()[0]
    db.close()
    proc = cloud.start("cloud")
    assert proc.wait_exit(WAIT) == 1
    assert "agent cannot run" in proc.log_text()
    assert f"schema revision 0099, which this eucareg does not know (it knows up to {HEAD})" in (
        proc.log_text()
    )
    db = sqlite3.connect(cloud.host_dir("cloud") / "state" / "registry.db")
    assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [("0099",)]
    assert db.execute("SELECT count(*) FROM components").fetchone()[0] == count
    db.close()
