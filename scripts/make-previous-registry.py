"""Make the registry fixture of the previous release (tests/data/registry-0.1.0.sql).

Run it with eucareg 0.1.0 (git commit 23314c7) on the path, never with the current code:

    git worktree add /tmp/prev 23314c7
    PYTHONPATH=/tmp/prev .venv/bin/python scripts/make-previous-registry.py \
        tests/data/registry-0.1.0.sql
    git worktree remove /tmp/prev

It fills every table of 0.1.0's registry through 0.1.0's own store API (Store.apply, as the
registrar writes): registered and pending components, a token with uses (one spent), a revoked
certificate, issued certificates signed by a real cloud CA, events, hook runs (one interrupted,
one of a batch) and trust settings; then writes the database as a text SQL dump that a reviewer
can read. Times are fixed so that the dump is the same on every run (keys and serials are not).
"""

from __future__ import annotations

import sqlite3
import sys
import tempfile
from pathlib import Path

import eucareg
from eucareg.core.model import HookOutcome, HookRun, IssuedCertificate, NewEvent, Record, Role
from eucareg.core.model import Status as S
from eucareg.core.transitions import TokenChange, TokenUse, Write
from eucareg.core.trust import Mode, Task, Token, TrustSettings
from eucareg.pki import certificates, keypairs
from eucareg.store.registry import Store, sqlite_url

T0 = 1_780_000_000.0  # 2026-05-28: a fixed clock, so the dump reads the same every time


def _cert(
    ca_key: keypairs.PrivateKey, ca: object, role: Role, cid: str, cluster: str | None
) -> str:
    key = keypairs.generate_key()
    cert = certificates.issue_certificate(
        issuer_key=ca_key,
        issuer_cert=ca,  # type: ignore[arg-type]
        subject_key=key.public_key(),
        role=role,
        component_id=cid,
        cluster=cluster,
    )
    return certificates.cert_pem(cert)


def _record(cid: str, role: Role, cluster: str | None, n: int, status: S, **kw: object) -> Record:
    return Record(
        component_id=cid,
        role=role,
        cluster=cluster,
        address=f"10.77.1.{10 + n}",
        fingerprint=f"sha256:{n:064x}",
        status=status,
        reason=str(kw.pop("reason", "registered by the site hook")),
        instance=f"host{n}-{role.value}-{cid[-12:]}",
        first_seen=T0 + n,
        updated_at=T0 + 100 + n,
        **kw,  # type: ignore[arg-type]
    )


def _event(at: float, rec: Record, kind: str, code: str, reason: str) -> NewEvent:
    return NewEvent(
        at, rec.component_id, rec.role.value, rec.cluster, rec.address, kind, code, reason
    )


