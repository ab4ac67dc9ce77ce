"""`eucareg ca rotate` on the CLC's files (a crash at every step finished by the next start, a
second rotation refused during the overlap and moving agents once more after it, refused while
the agent runs), and the registrar re-issuing every certificate under the new key: as a
renewal, once, for N+1 concurrent requests, and not again after a restart.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from eucareg.agent import collect, rotation
from eucareg.agent.cloudca import CloudCA
from eucareg.agent.identity import (
    Identity,
    ensure_cloud_ca,
    load_or_create_identity,
)
from eucareg.agent.locate import Endpoint
from eucareg.cli.main import main as cli
from eucareg.config.file import SOCKET_FILE
from eucareg.core import renewal
from eucareg.core.model import Role, Status
from eucareg.core.view import RegistrarSettings
from eucareg.pki import certificates, handover, keypairs
from eucareg.pki import credentials as cred
from eucareg.pki.cloud import read_held
from eucareg.registrar.engine import Issuer, Registrar, Timing
from eucareg.store.registry import Store, sqlite_url
from tests.factories import KEYS, ann, fresh_key, sighting

DAY = 86400.0
CLC = RegistrarSettings(
    registers=frozenset({Role.WALRUS, Role.CC, Role.SC}), observes_unmatched_nodes=True
)


def make_clc(tmp: Path) -> tuple[Path, Path, Identity]:
    state, keys = tmp / "state", tmp / "keys"
    keys.mkdir(parents=True)
    ident = load_or_create_identity(state, Role.CLC)
    ensure_cloud_ca(keys, ident)
    return state, keys, ident


def consistent(state: Path, keys: Path) -> tuple[str, handover.Handover | None]:
    """The CLC's key, cloud-cert.pem and cloud-pk.pem agree (else the agent would not start);
    the key's fingerprint, and the handover held."""
    ident = load_or_create_identity(state, Role.CLC)
    cert = ensure_cloud_ca(keys, ident)
    read_held(keys, ident.key)
    pk = keypairs.load_key(keys / cred.LAYOUTS[Role.CLC].key)
    assert keypairs.fingerprint(pk.public_key()) == ident.fingerprint
    return ident.fingerprint, handover.load_held(keys / handover.HANDOVER, cert, time.time())


def test_rotate_replaces_the_key_and_hands_over_from_the_old_one(tmp_path: Path) -> None:
    state, keys, old = make_clc(tmp_path)
    old_cert = certificates.load_cert(keys / cred.CLOUD_CERT)
    done = rotation.rotate(state, keys, 7 * DAY, time.time())
    new_fp, passed = consistent(state, keys)
    assert done.old_fingerprint == old.fingerprint != new_fp == done.new_fingerprint
    assert passed is not None and passed.old_fingerprint == old.fingerprint
    assert passed.old == old_cert and abs(passed.ends - (time.time() + 7 * DAY)) < 60
    # The component id stays, the old key is kept for the record (root only).
    assert load_or_create_identity(state, Role.CLC).component_id == old.component_id
    assert keypairs.fingerprint(keypairs.load_key(done.retired_key).public_key()) == old.fingerprint
    assert done.retired_key.stat().st_mode & 0o077 == 0
    assert not (state / "identity" / rotation.STAGE).exists()


def test_a_second_rotation_during_the_overlap_is_refused_and_changes_nothing(
    tmp_path: Path,
) -> None:
    state, keys, _ = make_clc(tmp_path)
    rotation.rotate(state, keys, 7 * DAY, time.time())
    before = {p.name: p.read_bytes() for p in keys.iterdir()}
    with pytest.raises(rotation.RotationError, match="overlap lasts until"):
        rotation.rotate(state, keys, 7 * DAY, time.time())
    assert {p.name: p.read_bytes() for p in keys.iterdir()} == before


