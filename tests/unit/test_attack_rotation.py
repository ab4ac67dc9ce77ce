"""Attacks on `eucareg ca rotate` (the cloud CA key handover), as a rogue registrar on the LAN
and as an unlucky operator would mount them: forged, replayed, stretched and chained handovers
in bundles and in the TLS chain, an agent started beside the rotation, SIGKILL at every step,
a restored backup, --overlap at its limits, file modes and what `ca show` prints.

Each test PASSES when the defence holds.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from eucareg.agent import collect, rotation
from eucareg.agent.cloudca import CloudCA
from eucareg.agent.identity import Identity, load_or_create_identity
from eucareg.cli.main import main as cli
from eucareg.core.model import Role
from eucareg.pki import certificates, handover, keypairs, tls
from eucareg.pki import credentials as cred
from eucareg.pki.cloud import read_held
from eucareg.store.owner import hold
from tests.factories import fresh_key
from tests.unit.test_rotation import consistent, make_clc
from tests.unit.test_rotation_handover import (
    CLC_ID,
    ENDPOINT,
    Rotated,
    clc_expect,
    issue,
    rotated,
    walrus_bundle,
)

DAY = 86400.0
WALRUS_ID = "walrus-00000000000a"


def cross_like(
    signer: keypairs.PrivateKey,
    issuer: x509.Certificate,
    subject: x509.Name,
    public: keypairs.PublicKey,
    *,
    ca: bool | None = True,
    start: float | None = None,
    length: float = DAY,
) -> x509.Certificate:
    """A certificate shaped as a cross-certificate (or not quite: `ca` None drops the basic
    constraints, False makes it a leaf), for whatever key, name and validity an attacker likes."""
    start = time.time() - 60 if start is None else start
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime.fromtimestamp(start, datetime.UTC))
        .not_valid_after(datetime.datetime.fromtimestamp(start + length, datetime.UTC))
    )
    if ca is not None:
        b = b.add_extension(
            x509.BasicConstraints(ca=ca, path_length=1 if ca else None), critical=True
        )
    return b.sign(signer, hashes.SHA256())


def walrus(tmp: Path, r: Rotated) -> tuple[Identity, Path, str, str]:
    """A Walrus registered under r's old CA: identity, key_dir, serial held, pin (old key)."""
    key = fresh_key()
    ident = Identity(WALRUS_ID, key, keypairs.fingerprint(key.public_key()))
    key_dir = tmp / "keys"
    pin = certificates.cert_fingerprint(r.old)
    collect._accept(
        walrus_bundle(r, key, signer="old"), Role.WALRUS, ident, ENDPOINT, key_dir, None, pin, None
    )
    serial = format(certificates.load_cert(key_dir / "walrus-cert.pem").serial_number, "x")
    return ident, key_dir, serial, pin


def snapshot(key_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(key_dir.iterdir())}


# -- handovers in a bundle (collect._accept) ---------------------------------------------------


def test_a_genuine_handover_seen_once_cannot_carry_a_rogue_key(tmp_path: Path) -> None:
    """An attacker who saw the genuine X (K1 -> K2) serves its own CA (same name, its own key)
    with X: X names K2 only, so the pin does not move to the rogue key."""
    r = rotated()
    ident, key_dir, have, pin = walrus(tmp_path, r)
    rogue_key = fresh_key()
    rogue_ca = handover.successor(rogue_key, r.old, time.time())
    rogue = Rotated(r.old_key, r.old, rogue_key, rogue_ca, r.cross)
    bundle = {**walrus_bundle(rogue, ident.key), handover.HANDOVER: r.passed.pem()}
    before = snapshot(key_dir)
    with pytest.raises(keypairs.CredentialError, match="refusing a rogue registrar"):
        collect._accept(bundle, Role.WALRUS, ident, ENDPOINT, key_dir, have, pin, None)
    assert snapshot(key_dir) == before


