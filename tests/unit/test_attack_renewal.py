"""Attack review of certificate renewal (issue 10): concurrent and replayed renewals, renewals
asked for by deregistered, re-keyed or other components, clock skew both ways, a tampered or
foreign cloud-cert.pem in the CLC's key_dir, `eucareg ca renew` racing itself and the agent, and
the lifetime settings at their limits.

Tests marked `xfail(strict=True, reason="DEFECT: ...")` assert the promised behaviour and fail
today. The others pin an attack that held (or a defect fixed with this review). Real registrars
on SQLite files with an injected clock, real certificates; negative checks wait for the answer
that decides them, never for a fixed time.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from eucareg.agent.cloudca import CloudCA, renew_held
from eucareg.cli.main import main
from eucareg.config.file import from_mapping
from eucareg.config.values import ConfigError
from eucareg.core import grammar, renewal
from eucareg.core.model import Role
from eucareg.core.view import RegistrarSettings
from eucareg.pki import certificates, keypairs
from eucareg.pki import credentials as cred
from eucareg.pki.cloud import read_held
from eucareg.registrar.desk import CredentialRefused
from eucareg.registrar.engine import Issuer, Registrar, Timing
from eucareg.store.registry import Store, sqlite_url
from tests.factories import KEYS, ann, sighting
from tests.unit.test_registrar import settle
from tests.unit.test_renewal import HOUR, SHORT, Clock, registrar_with_cc, serial_of
from tests.unit.test_renewal_ca import PATIENCE, _config, clc_dir, running_ca

YEAR = 365 * 86400.0


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    key = keypairs.generate_key()
    ca = certificates.create_cloud_ca(key, "attack-renewal")
    return Issuer(key=key, cert=ca, cloud_cert=ca, policy=SHORT)


def renewed_count(reg: Registrar, cid: str) -> int:
    return [e.code for e in reg.store.events(component_id=cid, kind="credentials")].count("renewed")


# -- concurrent and replayed renewals -----------------------------------------------------------


async def test_n_plus_one_concurrent_watches_and_requests_get_one_new_serial(
    tmp_path: Path, issuer: Issuer
) -> None:
    clock = Clock()
    async with registrar_with_cc(tmp_path, issuer, clock) as (reg, cid, key):
        old = serial_of((await reg.credentials(cid, key.public_key(), wait=0)).files)
        clock.offset = HOUR - 600  # due
        asks = [reg.credentials(cid, key.public_key(), wait=5, have=old) for _ in range(6)]
        asks += [reg.credentials(cid, key.public_key(), wait=0) for _ in range(5)]
        answers = await asyncio.wait_for(asyncio.gather(*asks), 30)
        serials = {serial_of(a.files) for a in answers}
        assert len(serials) == 1 and old not in serials
        assert renewed_count(reg, cid) == 1


async def test_a_replayed_old_serial_gets_the_new_bundle_and_no_second_renewal(
    tmp_path: Path, issuer: Issuer
) -> None:
    clock = Clock()
    async with registrar_with_cc(tmp_path, issuer, clock) as (reg, cid, key):
        old = serial_of((await reg.credentials(cid, key.public_key(), wait=0)).files)
        clock.offset = HOUR - 600
        new = serial_of((await reg.credentials(cid, key.public_key(), wait=0)).files)
        for _ in range(3):  # a watch naming the old serial answers at once with the new one
            answer = await asyncio.wait_for(
                reg.credentials(cid, key.public_key(), wait=30, have=old), 5
            )
            assert serial_of(answer.files) == new
        assert renewed_count(reg, cid) == 1


async def test_a_deregistered_component_gets_no_renewal(tmp_path: Path, issuer: Issuer) -> None:
    clock = Clock()
    async with registrar_with_cc(tmp_path, issuer, clock) as (reg, cid, key):
        old = serial_of((await reg.credentials(cid, key.public_key(), wait=0)).files)
        await reg.deregister(reg.memory.records[cid])
        clock.offset = HOUR - 600  # due, if it still counted
        for have in (old, None):
            try:
                answer = await reg.credentials(cid, key.public_key(), wait=0, have=have)
            except CredentialRefused as refused:
                assert refused.status == 410
            else:
                assert have is None and answer.files is None
        assert renewed_count(reg, cid) == 0
        assert cid not in reg.memory.certificates or reg.memory.certificates[cid].serial == old


async def test_a_renewal_asked_with_another_component_s_key_gets_nothing(
    tmp_path: Path, issuer: Issuer
) -> None:
    clock = Clock()
    async with registrar_with_cc(tmp_path, issuer, clock) as (reg, cid, _):
        other = ann(Role.SC, "c1")
        reg.on_sighting(sighting(other))
        clock.offset = HOUR - 600
        stranger = KEYS[other.fingerprint]
        with pytest.raises(CredentialRefused) as refused:
            await reg.credentials(cid, stranger.public_key(), wait=0)
        assert refused.value.status == 403
        assert renewed_count(reg, cid) == 0


# -- clock skew ---------------------------------------------------------------------------------


async def test_a_registrar_clock_set_back_renews_once_not_in_a_storm(
    tmp_path: Path, issuer: Issuer
) -> None:
    """Issued while the registrar's clock ran 2 hours ahead, then set right: the certificate is
    not valid yet, so it is replaced once, and the replacement is kept."""
    clock = Clock()
    clock.offset = 2 * HOUR
    async with registrar_with_cc(tmp_path, issuer, clock) as (reg, cid, key):
        ahead = serial_of((await reg.credentials(cid, key.public_key(), wait=0)).files)
        clock.offset = 0.0
        fixed = {
            serial_of((await reg.credentials(cid, key.public_key(), wait=0)).files)
            for _ in range(5)
        }
        assert len(fixed) == 1 and ahead not in fixed
        assert renewed_count(reg, cid) == 1
        # Jumping ahead past the end, then back: each jump renews once at most.
        clock.offset = 2 * HOUR
        await reg.credentials(cid, key.public_key(), wait=0)
        clock.offset = 0.0
        await reg.credentials(cid, key.public_key(), wait=0)
        await reg.credentials(cid, key.public_key(), wait=0)
        assert renewed_count(reg, cid) == 3


def test_a_component_clock_behind_or_ahead_never_takes_a_bundle_it_cannot_use(
    issuer: Issuer,
) -> None:
    key = keypairs.generate_key()
    now = datetime.datetime.now(datetime.UTC).timestamp()
    cert = certificates.issue_certificate(
        issuer_key=issuer.key,
        issuer_cert=issuer.cert,
        subject_key=key.public_key(),
        role=Role.CC,
        component_id="cc-000000000001",
        cluster="c1",
        now=now,
        lifetime=datetime.timedelta(hours=1),
    )
    files = {cred.CLOUD_CERT: certificates.cert_pem(issuer.cloud_cert).encode()}
    files["cluster-cert.pem"] = certificates.cert_pem(cert).encode()
    cred.check_current(files, now)  # by a right clock: fine
    for skew in (-3 * HOUR, +3 * HOUR):  # the component's clock behind, then ahead
        with pytest.raises(keypairs.CredentialError, match="not valid now"):
            cred.check_current(files, now + skew)


# -- a tampered or foreign cloud-cert.pem -------------------------------------------------------


def forged_for(key: keypairs.PrivateKey, held: x509.Certificate) -> x509.Certificate:
    """A certificate for the CLC's *public* key (anyone has it) under the CLC's own name, but
    signed by another key: what a writer of key_dir can make without the CLC's key."""
    rogue = keypairs.generate_key()
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(held.subject)
        .issuer_name(held.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=36500))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(rogue, hashes.SHA256())
    )


