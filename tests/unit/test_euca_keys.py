"""Eucalyptus's own key files delivered with the credentials (issue 10, part 5): what a
registrar reads and checks (each role's set, cluster isolation, missing and bad files), what
it serves over the signed channel (only to the registered component that asks, only when its
own configuration delivers), and what the agent writes (owner, modes, atomically, unchanged
files left alone, eucareg's own key_dir untouched).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import pwd
import shutil
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner

from eucareg.agent import collect
from eucareg.agent.euca_keys import EucaKeys, EucaKeysError, parse, write_files
from eucareg.agent.identity import Identity
from eucareg.agent.locate import Endpoint
from eucareg.cli.main import main
from eucareg.config.eucalyptus import EucalyptusConfigError, EucalyptusKeys
from eucareg.config.eucalyptus import parse as parse_config
from eucareg.config.file import from_mapping
from eucareg.config.values import ConfigError
from eucareg.core.model import Announcement, Role
from eucareg.pki import certificates, names, tls
from eucareg.pki import credentials as cred
from eucareg.pki import eucafiles as ef
from eucareg.registrar.euca_keys import EucaKeySource, read_set
from tests import eucakeys
from tests.factories import ann, record_from
from tests.unit.test_api_harness import (
    CC_SETTINGS,
    CLC_SETTINGS,
    CLOUD_CLC_ID,
    Harness,
    eventually,
    key_of,
    served,
)

NC_FILES = {ef.NODE_CERT, ef.NODE_KEY, ef.CLUSTER_CERT, ef.CLOUD_CERT}
CC_FILES = {ef.NODE_CERT, ef.NODE_KEY, ef.CLUSTER_CERT, ef.CLUSTER_KEY, ef.VTUNPASS, ef.CLOUD_CERT}
# A user that exists on every Linux host, so ownership is tested even without `eucalyptus`.
OTHER_USER = "nobody"


@pytest.fixture(scope="module")
def clc_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CLC's Eucalyptus key directory with two clusters (made once: RSA keys are slow)."""
    keys = tmp_path_factory.mktemp("clc") / "keys"
    eucakeys.make_clc_keys(keys, ("cluster1", "cluster2"))
    return keys


@pytest.fixture
def keys(tmp_path: Path, clc_keys: Path) -> Path:
    """A copy of it the test may damage."""
    copy = tmp_path / "euca-keys"
    shutil.copytree(clc_keys, copy)
    return copy