@pytest.mark.parametrize(
    ("start", "length", "why"),
    [
        (-3 * DAY, 2 * DAY, "ended"),
        (2 * DAY, 30 * DAY, "not begun"),
        (-60, 367 * DAY, "longer than 366 days"),
        (-60, 100 * 365 * DAY, "longer than 366 days"),
    ],
    ids=["expired", "not-yet-valid", "366d-plus-a-day", "a-century"],
)
def test_a_handover_signed_by_the_pinned_key_outside_its_overlap_moves_nobody(
    tmp_path: Path, start: float, length: float, why: str
) -> None:
    r = rotated()
    pub = r.new.public_key()
    assert isinstance(pub, keypairs.PublicKey)
    x = cross_like(r.old_key, r.old, r.new.subject, pub, start=time.time() + start, length=length)
    h = handover.Handover(x, r.old)
    with pytest.raises(keypairs.CredentialError, match=r"ended|longer than"):
        handover.verify(h, certificates.cert_fingerprint(r.old), r.new, time.time())
    ident, key_dir, have, pin = walrus(tmp_path, r)
    before = snapshot(key_dir)
    bundle = {**walrus_bundle(r, ident.key), handover.HANDOVER: h.pem()}
    with pytest.raises(keypairs.CredentialError, match="refusing a rogue registrar"):
        collect._accept(bundle, Role.WALRUS, ident, ENDPOINT, key_dir, have, pin, None)
    assert snapshot(key_dir) == before, why


def test_the_longest_overlap_ca_rotate_makes_is_still_a_valid_handover() -> None:
    """N for the cap above: a cross-certificate of `--overlap 366d` is honoured."""
    now = time.time()
    r = rotated(overlap=rotation.MAX_OVERLAP, now=now)
    handover.verify(r.passed, certificates.cert_fingerprint(r.old), r.new, now)
    assert handover.vouches(r.cross, r.old, now)


def test_two_handovers_at_once_are_refused(tmp_path: Path) -> None:
    """K1 -> K2 -> K3 in one cloud-handover.pem: one step only, from the key we pin."""
    r = rotated()
    k3 = fresh_key()
    c3 = handover.successor(k3, r.new, time.time())
    x23 = handover.make_cross(r.new_key, r.new, c3, time.time(), DAY)
    both = certificates.cert_pem(x23) + certificates.cert_pem(r.new) + r.passed.pem()
    with pytest.raises(keypairs.CredentialError, match="holds 4 certificates"):
        handover.parse(both)
    ident, key_dir, have, pin = walrus(tmp_path, r)
    third = Rotated(r.new_key, r.new, k3, c3, x23)
    before = snapshot(key_dir)
    for pem in (both, third.passed.pem()):
        bundle = {**walrus_bundle(third, ident.key), handover.HANDOVER: pem}
        with pytest.raises(keypairs.CredentialError, match="refusing a rogue registrar"):
            collect._accept(bundle, Role.WALRUS, ident, ENDPOINT, key_dir, have, pin, None)
    assert snapshot(key_dir) == before


def _dressed(r: Rotated) -> dict[str, x509.Certificate]:
    """Certificates signed by the pinned key K1 that are not a cross-certificate to K2."""
    cc_key, cc = issue(r.old_key, r.old, Role.CC, "cc-00000000000a", "c1")
    _, nc = issue(cc_key, cc, Role.NC, "nc-00000000000a", "c1")
    _, wal = issue(r.old_key, r.old, Role.WALRUS, WALRUS_ID)
    other = certificates.create_cloud_ca(fresh_key(), "clc-00000000000b").subject
    pub = r.new.public_key()
    assert isinstance(pub, keypairs.PublicKey)
    return {
        "cc-certificate": cc,
        "nc-certificate": nc,
        "walrus-certificate": wal,
        "clc-name-not-a-ca": cross_like(r.old_key, r.old, r.new.subject, pub, ca=False),
        "clc-name-no-constraints": cross_like(r.old_key, r.old, r.new.subject, pub, ca=None),
        "another-clc-name": cross_like(r.old_key, r.old, other, pub),
    }