def test_rotating_twice_moves_an_agent_that_moved_once_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """K1 -> K2, the agent moves; after the overlap K2 -> K3, and it moves again; neither an
    agent still on K1 nor a replayed K1 -> K2 handover gets anywhere."""
    state, keys, k1 = make_clc(tmp_path)
    agent_dir = tmp_path / "agent"
    key = fresh_key()
    ident = Identity("walrus-00000000000a", key, keypairs.fingerprint(key.public_key()))
    endpoint = Endpoint("10.0.0.1", 8780, k1.component_id)

    def bundle(now: float) -> dict[str, str]:
        clc = load_or_create_identity(state, Role.CLC)
        ca = certificates.load_cert(keys / cred.CLOUD_CERT)
        cert = certificates.issue_certificate(
            issuer_key=clc.key,
            issuer_cert=ca,
            subject_key=key.public_key(),
            role=Role.WALRUS,
            component_id=ident.component_id,
            cluster=None,
            now=now,
        )
        out = {
            cred.CLOUD_CERT: certificates.cert_pem(ca),
            "walrus-cert.pem": certificates.cert_pem(cert),
        }
        if (keys / handover.HANDOVER).exists():
            out[handover.HANDOVER] = (keys / handover.HANDOVER).read_text()
        return out

    def pinned() -> str:
        return certificates.cert_fingerprint(certificates.load_cert(agent_dir / cred.CLOUD_CERT))

    now = time.time()
    collect._accept(
        bundle(now), Role.WALRUS, ident, endpoint, agent_dir, None, k1.fingerprint, None
    )
    rotation.rotate(state, keys, 600, now)
    first_handover = (keys / handover.HANDOVER).read_text()
    k2 = consistent(state, keys)[0]
    collect._accept(bundle(now), Role.WALRUS, ident, endpoint, agent_dir, "x", pinned(), None)
    assert pinned() == k2
    # After the first overlap has ended (the agent's clock moved on with it): K2 -> K3.
    later = now + 700
    rotation.rotate(state, keys, 600, later)
    k3 = certificates.cert_fingerprint(certificates.load_cert(keys / cred.CLOUD_CERT))
    assert k3 not in (k1.fingerprint, k2)
    monkeypatch.setattr(collect, "time", _At(later + 1))
    b3 = bundle(later)
    # An agent still on K1 cannot jump to K3: the handover is from K2 (one step only).
    with pytest.raises(keypairs.CredentialError, match="its handover is from"):
        collect._accept(
            b3, Role.WALRUS, ident, endpoint, tmp_path / "x", None, k1.fingerprint, None
        )
    # A replayed first handover next to the K3 CA moves the K2 agent nowhere.
    replayed = {**b3, handover.HANDOVER: first_handover}
    with pytest.raises(keypairs.CredentialError, match="rogue"):
        collect._accept(replayed, Role.WALRUS, ident, endpoint, agent_dir, "x", k2, None)
    assert pinned() == k2
    # The genuine second handover moves it again.
    moved = collect._accept(b3, Role.WALRUS, ident, endpoint, agent_dir, "x", k2, None)
    assert moved is collect.Outcome.RENEWED and pinned() == k3


class _At:
    """A clock stopped at `t` (what collect reads as time.time())."""

    def __init__(self, t: float) -> None:
        self.t = t

    def time(self) -> float:
        return self.t


