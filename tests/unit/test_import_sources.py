"""`eucareg import`'s readers (issue 10, part 4): the `euca_conf --list-*` output as 1.6.2
prints it, the shell files of /etc/eucalyptus, nodes.list, the key directory (keys made here
with `cryptography`), the cross-checks between them, and stopping the legacy jobs with fake
`initctl`/`systemctl` on PATH. The nastiest inputs are refused with their file and line.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from eucareg.core.model import Role
from eucareg.upgrade import jobs
from eucareg.upgrade.checks import cross_check
from eucareg.upgrade.keys import read_keys
from eucareg.upgrade.sources import (
    Listed,
    parse_listing,
    parse_nodes_list,
    parse_shell,
    read_conf,
)

# As a 10.04 front end printed it (forum posts of 2011; instance ids after a busy node).
LISTING = """\
registered walruses:
   walrus  10.12.10.100
registered clusters:
   cluster1  10.12.10.100
registered storage controllers:
   cluster1  10.12.10.100
registered nodes:
   10.12.10.102  cluster1   i-4493083A  i-595C0A8A
   10.12.10.103  cluster1
"""


def listed(text: str) -> list[tuple[str, str | None, str]]:
    return [(c.role.value, c.cluster, c.address) for c in parse_listing(text, "L").components]


def test_the_listing_as_1_6_2_prints_it() -> None:
    result = parse_listing(LISTING, "list.txt")
    assert result.problems == ()
    assert [(c.role, c.cluster, c.address, c.where) for c in result.components] == [
        (Role.WALRUS, None, "10.12.10.100", "list.txt:2"),
        (Role.CC, "cluster1", "10.12.10.100", "list.txt:4"),
        (Role.SC, "cluster1", "10.12.10.100", "list.txt:6"),
        (Role.NC, "cluster1", "10.12.10.102", "list.txt:8"),
        (Role.NC, "cluster1", "10.12.10.103", "list.txt:9"),
    ]


def test_headers_in_any_order_empty_lists_and_blank_lines() -> None:
    text = "registered nodes:\n\nregistered clusters:\n  c2 10.0.0.9\n\nregistered walruses:\n"
    assert listed(text) == [("cc", "c2", "10.0.0.9")]


def test_a_line_listed_twice_is_imported_once_and_said() -> None:
    result = parse_listing(LISTING + "registered nodes:\n   10.12.10.103  cluster1\n", "L")
    assert [c.address for c in result.components if c.role is Role.NC] == [
        "10.12.10.102",
        "10.12.10.103",
    ]
    [problem] = result.problems
    assert not problem.fatal and problem.where == "L:11"
    assert "listed twice (first at L:9)" in problem.message


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        ("  walrus 10.0.0.1\n", "L:1", "comes before any 'registered ...:' header"),
        ("registered walruses:\n  walrus\n", "L:2", "expected 'NAME ADDRESS'"),
        ("registered clusters:\n  c1 10.0.0.1 extra\n", "L:2", "expected 'NAME ADDRESS'"),
        ("registered nodes:\n  10.0.0.5\n", "L:2", "expected 'ADDRESS CLUSTER"),
        ("registered nodes:\n  10.0.0.5 c1 garbage\n", "L:2", "expected 'ADDRESS CLUSTER"),
        ("registered clusters:\n  c1 cc1.example.com\n", "L:2", "a host name?"),
        ("registered clusters:\n  c1 10.0.0.256\n", "L:2", "is not an IP address"),
        ("registered clusters:\n  c!1 10.0.0.1\n", "L:2", "is not a cluster name"),
        ("registered clusters:\n  c1/x 10.0.0.1\n", "L:2", "is not a cluster name"),
        ("Error: cannot connect to the cloud controller\n", "L:1", "comes before any"),
        ("SERVICE\tcluster\tc1\tcc1\t10.0.0.1\tENABLED\n", "L:1", "comes before any"),
    ],
)
def test_what_is_not_the_listing_is_a_fatal_problem_naming_its_line(
    text: str, where: str, message: str
) -> None:
    result = parse_listing(text, "L")
    assert result.components == ()
    [problem] = result.problems
    assert problem.fatal and problem.where == where
    assert message in problem.message, problem


def test_addresses_l3_refuses_are_still_parsed_the_plan_refuses_them() -> None:
    # Parsing keeps them (they are addresses); the registrar's plan refuses them (test_import_plan).
    text = "registered nodes:\n  fe80::1 c1\n  127.0.0.1 c1\n  ::1 c1\n"
    assert [a for _, _, a in listed(text)] == ["fe80::1", "127.0.0.1", "::1"]
    scoped = parse_listing("registered nodes:\n  fe80::1%eth0 c1\n", "L")
    assert scoped.problems[0].fatal and "carries an IPv6 scope" in scoped.problems[0].message


def test_garbage_bytes_and_a_huge_line_do_not_crash() -> None:
    result = parse_listing("registered nodes:\n" + "\x00\xff" * 5000 + "\n", "L")
    assert result.problems[0].fatal and len(result.problems[0].message) < 400


def test_shell_assignments_quotes_comments_and_variables() -> None:
    text = (
        "# eucalyptus.conf\n"
        'EUCALYPTUS="/"\n'
        "export CC_PORT=8774 # trailing comment\n"
        "NODES='10.0.0.5 10.0.0.6'\n"
        'INSTANCE_PATH="$EUCALYPTUS/var/lib/instances"\n'
        '#NODES="10.9.9.9"\n'
        "if [ -z foo ]; then\n"
        "   true\n"
        "fi\n"
    )
    values, problems = parse_shell(text, "conf")
    assert problems == ()
    assert values == {
        "EUCALYPTUS": "/",
        "CC_PORT": "8774",
        "NODES": "10.0.0.5 10.0.0.6",
        "INSTANCE_PATH": "$EUCALYPTUS/var/lib/instances",
    }


def test_shell_file_oddities_are_reported_the_last_assignment_wins() -> None:
    text = 'NODES="10.0.0.1"\nNODES="10.0.0.2"\nBAD="unclosed\nLOOSE=a b\n'
    values, problems = parse_shell(text, "conf")
    assert values["NODES"] == "10.0.0.2" and values["LOOSE"] == "a" and "BAD" not in values
    messages = [(p.where, p.message) for p in problems]
    assert (
        "conf:2",
        "NODES is set twice (also at line 1); the last one counts, as in the shell",
    ) in messages
    assert any(w == "conf:3" and "cannot read the value" in m for w, m in messages)
    assert any(w == "conf:4" and "not quoted" in m for w, m in messages)


def test_nodes_list_repeats_and_variables() -> None:
    nodes, problems = parse_nodes_list("10.0.0.5\n10.0.0.6 # spare\n10.0.0.5\n$MORE\n", "n")
    assert nodes == ("10.0.0.5", "10.0.0.6")
    assert [p.where for p in problems] == ["n:3", "n:4"]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_conf_reads_nodes_from_nodes_list_when_nodes_is_empty(tmp_path: Path) -> None:
    write(tmp_path / "etc/eucalyptus/eucalyptus.conf", 'NODES=""\n')
    write(tmp_path / "var/lib/eucalyptus/nodes.list", "10.0.0.7\n")
    conf = read_conf(tmp_path)
    assert conf.nodes == ("10.0.0.7",) and conf.nodes_from.endswith("nodes.list")
    assert read_conf(tmp_path / "nowhere").conf.exists is False


# -- keys --------------------------------------------------------------------------------------


def make_pair(organisation: str) -> tuple[bytes, bytes]:
    """A certificate with subject O=organisation and its private key, as PEM."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    pk = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), pk