def digest_of(directory: Path) -> dict[str, tuple[str, int, int]]:
    """Every file under `directory`: its content's hash, inode and mtime."""
    return {
        str(p.relative_to(directory)): (
            hashlib.sha256(p.read_bytes()).hexdigest(),
            p.stat().st_ino,
            p.stat().st_mtime_ns,
        )
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


# -- the registrar's side: reading and checking ---------------------------------------------


def test_each_role_gets_what_euca_conf_copies_to_it(keys: Path, tmp_path: Path) -> None:
    cc = read_set(Role.CC, "cluster2", keys)
    assert cc.state == "ready", cc.reason
    assert set(cc.files) == CC_FILES
    assert cc.files[ef.NODE_KEY] == (keys / "cluster2" / ef.NODE_KEY).read_bytes()
    assert cc.files[ef.CLOUD_CERT] == (keys / ef.CLOUD_CERT).read_bytes()
    for role in (Role.WALRUS, Role.SC):
        got = read_set(role, "cluster1", keys)
        assert (got.state, set(got.files)) == ("ready", {ef.P12})
    cc_keys = tmp_path / "cc-keys"
    eucakeys.copy_to_cc(keys, cc_keys, "cluster1")
    nc = read_set(Role.NC, "cluster1", cc_keys)
    assert nc.state == "ready", nc.reason
    assert set(nc.files) == NC_FILES
    assert nc.files[ef.NODE_KEY] == (keys / "cluster1" / ef.NODE_KEY).read_bytes()
    # cloud-pk.pem never leaves the CLC, whatever the role.
    for got in (cc, nc):
        assert "cloud-pk.pem" not in got.files


def test_a_cc_never_gets_another_clusters_directory(keys: Path) -> None:
    """CC cluster1's set is cluster1's files; a cluster with no directory has none, and a
    cluster2 directory holding cluster1's keys is refused by its subjects."""
    one = read_set(Role.CC, "cluster1", keys)
    two = read_set(Role.CC, "cluster2", keys)
    assert one.files[ef.NODE_KEY] != two.files[ef.NODE_KEY]
    missing = read_set(Role.CC, "cluster3", keys)
    assert missing.state == "missing"
    assert "cluster3/" in missing.reason and "--register-cluster" in missing.reason
    shutil.rmtree(keys / "cluster2")
    shutil.copytree(keys / "cluster1", keys / "cluster2")
    forged = read_set(Role.CC, "cluster2", keys)
    assert forged.state == "invalid"
    assert "O=cc-cluster1, not O=cc-cluster2" in forged.reason
    assert not forged.files


def test_a_node_key_that_is_not_its_certificates_is_refused(keys: Path) -> None:
    shutil.copy(keys / "cluster2" / ef.NODE_KEY, keys / "cluster1" / ef.NODE_KEY)
    got = read_set(Role.CC, "cluster1", keys)
    assert got.state == "invalid" and not got.files
    assert "node-pk.pem is not the key node-cert.pem certifies" in got.reason


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda k: (k / "cluster1" / ef.NODE_CERT).write_text("junk"), "not a PEM certificate"),
        (lambda k: (k / "cluster1" / ef.NODE_KEY).write_text("junk"), "not an unencrypted PEM"),
        (lambda k: (k / ef.CLOUD_CERT).write_bytes(b""), "cloud-cert.pem is empty"),
        (
            lambda k: (k / "cluster1" / ef.VTUNPASS).write_bytes(b"x" * (ef.MAX_FILE + 1)),
            "larger than a key file",
        ),
        (
            lambda k: (
                (k / "cluster1" / ef.NODE_KEY).unlink(),
                (k / "cluster1" / ef.NODE_KEY).symlink_to("/etc/passwd"),
            ),
            "symbolic link",
        ),
    ],
)
def test_a_damaged_set_is_refused_with_its_reason(keys: Path, damage: Any, reason: str) -> None:
    damage(keys)
    got = read_set(Role.CC, "cluster1", keys)
    assert got.state == "invalid", got
    assert reason in got.reason
    assert not got.files


def test_a_keystore_that_does_not_open_with_eucalyptus_password_is_refused(keys: Path) -> None:
    (keys / ef.P12).write_bytes(b"\x30\x82not a keystore")
    got = read_set(Role.WALRUS, None, keys)
    assert got.state == "invalid" and "PKCS#12" in got.reason


def test_missing_files_are_named_and_vtunpass_is_optional(keys: Path) -> None:
    (keys / "cluster1" / ef.VTUNPASS).unlink()
    got = read_set(Role.CC, "cluster1", keys)
    assert got.state == "ready" and ef.VTUNPASS not in got.files
    (keys / "cluster1" / ef.NODE_KEY).unlink()
    got = read_set(Role.CC, "cluster1", keys)
    assert got.state == "missing"
    assert str(keys / "cluster1" / ef.NODE_KEY) in got.reason


async def test_the_source_reads_a_set_again_only_when_its_files_change(keys: Path) -> None:
    source = EucaKeySource(keys, poll=0.02)
    first = await source.current(Role.CC, "cluster1")
    again = await source.current(Role.CC, "cluster1")
    assert again is first  # cached by stat, not read again
    with source.watching(Role.CC, "cluster1") as changed:
        (keys / "cluster1" / ef.VTUNPASS).write_bytes(b"another password\n")
        await asyncio.wait_for(changed.wait(), 5)
    now = await source.current(Role.CC, "cluster1")
    assert now.files[ef.VTUNPASS] == b"another password\n"
    assert now.digest != first.digest
    await source.close()


# -- the registrar's side: serving ----------------------------------------------------------


@pytest.fixture
async def clc(tmp_path: Path, keys: Path) -> AsyncIterator[Harness]:
    async with served(tmp_path / "clc", CLC_SETTINGS) as harness:
        harness.registrar.desk.euca_keys = EucaKeySource(keys, poll=0.05)
        yield harness