@pytest.mark.parametrize("kind", list(_dressed(rotated())))
def test_no_other_certificate_of_the_pinned_key_passes_for_a_handover(
    tmp_path: Path, kind: str
) -> None:
    """A CC's, an NC's, a Walrus's certificate, or a K2 certificate under the CLC's name that is
    not a CA, or under another CLC's name: none moves the pin, none vouches in TLS."""
    r = rotated()
    fake = _dressed(r)[kind]
    assert not handover.vouches(fake, r.old, time.time())
    with pytest.raises(keypairs.CredentialError):
        handover.verify(
            handover.Handover(fake, r.old), certificates.cert_fingerprint(r.old), r.new, 0
        )
    ident, key_dir, have, pin = walrus(tmp_path, r)
    before = snapshot(key_dir)
    bundle = {
        **walrus_bundle(r, ident.key),
        handover.HANDOVER: handover.Handover(fake, r.old).pem(),
    }
    with pytest.raises(keypairs.CredentialError, match="refusing a rogue registrar"):
        collect._accept(bundle, Role.WALRUS, ident, ENDPOINT, key_dir, have, pin, None)
    assert snapshot(key_dir) == before


def test_a_handover_to_the_right_key_under_another_clc_name_is_refused() -> None:
    """Signed by K1, for K2, but naming another CLC, with a new CA of that name: the CLC we
    pinned does not become another one."""
    r = rotated()
    other = certificates.create_cloud_ca(fresh_key(), "clc-00000000000b").subject
    renamed = certificates.create_cloud_ca_named(r.new_key, other)
    pub = r.new.public_key()
    assert isinstance(pub, keypairs.PublicKey)
    x = cross_like(r.old_key, r.old, other, pub)
    with pytest.raises(keypairs.CredentialError, match="names another CLC"):
        handover.verify(
            handover.Handover(x, r.old), certificates.cert_fingerprint(r.old), renamed, 0
        )


def test_a_stolen_retired_key_cannot_move_a_moved_agent_back(tmp_path: Path) -> None:
    """The agent has moved to K2. Whoever holds the retired K1 serves K1's CA with a
    'handover' K1 -> K1' or K2 -> K1 forged with K1: refused, the pin stays K2."""
    r = rotated()
    ident, key_dir, have, pin = walrus(tmp_path, r)
    moved = {**walrus_bundle(r, ident.key), handover.HANDOVER: r.passed.pem()}
    collect._accept(moved, Role.WALRUS, ident, ENDPOINT, key_dir, have, pin, None)
    new_fp = certificates.cert_fingerprint(r.new)
    before = snapshot(key_dir)
    back = Rotated(r.new_key, r.new, r.old_key, r.old, handover.make_cross(
        r.old_key, r.new, r.old, time.time(), DAY))  # fmt: skip
    k1b = fresh_key()
    c1b = handover.successor(k1b, r.old, time.time())
    sideways = Rotated(r.old_key, r.old, k1b, c1b, handover.make_cross(
        r.old_key, r.old, c1b, time.time(), DAY))  # fmt: skip
    for attack in (back, sideways):
        bundle = {**walrus_bundle(attack, ident.key), handover.HANDOVER: attack.passed.pem()}
        with pytest.raises(keypairs.CredentialError, match="refusing a rogue registrar"):
            collect._accept(bundle, Role.WALRUS, ident, ENDPOINT, key_dir, "x", new_fp, None)
    assert snapshot(key_dir) == before


def test_a_handover_beside_the_unchanged_ca_moves_nothing_and_is_not_kept(
    tmp_path: Path,
) -> None:
    """A bundle of the old CA (cloud-cert.pem unchanged) with a genuine handover beside it: a
    plain renewal, the pin stays, no cloud-handover.pem is written (it leads elsewhere)."""
    r = rotated()
    ident, key_dir, have, pin = walrus(tmp_path, r)
    bundle = {**walrus_bundle(r, ident.key, signer="old"), handover.HANDOVER: r.passed.pem()}
    out = collect._accept(bundle, Role.WALRUS, ident, ENDPOINT, key_dir, have, pin, None)
    assert out is collect.Outcome.RENEWED
    assert certificates.cert_fingerprint(certificates.load_cert(key_dir / cred.CLOUD_CERT)) == pin
    assert not (key_dir / handover.HANDOVER).exists()


