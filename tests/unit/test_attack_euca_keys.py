"""An attack review of the delivery of Eucalyptus's own key files (issue 10): what the agent,
running as root, does with links, FIFOs and odd files planted in the Eucalyptus key directory
(which the `eucalyptus` user owns), path-like and oversized answers, and what the registrar
serves from a directory holding such things; many watchers of one set.
"""

from __future__ import annotations

import asyncio
import base64
import os
import pwd
import shutil
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from eucareg.agent import collect
from eucareg.agent.euca_keys import EucaKeys, EucaKeysError, parse, write_files
from eucareg.agent.identity import Identity
from eucareg.agent.locate import Endpoint
from eucareg.config.eucalyptus import EucalyptusConfigError, EucalyptusKeys
from eucareg.config.eucalyptus import parse as parse_config
from eucareg.core.model import Role
from eucareg.pki import eucafiles as ef
from eucareg.pki import names, tls
from eucareg.pki.signing import signed_body
from eucareg.registrar.euca_keys import INVALID, READY, EucaKeySource, read_set
from tests import eucakeys
from tests.factories import ann
from tests.unit.test_api_harness import CLC_SETTINGS, CLOUD_CLC_ID, Harness, key_of, served
from tests.unit.test_euca_keys import OTHER_USER, ask, register

SECOND_USER = "daemon"  # another user every Linux host has


@pytest.fixture(scope="module")
def clc_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    keys = tmp_path_factory.mktemp("clc") / "keys"
    eucakeys.make_clc_keys(keys, ("cluster1", "cluster2"))
    return keys


@pytest.fixture
def keys(tmp_path: Path, clc_keys: Path) -> Path:
    copy = tmp_path / "euca-keys"
    shutil.copytree(clc_keys, copy)
    return copy


@pytest.fixture
def nc_files(keys: Path, tmp_path: Path) -> dict[str, bytes]:
    cc_keys = tmp_path / "cc-keys"
    eucakeys.copy_to_cc(keys, cc_keys, "cluster1")
    return dict(read_set(Role.NC, "cluster1", cc_keys).files)


def victim(tmp_path: Path, data: bytes = b"precious\n", mode: int = 0o644) -> Path:
    path = tmp_path / "outside" / "victim"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    os.chown(path, 0, 0)
    return path


def untouched(path: Path, data: bytes, mode: int = 0o644) -> bool:
    st = os.lstat(path)
    return path.read_bytes() == data and (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, mode)


def answer_of(files: dict[str, bytes]) -> dict[str, Any]:
    return {
        "state": "ready",
        "reason": "",
        "digest": ef.digest(files),
        "files": {n: base64.b64encode(d).decode() for n, d in files.items()},
    }


# -- the agent's side: what is planted in the directory it writes ----------------------------


def test_a_hard_link_with_the_same_bytes_is_replaced_not_chmod_ed(
    tmp_path: Path, nc_files: dict[str, bytes]
) -> None:
    """The `eucalyptus` user links another file (same bytes) at node-pk.pem: putting its owner
    and mode right in place would chown and chmod that other file too, as root."""
    target = tmp_path / "keys"
    target.mkdir()
    other = victim(tmp_path, nc_files[ef.NODE_KEY], 0o644)
    os.link(other, target / ef.NODE_KEY)
    conf = EucalyptusKeys(True, target, OTHER_USER)
    assert ef.NODE_KEY in write_files(conf, nc_files)
    assert untouched(other, nc_files[ef.NODE_KEY], 0o644)
    st = os.lstat(target / ef.NODE_KEY)
    assert st.st_ino != os.lstat(other).st_ino and st.st_nlink == 1
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (pwd.getpwnam(OTHER_USER).pw_uid, 0o600)


@pytest.mark.parametrize("same_bytes", [True, False])
def test_a_symlink_at_a_file_name_is_replaced_never_followed(
    tmp_path: Path, nc_files: dict[str, bytes], same_bytes: bool
) -> None:
    target = tmp_path / "keys"
    target.mkdir()
    data = nc_files[ef.CLOUD_CERT] if same_bytes else b"precious\n"
    other = victim(tmp_path, data, 0o640)
    (target / ef.CLOUD_CERT).symlink_to(other)
    write_files(EucalyptusKeys(True, target, OTHER_USER), nc_files)
    assert untouched(other, data, 0o640)
    assert not (target / ef.CLOUD_CERT).is_symlink()
    assert (target / ef.CLOUD_CERT).read_bytes() == nc_files[ef.CLOUD_CERT]