def fill(store: Store) -> None:
    ca_key = keypairs.generate_key()
    ca = certificates.create_cloud_ca(ca_key, "clc-0000000000c1")
    ca_fp = certificates.cert_fingerprint(ca)
    walrus = _record(
        "walrus-0000000000a1",
        Role.WALRUS,
        None,
        1,
        S.REGISTERED,
        registered_at=T0 + 101,
        credentials_issued_at=T0 + 102,
        credentials_collected_at=T0 + 103,
        admitted_by="install-window",
    )
    cc = _record(
        "cc-0000000000b1",
        Role.CC,
        "cluster01",
        2,
        S.REGISTERED,
        registered_at=T0 + 102,
        credentials_issued_at=T0 + 103,
        credentials_collected_at=T0 + 104,
        admitted_by="token:tok0000000000001",
        approved=True,
    )
    sc = _record(
        "sc-0000000000b2",
        Role.SC,
        "cluster01",
        3,
        S.PENDING,
        reason="waiting for the operator's approval",
        waiting_for="approval",
        attempts=2,
        next_retry_at=T0 + 400,
        claimable=True,
    )
    old_cc = _record(
        "cc-0000000000b0",
        Role.CC,
        "cluster02",
        4,
        S.REPLACED,
        reason="a reinstalled machine took its address",
        expires_at=T0 + 9000,
    )
    failed = _record(
        "walrus-0000000000a2",
        Role.WALRUS,
        None,
        5,
        S.FAILED,
        reason="hook walrus exited 1",
        attempts=3,
        next_retry_at=T0 + 700,
        admitted_by="token:tok0000000000001",
        replaces=None,
    )
    records = (walrus, cc, sc, old_cc, failed)
    token = Token(
        token_id="tok0000000000001",
        role=Role.CC,
        cluster="cluster01",
        created_at=T0,
        expires_at=T0 + 86400,
        uses=3,
        revoked_at=None,
        ca_fingerprint=ca_fp,
    )
    revoked_token = Token(
        token_id="tok0000000000002",
        role=Role.WALRUS,
        cluster=None,
        created_at=T0 + 5,
        expires_at=T0 + 3600,
        uses=None,
        revoked_at=T0 + 50,
        ca_fingerprint=ca_fp,
    )
    certs = tuple(
        IssuedCertificate(
            r.component_id,
            r.fingerprint,
            f"{0x1000 + i:x}",
            _cert(ca_key, ca, r.role, r.component_id, r.cluster),
            T0 + 103 + i,
        )
        for i, r in enumerate((walrus, cc, old_cc))
    )
    store.apply(
        [
            Write(
                records=records,
                tokens=(token, revoked_token),
                certificates=certs,
                trust=TrustSettings(
                    mode=Mode.ANY,
                    locked=frozenset({Task.CC}),
                    install_until=T0 + 1800,
                ),
                events=tuple(
                    _event(
                        T0 + 100 + i,
                        r,
                        "decision",
                        "registered" if r.status is S.REGISTERED else r.status.value,
                        r.reason,
                    )
                    for i, r in enumerate(records)
                ),
                hook_runs=(
                    HookRun(
                        "run-walrus-1",
                        walrus.component_id,
                        "walrus",
                        T0 + 100,
                        HookOutcome.OK,
                        1.25,
                        0,
                        "registered walrus at 10.77.1.11\n",
                        "",
                    ),
                    HookRun(
                        "run-cc-1",
                        cc.component_id,
                        "cluster",
                        T0 + 101,
                        HookOutcome.OK,
                        0.5,
                        0,
                        "",
                        "",
                        batch="batch-0001",
                    ),
                    HookRun(
                        "run-failed-1",
                        failed.component_id,
                        "walrus",
                        T0 + 102,
                        HookOutcome.FAILED,
                        2.0,
                        1,
                        "",
                        "euca_conf: no such host\n",
                        attempt=3,
                    ),
                    HookRun(
                        "run-failed-0",
                        failed.component_id,
                        "walrus",
                        T0 + 99,
                        HookOutcome.INTERRUPTED,
                        0.0,
                        None,
                        "",
                        "",
                        pgid=4242,
                        proc_start=123456789,
                    ),
                ),
            ),
            Write(
                token_uses=(
                    TokenUse(token.token_id, cc.component_id, TokenChange.RESERVE),
                    TokenUse(token.token_id, failed.component_id, TokenChange.RESERVE),
                ),
                events=(_event(T0 + 110, cc, "token", "token-used", "admitted by token"),),
            ),
            Write(
                token_uses=(TokenUse(token.token_id, old_cc.component_id, TokenChange.SPEND),),
                revoke=(old_cc.component_id,),
                revoke_reason="deregistered by the operator",
                events=(_event(T0 + 120, old_cc, "operator", "deregistered", "by the operator"),),
            ),
        ]
    )


def main(out: Path) -> None:
    assert eucareg.__file__ is not None
    print(f"eucareg from {Path(eucareg.__file__).parent}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "registry.db"
        store = Store(sqlite_url(db))
        fill(store)
        store.close()
        conn = sqlite3.connect(db)
        dump = "\n".join(conn.iterdump()) + "\n"
        conn.close()
    out.write_text(
        "-- The registry of eucareg 0.1.0 (git 23314c7), made by "
        "scripts/make-previous-registry.py;\n"
        "-- load it with sqlite3.Connection.executescript. Do not edit by hand.\n" + dump
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