def genuine(cert: x509.Certificate, key: keypairs.PrivateKey) -> bool:
    try:
        cert.verify_directly_issued_by(cert)
    except Exception:
        return False
    return certificates.cert_fingerprint(cert) == keypairs.fingerprint(key.public_key())


async def test_a_forged_ca_for_the_clc_key_found_at_start_is_never_served(tmp_path: Path) -> None:
    """The agent starts with what key_dir holds (its fingerprint is the CLC's, so it is
    loaded): the first check must replace it by a certificate the CLC's key signed, on disk
    too, before anything is served."""
    key_dir, key = clc_dir(tmp_path)
    forged = forged_for(key, read_held(key_dir, key))
    cred.write_atomic(key_dir / cred.CLOUD_CERT, certificates.cert_pem(forged).encode())
    changes: list[x509.Certificate] = []

    async def changed() -> None:
        changes.append(ca.cert)

    ca = CloudCA(key_dir, key, forged, changed)
    await ca.check()
    assert genuine(ca.cert, key) and ca.cert != forged
    assert ca.cert.subject == forged.subject  # the name certificates were issued under
    assert read_held(key_dir, key) == ca.cert  # and the file is the CLC's again
    assert changes == [ca.cert]


@pytest.mark.parametrize("kind", ["foreign", "forged", "garbage", "empty"])
async def test_a_foreign_or_damaged_cloud_cert_written_while_running_is_put_back(
    tmp_path: Path, kind: str
) -> None:
    """Someone who can write key_dir (the eucalyptus user) replaces cloud-cert.pem: the CLC
    keeps serving its own certificate and writes it back, so that nothing else on this host
    reading key_dir (a CC here, Eucalyptus) ever takes the foreign one as the cloud CA."""
    key_dir, key = clc_dir(tmp_path)
    held = read_held(key_dir, key)
    changes: list[int] = []

    async def changed() -> None:
        changes.append(1)

    ca = CloudCA(key_dir, key, held, changed)
    other = {
        "foreign": certificates.cert_pem(
            certificates.create_cloud_ca(keypairs.generate_key(), "rogue")
        ).encode(),
        "forged": certificates.cert_pem(forged_for(key, held)).encode(),
        "garbage": b"\x00not a certificate\xff",
        "empty": b"",
    }[kind]
    cred.write_atomic(key_dir / cred.CLOUD_CERT, other)
    assert await ca.check() is False
    assert ca.cert == held and changes == []
    assert (key_dir / cred.CLOUD_CERT).read_bytes() == certificates.cert_pem(held).encode()