def test_a_fifo_at_a_file_name_neither_hangs_nor_stays(
    tmp_path: Path, nc_files: dict[str, bytes]
) -> None:
    target = tmp_path / "keys"
    target.mkdir()
    os.mkfifo(target / ef.NODE_CERT)
    write_files(EucalyptusKeys(True, target, OTHER_USER), nc_files)
    assert stat.S_ISREG(os.lstat(target / ef.NODE_CERT).st_mode)


def test_a_keys_dir_that_is_a_link_to_etc_is_refused(
    tmp_path: Path, nc_files: dict[str, bytes]
) -> None:
    elsewhere = tmp_path / "etc"
    elsewhere.mkdir()
    link = tmp_path / "keys"
    link.symlink_to(elsewhere)
    euca = EucaKeys(EucalyptusKeys(True, link, OTHER_USER), Role.NC, "cluster1")
    euca.receive(answer_of(nc_files))
    assert euca.state == "failed" and "is not a directory (a symbolic link" in euca.reason
    assert list(elsewhere.iterdir()) == []
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(EucaKeysError, match="is not a directory"):
        write_files(EucalyptusKeys(True, regular, OTHER_USER), nc_files)


def test_a_planted_temporary_name_that_is_a_link_is_left_and_not_followed(
    tmp_path: Path, nc_files: dict[str, bytes]
) -> None:
    target = tmp_path / "keys"
    target.mkdir()
    other = victim(tmp_path)
    (target / f".{ef.NODE_KEY}.planted").symlink_to(other)
    write_files(EucalyptusKeys(True, target, OTHER_USER), nc_files)
    assert untouched(other, b"precious\n")
    assert (target / ef.NODE_KEY).read_bytes() == nc_files[ef.NODE_KEY]


def test_a_directory_at_a_file_name_fails_by_name_and_the_rest_is_kept(
    tmp_path: Path, nc_files: dict[str, bytes]
) -> None:
    target = tmp_path / "keys"
    target.mkdir()
    (target / ef.NODE_KEY).mkdir()
    euca = EucaKeys(EucalyptusKeys(True, target, OTHER_USER), Role.NC, "cluster1")
    euca.receive(answer_of(nc_files))
    assert euca.state == "failed"
    assert (target / ef.NODE_KEY).is_dir()


def test_when_the_users_uid_changes_the_files_follow_without_a_rewrite(
    tmp_path: Path, nc_files: dict[str, bytes]
) -> None:
    target = tmp_path / "keys"
    write_files(EucalyptusKeys(True, target, OTHER_USER), nc_files)
    inodes = {n: os.lstat(target / n).st_ino for n in nc_files}
    assert write_files(EucalyptusKeys(True, target, SECOND_USER), nc_files) == []
    uid = pwd.getpwnam(SECOND_USER).pw_uid
    for name in nc_files:
        st = os.lstat(target / name)
        assert (st.st_ino, st.st_uid) == (inodes[name], uid)


@pytest.mark.parametrize(
    "name", ["../../etc/shadow", "/etc/shadow", "node-pk.pem/..", ".", "", "cloud-pk.pem"]
)
def test_a_path_like_or_unknown_name_is_never_written(tmp_path: Path, name: str) -> None:
    target = tmp_path / "a" / "keys"
    with pytest.raises(ValueError):
        parse({**answer_of({}), "files": {name: "eA=="}}, Role.NC)
    with pytest.raises(EucaKeysError, match="refusing file name"):
        write_files(EucalyptusKeys(True, target, OTHER_USER), {name: b"x"})
    assert not target.exists() and not (tmp_path / "etc").exists()


