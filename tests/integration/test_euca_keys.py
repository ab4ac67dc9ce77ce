"""Eucalyptus's own keys delivered by eucareg, in a lab (issue 10, part 5): a CLC, a CC and an
NC in network namespaces, each with key delivery on and a Eucalyptus key directory of its own
(in the test's temporary directory). The CLC's keys are made by the test in the 1.6 layout;
the cluster's directory appears only after the CC registered, as `euca_conf
--register-cluster` would make it. The NC ends with the cluster's shared node key pair, owned
by `eucalyptus`, its own eucareg credentials untouched; `eucareg deregister` then runs the CC's
`deregister-node` hook and reports its outcome.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from eucalab.cloud import LabCloud
from eucalab.cloud_probes import all_registered
from eucareg.pki import eucafiles as ef
from tests import eucakeys
from tests.integration.conftest import CloudFactory

pytestmark = pytest.mark.integration

USER = "eucalyptus"
PLAN: dict[str, dict[str, str | None]] = {
    "clc": {"clc": None},
    "cc": {"cc": "cluster1"},
    "node1": {"nc": "cluster1"},
}
NC_FILES = {ef.NODE_CERT, ef.NODE_KEY, ef.CLUSTER_CERT, ef.CLOUD_CERT}
CC_FILES = NC_FILES | {ef.CLUSTER_KEY, ef.VTUNPASS}


@pytest.fixture(scope="module")
def eucalyptus_user() -> Iterator[pwd.struct_passwd]:
    """The `eucalyptus` user (scripts/system-deps.sh --test adds it); made here if missing,
    and then removed again."""
    try:
        yield pwd.getpwnam(USER)
        return
    except KeyError:
        pass
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    made = subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if made.returncode != 0:
        pytest.skip(
            f"no user {USER!r} and it cannot be created ({made.stderr.strip()}): run "
            "scripts/system-deps.sh --test as root"
        )
    try:
        yield pwd.getpwnam(USER)
    finally:
        userdel = shutil.which("userdel") or "/usr/sbin/userdel"
        subprocess.run([userdel, USER], capture_output=True, timeout=30, check=False)


def euca_dir(cloud: LabCloud, host: str) -> Path:
    return cloud.host_dir(host) / "eucalyptus" / "keys"


def snapshot(directory: Path) -> dict[str, tuple[str, int, int, int]]:
    """Each file: content hash, inode, mtime and mode: any rewrite shows."""
    found = {}
    for path in sorted(directory.iterdir()):
        st = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        found[path.name] = (digest, st.st_ino, st.st_mtime_ns, st.st_mode)
    return found


def wait_for_file(path: Path, content: bytes, timeout: float = 90) -> None:
    """Until `path` holds `content` (the delivery this test is about), bounded."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_bytes() == content):
        assert time.monotonic() < deadline, f"{path} never got the expected content"
        time.sleep(0.2)