async def ask(
    h: Harness, a: Announcement, key: Any = None, wait: float = 0, **fields: Any
) -> tuple[int, Any]:
    return await h.signed(
        "/v1/credentials",
        key or key_of(a),
        {"component_id": a.component_id, **fields},
        query=f"?wait={wait:g}",
    )


async def register(h: Harness, a: Announcement) -> dict[str, Any]:
    """`a` registered through an install window; its first (plain) credential answer."""
    await h.post("/v1/trust/install-window", {"open": True, "for": "10m"})
    h.announce(a)
    await h.record_status(a.component_id, "awaiting-key")
    status, answer = await ask(h, a, wait=10)
    assert status == 200, answer
    return dict(answer)


def files_of(answer: dict[str, Any]) -> dict[str, bytes]:
    return {n: base64.b64decode(v) for n, v in answer["eucalyptus"]["files"].items()}


async def test_a_registered_cc_that_asks_gets_its_clusters_files(clc: Harness, keys: Path) -> None:
    cc = ann(Role.CC, cluster="cluster2")
    plain = await register(clc, cc)
    assert "eucalyptus" not in plain  # not asked for: no private key leaves the CLC
    status, answer = await ask(clc, cc, euca="")
    assert status == 200
    assert answer["eucalyptus"]["state"] == "ready"
    got = files_of(answer)
    assert set(got) == CC_FILES
    assert got[ef.CLUSTER_KEY] == (keys / "cluster2" / ef.CLUSTER_KEY).read_bytes()
    assert got[ef.NODE_KEY] != (keys / "cluster1" / ef.NODE_KEY).read_bytes()
    assert ef.digest(got) == answer["eucalyptus"]["digest"]
    events = (await clc.get("/v1/events", component_id=cc.component_id))[1]["events"]
    assert any(e["code"] == "euca-keys-sent" for e in events)


async def test_strangers_forgers_and_the_deregistered_get_nothing(clc: Harness) -> None:
    walrus = ann(Role.WALRUS)
    await register(clc, walrus)
    # Not registered: told to wait, no files.
    stranger = ann(Role.WALRUS)
    status, answer = await ask(clc, stranger, euca="")
    assert status == 202 and "eucalyptus" not in answer and "files" not in answer
    # Signed by another key, naming the registered walrus: refused.
    status, answer = await ask(clc, walrus, key=key_of(stranger), euca="")
    assert status == 403 and "eucalyptus" not in answer
    status, answer = await ask(clc, walrus, euca="")
    assert status == 200 and set(files_of(answer)) == {ef.P12}
    assert (await clc.post("/v1/deregister", {"component_id": walrus.component_id}))[0] == 200
    status, answer = await ask(clc, walrus, euca="")
    assert status == 202 and "eucalyptus" not in answer


async def test_a_registrar_that_does_not_deliver_says_so(tmp_path: Path) -> None:
    async with served(tmp_path / "clc", CLC_SETTINGS) as h:
        walrus = ann(Role.WALRUS)
        await register(h, walrus)
        status, answer = await ask(h, walrus, euca="")
        assert status == 200
        assert answer["eucalyptus"]["state"] == "off"
        assert answer["eucalyptus"]["files"] == {}
        assert "deliver_keys is off" in answer["eucalyptus"]["reason"]


async def test_a_bad_set_is_refused_with_its_reason_and_never_served(
    clc: Harness, keys: Path
) -> None:
    cc = ann(Role.CC, cluster="cluster1")
    await register(clc, cc)
    (keys / "cluster1" / ef.NODE_CERT).write_text("-----BEGIN CERTIFICATE-----\nAAAA\n")
    status, answer = await ask(clc, cc, euca="")
    assert status == 200
    euca = answer["eucalyptus"]
    assert euca["state"] == "invalid" and euca["files"] == {}
    assert "node-cert.pem is not a PEM certificate" in euca["reason"]
    events = (await clc.get("/v1/events", component_id=cc.component_id))[1]["events"]
    assert any(e["code"] == "euca-keys-invalid" for e in events)