@pytest.mark.parametrize(
    "data",
    [
        "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n",
        "\x00" * 1000,
        "many",  # replaced below: a hundred copies of the genuine certificates
    ],
    ids=["garbage-pem", "binary", "many-certificates"],
)
def test_a_malformed_or_huge_handover_moves_nobody(tmp_path: Path, data: str) -> None:
    r = rotated()
    if data == "many":
        data = r.passed.pem() * 100
    with pytest.raises(keypairs.CredentialError, match=handover.HANDOVER):
        handover.parse(data)
    ident, key_dir, have, pin = walrus(tmp_path, r)
    before = snapshot(key_dir)
    bundle = {**walrus_bundle(r, ident.key), handover.HANDOVER: data}
    with pytest.raises(keypairs.CredentialError, match="refusing a rogue registrar"):
        collect._accept(bundle, Role.WALRUS, ident, ENDPOINT, key_dir, have, pin, None)
    assert snapshot(key_dir) == before


def test_the_handover_size_limit_at_n_and_n_plus_one() -> None:
    pem = rotated().passed.pem()
    at_limit = pem + "\n" * (handover.MAX_HANDOVER_BYTES - len(pem))
    assert len(at_limit) == handover.MAX_HANDOVER_BYTES
    assert handover.parse(at_limit).old_fingerprint
    with pytest.raises(keypairs.CredentialError, match="longer than"):
        handover.parse(at_limit + "\n")


# -- the TLS chain (tls.check_registrar) -------------------------------------------------------


def now() -> datetime.datetime:
    """The time of the check: now, not when the module was imported (the certificates are
    made during the test, and in a full run the import was many minutes earlier)."""
    return datetime.datetime.now(datetime.UTC)


def cc_expect(**kw: object) -> tls.Expect:
    return tls.Expect(Role.CC, "c1", "cc-00000000000a", **kw)  # type: ignore[arg-type]


def test_a_rogue_adding_its_own_cross_certificate_to_its_chain_is_refused() -> None:
    """check_registrar accepts no CA certificate from the chain the server sends merely for
    being there: a rogue's own 'cross' (self-made, made by a registered CC, or the genuine X
    beside a leaf of the rogue's key) never vouches for its certificate."""
    r = rotated()
    rogue_key = fresh_key()
    rogue_pub = rogue_key.public_key()
    cc_key, cc = issue(r.old_key, r.old, Role.CC, "cc-00000000000b", "c2")
    own_x = cross_like(rogue_key, r.old, r.old.subject, rogue_pub)
    cc_x = cross_like(cc_key, cc, r.old.subject, rogue_pub)
    rogue_ca = certificates.create_cloud_ca_named(rogue_key, r.old.subject)
    _, leaf = issue(rogue_key, rogue_ca, Role.CC, "cc-00000000000a", "c1")
    chains = {
        "own-cross": [leaf, own_x, r.old],
        "cross-by-a-cc": [leaf, cc_x, cc, r.old],
        "genuine-cross-beside": [leaf, r.cross, r.new, r.old],
        "everything": [leaf, rogue_ca, own_x, cc_x, cc, r.cross, r.new, r.old],
    }
    for name, chain in chains.items():
        for expect in (cc_expect(root=r.old), cc_expect(pin=certificates.cert_fingerprint(r.old))):
            with pytest.raises(tls.UntrustedRegistrar, match="not signed by our cloud CA"):
                tls.check_registrar(chain, expect, now())
            assert name  # (which chain failed shows in the traceback's locals)
    # The same chain with a leaf the new key really signed is accepted: the check is real.
    _, good = issue(r.new_key, r.new, Role.CC, "cc-00000000000a", "c1")
    tls.check_registrar([good, r.new, r.cross, r.old], cc_expect(root=r.old), now())