def test_a_huge_file_in_the_answer_is_refused_and_nothing_written(
    tmp_path: Path, nc_files: dict[str, bytes]
) -> None:
    target = tmp_path / "keys"
    huge = {**nc_files, ef.CLOUD_CERT: b"A" * (ef.MAX_FILE + 1)}
    euca = EucaKeys(EucalyptusKeys(True, target, OTHER_USER), Role.NC, "cluster1")
    euca.receive(answer_of(huge))
    assert euca.state == "failed" and "larger than a key file can be" in euca.reason
    assert not target.exists()


def test_an_answer_whose_digest_does_not_match_its_files_is_not_written(
    tmp_path: Path, nc_files: dict[str, bytes]
) -> None:
    target = tmp_path / "keys"
    raw = {**answer_of(nc_files), "digest": ef.digest({})}
    euca = EucaKeys(EucalyptusKeys(True, target, OTHER_USER), Role.NC, "cluster1")
    euca.receive(raw)
    assert euca.state == "invalid" and "does not match" in euca.reason
    assert not target.exists()


# -- the registrar's side: what is planted in the directory it reads -------------------------


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory", "huge", "socket"])
async def test_odd_files_in_the_registrars_directory_are_refused_without_hanging(
    keys: Path, kind: str
) -> None:
    path = keys / "cluster1" / ef.NODE_KEY
    real = path.read_bytes()
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        elsewhere = keys.parent / "node-pk.pem"
        elsewhere.write_bytes(real)
        path.symlink_to(elsewhere)
    elif kind == "directory":
        path.mkdir()
    elif kind == "huge":
        path.write_bytes(real + b"\n" * (ef.MAX_FILE + 1))
    else:
        import socket

        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()
    got = await asyncio.wait_for(asyncio.to_thread(read_set, Role.CC, "cluster1", keys), 10)
    assert got.state == INVALID and got.files == {}
    assert ef.NODE_KEY in got.reason or str(path) in got.reason


@pytest.mark.parametrize("cluster", ["..", ".", "a/b", "", "../cluster1"])
def test_a_path_like_cluster_reads_nothing(keys: Path, cluster: str) -> None:
    got = read_set(Role.CC, cluster, keys / "cluster2")
    assert got.state == INVALID and got.files == {}


def test_a_cluster_directory_linked_to_another_clusters_is_refused(keys: Path) -> None:
    """keys/cluster3 -> keys/cluster1: a CC registered as cluster3 must not get cluster1's."""
    (keys / "cluster3").symlink_to(keys / "cluster1")
    got = read_set(Role.CC, "cluster3", keys)
    assert got.state == INVALID and "not O=cc-cluster3" in got.reason


def test_eucareg_own_credentials_are_never_served_as_eucalyptus_keys(tmp_path: Path) -> None:
    """A keys_dir that turns out (through a link) to be eucareg's own key_dir: its files carry
    the same names but O=eucareg, so the set is refused, not served."""
    from eucareg.pki import certificates, keypairs

    ca_key = keypairs.generate_key()
    ca = certificates.create_cloud_ca(ca_key, "cloud-1")
    own = tmp_path / "eucareg-keys"
    own.mkdir()
    node_key = keypairs.generate_key()
    cert = certificates.issue_certificate(
        issuer_key=ca_key,
        issuer_cert=ca,
        subject_key=node_key.public_key(),
        role=Role.NC,
        component_id="nc-1",
        cluster="cluster1",
    )
    (own / ef.NODE_KEY).write_bytes(keypairs.key_pem(node_key))
    (own / ef.NODE_CERT).write_bytes(certificates.cert_pem(cert).encode())
    (own / ef.CLUSTER_CERT).write_bytes(certificates.cert_pem(ca).encode())
    (own / ef.CLOUD_CERT).write_bytes(certificates.cert_pem(ca).encode())
    got = read_set(Role.NC, "cluster1", own)
    assert got.state == INVALID and got.files == {}