async def test_a_watch_ends_as_soon_as_the_files_appear(clc: Harness, keys: Path) -> None:
    """The component watching its certificate, holding the "missing" answer, is answered
    when `euca_conf` creates the cluster's directory: not when its wait runs out."""
    shutil.rmtree(keys / "cluster1")
    cc = ann(Role.CC, cluster="cluster1")
    await register(clc, cc)
    status, answer = await ask(clc, cc, euca="")
    assert answer["eucalyptus"]["state"] == "missing"
    serial = format(
        certificates.load_cert_pem(answer["files"]["cluster-cert.pem"]).serial_number, "x"
    )
    held = asyncio.ensure_future(
        ask(clc, cc, wait=25, have=serial, euca=answer["eucalyptus"]["digest"])
    )
    await eventually(lambda: bool(clc.registrar.desk.euca_keys._watchers), "the watch")  # type: ignore[union-attr]
    assert not held.done()
    started = time.monotonic()
    eucakeys.add_cluster(keys, "cluster1")
    status, answer = await asyncio.wait_for(held, 20)
    assert time.monotonic() - started < 15
    assert status == 200 and answer["eucalyptus"]["state"] == "ready"
    assert files_of(answer)[ef.NODE_KEY] == (keys / "cluster1" / ef.NODE_KEY).read_bytes()


async def test_an_nc_of_another_cluster_gets_no_node_key(tmp_path: Path, keys: Path) -> None:
    """The CC serves its own cluster's node key only: a record of another cluster (which
    its policy never registers) is refused by the desk itself."""
    cc_keys = tmp_path / "cc-keys"
    eucakeys.copy_to_cc(keys, cc_keys, "cluster1")
    async with served(tmp_path / "cc", CC_SETTINGS) as cc:
        cc.registrar.desk.euca_keys = EucaKeySource(cc_keys)
        ours = record_from(ann(Role.NC, cluster="cluster1"))
        theirs = record_from(ann(Role.NC, cluster="cluster2"))
        good = await cc.registrar.desk._euca_set(ours)
        assert good.state == "ready" and set(good.files) == NC_FILES
        bad = await cc.registrar.desk._euca_set(theirs)
        assert bad.state == "invalid" and not bad.files
        assert "not of this CC's cluster cluster1" in bad.reason


# -- the agent's side ------------------------------------------------------------------------


def test_the_answer_may_name_only_the_roles_own_files() -> None:
    ok = {"state": "ready", "reason": "", "digest": ef.digest({}), "files": {}}
    assert parse(ok, Role.NC).files == {}
    for name in ("../../etc/shadow", "cloud-pk.pem", "euca.p12"):
        raw = {**ok, "files": {name: base64.b64encode(b"x").decode()}}
        with pytest.raises(ValueError, match="not a nc's file"):
            parse(raw, Role.NC)
    with pytest.raises(ValueError, match="not base64"):
        parse({**ok, "files": {ef.NODE_KEY: "!!"}}, Role.NC)
    files = {ef.NODE_KEY: base64.b64encode(b"x").decode()}
    with pytest.raises(ValueError, match="digest does not match"):
        parse({**ok, "files": files}, Role.NC)


def nc_files(keys: Path, tmp_path: Path) -> dict[str, bytes]:
    cc_keys = tmp_path / "cc-keys"
    eucakeys.copy_to_cc(keys, cc_keys, "cluster1")
    return dict(read_set(Role.NC, "cluster1", cc_keys).files)


def test_files_are_written_owned_by_the_user_with_eucalyptus_modes(
    keys: Path, tmp_path: Path
) -> None:
    target = tmp_path / "nc" / "var" / "lib" / "eucalyptus" / "keys"
    conf = EucalyptusKeys(True, target, OTHER_USER)
    files = nc_files(keys, tmp_path)
    assert sorted(write_files(conf, files)) == sorted(files)
    entry = pwd.getpwnam(OTHER_USER)
    st = os.stat(target)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (entry.pw_uid, 0o700)
    for name, data in files.items():
        st = os.stat(target / name)
        assert (target / name).read_bytes() == data
        assert (st.st_uid, st.st_gid) == (entry.pw_uid, entry.pw_gid)
        assert stat.S_IMODE(st.st_mode) == (0o600 if name == ef.NODE_KEY else 0o644)
    assert not [p for p in target.iterdir() if p.name.startswith(".")]  # no temporary left