def make_cluster_keys(directory: Path, cluster: str) -> None:
    """keys/<cluster>/ as euca_conf --register-cluster left it."""
    directory.mkdir(parents=True, exist_ok=True)
    for kind, prefix in (("cluster", "cc"), ("node", "nc")):
        cert, pk = make_pair(f"{prefix}-{cluster}")
        (directory / f"{kind}-cert.pem").write_bytes(cert)
        (directory / f"{kind}-pk.pem").write_bytes(pk)
        (directory / f"{kind}-pk.pem").chmod(0o600)
    (directory / "vtunpass").write_text("secret\n")


def make_clc_keys(root: Path, clusters: list[str]) -> Path:
    keys = root / "var/lib/eucalyptus/keys"
    keys.mkdir(parents=True, exist_ok=True)
    cert, pk = make_pair("cloud")
    (keys / "cloud-cert.pem").write_bytes(cert)
    (keys / "cloud-pk.pem").write_bytes(pk)
    (keys / "euca.p12").write_bytes(b"p12")
    for cluster in clusters:
        make_cluster_keys(keys / cluster, cluster)
    return keys


def test_a_whole_clc_key_directory(tmp_path: Path) -> None:
    make_clc_keys(tmp_path, ["cluster1", "cluster2"])
    keys = read_keys(tmp_path)
    assert keys.exists and keys.cloud and keys.problems == ()
    assert keys.names == {"cluster1", "cluster2"}
    assert all(c.complete for c in keys.clusters)