async def test_a_due_ca_is_renewed_even_with_a_foreign_file_on_disk(tmp_path: Path) -> None:
    clock = Clock()
    key_dir, key = clc_dir(tmp_path, issued_at=clock() - 14 * YEAR)  # due
    held = read_held(key_dir, key)
    other = certificates.create_cloud_ca(keypairs.generate_key(), "rogue")
    cred.write_atomic(key_dir / cred.CLOUD_CERT, certificates.cert_pem(other).encode())

    async def changed() -> None:
        return None

    ca = CloudCA(key_dir, key, held, changed, clock=clock)
    assert await ca.check() is True
    assert genuine(ca.cert, key) and ca.cert.serial_number != held.serial_number
    assert renewal.phase(certificates.validity(ca.cert), renewal.ca_margin(), clock()) is (
        renewal.Phase.CURRENT
    )
    assert read_held(key_dir, key) == ca.cert


# -- eucareg ca renew racing ----------------------------------------------------------------------


async def test_ca_renew_twice_at_once_while_the_agent_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two `eucareg ca renew` at once (threads) while the agent runs on: both succeed, and the
    agent settles on the one left on disk, announced, for the same key. The later-written
    renewal may be the older (the two straddle a second): the agent then writes back the one
    it serves, without announcing anything, so the settling is waited for, not a change."""
    key_dir, key = clc_dir(tmp_path)
    held = read_held(key_dir, key)
    async with running_ca(key_dir, key, held, monkeypatch) as agent:
        ca = agent.ca

        def renew() -> x509.Certificate:
            return renew_held(key_dir, key, datetime.datetime.now().timestamp())

        # Not joined on the event loop: the agent takes up the first while the second runs.
        outcomes = await asyncio.wait_for(
            asyncio.gather(
                asyncio.to_thread(renew), asyncio.to_thread(renew), return_exceptions=True
            ),
            PATIENCE,
        )
        errors = [o for o in outcomes if not isinstance(o, x509.Certificate)]
        results = [o for o in outcomes if isinstance(o, x509.Certificate)]
        assert errors == [] and len(results) == 2
        await agent.until(lambda: agent.changes != [], "change announced")
        await agent.until(lambda: ca.cert == read_held(key_dir, key), "settling on the file")
        on_disk = read_held(key_dir, key)
        assert ca.cert == on_disk and on_disk in results and genuine(on_disk, key)
        assert agent.changes[-1] == ca.cert  # what it serves was announced
        assert certificates.cert_fingerprint(ca.cert) == certificates.cert_fingerprint(held)


def test_ca_renew_without_an_agent_and_ca_show_after(tmp_path: Path) -> None:
    key_dir, key = clc_dir(tmp_path)
    config = _config(tmp_path, key)
    runner = CliRunner()
    for _ in range(2):
        done = runner.invoke(main, ["ca", "renew", "--config", str(config)])
        assert done.exit_code == 0, done.output
    shown = runner.invoke(main, ["ca", "show", "--config", str(config)])
    assert shown.exit_code == 0 and "current" in shown.output
    assert genuine(read_held(key_dir, key), key)


def test_ca_renew_refuses_a_forged_certificate_for_its_key(tmp_path: Path) -> None:
    key_dir, key = clc_dir(tmp_path)
    forged = forged_for(key, read_held(key_dir, key))
    cred.write_atomic(key_dir / cred.CLOUD_CERT, certificates.cert_pem(forged).encode())
    result = CliRunner().invoke(main, ["ca", "renew", "--config", str(_config(tmp_path, key))])
    assert result.exit_code == 1 and "not self-signed" in result.output


# -- the lifetime settings at their limits ------------------------------------------------------


@pytest.mark.parametrize(
    ("lifetime", "before", "ok"),
    [
        (renewal.MIN_LIFETIME, None, True),
        (renewal.MIN_LIFETIME - 1, None, False),
        (HOUR, HOUR - renewal.MIN_USE, True),
        (HOUR, HOUR - renewal.MIN_USE + 1, False),
        (HOUR, 1.0, True),
        (HOUR, 0.0, False),
        (HOUR, -1.0, False),
    ],
)
def test_the_policy_limits_at_n_and_n_plus_one(
    lifetime: float, before: float | None, ok: bool
) -> None:
    problem = renewal.RenewalPolicy(lifetime, before).problem()
    assert (problem is None) is ok, problem


def _settings(**registrar: object) -> dict[str, object]:
    return {"address": "10.0.0.1", "components": {"clc": {}}, "registrar": registrar}


def test_the_configured_lifetime_at_its_ceiling_and_one_second_over() -> None:
    top = int(grammar.MAX_DURATION)
    cfg = from_mapping(_settings(certificate_lifetime=f"{top}s"))
    assert cfg.certificates.lifetime == top
    with pytest.raises(ConfigError, match="certificate_lifetime"):
        from_mapping(_settings(certificate_lifetime=f"{top + 1}s"))
    with pytest.raises(ConfigError, match="certificate_renew_before"):
        from_mapping(_settings(certificate_lifetime="1h", certificate_renew_before="1h"))


def test_a_certificate_at_the_longest_lifetime_is_issued_and_verifies(issuer: Issuer) -> None:
    key = keypairs.generate_key()
    cert = certificates.issue_certificate(
        issuer_key=issuer.key,
        issuer_cert=issuer.cert,
        subject_key=key.public_key(),
        role=Role.WALRUS,
        component_id="walrus-000000000001",
        cluster=None,
        lifetime=datetime.timedelta(seconds=grammar.MAX_DURATION),
    )
    files = {
        cred.CLOUD_CERT: certificates.cert_pem(issuer.cloud_cert),
        cred.LAYOUTS[Role.WALRUS].cert: certificates.cert_pem(cert),
    }
    cred.verify_bundle(files, Role.WALRUS, key)


# -- a registrar killed mid-renewal -------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from eucareg.pki import certificates, keypairs
    from eucareg.registrar.engine import Issuer
    from tests.unit.test_renewal import SHORT, Clock, make

    async def main() -> None:
        state = Path(sys.argv[1])
        ca_key = keypairs.load_key(state / "ca.key")
        ca = certificates.load_cert(state / "ca.pem")
        issuer = Issuer(key=ca_key, cert=ca, cloud_cert=ca, policy=SHORT)
        clock = Clock()
        clock.offset = float(sys.argv[3])
        reg = await make(state, issuer, clock)
        key = keypairs.load_key(state / "cc.key")
        await reg.credentials(sys.argv[2], key.public_key(), wait=0)
        print("answered", flush=True)  # never: the crash point is passed first

    asyncio.run(main())
    """
)