def test_unchanged_files_are_not_rewritten(keys: Path, tmp_path: Path) -> None:
    target = tmp_path / "keys"
    conf = EucalyptusKeys(True, target, OTHER_USER)
    files = nc_files(keys, tmp_path)
    write_files(conf, files)
    before = digest_of(target)
    assert write_files(conf, files) == []
    assert digest_of(target) == before
    # Someone chmods a key: put right in place, not rewritten.
    os.chmod(target / ef.NODE_KEY, 0o644)
    assert write_files(conf, files) == []
    assert stat.S_IMODE(os.stat(target / ef.NODE_KEY).st_mode) == 0o600
    # A changed file is replaced (a new inode: renamed into place), the others left alone.
    changed = {**files, ef.CLOUD_CERT: (keys / "cluster2" / ef.NODE_CERT).read_bytes()}
    assert write_files(conf, changed) == [ef.CLOUD_CERT]
    after = digest_of(target)
    assert after[ef.CLOUD_CERT][1] != before[ef.CLOUD_CERT][1]
    assert after[ef.NODE_KEY][:2] == before[ef.NODE_KEY][:2]


def test_a_missing_user_is_a_clear_error_and_nothing_is_written(keys: Path, tmp_path: Path) -> None:
    target = tmp_path / "keys"
    conf = EucalyptusKeys(True, target, "no-such-user-eucareg")
    with pytest.raises(EucaKeysError, match="'no-such-user-eucareg' does not exist"):
        write_files(conf, nc_files(keys, tmp_path))
    assert not target.exists()
    # The component keeps going and says why.
    euca = EucaKeys(conf, Role.NC, "cluster1")
    files = nc_files(keys, tmp_path / "again")
    raw = {
        "state": "ready",
        "reason": "",
        "digest": ef.digest(files),
        "files": {n: base64.b64encode(d).decode() for n, d in files.items()},
    }
    euca.receive(raw)
    assert euca.state == "failed" and "does not exist" in euca.reason
    assert euca.digest == ef.digest(files)  # the next watch does not return at once


def test_a_set_of_another_cluster_is_not_written(keys: Path, tmp_path: Path) -> None:
    """Checked on the component too: cluster2's node pair is not written on a cluster1 NC."""
    cc_keys = tmp_path / "cc2"
    eucakeys.copy_to_cc(keys, cc_keys, "cluster2")
    files = dict(read_set(Role.NC, "cluster2", cc_keys).files)
    target = tmp_path / "keys"
    euca = EucaKeys(EucalyptusKeys(True, target, OTHER_USER), Role.NC, "cluster1")
    euca.receive(
        {
            "state": "ready",
            "reason": "",
            "digest": ef.digest(files),
            "files": {n: base64.b64encode(d).decode() for n, d in files.items()},
        }
    )
    assert euca.state == "failed" and "not O=cc-cluster1" in euca.reason
    assert not target.exists()