async def test_many_watchers_share_one_poll_which_ends_with_the_last(keys: Path) -> None:
    """101 components watching one set and 1 another: one poll task; a change wakes every
    watcher of that set (not the other's), and the poll ends once nobody watches."""
    source = EucaKeySource(keys, poll=0.02)
    await source.current(Role.CC, "cluster1")
    await source.current(Role.CC, "cluster2")
    from contextlib import ExitStack

    with ExitStack() as stack:
        events = [stack.enter_context(source.watching(Role.CC, "cluster1")) for _ in range(101)]
        other = stack.enter_context(source.watching(Role.CC, "cluster2"))
        poller = source._poller
        assert poller is not None and len({id(e) for e in events}) == 1
        (keys / "cluster1" / ef.VTUNPASS).write_bytes(b"changed\n")
        await asyncio.wait_for(events[0].wait(), 5)
        assert not other.is_set()
        assert source._poller is poller
    await asyncio.wait_for(poller, 5)
    assert source._watchers == {}
    now = await source.current(Role.CC, "cluster1")
    assert now.state == READY and now.files[ef.VTUNPASS] == b"changed\n"
    await source.close()


async def test_a_set_changed_half_way_is_never_served_mixed(keys: Path, clc_keys: Path) -> None:
    """The CLC's keys/cluster1 replaced by another pair while being read: a node key of one
    pair and the certificate of the other are refused, and the next look serves the new set."""
    source = EucaKeySource(keys, poll=0.02)
    first = await source.current(Role.CC, "cluster1")
    assert first.state == READY
    other = keys.parent / "other"
    eucakeys.add_cluster(other, "cluster1")
    shutil.copy(other / "cluster1" / ef.NODE_KEY, keys / "cluster1" / ef.NODE_KEY)
    mixed = await source.current(Role.CC, "cluster1")
    assert mixed.state == INVALID and "is not the key node-cert.pem certifies" in mixed.reason
    for name in eucakeys.CLUSTER_FILES:
        shutil.copy(other / "cluster1" / name, keys / "cluster1" / name)
    fresh = await source.current(Role.CC, "cluster1")
    assert fresh.state == READY and fresh.files[ef.NODE_KEY] != first.files[ef.NODE_KEY]
    await source.close()


# -- the configuration ------------------------------------------------------------------------


@pytest.mark.parametrize("keys_dir", ["//", "//.", "///", "/var/..", "//var/.."])
def test_the_root_is_never_a_key_directory_however_it_is_spelled(keys_dir: str) -> None:
    """POSIX normpath keeps a leading `//`; on Linux it is the root all the same."""
    with pytest.raises(EucalyptusConfigError, match="/ is not a key directory"):
        parse_config({"keys_dir": keys_dir}, Path("/var/lib/eucareg/keys"))


@pytest.mark.parametrize(
    "keys_dir", ["//var/lib/eucareg/keys", "//var/lib/eucareg", "/var//lib/eucareg/keys/./sub"]
)
def test_a_key_dir_meeting_eucareg_s_is_refused_however_it_is_spelled(keys_dir: str) -> None:
    with pytest.raises(EucalyptusConfigError, match="key_dir: /var/lib/eucareg/keys"):
        parse_config({"keys_dir": keys_dir}, Path("/var/lib/eucareg/keys"))


# -- the registrar's side: who asks ----------------------------------------------------------


@pytest.fixture
async def clc(tmp_path: Path, keys: Path) -> AsyncIterator[Harness]:
    async with served(tmp_path / "clc", CLC_SETTINGS) as harness:
        harness.registrar.desk.euca_keys = EucaKeySource(keys, poll=0.05)
        yield harness


async def test_a_replayed_request_for_the_keys_is_refused(clc: Harness) -> None:
    """Someone who recorded a registered component's signed request (it travels inside TLS,
    but say a proxy kept it) cannot send it again for the private keys."""
    walrus = ann(Role.WALRUS)
    await register(clc, walrus)
    fields = {"component_id": walrus.component_id, "euca": ""}
    path = "/v1/credentials?wait=0"
    recorded = signed_body(key_of(walrus), fields, method="POST", path=path, audience=clc.audience)
    status, answer = await clc.signed(
        "/v1/credentials", key_of(walrus), fields, "?wait=0", recorded
    )
    assert status == 200 and answer["eucalyptus"]["state"] == "ready"
    status, answer = await clc.signed(
        "/v1/credentials", key_of(walrus), fields, "?wait=0", recorded
    )
    assert status in (400, 401, 403) and "eucalyptus" not in answer, answer