async def test_a_registrar_killed_right_after_storing_a_renewal_hands_out_that_one(
    tmp_path: Path, issuer: Issuer
) -> None:
    """EUCAREG_CRASH_AT=after-certificate kills the process once the renewed certificate is
    committed, before it is handed out: the restarted registrar hands out exactly that one,
    and the store holds one `renewed` event, not two."""
    clock = Clock()
    async with registrar_with_cc(tmp_path, issuer, clock) as (reg, cid, key):
        old = serial_of((await reg.credentials(cid, key.public_key(), wait=0)).files)
    cred.write_atomic(tmp_path / "ca.key", keypairs.key_pem(issuer.key))
    cred.write_atomic(tmp_path / "ca.pem", certificates.cert_pem(issuer.cert).encode())
    cred.write_atomic(tmp_path / "cc.key", keypairs.key_pem(key))
    env = {
        **os.environ,
        "EUCAREG_CRASH_AT": "after-certificate",
        "PYTHONPATH": str(Path(__file__).parents[2]),
    }
    due = HOUR - 600
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(tmp_path), cid, str(due),
        env=env, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 86 and b"answered" not in out
    clock.offset = due
    async with registrar_with_cc(tmp_path, issuer, clock, cc=(cid, key)) as (again, _, _):
        stored = again.memory.certificates[cid].serial
        assert stored != old
        served = serial_of((await again.credentials(cid, key.public_key(), wait=0)).files)
        assert served == stored
        assert renewed_count(again, cid) == 1