async def test_an_agent_collecting_writes_both_sets_apart(tmp_path: Path, keys: Path) -> None:
    """A CC collecting over TLS with delivery on: its eucareg credentials in its key_dir,
    Eucalyptus's cluster files in the Eucalyptus directory, neither touching the other."""
    key_dir = tmp_path / "eucareg-keys"
    euca_dir = tmp_path / "eucalyptus-keys"
    async with served(tmp_path / "clc", CLC_SETTINGS, tls_dir=tmp_path / "tls") as clc:
        clc.registrar.desk.euca_keys = EucaKeySource(keys, poll=0.05)
        clc.local.append({"role": "clc", "component_id": CLOUD_CLC_ID})
        await clc.registrar.open_install_window(600)  # served over TLS: not through .post
        cc = ann(Role.CC, cluster="cluster1")
        clc.announce(cc)
        await clc.record_status(cc.component_id, "awaiting-key")
        identity = Identity(cc.component_id, key_of(cc), cc.fingerprint)
        endpoint = Endpoint("127.0.0.1", clc.client.port or 0, CLOUD_CLC_ID)
        expect = tls.Expect(Role.CLC, component_id=CLOUD_CLC_ID, root=clc.cloud.issuer.cert)
        euca = EucaKeys(EucalyptusKeys(True, euca_dir, OTHER_USER), Role.CC, "cluster1")
        async with aiohttp.ClientSession() as session:
            outcome = await collect.collect_credentials(
                session,
                identity,
                Role.CC,
                endpoint,
                key_dir,
                wait=10,
                expect=expect,
                named=names.CertIdentity(Role.CC, "cluster1", cc.component_id),
                euca=euca,
            )
            assert outcome is collect.Outcome.WRITTEN
            first = euca.digest
            assert first.startswith("sha256:")
            # Its watch sends that digest back (the schema takes it) and, nothing having
            # changed, is held until its wait runs out: the same set, nothing rewritten.
            serial = format(certificates.load_cert(key_dir / ef.CLUSTER_CERT).serial_number, "x")
            before = digest_of(euca_dir)
            watched = await collect.collect_credentials(
                session,
                identity,
                Role.CC,
                endpoint,
                key_dir,
                wait=1,
                have=serial,
                expect=expect,
                named=names.CertIdentity(Role.CC, "cluster1", cc.component_id),
                client=None,
                euca=euca,
            )
            assert watched is collect.Outcome.UNCHANGED
            assert euca.digest == first and euca.written == []
            assert digest_of(euca_dir) == before
            # Someone deletes a key: the next watch's answer puts it back, and only it.
            (euca_dir / ef.NODE_KEY).unlink()
            await collect.collect_credentials(
                session,
                identity,
                Role.CC,
                endpoint,
                key_dir,
                wait=1,
                have=serial,
                expect=expect,
                named=names.CertIdentity(Role.CC, "cluster1", cc.component_id),
                euca=euca,
            )
            assert euca.written == [ef.NODE_KEY]
            assert (euca_dir / ef.NODE_KEY).read_bytes() == (
                keys / "cluster1" / ef.NODE_KEY
            ).read_bytes()
    assert euca.state == "written", euca.reason
    assert sorted(p.name for p in key_dir.iterdir()) == sorted(cred.required_files(Role.CC))
    assert sorted(p.name for p in euca_dir.iterdir()) == sorted(CC_FILES)
    # Same names, different files: eucareg's cluster-cert.pem is its own, not Eucalyptus's.
    ours = (key_dir / ef.CLUSTER_CERT).read_bytes()
    theirs = (euca_dir / ef.CLUSTER_CERT).read_bytes()
    assert ours != theirs
    assert theirs == (keys / "cluster1" / ef.CLUSTER_CERT).read_bytes()


# -- configuration ---------------------------------------------------------------------------


BASE = {"address": "10.0.0.1", "components": {"nc": {"cluster": "cluster1"}}}


@pytest.mark.parametrize(
    ("key_dir", "keys_dir", "relation"),
    [
        ("/var/lib/eucalyptus/keys", None, "is Eucalyptus's"),
        ("/var/lib/eucalyptus/keys/", None, "is Eucalyptus's"),
        ("/srv/k", "/srv/k/../k", "is Eucalyptus's"),
        ("/var/lib/eucalyptus/keys/eucareg", None, "is inside"),
        ("/var/lib/eucalyptus", None, "contains"),
        ("/srv/eucareg", "/srv/eucareg/euca", "contains"),
    ],
)
def test_key_dir_and_the_eucalyptus_directory_may_not_meet(
    key_dir: str, keys_dir: str | None, relation: str
) -> None:
    raw: dict[str, Any] = {**BASE, "key_dir": key_dir}
    if keys_dir is not None:
        raw["eucalyptus"] = {"keys_dir": keys_dir}
    with pytest.raises(ConfigError, match=f"key_dir: .* {relation}") as caught:
        from_mapping(raw)
    assert "would overwrite them" in str(caught.value)