@pytest.mark.parametrize("stage", ["pending", "awaiting-key"])
async def test_a_component_not_yet_registered_gets_no_file(clc: Harness, stage: str) -> None:
    cc = ann(Role.CC, cluster="cluster1")
    if stage == "awaiting-key":
        await clc.post("/v1/trust/install-window", {"open": True, "for": "10m"})
    clc.announce(cc)
    await clc.record_status(cc.component_id, stage)
    if stage == "awaiting-key":
        # Hold the registration back: its proven key starts the hook; the answer must not
        # carry files while the record is registering.
        clc.registrar.hook_dir.mkdir(parents=True, exist_ok=True)
        release = clc.registrar.hook_dir / "release"
        hook = clc.registrar.hook_dir / "cluster"
        hook.write_text(f'#!/bin/sh\nwhile [ ! -e "{release}" ]; do sleep 0.05; done\n')
        hook.chmod(0o755)
    status, answer = await ask(clc, cc, euca="")
    assert status == 202 and "eucalyptus" not in answer and "files" not in answer, answer
    if stage == "awaiting-key":
        await clc.record_status(cc.component_id, "registering")
        status, answer = await ask(clc, cc, euca="")
        assert status == 202 and "eucalyptus" not in answer, answer
        release.touch()
        await clc.record_status(cc.component_id, "registered")
        status, answer = await ask(clc, cc, euca="")
        assert status == 200 and answer["eucalyptus"]["state"] == "ready"


async def test_a_registrar_that_is_not_the_pinned_one_plants_no_file(
    tmp_path: Path, keys: Path
) -> None:
    """A rogue CLC (a cloud CA the component did not pin) delivering "keys": the TLS check
    fails before any answer is read, and nothing is written into the Eucalyptus directory."""
    from eucareg.pki import certificates, keypairs

    key_dir = tmp_path / "eucareg-keys"
    euca_dir = tmp_path / "eucalyptus-keys"
    pinned = certificates.create_cloud_ca(keypairs.generate_key(), "the-real-cloud")
    async with served(tmp_path / "rogue", CLC_SETTINGS, tls_dir=tmp_path / "tls") as rogue:
        rogue.registrar.desk.euca_keys = EucaKeySource(keys, poll=0.05)
        rogue.local.append({"role": "clc", "component_id": CLOUD_CLC_ID})
        await rogue.registrar.open_install_window(600)
        cc = ann(Role.CC, cluster="cluster1")
        rogue.announce(cc)
        await rogue.record_status(cc.component_id, "awaiting-key")
        identity = Identity(cc.component_id, key_of(cc), cc.fingerprint)
        endpoint = Endpoint("127.0.0.1", rogue.client.port or 0, CLOUD_CLC_ID)
        expect = tls.Expect(Role.CLC, component_id=CLOUD_CLC_ID, root=pinned)
        euca = EucaKeys(EucalyptusKeys(True, euca_dir, OTHER_USER), Role.CC, "cluster1")
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientConnectorCertificateError) as refused:
                await collect.collect_credentials(
                    session,
                    identity,
                    Role.CC,
                    endpoint,
                    key_dir,
                    wait=5,
                    expect=expect,
                    named=names.CertIdentity(Role.CC, "cluster1", cc.component_id),
                    euca=euca,
                )
    assert "a rogue registrar?" in str(refused.value), refused.value
    assert not euca_dir.exists() and euca.digest == ""
    assert not key_dir.exists() or list(key_dir.iterdir()) == []


def test_a_hard_link_in_the_registrars_directory_is_not_served(keys: Path, tmp_path: Path) -> None:
    """vtunpass is not parsed: a link to another file of the host (the `eucalyptus` user owns
    keys/, and without protected_hardlinks may link any file) would hand it to the CC."""
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$secret:19000:0:99999:7:::\n")
    (keys / "cluster1" / ef.VTUNPASS).unlink()
    os.link(secret, keys / "cluster1" / ef.VTUNPASS)
    got = read_set(Role.CC, "cluster1", keys)
    assert got.state == INVALID and got.files == {}
    assert "has 2 names (a hard link)" in got.reason