def test_a_cc_hosts_flat_key_directory_names_its_cluster_by_subject(tmp_path: Path) -> None:
    make_cluster_keys(tmp_path / "var/lib/eucalyptus/keys", "east")
    keys = read_keys(tmp_path)
    assert (keys.cloud, keys.names, keys.problems) == (False, {"east"}, ())


def test_inconsistent_keys_are_each_named(tmp_path: Path) -> None:
    keys_dir = make_clc_keys(tmp_path, ["c1", "c2", "c3"])
    (keys_dir / "c1" / "vtunpass").unlink()
    # c2's node certificate says another cluster; c3's cluster key is another key.
    cert, _ = make_pair("nc-other")
    (keys_dir / "c2" / "node-cert.pem").write_bytes(cert)
    _, pk = make_pair("cc-c3")
    (keys_dir / "c3" / "cluster-pk.pem").write_bytes(pk)
    (keys_dir / "euca.p12").unlink()
    (keys_dir / "c4").mkdir()
    (keys_dir / "c4" / "cluster-cert.pem").write_text("garbage")
    keys = read_keys(tmp_path)
    found = {(Path(p.where).relative_to(keys_dir).as_posix(), p.message) for p in keys.problems}
    assert found >= {
        ("euca.p12", "missing (the CLC's credentials are incomplete)"),
        ("c1/vtunpass", "missing (cluster c1)"),
        ("c2/node-cert.pem", "subject O=nc-other, expected O=nc-c2"),
        ("c3/cluster-pk.pem", "is not the private key of its certificate"),
        ("c4/cluster-cert.pem", "not a PEM certificate"),
    }
    assert {c.cluster: c.complete for c in keys.clusters} == {
        "c1": False,
        "c2": False,
        "c3": False,
        "c4": False,
    }


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_an_unreadable_private_key_says_run_as_root(tmp_path: Path) -> None:
    keys_dir = make_clc_keys(tmp_path, ["c1"])
    (keys_dir / "c1" / "node-pk.pem").chmod(0)
    [problem] = read_keys(tmp_path).problems
    assert "run as root" in problem.message


def test_cross_checks_name_each_disagreement_the_listing_wins(tmp_path: Path) -> None:
    write(
        tmp_path / "etc/eucalyptus/eucalyptus.conf",
        'NODES="10.12.10.102 10.12.10.199"\n',
    )
    write(
        tmp_path / "etc/eucalyptus/eucalyptus-ipaddr.conf",
        'CC_IP_ADDR="10.12.10.100"\nWALRUS_IP_ADDR="10.12.10.101"\nSC_IP_ADDR="$CC_IP_ADDR"\n',
    )
    make_clc_keys(tmp_path, ["cluster1", "old"])
    listing = parse_listing(LISTING, "L")
    problems = cross_check(listing, read_conf(tmp_path), read_keys(tmp_path), "cluster1")
    messages = [p.message for p in problems]
    assert messages == [
        "names node 10.12.10.199, which euca_conf --list-nodes does not list: not imported "
        "(the listing is the truth)",
        "does not name node 10.12.10.103 of cluster cluster1, which euca_conf --list-nodes "
        "lists: imported (the listing is the truth)",
        "WALRUS_IP_ADDR=10.12.10.101, but euca_conf lists the walrus at 10.12.10.100 (the "
        "listing is the truth)",
        "holds the credentials of cluster old, which euca_conf --list-clusters does not "
        "list: not imported (the listing is the truth)",
    ]
    listing2 = parse_listing("registered clusters:\n  nokeys 10.0.0.1\n", "L")
    messages = [
        p.message for p in cross_check(listing2, read_conf(tmp_path), read_keys(tmp_path), None)
    ]
    assert any("cluster nokeys is listed, but holds no keys here" in m for m in messages)
    assert (
        "not found"
        in cross_check(listing, read_conf(tmp_path / "x"), read_keys(tmp_path / "x"), None)[
            0
        ].message
    )


# -- legacy jobs -------------------------------------------------------------------------------


def fake_tool(bin_dir: Path, name: str, log: Path, script: str = "exit 0") -> None:
    write(bin_dir / name, f'#!/bin/sh\necho "{name} $*" >> {log}\n{script}\n').chmod(0o755)


@pytest.fixture
def fake_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return bin_dir, log