def test_the_table_is_off_by_default_and_checked() -> None:
    assert from_mapping(BASE).eucalyptus == EucalyptusKeys()
    assert not EucalyptusKeys().deliver
    conf = from_mapping(
        {**BASE, "eucalyptus": {"deliver_keys": True, "keys_dir": "/srv/ek", "user": "euca"}}
    ).eucalyptus
    assert conf == EucalyptusKeys(True, Path("/srv/ek"), "euca")
    for table, message in (
        ({"deliver_keys": "yes"}, "deliver_keys: expected true or false"),
        ({"keys_dir": "relative"}, "must be an absolute path"),
        ({"keys_dir": "/"}, "/ is not a key directory"),
        ({"user": "-rf"}, "eucalyptus.user: expected a user name"),
        ({"user": "a/b"}, "eucalyptus.user: expected a user name"),
        ({"deliver": True}, "eucalyptus.deliver: unknown key"),
    ):
        with pytest.raises(EucalyptusConfigError, match=message):
            parse_config(table, Path("/var/lib/eucareg/keys"))


async def test_a_component_sending_any_digest_it_likes_makes_one_event(clc: Harness) -> None:
    """Each request with a stale digest is answered at once, but the event log hears of the
    set once, not once per request."""
    walrus = ann(Role.WALRUS)
    await register(clc, walrus)
    for n in range(5):
        status, answer = await ask(clc, walrus, euca=f"sha256:{n:064x}")
        assert status == 200 and answer["eucalyptus"]["state"] == "ready"
    events = (await clc.get("/v1/events", component_id=walrus.component_id))[1]["events"]
    assert [e["code"] for e in events].count("euca-keys-sent") == 1
    # A digest the schema does not take is refused before anything is looked at.
    status, answer = await ask(clc, walrus, euca="../../etc")
    assert status == 400, answer


def test_the_component_refuses_a_digest_it_could_not_send_back() -> None:
    raw = {"state": "missing", "reason": "r", "digest": "not a digest", "files": {}}
    with pytest.raises(ValueError, match="is not a digest"):
        parse(raw, Role.NC)


def test_a_temporary_file_a_crash_left_is_removed_at_the_next_write(
    keys: Path, tmp_path: Path
) -> None:
    target = tmp_path / "keys"
    conf = EucalyptusKeys(True, target, OTHER_USER)
    files = nc_files(keys, tmp_path)
    write_files(conf, files)
    leftover = target / f".{ef.NODE_KEY}.k3x9q2"  # as mkstemp names them
    leftover.write_bytes(b"half a key")
    write_files(conf, files)
    assert not leftover.exists()
    assert sorted(p.name for p in target.iterdir()) == sorted(files)


def test_check_config_shows_the_table(tmp_path: Path) -> None:
    config = tmp_path / "eucareg.toml"
    config.write_text(
        'address = "10.0.0.1"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        "[eucalyptus]\n"
        "deliver_keys = true\n"
        f'keys_dir = "{tmp_path / "euca"}"\n'
        "[components.nc]\n"
        'cluster = "cluster1"\n'
    )
    result = CliRunner().invoke(main, ["check-config", "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)["eucalyptus"]
    assert shown == {"deliver_keys": True, "keys_dir": str(tmp_path / "euca"), "user": "eucalyptus"}
    config.write_text(config.read_text().replace(str(tmp_path / "euca"), str(tmp_path / "state")))
    refused = CliRunner().invoke(main, ["check-config", "--config", str(config)])
    assert refused.exit_code == 2
    assert "is inside Eucalyptus's key directory" in " ".join(refused.output.split())


def test_a_key_dir_that_meets_the_eucalyptus_directory_through_a_link_is_refused(
    keys: Path, tmp_path: Path
) -> None:
    """The configuration compares paths as written; the writer follows the links too."""
    own = tmp_path / "eucareg-keys"
    own.mkdir()
    (own / "cloud-cert.pem").write_bytes(b"eucareg's own")
    link = tmp_path / "euca-link"
    link.symlink_to(own)
    conf = EucalyptusKeys(True, link, OTHER_USER)
    with pytest.raises(EucaKeysError, match=r"through symbolic links, key_dir: .* is Eucalyptus"):
        write_files(conf, nc_files(keys, tmp_path), own)
    assert (own / "cloud-cert.pem").read_bytes() == b"eucareg's own"
    assert sorted(p.name for p in own.iterdir()) == ["cloud-cert.pem"]