def test_a_chain_of_two_handovers_is_one_step_too_many() -> None:
    r = rotated()
    k3 = fresh_key()
    c3 = handover.successor(k3, r.new, time.time())
    x23 = handover.make_cross(r.new_key, r.new, c3, time.time(), DAY)
    chain = [c3, x23, r.new, r.cross, r.old]
    with pytest.raises(tls.UntrustedRegistrar, match="not signed by our cloud CA"):
        tls.check_registrar(chain, clc_expect(root=r.old), now())
    with pytest.raises(tls.UntrustedRegistrar, match="not signed by our cloud CA"):
        tls.check_registrar(chain, clc_expect(pin=certificates.cert_fingerprint(r.old)), now())
    tls.check_registrar(chain, clc_expect(root=r.new), now())  # one step from K2: fine


def test_a_stretched_cross_certificate_does_not_vouch_in_tls() -> None:
    r = rotated()
    pub = r.new.public_key()
    assert isinstance(pub, keypairs.PublicKey)
    long_x = cross_like(r.old_key, r.old, r.new.subject, pub, length=20 * 365 * DAY)
    with pytest.raises(tls.UntrustedRegistrar, match="not signed by our cloud CA"):
        tls.check_registrar([r.new, long_x, r.old], clc_expect(root=r.old), now())


def test_a_cc_that_has_not_moved_is_refused_by_a_node_that_has() -> None:
    """The CC still serves its certificate under K1; a node already moved to K2 refuses it
    (nothing signed by K2 vouches for K1), and a node still on K1 accepts it."""
    r = rotated()
    _, old_cc = issue(r.old_key, r.old, Role.CC, "cc-00000000000a", "c1")
    with pytest.raises(tls.UntrustedRegistrar, match="not signed by our cloud CA"):
        tls.check_registrar([old_cc, r.old], cc_expect(root=r.new), now())
    tls.check_registrar([old_cc, r.old], cc_expect(root=r.old), now())


# -- the operator ------------------------------------------------------------------------------


async def test_a_rotation_beside_a_running_agent_never_leaves_a_locked_out_clc(
    tmp_path: Path,
) -> None:
    """The agent (holding K1) runs while the rotation writes K2, C2 and the handover (it
    started during the prompt, say). Its watch sees cloud-cert.pem change: it must not write
    C1 back over C2 (the stored key is K2: the next start would find key and certificate
    disagreeing and stop, and every component would be locked out)."""
    state, keys, old = make_clc(tmp_path)
    ca = CloudCA(keys, old.key, read_held(keys, old.key), _nothing)
    assert not await ca.check()
    done = rotation.rotate(state, keys, DAY, time.time())
    with pytest.raises(keypairs.CredentialError, match="restart the agent"):
        await ca.check()
    assert certificates.cert_fingerprint(ca.cert) == old.fingerprint  # it serves K1 until restarted
    fp, passed = consistent(state, keys)  # the restart: K2 with its handover
    assert fp == done.new_fingerprint and passed is not None
    # A genuinely foreign cloud-cert.pem (no handover from our key to it) is still put back.
    _, keys2, other = make_clc(tmp_path / "two")
    held = read_held(keys2, other.key)
    ca2 = CloudCA(keys2, other.key, held, _nothing)
    foreign = certificates.create_cloud_ca(fresh_key(), CLC_ID)
    cred.write_atomic(keys2 / cred.CLOUD_CERT, certificates.cert_pem(foreign).encode())
    await ca2.check()
    assert read_held(keys2, other.key) == held


async def _nothing() -> None:
    return None


def _config(tmp: Path, state: Path, keys: Path) -> Path:
    config = tmp / "eucareg.toml"
    config.write_text(
        f'address = "10.0.0.1"\nstate_dir = "{state}"\nkey_dir = "{keys}"\n'
        "[components]\nclc = {}\n"
    )
    return config


def test_the_cli_refuses_while_an_agent_holds_the_registry(tmp_path: Path) -> None:
    """No operator socket yet (the agent is starting), but its registrar holds the registry's
    lock: refused, nothing changed."""
    state, keys, old = make_clc(tmp_path)
    config = _config(tmp_path, state, keys)
    before = snapshot(keys)
    with hold(state / "registry.db") as pid:
        assert pid is None
        out = CliRunner().invoke(cli, ["ca", "rotate", "--config", str(config), "--yes"])
    assert out.exit_code == 1, out.output
    assert "started meanwhile" in out.output
    assert snapshot(keys) == before and consistent(state, keys)[0] == old.fingerprint