def test_upstart_jobs_are_stopped_and_disabled_with_an_override(
    tmp_path: Path, fake_path: tuple[Path, Path]
) -> None:
    bin_dir, log = fake_path
    # initctl says "Unknown instance" for a job that is not running, as upstart does.
    fake_tool(
        bin_dir,
        "initctl",
        log,
        'case "$2" in eucalyptus-nc-publication) echo "initctl: Unknown instance: " >&2; '
        "exit 1;; esac",
    )
    root = tmp_path / "root"
    init = root / "etc/init"
    for name in (
        "uec-component-listener",
        "eucalyptus-cc-publication",
        "eucalyptus-nc-publication",
        "eucalyptus-cc",
        "ssh",
    ):
        write(init / f"{name}.conf", "exec true\n")
    write(init / "eucalyptus-cc-publication.override", "# local\nmanual\n")
    results = jobs.stop_legacy_jobs(root)
    assert [(r.name, r.stopped, r.ok) for r in results] == [
        ("eucalyptus-cc-publication", "stopped", True),
        ("eucalyptus-nc-publication", "was not running", True),
        ("uec-component-listener", "stopped", True),
    ]
    assert log.read_text().splitlines() == [
        "initctl stop eucalyptus-cc-publication",
        "initctl stop eucalyptus-nc-publication",
        "initctl stop uec-component-listener",
    ]
    assert (init / "uec-component-listener.override").read_text() == "manual\n"
    assert (init / "eucalyptus-cc-publication.override").read_text() == "# local\nmanual\n"
    assert results[0].disabled.startswith("already disabled")
    assert (
        results[2].undo
        == f"rm {init / 'uec-component-listener.override'}; start uec-component-listener"
    )
    assert not (init / "eucalyptus-cc.override").exists() and not (init / "ssh.override").exists()
    # Again: nothing new written, each says it is already disabled.
    again = jobs.stop_legacy_jobs(root)
    assert all(r.disabled.startswith("already disabled") for r in again)
    assert (init / "uec-component-listener.override").read_text() == "manual\n"


def test_a_failing_initctl_is_reported_not_hidden(
    tmp_path: Path, fake_path: tuple[Path, Path]
) -> None:
    bin_dir, log = fake_path
    fake_tool(bin_dir, "initctl", log, 'echo "initctl: Unable to connect to Upstart" >&2; exit 1')
    root = tmp_path / "root"
    write(root / "etc/init/uec-component-listener.conf", "")
    [result] = jobs.stop_legacy_jobs(root)
    assert not result.ok and "Unable to connect to Upstart" in result.stopped


def test_no_initctl_at_all_is_reported(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write(root / "etc/init/uec-component-listener.conf", "")

    def missing(argv: object) -> tuple[int, str]:
        raise FileNotFoundError(2, "No such file or directory", "initctl")

    [result] = jobs.stop_legacy_jobs(root, missing)
    assert not result.ok and "cannot run initctl" in result.stopped


def test_systemd_units_are_disabled_now(tmp_path: Path, fake_path: tuple[Path, Path]) -> None:
    bin_dir, log = fake_path
    fake_tool(bin_dir, "systemctl", log)
    root = tmp_path / "root"
    (root / "run/systemd/system").mkdir(parents=True)
    write(root / "lib/systemd/system/uec-component-listener.service", "")
    write(root / "etc/systemd/system/eucalyptus-walrus-publication.service", "")
    write(root / "etc/init/eucalyptus-cc-publication.conf", "")  # inert under systemd
    results = jobs.stop_legacy_jobs(root)
    assert [(r.name, r.system, r.ok) for r in results] == [
        ("eucalyptus-walrus-publication", "systemd", True),
        ("uec-component-listener", "systemd", True),
    ]
    assert log.read_text().splitlines() == [
        "systemctl disable --now eucalyptus-walrus-publication.service",
        "systemctl disable --now uec-component-listener.service",
    ]


def test_nothing_to_stop_is_an_empty_answer(tmp_path: Path) -> None:
    assert jobs.stop_legacy_jobs(tmp_path) == []


def test_listed_is_hashable_and_plain() -> None:
    assert Listed(Role.NC, "c1", "10.0.0.1", "L:1") == Listed(Role.NC, "c1", "10.0.0.1", "L:1")


def test_an_unreadable_or_odd_conf_is_a_warning_not_a_crash(tmp_path: Path) -> None:
    (tmp_path / "etc/eucalyptus/eucalyptus.conf").mkdir(parents=True)  # a directory, not a file
    write(tmp_path / "etc/eucalyptus/eucalyptus-ipaddr.conf", "\x00\xff garbage =\n" * 100)
    (tmp_path / "var/lib/eucalyptus/nodes.list").mkdir(parents=True)
    conf = read_conf(tmp_path)
    assert conf.nodes == ()
    assert [Path(p.where).name for p in conf.problems] == ["eucalyptus.conf", "nodes.list"]
    assert all("cannot be read" in p.message for p in conf.problems)
