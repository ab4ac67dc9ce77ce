"""Attack review of `eucareg import` (issue 10): hostile listings, conf and key directories,
imports racing registrations, a rogue machine first at an imported address, `--fingerprints`
bypass attempts, hostile `--root` contents for the legacy jobs, `--from-command` with a hostile
PATH, and a registrar killed mid-import.

Tests marked `xfail(strict=True, reason="DEFECT: ...")` assert the promised behaviour and fail
today. The others pin an attack that held (or a defect fixed with this review). Real registrars
on SQLite files, real HTTP over the operator socket, real hooks counted; negative checks wait for
the event that decides them (`settle`, an answer), never for a fixed time.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pytest
from click.testing import CliRunner

from eucareg.cli.main import main
from eucareg.core.model import Role, Status
from eucareg.core.trust import Mode
from eucareg.pki import certificates, keypairs
from eucareg.registrar.engine import Issuer, Registrar
from eucareg.upgrade import jobs
from eucareg.upgrade.plan import MAX_IMPORT, Action, Candidate
from eucareg.upgrade.sources import MAX_TEXT, parse_listing, parse_pins, read_text
from tests.factories import KEYS, ann, sighting
from tests.unit.test_api_harness import CC_SETTINGS, CLC_SETTINGS, Harness, served
from tests.unit.test_cli_operator import op, run, token_file
from tests.unit.test_import_sources import LISTING, fake_tool, write
from tests.unit.test_registrar import counting_hooks, hook_lines, make_registrar, settle

__all__ = ["token_file"]  # the fixture, shared
pytestmark = pytest.mark.usefixtures("no_host_config")

FRONT = "10.77.9.9"
KEY_A = "sha256:" + "a" * 64
_CA_KEY = keypairs.generate_key()
_CA = certificates.create_cloud_ca(_CA_KEY, "attack-import")
ISSUER = Issuer(key=_CA_KEY, cert=_CA, cloud_cert=_CA)


# -- hostile listings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        # NUL bytes glued to an address or a cluster: never an address, never a cluster.
        ("registered clusters:\n   c1  10.0.0.1\x00\n", "is not an IP address"),
        ("registered clusters:\n   c1\x00x  10.0.0.1\n", "not a cluster name"),
        # Look-alikes: fullwidth digits, Arabic-Indic digits, a Cyrillic es in the cluster.
        (
            "registered clusters:\n   c1  \uff11\uff10.\uff10.\uff10.\uff11\n",
            "is not an IP address",
        ),
        (
            "registered clusters:\n   c1  \u0661\u0660.\u0660.\u0660.\u0661\n",
            "is not an IP address",
        ),
        ("registered clusters:\n   \u0441luster1  10.0.0.1\n", "not a cluster name"),
        # A Cyrillic ie in a header is not a header: the line after it comes before any.
        ("r\u0435gistered clusters:\n   c1  10.0.0.1\n", "before any"),
        # A host name, a scoped address, a leading-zero octet (read as octal by some tools).
        ("registered walruses:\n   walrus  front.example\n", "is not an IP address"),
        ("registered walruses:\n   walrus  fe80::1%eth0\n", "IPv6 scope"),
        ("registered walruses:\n   walrus  010.0.0.1\n", "is not an IP address"),
    ],
)
def test_hostile_listing_lines_are_fatal_and_name_their_line(text: str, needle: str) -> None:
    listing = parse_listing(text, "list.txt")
    fatal = [p for p in listing.problems if p.fatal]
    assert fatal and needle in fatal[0].message, listing.problems
    assert fatal[0].where.startswith("list.txt:")
    # Nothing from a listing with a fatal problem reaches a registrar (the CLI stops first):
    # only lines that parsed are components, and none of those is the hostile one.
    assert all("\x00" not in c.address and c.address.isascii() for c in listing.components)


def test_crlf_listing_reads_as_the_same_components() -> None:
    plain = parse_listing(LISTING, "a")
    crlf = parse_listing(LISTING.replace("\n", "\r\n"), "b")
    assert [(c.role, c.cluster, c.address) for c in crlf.components] == [
        (c.role, c.cluster, c.address) for c in plain.components
    ]
    assert not crlf.problems


def test_a_file_over_the_size_limit_is_refused_not_read(tmp_path: Path) -> None:
    big = tmp_path / "big.txt"
    with big.open("wb") as f:
        f.write(b"registered nodes:\n")
        f.write(b"   10.0.0.1  c1\n" * (MAX_TEXT // 16 + 1))
    with pytest.raises(ValueError, match="larger than"):
        read_text(big)


async def test_a_huge_listing_on_standard_input_is_refused(tmp_path: Path) -> None:
    """--list-file - is bounded like a file: a runaway pipe is not read into memory whole."""
    huge = "registered nodes:\n" + "   10.0.0.1  c1\n" * (MAX_TEXT // 16 + 2)
    runner = CliRunner(env={"EUCAREG_API": None, "EUCAREG_ADMIN_TOKEN_FILE": None})
    args = ["import", "--list-file", "-", "--dry-run", "--api", f"unix:{tmp_path / 'none.sock'}"]
    result = await asyncio.to_thread(runner.invoke, main, args, input=huge)
    assert result.exit_code == 1, result.output
    assert "larger than" in result.stderr and "Traceback" not in result.output


def test_cluster_names_differing_only_in_case_are_different_clusters() -> None:
    """Eucalyptus cluster names are case-sensitive: an SC of `Cluster1` is not the SC of
    `cluster1`, and needs a CC of its own cluster."""
    from eucareg.upgrade.plan import classify

    rows = classify(
        [
            Candidate(Role.CC, "cluster1", "10.0.0.1"),
            Candidate(Role.SC, "Cluster1", "10.0.0.1"),
        ],
        {},
        registers=frozenset({Role.WALRUS, Role.CC, Role.SC}),
        own_cluster=None,
    )
    assert [r.action for r in rows] == [Action.IMPORT, Action.CONFLICT]
    assert "cluster Cluster1 has no CC" in rows[1].reason


def test_duplicate_roles_and_addresses_in_one_listing_conflict() -> None:
    from eucareg.upgrade.plan import classify

    clc = frozenset({Role.WALRUS, Role.CC, Role.SC})
    two_walruses = classify(
        [Candidate(Role.WALRUS, None, "10.0.0.1"), Candidate(Role.WALRUS, None, "10.0.0.2")],
        {},
        registers=clc,
        own_cluster=None,
    )
    assert [r.action for r in two_walruses] == [Action.IMPORT, Action.CONFLICT]
    two_ccs_one_address = classify(
        [Candidate(Role.CC, "a", "10.0.0.1"), Candidate(Role.CC, "b", "10.0.0.1")],
        {},
        registers=clc,
        own_cluster=None,
    )
    assert [r.action for r in two_ccs_one_address] == [Action.IMPORT, Action.CONFLICT]
    # The same address written two ways is one address.
    same = classify(
        [Candidate(Role.CC, "a", "fd00::1"), Candidate(Role.CC, "b", "FD00:0::0001")],
        {},
        registers=clc,
        own_cluster=None,
    )
    assert [r.action for r in same] == [Action.IMPORT, Action.CONFLICT]


# -- the 250 cap: N and N+1 ---------------------------------------------------------------------


def _nodes(n: int, cluster: str = "cluster1") -> str:
    lines = [f"   10.88.{i // 200}.{i % 200 + 1}  {cluster}" for i in range(n)]
    return "registered nodes:\n" + "\n".join(lines) + "\n"


async def test_250_nodes_import_and_251_are_refused_whole(tmp_path: Path, token_file: Path) -> None:
    async with served(tmp_path / "cc", CC_SETTINGS, peer_key=None) as cc:
        over = write(tmp_path / "over.txt", _nodes(MAX_IMPORT + 1))
        args = ("import", "--root", str(tmp_path), "--keep-legacy-jobs", "--yes")
        refused = await op(cc, token_file, *args, "--list-file", str(over))
        assert refused.exit_code == 1, refused.output
        assert f"one import takes at most {MAX_IMPORT}" in refused.stderr
        assert cc.registrar.records() == {}
        full = write(tmp_path / "full.txt", _nodes(MAX_IMPORT))
        done = await op(cc, token_file, *args, "--list-file", str(full), "--json")
        assert done.exit_code == 0, done.output
        assert json.loads(done.stdout)["imported"] == MAX_IMPORT
        assert len(cc.registrar.store.records()) == MAX_IMPORT


# -- importing over what the registry already holds ---------------------------------------------


def status_of(reg: Registrar, component_id: str) -> Status | None:
    record = reg.record(component_id)
    return record.status if record is not None else None


async def test_import_over_registered_pending_and_awaiting_key_components(tmp_path: Path) -> None:
    """A registered component of the same cluster is `already registered` (nothing twice); one
    admitted and waiting to prove its key holds its address (conflict, nothing imported); one
    merely pending takes the imported registration over (no hook)."""
    counting_hooks(tmp_path / "hooks", tmp_path / "hooks.log")
    reg = await make_registrar(tmp_path, CLC_SETTINGS, install_window=True)
    walrus = ann(Role.WALRUS, address="10.77.9.30")
    reg.on_sighting(sighting(walrus))
    await settle(reg)
    assert status_of(reg, walrus.component_id) is Status.REGISTERED
    waiting = ann(Role.CC, "c1", address=FRONT)
    KEYS.pop(waiting.fingerprint)  # admitted (install window) but never proves its key
    reg.on_sighting(sighting(waiting))
    await settle(reg)
    assert status_of(reg, waiting.component_id) is Status.AWAITING_KEY
    before = reg.records()
    rows = await reg.admin.import_components(
        [Candidate(Role.WALRUS, None, "10.77.9.30"), Candidate(Role.CC, "c1", FRONT)],
        dry_run=False,
        source="t",
    )
    assert [r.action for r in rows] == [Action.REGISTERED, Action.CONFLICT]
    assert waiting.component_id in rows[1].reason and "awaiting-key" in rows[1].reason
    assert reg.records() == before  # all or nothing: nothing recorded
    assert len(hook_lines(tmp_path / "hooks.log")) == 1  # the walrus's own registration only
    await reg.close()


async def test_import_deregister_import_again_records_one_each_time(tmp_path: Path) -> None:
    reg = await make_registrar(tmp_path, CLC_SETTINGS, install_window=False)
    first = await reg.admin.import_components(
        [Candidate(Role.CC, "c1", FRONT)], dry_run=False, source="t"
    )
    record = reg.record(first[0].component_id or "")
    assert record is not None
    await reg.admin.deregister(record)
    await settle(reg)
    assert not [r for r in reg.records().values() if r.status is Status.REGISTERED]
    again = await reg.admin.import_components(
        [Candidate(Role.CC, "c1", FRONT)], dry_run=False, source="t"
    )
    assert [r.action for r in again] == [Action.IMPORT]
    registered = [r for r in reg.records().values() if r.status is Status.REGISTERED]
    assert [r.component_id for r in registered] == [again[0].component_id]
    await reg.close()


# -- a rogue first at an imported address -------------------------------------------------------


@pytest.mark.parametrize("mode", [Mode.LOCAL, Mode.OFF])
async def test_a_rogue_first_at_an_unpinned_import_wins_and_the_operator_can_see_it(
    tmp_path: Path, mode: Mode
) -> None:
    """Documented (docs/upgrade.md, Adoption): without --fingerprints, the first component that
    announces itself at the imported role and address and proves a key takes the registration
    over, in any trust mode. The operator sees an `adopted` event for that component id and
    key, and `eucareg deregister` sends the genuine one back to the trust rules."""
    docs = Path(__file__).parents[2] / "docs/upgrade.md"
    assert "whoever first announces itself at that" in docs.read_text()
    reg = await make_registrar(tmp_path, CLC_SETTINGS, install_window=False, issuer=ISSUER)
    await reg.admin.set_mode(mode)
    await reg.admin.import_components([Candidate(Role.CC, "c1", FRONT)], dry_run=False, source="t")
    rogue = ann(Role.CC, "c1", address=FRONT)
    reg.on_sighting(sighting(rogue))
    await settle(reg)
    taken = reg.record(rogue.component_id)
    assert taken is not None and taken.status is Status.REGISTERED
    answer = await reg.credentials(rogue.component_id, KEYS[rogue.fingerprint].public_key(), wait=0)
    assert answer.files is not None  # it holds credentials: why pins exist
    [adopted] = [
        e for e in reg.store.events(component_id=rogue.component_id) if e.kind == "adopted"
    ]
    assert taken.fingerprint == rogue.fingerprint
    await reg.admin.deregister(taken)
    genuine = ann(Role.CC, "c1", address=FRONT)
    reg.on_sighting(sighting(genuine))
    await settle(reg)
    newcomer = reg.record(genuine.component_id)
    assert newcomer is not None and newcomer.status is not Status.REGISTERED  # trust rules again
    assert adopted.kind == "adopted"
    await reg.close()


async def test_a_rogue_with_another_key_cannot_take_a_pinned_import_in_mode_off(
    tmp_path: Path,
) -> None:
    reg = await make_registrar(tmp_path, CLC_SETTINGS, install_window=False, issuer=ISSUER)
    await reg.admin.set_mode(Mode.OFF)
    genuine = ann(Role.CC, "c1", address=FRONT)
    await reg.admin.import_components(
        [Candidate(Role.CC, "c1", FRONT, fingerprint=genuine.fingerprint)],
        dry_run=False,
        source="t",
    )
    rogue = ann(Role.CC, "c1", address=FRONT)
    reg.on_sighting(sighting(rogue))
    await settle(reg)
    refused = reg.record(rogue.component_id)
    assert refused is not None and refused.status is Status.REFUSED
    answer = await reg.credentials(rogue.component_id, KEYS[rogue.fingerprint].public_key(), wait=0)
    assert answer.files is None
    # Even naming the imported record's id with its own key gets nothing.
    [placeholder] = [r for r in reg.records().values() if r.admitted_by == "imported"]
    from eucareg.registrar.desk import CredentialRefused

    with pytest.raises(CredentialRefused):
        await reg.credentials(
            placeholder.component_id, KEYS[rogue.fingerprint].public_key(), wait=0
        )
    await reg.close()


# -- --fingerprints bypass attempts -------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        f"cc 10.0.0.1 {KEY_A.upper()}",  # upper case: would never match a real key
        f"cc 10.0.0.1 {KEY_A}0",  # one digit too many
        f"cc 10.0.0.1 {KEY_A} extra",  # trailing words
        f"CC 10.0.0.1 {KEY_A}",  # role in capitals
        f"cc 10.0.0.1%eth0 {KEY_A}",  # a scoped address
        f"cc 10.0.0.1 {KEY_A}\ncc 10.0.0.1 sha256:{'b' * 64}",  # two keys for one component
    ],
)
def test_a_bad_pin_line_is_fatal(line: str) -> None:
    _, problems = parse_pins(line + "\n", "keys.txt")
    assert problems and all(p.fatal for p in problems), problems


def test_a_pin_matches_its_component_however_the_address_is_written() -> None:
    pins, problems = parse_pins(f"cc FD00:0::0001 {KEY_A}\n", "keys.txt")
    assert not problems and pins == {(Role.CC, "fd00::1"): KEY_A}


async def test_pinning_an_import_made_without_a_key_is_a_conflict_not_a_silent_no_op(
    clc: Harness, token_file: Path, tmp_path: Path
) -> None:
    """Import without --fingerprints, then again with them: the records stay claimable by any
    key. The operator asked for a pin; an exit 0 would leave it believing it holds."""
    listing = write(tmp_path / "list.txt", f"registered clusters:\n   c1  {FRONT}\n")
    args = ("import", "--root", str(tmp_path), "--keep-legacy-jobs", "--yes")
    first = await op(clc, token_file, *args, "--list-file", str(listing))
    assert first.exit_code == 0, first.output
    pins = write(tmp_path / "keys.txt", f"cc {FRONT} {KEY_A}\n")
    again = await op(
        clc, token_file, *args, "--list-file", str(listing), "--fingerprints", str(pins)
    )
    assert again.exit_code == 1, again.output
    assert "deregister it and import again to pin it" in again.stdout
    [record] = clc.registrar.records().values()
    assert record.fingerprint == ""  # unchanged, and the operator was told


# -- the legacy jobs with hostile --root contents -----------------------------------------------


def _logging_runner(calls: list[list[str]]) -> jobs.Runner:
    def runner(argv: Sequence[str]) -> tuple[int, str]:
        calls.append(list(argv))
        return 0, ""

    return runner


def test_an_override_symlinked_elsewhere_is_not_written_through(tmp_path: Path) -> None:
    root = tmp_path / "root"
    victim = tmp_path / "victim.conf"
    victim.write_text("precious\n")
    write(root / "etc/init/uec-component-listener.conf", "")
    (root / "etc/init/uec-component-listener.override").symlink_to(victim)
    calls: list[list[str]] = []
    [result] = jobs.stop_legacy_jobs(root, _logging_runner(calls))
    assert victim.read_text() == "precious\n"
    assert not result.ok and "symbolic link" in result.disabled


def test_an_etc_init_symlinked_out_of_root_is_refused(tmp_path: Path) -> None:
    """--root names a copy of the old front end: an etc/init there that leads out of it
    (to this host's /etc/init, say) is not followed, nothing is written, nothing is stopped."""
    elsewhere = tmp_path / "elsewhere"
    write(elsewhere / "uec-component-listener.conf", "")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/init").symlink_to(elsewhere)
    calls: list[list[str]] = []
    results = jobs.stop_legacy_jobs(root, _logging_runner(calls))
    assert not (elsewhere / "uec-component-listener.override").exists()
    assert calls == []
    assert [r.ok for r in results] == [False]
    assert "outside" in results[0].stopped


def test_odd_job_file_names_are_passed_as_one_argument(tmp_path: Path) -> None:
    root = tmp_path / "root"
    name = "eucalyptus-$(touch pwned);x-publication"
    write(root / f"etc/init/{name}.conf", "")
    calls: list[list[str]] = []
    [result] = jobs.stop_legacy_jobs(root, _logging_runner(calls))
    assert calls == [["initctl", "stop", name]]  # an argument, never a shell word
    assert result.ok and not (Path.cwd() / "pwned").exists()


# -- --from-command with a hostile PATH ---------------------------------------------------------


async def test_from_command_never_runs_a_euca_conf_from_a_relative_path_entry(
    clc: Harness, token_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PATH=.:… (or an empty entry) in root's environment must not let a euca_conf dropped in
    the working directory run as root: relative entries are skipped."""
    cwd = tmp_path / "cwd"
    fake_tool(cwd, "euca_conf", tmp_path / "hostile.log", "echo pwned")
    good = write(tmp_path / "list.txt", f"registered clusters:\n   c1  {FRONT}\n")
    fake_tool(tmp_path / "bin", "euca_conf", tmp_path / "good.log", f"/bin/cat {good}")
    monkeypatch.chdir(cwd)
    for path in (f".:{tmp_path / 'bin'}", f":{tmp_path / 'bin'}", f"bin-rel:{tmp_path / 'bin'}"):
        monkeypatch.setenv("PATH", path)
        result = await op(clc, token_file, "import", "--from-command", "--dry-run", "--json")
        assert result.exit_code == 0, result.output
        assert not (tmp_path / "hostile.log").exists()
        assert json.loads(result.stdout)["plan"][0]["address"] == FRONT
    monkeypatch.setenv("PATH", ".")
    alone = await op(clc, token_file, "import", "--from-command", "--dry-run")
    assert alone.exit_code == 1 and "euca_conf" in alone.stderr
    assert not (tmp_path / "hostile.log").exists()


# -- a registrar killed mid-import --------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from eucareg.core.model import Role
    from eucareg.upgrade.plan import Candidate
    from tests.unit.test_registrar import CLC_SETTINGS, make_registrar

    async def main() -> None:
        reg = await make_registrar(Path(sys.argv[1]), CLC_SETTINGS, install_window=False)
        for batch in range(40):
            cands = [
                Candidate(Role.CC, f"b{batch}c{i}", f"10.66.{batch}.{i + 1}") for i in range(50)
            ]
            await reg.admin.import_components(cands, dry_run=False, source=f"batch {batch}")
            print(f"batch {batch}", flush=True)
        await asyncio.sleep(60)

    asyncio.run(main())
    """
)


async def test_a_registrar_killed_during_imports_keeps_each_whole_or_not_at_all(
    tmp_path: Path,
) -> None:
    """SIGKILL a registrar importing batch after batch of 50 (killed once batch 3 is answered,
    so most likely during batch 4's write): it reopens with whole batches only, never part of
    one, and importing the next batch again records it once."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(tmp_path), env=env, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        for expected in range(4):
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            assert line.decode().strip() == f"batch {expected}"
        proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    reg = await make_registrar(tmp_path, CLC_SETTINGS, install_window=False)
    count = sum(1 for r in reg.records().values() if r.admitted_by == "imported")
    assert count % 50 == 0 and count >= 200, count
    batch = count // 50
    cands = [Candidate(Role.CC, f"b{batch}c{i}", f"10.66.{batch}.{i + 1}") for i in range(50)]
    rows = await reg.admin.import_components(cands, dry_run=False, source="again")
    assert {r.action for r in rows} == {Action.IMPORT}
    assert sum(1 for r in reg.records().values() if r.admitted_by == "imported") == count + 50
    await reg.close()


async def test_two_cli_imports_at_once_record_each_component_once(
    clc: Harness, token_file: Path, tmp_path: Path
) -> None:
    """Three `eucareg import` processes at once (each plans, then imports): each component is
    recorded once, and each process says what it did."""
    listing = write(
        tmp_path / "list.txt",
        f"registered walruses:\n   walrus  {FRONT}\nregistered clusters:\n   c1  {FRONT}\n",
    )
    argv = [
        sys.executable, "-m", "eucareg", "import", "--root", str(tmp_path), "--keep-legacy-jobs",
        "--yes", "--json", "--list-file", str(listing), "--api", clc.socket,
        "--admin-token-file", str(token_file),
    ]  # fmt: skip
    procs = [
        await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    outputs = [await asyncio.wait_for(p.communicate(), 60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert sum(json.loads(out)["imported"] for out, _ in outputs) == 2
    assert len(clc.registrar.store.records()) == 2


async def test_legacy_jobs_only_never_touches_the_registry(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc/init").mkdir(parents=True)
    result = await run("import", "--legacy-jobs-only", "--root", str(root), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"legacy_jobs": []}


# -- hostile conf files and key directories -----------------------------------------------------


async def test_a_fifo_or_device_in_place_of_a_conf_or_key_file_is_reported_not_waited_on(
    tmp_path: Path,
) -> None:
    """A FIFO (nobody writing) where eucalyptus.conf, nodes.list or a key file should be
    would block `open` for ever; /dev/zero would be read without end. Each is a warning
    naming the file, and reading the front end ends at once."""
    from eucareg.upgrade.checks import cross_check
    from eucareg.upgrade.keys import read_keys
    from eucareg.upgrade.sources import read_conf
    from tests.unit.test_import_sources import make_clc_keys

    root = tmp_path / "root"
    keys = make_clc_keys(root, ["cluster1"])
    conf = root / "etc/eucalyptus/eucalyptus.conf"
    conf.parent.mkdir(parents=True)
    os.mkfifo(conf)
    os.mkfifo(root / "var/lib/eucalyptus/nodes.list")
    (keys / "cluster1/cluster-pk.pem").unlink()
    os.mkfifo(keys / "cluster1/cluster-pk.pem")
    (keys / "cluster1/node-cert.pem").unlink()
    (keys / "cluster1/node-cert.pem").symlink_to("/dev/zero")

    def read_all() -> list[str]:
        listing = parse_listing(f"registered clusters:\n   cluster1  {FRONT}\n", "l")
        found = read_conf(root)
        return [
            str(p) for p in (*found.problems, *cross_check(listing, found, read_keys(root), None))
        ]

    problems = await asyncio.wait_for(asyncio.to_thread(read_all), 20)
    text = "\n".join(problems)
    assert f"{conf}: cannot be read: " in text and "not a regular file" in text
    assert "cluster-pk.pem" in text and "node-cert.pem" in text


def test_key_files_linked_out_of_the_key_directory_are_not_read(tmp_path: Path) -> None:
    """keys/<cluster>/cluster-pk.pem -> /some/other/secret: a root-run import must not read
    a file outside the key directory on its word (the check names the link instead)."""
    from eucareg.upgrade.keys import read_keys
    from tests.unit.test_import_sources import make_clc_keys

    root = tmp_path / "root"
    keys = make_clc_keys(root, ["cluster1"])
    secret = tmp_path / "secret.pem"
    (keys / "cluster1/cluster-pk.pem").rename(secret)
    (keys / "cluster1/cluster-pk.pem").symlink_to(secret)
    secret.chmod(0)  # were it opened as root anyway, the test could not tell: use the message
    found = read_keys(root)
    [cluster] = found.clusters
    assert not cluster.complete
    assert any(
        "cluster-pk.pem" in p.where and "outside the key directory" in p.message
        for p in found.problems
    ), found.problems


async def test_components_already_waiting_at_an_imported_address_are_shown_in_the_plan(
    tmp_path: Path,
) -> None:
    """A rogue that announced itself before the import, next to the genuine component: the
    dry run names both (the first to prove a key takes the import over), and the import
    gives the registration to exactly one of them, with no hook."""
    counting_hooks(tmp_path / "hooks", tmp_path / "hooks.log")
    reg = await make_registrar(tmp_path, CLC_SETTINGS, install_window=False, issuer=ISSUER)
    first, second = ann(Role.CC, "c1", address=FRONT), ann(Role.CC, "c1", address=FRONT)
    for a in (first, second):
        reg.on_sighting(sighting(a))
    await settle(reg)
    assert {status_of(reg, a.component_id) for a in (first, second)} == {Status.PENDING}
    [planned] = await reg.admin.import_components(
        [Candidate(Role.CC, "c1", FRONT)], dry_run=True, source="t"
    )
    assert planned.action is Action.IMPORT
    assert "2 component(s) wait there now" in planned.reason
    assert first.component_id in planned.reason and second.component_id in planned.reason
    pinned = await reg.admin.import_components(
        [Candidate(Role.CC, "c1", FRONT, fingerprint=first.fingerprint)], dry_run=True, source="t"
    )
    assert "wait there" not in pinned[0].reason  # the pin decides, not the race
    await reg.admin.import_components([Candidate(Role.CC, "c1", FRONT)], dry_run=False, source="t")
    await settle(reg)
    statuses = sorted(str(status_of(reg, a.component_id)) for a in (first, second))
    assert statuses.count(str(Status.REGISTERED)) == 1, statuses
    assert hook_lines(tmp_path / "hooks.log") == []
    await reg.close()


async def test_an_unpinned_imported_record_gives_no_credentials_to_whoever_names_it(
    tmp_path: Path,
) -> None:
    """The imported record itself holds no key: a signed request naming its id, with any key,
    is refused and leaves no certificate behind; only adoption (announce, prove) gets one."""
    reg = await make_registrar(tmp_path, CLC_SETTINGS, install_window=False, issuer=ISSUER)
    [row] = await reg.admin.import_components(
        [Candidate(Role.CC, "c1", FRONT)], dry_run=False, source="t"
    )
    from eucareg.registrar.desk import CredentialRefused

    with pytest.raises(CredentialRefused) as refused:
        await reg.credentials(row.component_id or "", keypairs.generate_key().public_key(), wait=0)
    assert refused.value.status == 403
    assert reg.memory.certificates == {}
    await reg.close()