def test_a_stage_for_another_key_never_overwrites_the_key_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A committed stage from K1, but the key held is K0 (a backup restored over a rotation
    cut short): refused by name, K0 kept (nothing ever retired it)."""
    state, keys, _ = make_clc(tmp_path)
    key_path = state / "identity" / "clc.key.pem"

    def dying(*_: object) -> None:
        raise OSError("simulated crash")

    monkeypatch.setattr(rotation, "apply_pending", dying)
    with pytest.raises(OSError, match="simulated crash"):
        rotation.rotate(state, keys, DAY, time.time())
    monkeypatch.undo()
    assert (state / "identity" / rotation.STAGE).is_dir()
    restored = fresh_key()
    cred.write_atomic(key_path, keypairs.key_pem(restored))
    with pytest.raises(rotation.RotationError, match="holds sha256:"):
        load_or_create_identity(state, Role.CLC)
    assert keypairs.fingerprint(keypairs.load_key(key_path).public_key()) == keypairs.fingerprint(
        restored.public_key()
    )


_KILLER = """
import os, shutil, signal, sys, time
from pathlib import Path
from eucareg.agent import rotation
from eucareg.pki import credentials as cred
n, steps = int(sys.argv[3]), [0]
def step(real):
    def wrapped(*a, **kw):
        steps[0] += 1
        if steps[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **kw)
    return wrapped
cred.write_atomic = step(cred.write_atomic)
rotation.os.rename = step(os.rename)
rotation.shutil.rmtree = step(shutil.rmtree)
rotation._fsync_dir = step(rotation._fsync_dir)
rotation.rotate(Path(sys.argv[1]), Path(sys.argv[2]), 86400.0, time.time())
print("steps", steps[0])
"""


def test_sigkill_at_every_step_then_a_start_leaves_key_cert_and_pin_agreeing(
    tmp_path: Path,
) -> None:
    """A real SIGKILL before each file write, rename, removal and directory sync of the
    rotation, then the agent's start: key, cloud-cert.pem and cloud-pk.pem agree, on the old
    key before the commit and on the new one with its handover after it; never a half state."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}

    def run(state: Path, keys: Path, n: int) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-c", _KILLER, str(state), str(keys), str(n)]
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)

    state, keys, _ = make_clc(tmp_path / "count")
    whole = run(state, keys, 0)
    assert whole.returncode == 0, whole.stderr
    total = int(whole.stdout.split()[-1])
    assert total >= 13  # 2 cleanups, 4 staged writes, rename, sync, 5 writes, removal, sync
    outcomes = []
    for n in range(1, total + 1):
        state, keys, old = make_clc(tmp_path / f"kill{n}")
        killed = run(state, keys, n)
        assert killed.returncode == -signal.SIGKILL, (n, killed.stderr)
        fp, passed = consistent(state, keys)  # the start after the crash
        moved = fp != old.fingerprint
        assert moved is (passed is not None), n
        if moved:
            assert passed is not None and passed.old_fingerprint == old.fingerprint
        assert not (state / "identity" / rotation.STAGE).exists()
        assert not (state / "identity" / f"{rotation.STAGE}.tmp").exists()
        outcomes.append(moved)
    # Before the commit (the rename) nothing moved; after it, everything did.
    assert outcomes == sorted(outcomes) and outcomes[0] is False and outcomes[-1] is True


def test_rotate_then_restore_a_pre_rotation_backup(tmp_path: Path) -> None:
    """The operator puts back the key and cloud CA from before the rotation (the handover
    file stays): the CLC is consistent on the old key, serves no handover (it leads away from
    the key held) and may rotate again, from the old key."""
    state, keys, old = make_clc(tmp_path)
    saved = {
        p: p.read_bytes()
        for p in (
            state / "identity" / "clc.key.pem",
            keys / cred.CLOUD_CERT,
            keys / cred.LAYOUTS[Role.CLC].key,
        )
    }
    rotation.rotate(state, keys, DAY, time.time())
    for path, data in saved.items():
        cred.write_atomic(path, data)
    fp, passed = consistent(state, keys)
    assert fp == old.fingerprint and passed is None
    shown = CliRunner().invoke(
        cli, ["ca", "show", "--config", str(_config(tmp_path, state, keys)), "--json"]
    )
    assert shown.exit_code == 0 and "handover_from" not in json.loads(shown.output)
    again = rotation.rotate(state, keys, DAY, time.time())
    assert again.old_fingerprint == old.fingerprint