async def test_an_older_genuine_cloud_cert_put_back_does_not_undo_a_renewal(tmp_path: Path) -> None:
    """A copy of the previous cloud-cert.pem written back (a replay, or a co-located CC
    writing a bundle it fetched just before the renewal): ours, but older; the CLC keeps the
    renewed one and writes it back."""
    key_dir, key = clc_dir(tmp_path)
    old = read_held(key_dir, key)

    async def changed() -> None:
        return None

    ca = CloudCA(key_dir, key, old, changed)
    later = datetime.datetime.now(datetime.UTC).timestamp() + 5
    renewed = renew_held(key_dir, key, later, old)
    assert await ca.check() is True and ca.cert == renewed
    cred.write_atomic(key_dir / cred.CLOUD_CERT, certificates.cert_pem(old).encode())
    assert await ca.check() is False
    assert ca.cert == renewed and read_held(key_dir, key) == renewed


@pytest.mark.xfail(
    strict=True,
    reason="DEFECT: settle_held writes the served certificate back over a `ca renew` that "
    "landed between its read of cloud-cert.pem and its write: the renewal is undone",
)
async def test_a_write_back_does_not_undo_a_renewal_written_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older copy of cloud-cert.pem put back: the agent reads it, decides to write the one
    it serves back, and `eucareg ca renew` (reading the same old copy) writes a newer renewal
    just before that write. The operator was told the new serial; it must not be overwritten
    by an older certificate (settle_held: "must not undo a renewal")."""
    key_dir, key = clc_dir(tmp_path)
    old = read_held(key_dir, key)

    async def changed() -> None:
        return None

    ca = CloudCA(key_dir, key, old, changed)
    now = datetime.datetime.now(datetime.UTC).timestamp()
    served = renew_held(key_dir, key, now + 5, old)
    assert await ca.check() is True and ca.cert == served
    cred.write_atomic(key_dir / cred.CLOUD_CERT, certificates.cert_pem(old).encode())
    real = cred.write_atomic
    operator: list[x509.Certificate] = []

    def racing(path: Path, data: bytes, mode: int = 0o600) -> None:
        if not operator and path.name == cred.CLOUD_CERT:  # the agent's write-back, first
            operator.append(certificates.renew_cloud_ca(key, old, now=now + 10))
            real(path, certificates.cert_pem(operator[0]).encode(), mode)  # `ca renew`
        real(path, data, mode)

    monkeypatch.setattr(cred, "write_atomic", racing)
    await ca.check()  # puts `served` back over the older copy (and, today, over the renewal)
    await ca.check()  # what the watch does next, woken by the two writes
    assert operator, "the agent wrote nothing back"
    assert read_held(key_dir, key) == operator[0] and ca.cert == operator[0]


# -- a CC renewed while its NCs watch -----------------------------------------------------------


async def test_a_cc_renewed_while_its_nodes_watch_answers_each_with_the_new_chain(
    tmp_path: Path, issuer: Issuer
) -> None:
    """The CC's own certificate renewed for the same key (its agent collected a renewal):
    every NC watching gets the new cluster-cert.pem at once, its node certificate unchanged
    and verifying under it; no node certificate is renewed for it."""
    cc_key = keypairs.generate_key()

    def cc_cert() -> x509.Certificate:
        return certificates.issue_certificate(
            issuer_key=issuer.key,
            issuer_cert=issuer.cert,
            subject_key=cc_key.public_key(),
            role=Role.CC,
            component_id="cc-00000000000c",
            cluster="c1",
        )

    holder = [Issuer(key=cc_key, cert=cc_cert(), cloud_cert=issuer.cloud_cert, policy=SHORT)]
    reg = Registrar(
        Store(sqlite_url(tmp_path / "registry.db")),
        RegistrarSettings(registers=frozenset({Role.NC}), own_cluster="c1"),
        hook_dir=tmp_path / "hooks",
        timing=Timing(retry_base=0.05, retry_max=0.2, hook_timeout=5),
        issuer_for=lambda _role: holder[0],
        self_registered=lambda: True,
        master_key=b"test-master-key",
    )
    await reg.start()
    await reg.open_install_window(3600)
    try:
        nodes = [ann(Role.NC, "c1") for _ in range(3)]
        for node in nodes:
            reg.on_sighting(sighting(node))
        await settle(reg)
        keys = {n.component_id: KEYS[n.fingerprint] for n in nodes}
        held = {
            cid: serial_of((await reg.credentials(cid, k.public_key(), wait=0)).files, Role.NC)
            for cid, k in keys.items()
        }
        watches = [
            asyncio.create_task(reg.credentials(cid, k.public_key(), 60, held[cid]))
            for cid, k in keys.items()
        ]
        for _ in range(500):  # until each watch is held by the desk (bounded)
            if set(reg.desk._watching) == set(keys):
                break
            await asyncio.sleep(0.01)
        assert set(reg.desk._watching) == set(keys) and not any(w.done() for w in watches)
        holder[0] = Issuer(key=cc_key, cert=cc_cert(), cloud_cert=issuer.cloud_cert, policy=SHORT)
        reg.self_registration_changed()
        answers = await asyncio.wait_for(asyncio.gather(*watches), 10)
        new_chain = certificates.cert_pem(holder[0].cert)
        for (cid, k), answer in zip(keys.items(), answers, strict=True):
            assert answer.files is not None and answer.files["cluster-cert.pem"] == new_chain
            assert serial_of(answer.files, Role.NC) == held[cid]  # the node's own: unchanged
            cred.verify_bundle(answer.files, Role.NC, k)
            assert renewed_count(reg, cid) == 0
    finally:
        await reg.close()


async def test_issuing_stays_one_at_a_time_per_component_across_a_failure(
    tmp_path: Path, issuer: Issuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests queued behind a failed issuance, and one arriving as the lock changes hands,
    still issue one at a time, and the desk keeps no lock once nobody waits."""
    clock = Clock()
    async with registrar_with_cc(tmp_path, issuer, clock) as (reg, cid, key):
        desk = reg.desk
        real = desk._issued
        inside, most, calls = [0], [0], [0]

        async def issued(*args: object) -> object:
            calls[0] += 1
            inside[0] += 1
            most[0] = max(most[0], inside[0])
            try:
                await asyncio.sleep(0.05)
                if calls[0] == 1:
                    raise CredentialRefused(409, f"{cid} changed while issuing; ask again")
                return await real(*args)  # type: ignore[arg-type]
            finally:
                inside[0] -= 1

        monkeypatch.setattr(desk, "_issued", issued)

        async def ask(delay: float) -> object:
            await asyncio.sleep(delay)
            try:
                return await reg.credentials(cid, key.public_key(), wait=0)
            except CredentialRefused as refused:
                return refused.status

        answers = await asyncio.wait_for(
            asyncio.gather(*(ask(d) for d in (0, 0.01, 0.02, 0.05, 0.05, 0.06))), 30
        )
        assert answers.count(409) == 1
        assert most[0] == 1  # never two issuing for one component at once
        assert desk._issuing == {}