@pytest.mark.parametrize("crash_at", range(1, 10))  # 4 staged writes, then 5 applied
def test_a_crash_at_any_step_is_finished_or_undone_by_the_next_start(
    tmp_path: Path, crash_at: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every file write of a rotation fails in turn (the process dies there); the next start
    (loading the CLC's identity) leaves the key, cloud-cert.pem and cloud-pk.pem agreeing:
    the old key if the stage was not committed, else the new one with its handover."""
    state, keys, old = make_clc(tmp_path)
    real, calls = cred.write_atomic, [0]

    def dying(path: Path, data: bytes, mode: int = 0o600) -> None:
        calls[0] += 1
        if calls[0] == crash_at:
            raise OSError("simulated crash")
        real(path, data, mode)

    monkeypatch.setattr(cred, "write_atomic", dying)
    with pytest.raises(OSError, match="simulated crash"):
        rotation.rotate(state, keys, DAY, time.time())
    monkeypatch.setattr(cred, "write_atomic", real)
    fp, passed = consistent(state, keys)  # the agent's start: finishes a committed rotation
    committed = crash_at > 4  # the stage's four files, then the rename
    assert (fp != old.fingerprint) is committed
    assert (passed is not None) is committed
    assert not (state / "identity" / rotation.STAGE).exists()
    assert not (state / "identity" / f"{rotation.STAGE}.tmp").exists()
    if committed:
        assert passed is not None and passed.old_fingerprint == old.fingerprint


def test_an_unusable_stage_stops_the_start_with_its_reason(tmp_path: Path) -> None:
    state, keys, _ = make_clc(tmp_path)
    (state / "identity" / rotation.STAGE).mkdir()
    with pytest.raises(keypairs.CredentialError, match="unusable staged rotation"):
        load_or_create_identity(state, Role.CLC)
    # Nothing was changed meanwhile.
    (state / "identity" / rotation.STAGE).rmdir()
    consistent(state, keys)


def test_the_cli_refuses_while_the_agent_runs_and_reports_a_rotation(tmp_path: Path) -> None:
    state, keys, old = make_clc(tmp_path)
    config = tmp_path / "eucareg.toml"
    config.write_text(
        f'address = "10.0.0.1"\nstate_dir = "{state}"\nkey_dir = "{keys}"\n'
        "[components]\nclc = {}\n"
    )
    runner = CliRunner()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listening:
        listening.bind(str(state / SOCKET_FILE))
        listening.listen(1)
        refused = runner.invoke(cli, ["ca", "rotate", "--config", str(config), "--yes"])
        assert refused.exit_code == 1, refused.output
        assert "the agent is running" in refused.output
    (state / SOCKET_FILE).unlink()
    bad = runner.invoke(cli, ["ca", "rotate", "--config", str(config), "--yes", "--overlap", "1s"])
    assert bad.exit_code == 2 and "--overlap: must be at least 10m" in bad.output
    assert consistent(state, keys)[0] == old.fingerprint
    done = runner.invoke(cli, ["ca", "rotate", "--config", str(config), "--yes", "--json"])
    assert done.exit_code == 0, done.output
    assert f'"previous_fingerprint": "{old.fingerprint}"' in done.output
    shown = runner.invoke(cli, ["ca", "show", "--config", str(config), "--json"])
    assert f'"handover_from": "{old.fingerprint}"' in shown.output


async def test_the_running_clc_serves_the_handover_until_it_ends(tmp_path: Path) -> None:
    state, keys, _ = make_clc(tmp_path)
    now = time.time()
    rotation.rotate(state, keys, 600, now)
    ident = load_or_create_identity(state, Role.CLC)
    changes: list[float] = []
    clock = [now]

    async def changed() -> None:
        changes.append(clock[0])

    ca = CloudCA(keys, ident.key, read_held(keys, ident.key), changed, clock=lambda: clock[0])
    assert await ca.check() and ca.handover_ends is not None
    assert ca.due_at == ca.handover_ends  # the loop wakes when it ends
    assert not await ca.check()
    clock[0] = ca.handover_ends + 1
    assert await ca.check() and ca.handover_ends is None
    assert len(changes) == 2  # the server contexts are rebuilt without the old CA


# -- the registrar re-issuing under the new key ------------------------------------------------


async def make_registrar(tmp: Path, issuer: list[Issuer]) -> Registrar:
    reg = Registrar(
        Store(sqlite_url(tmp / "registry.db")),
        CLC,
        hook_dir=tmp / "hooks",
        timing=Timing(retry_base=0.05, retry_max=0.2, hook_timeout=5),
        issuer_for=lambda _role: issuer[0],
        master_key=b"test-master-key",
    )
    await reg.start()
    await reg.open_install_window(3600)
    return reg


async def registered(reg: Registrar, n: int) -> list[tuple[str, keypairs.PrivateKey]]:
    out = []
    for i in range(n):
        cc = ann(Role.CC, f"c{i}")
        reg.on_sighting(sighting(cc))
        out.append((cc.component_id, KEYS[cc.fingerprint]))
    for _ in range(200):
        await reg.idle()
        done = 0
        for cid, key in out:
            record = reg.memory.records.get(cid)
            if record is not None and record.status is Status.AWAITING_KEY:
                await reg.credentials(cid, key.public_key(), wait=0)
            if record is not None and record.status is Status.REGISTERED:
                done += 1
        if done == n:
            return out
        await asyncio.sleep(0.02)
    raise AssertionError("not registered")


def serial(files: dict[str, str] | None) -> str:
    assert files is not None
    return format(certificates.load_cert_pem(files["cluster-cert.pem"]).serial_number, "x")


async def test_every_certificate_is_reissued_under_the_new_key_once_as_a_renewal(
    tmp_path: Path,
) -> None:
    state, keys, old = make_clc(tmp_path)
    old_ca = certificates.load_cert(keys / cred.CLOUD_CERT)
    issuer = [Issuer(key=old.key, cert=old_ca, cloud_cert=old_ca)]
    reg = await make_registrar(tmp_path, issuer)
    try:
        ccs = await registered(reg, 3)
        first = {
            cid: serial((await reg.credentials(cid, k.public_key(), 0)).files) for cid, k in ccs
        }
        runs = len(reg.store.hook_runs())
        rotation.rotate(state, keys, DAY, time.time())
        new = load_or_create_identity(state, Role.CLC)
        new_ca = certificates.load_cert(keys / cred.CLOUD_CERT)
        pem = (keys / handover.HANDOVER).read_text()
        issuer[0] = Issuer(key=new.key, cert=new_ca, cloud_cert=new_ca, handover=pem)
        # N+1 concurrent requests (a watch and its retries): one new certificate per CC.
        answers = await asyncio.gather(
            *(
                reg.credentials(cid, k.public_key(), 0, have=first[cid])
                for cid, k in ccs
                for _ in range(4)
            )
        )
        for cid, _key in ccs:
            got = [
                a
                for a, (c, _) in zip(answers, [x for x in ccs for _ in range(4)], strict=True)
                if c == cid
            ]
            serials = {serial(a.files) for a in got}
            assert len(serials) == 1 and first[cid] not in serials
            files = got[0].files
            assert files is not None and files[handover.HANDOVER] == pem
            cert = certificates.load_cert_pem(files["cluster-cert.pem"])
            cert.verify_directly_issued_by(new_ca)
            codes = [e.code for e in reg.store.events(component_id=cid, kind="credentials")]
            assert codes.count("renewed") == 1 and "revoked" not in codes
            assert reg.memory.records[cid].status is Status.REGISTERED
            assert first[cid] not in reg.memory.revoked  # the old one ends by itself
        assert len(reg.store.hook_runs()) == runs  # no hook ran again
    finally:
        await reg.close()
    # A registrar restart during the overlap: nothing is issued again.
    again = await make_registrar(tmp_path, issuer)
    try:
        for cid, key in ccs:
            answer = await again.credentials(cid, key.public_key(), 0)
            codes = [e.code for e in again.store.events(component_id=cid, kind="credentials")]
            assert codes.count("renewed") == 1, codes
            assert answer.files is not None and handover.HANDOVER in answer.files
    finally:
        await again.close()
    assert renewal.DEFAULT_POLICY.margin > 0  # (the default policy: nothing was due by time)


async def test_after_a_registrar_restart_the_first_watch_gets_the_handover_at_once(
    tmp_path: Path,
) -> None:
    """A component whose chain changed while its registrar restarted cannot say so (`have` is
    its own serial): its first watch during the handover is answered at once, the next holds."""
    state, keys, _old = make_clc(tmp_path)
    rotation.rotate(state, keys, DAY, time.time())
    new = load_or_create_identity(state, Role.CLC)
    new_ca = certificates.load_cert(keys / cred.CLOUD_CERT)
    pem = (keys / handover.HANDOVER).read_text()
    issuer = [Issuer(key=new.key, cert=new_ca, cloud_cert=new_ca, handover=pem)]
    reg = await make_registrar(tmp_path, issuer)
    try:
        [(cid, key)] = await registered(reg, 1)
        have = serial((await reg.credentials(cid, key.public_key(), 0)).files)
    finally:
        await reg.close()
    again = await make_registrar(tmp_path, issuer)
    try:
        started = time.monotonic()
        first = await again.credentials(cid, key.public_key(), 5.0, have=have)
        assert time.monotonic() - started < 2.0
        assert first.files is not None and first.files[handover.HANDOVER] == pem
        started = time.monotonic()
        await again.credentials(cid, key.public_key(), 0.5, have=have)
        assert time.monotonic() - started >= 0.45  # held: nothing new to tell
    finally:
        await again.close()