@pytest.mark.parametrize(
    ("overlap", "ok"),
    [("10m", True), ("599s", False), ("366d", True), ("367d", False), ("31622401s", False)],
)
def test_overlap_at_its_limits(tmp_path: Path, overlap: str, ok: bool) -> None:
    state, keys, old = make_clc(tmp_path)
    config = _config(tmp_path, state, keys)
    args = ["ca", "rotate", "--config", str(config), "--yes", "--json", "--overlap", overlap]
    out = CliRunner().invoke(cli, args)
    if not ok:
        assert out.exit_code == 2 and "--overlap" in out.output, out.output
        assert consistent(state, keys)[0] == old.fingerprint
        return
    assert out.exit_code == 0, out.output
    ends = datetime.datetime.strptime(
        json.loads(out.output)["handover_until"], "%Y-%m-%dT%H:%M:%SZ"
    ).replace(tzinfo=datetime.UTC)
    expected = {"10m": 600.0, "366d": 366 * DAY}[overlap]
    assert abs(ends.timestamp() - time.time() - expected) < 60
    fp, passed = consistent(state, keys)
    assert fp != old.fingerprint and passed is not None  # components accept it (not too long)
    handover.verify(passed, old.fingerprint, read_held(keys, keypairs.load_key(
        state / "identity" / "clc.key.pem")), time.time())  # fmt: skip


def test_the_keys_and_the_stage_are_root_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state, keys, _ = make_clc(tmp_path)
    ident = state / "identity"

    def no_rename(*_: object) -> None:
        raise OSError("stopped before the commit")

    monkeypatch.setattr(os, "rename", no_rename)
    with pytest.raises(OSError, match="before the commit"):
        rotation.rotate(state, keys, DAY, time.time())
    tmp = ident / f"{rotation.STAGE}.tmp"
    assert tmp.stat().st_mode & 0o777 == 0o700
    for f in tmp.iterdir():
        assert f.stat().st_mode & 0o077 == 0, f
    monkeypatch.undo()
    done = rotation.rotate(state, keys, DAY, time.time())
    assert not tmp.exists()
    for path in (
        ident / "clc.key.pem",
        keys / cred.LAYOUTS[Role.CLC].key,
        done.retired_key,
    ):
        assert path.stat().st_mode & 0o077 == 0, path
    assert done.retired_key.parent.stat().st_mode & 0o777 == 0o700


def test_ca_show_and_rotate_print_no_secret(tmp_path: Path) -> None:
    state, keys, old = make_clc(tmp_path)
    config = _config(tmp_path, state, keys)
    runner = CliRunner()
    rotated_out = runner.invoke(cli, ["ca", "rotate", "--config", str(config), "--yes", "--json"])
    shown = runner.invoke(cli, ["ca", "show", "--config", str(config), "--json"])
    new_key = keypairs.load_key(state / "identity" / "clc.key.pem")
    secrets = [keypairs.key_pem(k).decode() for k in (old.key, new_key)]
    for out in (rotated_out, shown):
        assert out.exit_code == 0, out.output
        assert "PRIVATE" not in out.output
        for pem in secrets:
            body = "".join(pem.splitlines()[1:-1])
            assert all(body[i : i + 40] not in out.output for i in range(0, len(body) - 40, 40))
    info = json.loads(shown.output)
    assert set(info) == {
        "fingerprint", "serial", "subject", "not_before", "not_after", "renew_at", "state",
        "handover_from", "handover_until",
    }  # fmt: skip
    assert info["handover_from"] == old.fingerprint