def test_an_nc_ends_with_the_clusters_node_key_pair_and_deregistering_runs_the_hook(
    cloud_factory: CloudFactory, eucalyptus_user: pwd.struct_passwd
) -> None:
    cloud = cloud_factory(PLAN)
    tables = {}
    for host in PLAN:
        keys = euca_dir(cloud, host)
        tables[host] = [
            f'eucalyptus = {{ deliver_keys = true, keys_dir = "{keys}", user = "{USER}" }}'
        ]
    log = cloud.host_dir("cc") / "hooks.log"
    deregister_node = (
        "#!/bin/sh\n"
        f'echo "deregister-node $EUCAREG_ID $EUCAREG_ADDRESS $EUCAREG_EVENT $1" >> {log}\n'
    )
    cloud.settings = {
        **cloud.settings,
        "top_level": tables,
        "hooks": {"cc": {"deregister-node": deregister_node}},
    }
    clc_keys = euca_dir(cloud, "clc")
    eucakeys.make_clc_keys(clc_keys, clusters=())  # no cluster registered with Eucalyptus yet
    cloud.start_all(["clc", "cc", "node1"])
    cloud.wait_for("clc", all_registered(cloud.expected()), timeout=90)
    cc_id = cloud.component_id("cc", "cc")
    nc_id = cloud.component_id("node1", "nc")

    # Registered, but Eucalyptus's cluster directory is not there yet: both are told so.
    missing = cloud.wait_for_event("clc", cc_id, "credentials", "euca-keys-missing", timeout=60)
    assert f"{clc_keys}/cluster1/" in missing["reason"]
    cloud.wait_for_event("cc", nc_id, "credentials", "euca-keys-missing", timeout=60)
    nc_own = cloud.key_dir("node1")
    deadline = time.monotonic() + 30
    while not (nc_own / "node-cert.pem").exists():
        assert time.monotonic() < deadline, "the NC never got its eucareg credentials"
        time.sleep(0.2)
    before = snapshot(nc_own)

    # `euca_conf --register-cluster` makes keys/cluster1/ on the CLC: it reaches the CC, then
    # the NC, without anyone asking again.
    eucakeys.add_cluster(clc_keys, "cluster1")
    node_pk = (clc_keys / "cluster1" / ef.NODE_KEY).read_bytes()
    nc_euca = euca_dir(cloud, "node1")
    wait_for_file(nc_euca / ef.NODE_KEY, node_pk)
    wait_for_file(nc_euca / ef.NODE_CERT, (clc_keys / "cluster1" / ef.NODE_CERT).read_bytes())
    assert {p.name for p in nc_euca.iterdir()} == NC_FILES
    assert {p.name for p in euca_dir(cloud, "cc").iterdir()} == CC_FILES
    assert (euca_dir(cloud, "cc") / ef.CLUSTER_KEY).read_bytes() == (
        clc_keys / "cluster1" / ef.CLUSTER_KEY
    ).read_bytes()
    for directory in (nc_euca, euca_dir(cloud, "cc")):
        st = directory.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (eucalyptus_user.pw_uid, 0o700)
        for path in directory.iterdir():
            st = path.stat()
            assert (st.st_uid, st.st_gid) == (eucalyptus_user.pw_uid, eucalyptus_user.pw_gid)
            private = path.name in ef.PRIVATE
            assert stat.S_IMODE(st.st_mode) == (0o600 if private else 0o644), path
    # The NC's own eucareg credentials: not a byte, inode or mode changed; and they are not
    # Eucalyptus's files of the same names.
    assert snapshot(nc_own) == before
    assert (nc_own / ef.NODE_CERT).read_bytes() != (nc_euca / ef.NODE_CERT).read_bytes()
    assert not (nc_own / ef.NODE_KEY).exists() or ((nc_own / ef.NODE_KEY).read_bytes() != node_pk)
    sent = cloud.wait_for_event("cc", nc_id, "credentials", "euca-keys-sent", timeout=30)
    assert str(euca_dir(cloud, "cc")) in sent["reason"]
    # Every watch since went through: no request refused, no write failed.
    for host in ("cc", "node1"):
        text = cloud.logs(host)
        assert "HTTP 400" not in text and "cannot write Eucalyptus key files" not in text, host

    # Deregistering the NC on its CC runs deregister-node, and the operator sees the outcome.
    done = cloud.cli("cc", "deregister", nc_id)
    assert f"deregistered {nc_id}; its credentials are revoked" in done.stdout
    assert "deregister-node: ok" in done.stdout, done.stdout
    address = str(cloud.lab.address("node1"))
    lines = [line for line in cloud.hook_log("cc") if line.startswith("deregister-node")]
    assert lines == [f"deregister-node {nc_id} {address} deregister {address}"]
    cloud.wait_for_event("cc", nc_id, "hook", "deregister-hook-ok", timeout=10)
    # Journaled after its registration run (the NC, still announcing into the open install
    # window, may be registered again at once: its `node` hook then runs once more).
    names = [r["hook"].rsplit("/", 1)[1] for r in cloud.hook_runs("cc", nc_id)]
    assert names[:2] == ["node", "deregister-node"], names
    # Eucalyptus's files stay on the NC (euca_conf --deregister-nodes leaves them too).
    assert (nc_euca / ef.NODE_KEY).read_bytes() == node_pk
    assert os.stat(nc_euca / ef.NODE_KEY).st_uid == eucalyptus_user.pw_uid
