"""`eucareg discover`: sightings decoded as a registrar decodes them (garbage ignored, with its
reason), grouped into CLCs and clusters, the JSON shapes, what is printed and the exit
statuses. The mDNS listener is replaced by canned sightings: no network is used.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from click.testing import CliRunner, Result

from eucareg.cli import discover
from eucareg.cli.main import main
from eucareg.core.model import AnnouncedState, Role
from eucareg.mdns.types import Change, Sighting
from tests.factories import ann, fake_fingerprint, sighting

CLC_FP = fake_fingerprint("clc")


def clc(
    address: str = "10.77.1.10",
    *,
    component_id: str = "clc-bf9547e66504",
    fingerprint: str = CLC_FP,
) -> Sighting:
    return sighting(
        ann(
            Role.CLC,
            component_id=component_id,
            address=address,
            fingerprint=fingerprint,
            api_port=8780,
        )
    )


def member(role: Role, cluster: str, n: int, *, registered: bool = False) -> Sighting:
    """A CC, SC or NC of `cluster`, the n-th of the test (its id, address and key)."""
    state = AnnouncedState.REGISTERED if registered else AnnouncedState.READY
    return sighting(
        ann(
            role,
            cluster,
            component_id=f"{role.value}-{n:012x}",
            address=f"10.77.1.{n}",
            fingerprint=fake_fingerprint(f"{role.value}{n}"),
            state=state,
            api_port=8780 if registered else None,
        )
    )


def garbage(instance: str = "cloud-decoy", **txt: str) -> Sighting:
    record = {
        "txtvers": "1",
        "protovers": "1",
        "type": "cloud",
        "state": "ready",
        "addr": "10.77.1.66",
        "id": "clc-decoy0000001",
        "fp": "sha256:nothex",
        "port": "8780",
        **txt,
    }
    return Sighting(instance, Change.ADDED, txt=record, addresses=("10.77.1.66",))


# -- the pure parts ------------------------------------------------------------------------------


def test_heard_keeps_the_latest_sighting_of_each_instance_still_announced() -> None:
    heard = discover.Heard()
    first, other = clc(), member(Role.CC, "cluster1", 11)
    heard.on_sighting(first)
    heard.on_sighting(other)
    updated = Sighting(first.instance, Change.UPDATED, txt=dict(first.txt), addresses=("x",))
    heard.on_sighting(updated)
    heard.on_sighting(Sighting(other.instance, Change.REMOVED))
    heard.on_sighting(Sighting("never-heard", Change.REMOVED))
    assert heard.sightings() == [updated]


def test_survey_decodes_with_the_registrar_checks_and_says_why_it_ignores() -> None:
    good = clc()
    copied = Sighting("cloud-copy", Change.ADDED, txt=dict(good.txt), addresses=("10.77.1.99",))
    heard = discover.survey([good, garbage(), copied, garbage("b-old", txtvers="2")])
    assert [a.component_id for a in heard.announcements] == ["clc-bf9547e66504"]
    assert heard.ignored == (
        {"instance": "b-old", "code": "bad-txt", "reason": "txtvers='2', expected '1'"},
        {
            "instance": "cloud-copy",
            "code": "replayed",
            "reason": "addr=10.77.1.10 is not an address of the announcing host (10.77.1.99); "
            "a copied announcement?",
        },
        {
            "instance": "cloud-decoy",
            "code": "bad-txt",
            "reason": "fp='sha256:nothex' is not a key fingerprint (sha256: and 64 hex digits)",
        },
    )


def test_the_clc_address_is_its_addr_not_one_the_responder_offered() -> None:
    # A dual-homed CLC: the responder offers both addresses, addr= names the one to use.
    two = Sighting(
        "cloud-clc-bf9547e66504",
        Change.ADDED,
        txt=dict(clc("192.168.5.10").txt),
        addresses=("10.0.0.5", "192.168.5.10"),
    )
    rows = discover.clc_rows(discover.survey([two]).announcements)
    assert rows == [
        {
            "component_id": "clc-bf9547e66504",
            "address": "192.168.5.10",
            "port": 8780,
            "fingerprint": CLC_FP,
            "eucavers": "3.4",
            "instances": ["cloud-clc-bf9547e66504"],
        }
    ]


def test_twins_of_one_clc_are_one_row_and_other_roles_none() -> None:
    one = clc()
    twin = Sighting(f"{one.instance} #2", Change.ADDED, txt=dict(one.txt), addresses=one.addresses)
    heard = discover.survey([twin, member(Role.CC, "cluster1", 11, registered=True), one])
    rows = discover.clc_rows(heard.announcements)
    assert len(rows) == 1
    assert rows[0]["instances"] == [one.instance, twin.instance]


def test_clc_outcome_one_none_several() -> None:
    one = discover.clc_outcome(discover.survey([clc(), garbage()]), 3.0)
    assert (one.status, one.error, one.warnings) == (0, None, ())
    assert set(one.data) == {"clcs", "ignored", "listened"}
    assert one.data["listened"] == 3.0
    assert [i["instance"] for i in one.data["ignored"]] == ["cloud-decoy"]

    none = discover.clc_outcome(discover.survey([member(Role.NC, "cluster1", 21)]), 3.0)
    assert (none.status, none.error) == (1, "no CLC heard on this LAN within 3s")
    assert none.data["clcs"] == []
    assert discover.clc_outcome(discover.Survey(()), 0.5).error == (
        "no CLC heard on this LAN within 0.5s"
    )

    rogue = clc("10.77.1.9", component_id="clc-0123456789ab", fingerprint=fake_fingerprint("x"))
    several = discover.clc_outcome(discover.survey([clc(), rogue]), 3.0)
    assert several.status == 3 and several.error is None
    # Both printed, sorted by address (numerically: .9 before .10).
    assert [r["address"] for r in several.data["clcs"]] == ["10.77.1.9", "10.77.1.10"]
    assert several.warnings == (
        "2 CLCs heard on this LAN (clc-0123456789ab at 10.77.1.9, clc-bf9547e66504 at "
        "10.77.1.10), where the design expects one: confirm the fingerprint out of band before "
        "pinning one",
    )


def test_clusters_group_ccs_scs_and_count_ncs() -> None:
    nc = member(Role.NC, "cluster1", 21)
    nc_twin = Sighting(f"{nc.instance} #2", Change.ADDED, txt=dict(nc.txt), addresses=nc.addresses)
    heard = discover.survey(
        [
            clc(),
            sighting(ann(Role.WALRUS, address="10.77.1.10", fingerprint=fake_fingerprint("w"))),
            member(Role.NC, "cluster2", 31),
            member(Role.CC, "cluster1", 11, registered=True),
            member(Role.SC, "cluster1", 12),
            nc,
            nc_twin,
            member(Role.NC, "cluster1", 22),
            member(Role.CC, "cluster3", 41),
            garbage("cluster-bad", type="cluster", cluster="cluster9", fp="sha256:00"),
        ]
    )
    rows = discover.cluster_rows(heard.announcements)
    assert [r["name"] for r in rows] == ["cluster1", "cluster2", "cluster3"]
    cluster1, cluster2, cluster3 = rows
    assert cluster1 == {
        "name": "cluster1",
        "cc": [
            {
                "component_id": "cc-00000000000b",
                "address": "10.77.1.11",
                "port": 8780,
                "state": "registered",
                "registered": True,
                "fingerprint": fake_fingerprint("cc11"),
                "instances": ["cluster-cc-00000000000b"],
            }
        ],
        "sc": [
            {
                "component_id": "sc-00000000000c",
                "address": "10.77.1.12",
                "fingerprint": fake_fingerprint("sc12"),
                "instances": ["storage-sc-00000000000c"],
            }
        ],
        "nc_count": 2,  # the twin is the same NC
    }
    # A cluster heard only from its NCs is listed, with no CC.
    assert (cluster2["cc"], cluster2["sc"], cluster2["nc_count"]) == ([], [], 1)
    assert cluster3["cc"][0]["registered"] is False and cluster3["cc"][0]["port"] is None


def test_clusters_outcome_none_and_a_name_two_ccs_announce() -> None:
    none = discover.clusters_outcome(discover.survey([clc()]), 3.0)
    assert (none.status, none.error) == (1, "no cluster heard on this LAN within 3s")
    assert set(none.data) == {"clusters", "ignored", "listened"}
    twice = discover.clusters_outcome(
        discover.survey(
            [
                member(Role.CC, "cluster1", 11, registered=True),
                member(Role.CC, "cluster1", 13),
            ]
        ),
        3.0,
    )
    assert twice.status == 0
    assert [cc["state"] for cc in twice.data["clusters"][0]["cc"]] == ["registered", "ready"]
    assert twice.warnings == (
        "cluster cluster1: 2 CCs announce it; the CLC registers one only (`eucareg status` on "
        "the CLC says which)",
    )


# -- the commands, with canned sightings ---------------------------------------------------------


@pytest.fixture(autouse=True)
def canned(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Sighting]]:
    """What `listen` hears in these tests; it never opens a socket. The seconds it was asked
    to listen are appended to LISTENED."""
    heard: list[Sighting] = []
    LISTENED.clear()
    BACKENDS.clear()

    async def listen(
        seconds: float, *, ipv6: bool = False, backend_name: str = "auto"
    ) -> list[Sighting]:
        LISTENED.append((seconds, ipv6))
        BACKENDS.append(backend_name)
        return list(heard)

    monkeypatch.setattr(discover, "listen", listen)
    yield heard


LISTENED: list[tuple[float, bool]] = []
BACKENDS: list[str] = []


def run(*args: str) -> Result:
    result = CliRunner().invoke(main, ["discover", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    return result


def test_discover_clc_prints_one_clc(canned: list[Sighting]) -> None:
    canned += [clc(), member(Role.CC, "cluster1", 11, registered=True)]
    result = run("clc")
    assert (result.exit_code, result.stderr) == (0, "")
    assert "clc-bf9547e66504" in result.stdout and "10.77.1.10" in result.stdout
    assert CLC_FP in result.stdout and "8780" in result.stdout
    assert "cc-00000000000b" not in result.stdout
    assert LISTENED == [(3.0, False)]  # the default --timeout

    result = run("clc", "--json", "--timeout", "500ms", "--ipv6")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["clcs"][0]["address"] == "10.77.1.10"
    assert data["clcs"][0]["fingerprint"] == CLC_FP
    assert data["ignored"] == [] and data["listened"] == 0.5
    assert LISTENED[-1] == (0.5, True)


def test_discover_clc_nothing_heard_is_exit_1(canned: list[Sighting]) -> None:
    result = run("clc")
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == "error: no CLC heard on this LAN within 3s\n"
    # --json still prints its object (what was ignored may say why), and the same error.
    canned.append(garbage())
    result = run("clc", "--json", "--timeout", "2s")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["ignored"][0]["code"] == "bad-txt"
    assert result.stderr == "error: no CLC heard on this LAN within 2s\n"


def test_discover_clc_several_prints_all_warns_and_exits_3(canned: list[Sighting]) -> None:
    canned += [clc(), clc("10.77.1.9", component_id="clc-0123456789ab")]
    result = run("clc")
    assert result.exit_code == 3
    assert "clc-0123456789ab" in result.stdout and "clc-bf9547e66504" in result.stdout
    assert result.stderr.startswith("warning: 2 CLCs heard on this LAN (")
    assert len(json.loads(run("clc", "--json").stdout)["clcs"]) == 2


def test_ignored_announcements_are_noted_and_named_with_verbose(canned: list[Sighting]) -> None:
    canned += [clc(), garbage()]
    result = run("clc")
    assert result.exit_code == 0 and "clc-decoy" not in result.stdout
    assert result.stderr == (
        "note: 1 announcement(s) with an invalid TXT record ignored (--verbose lists them)\n"
    )
    result = run("clc", "--verbose")
    assert result.stderr == (
        "ignored 'cloud-decoy': bad-txt: fp='sha256:nothex' is not a key fingerprint "
        "(sha256: and 64 hex digits)\n"
    )
    assert run("clc", "--json").stderr == ""
    # Names and values chosen by whoever announces are printed as they are, never as markup.
    canned.append(garbage("[/bold] [red]x", txtvers="[/]"))
    result = run("clc", "-v")
    assert result.exit_code == 0
    assert "ignored '[/bold] [red]x': bad-txt: txtvers='[/]', expected '1'\n" in result.stderr


def test_discover_clusters_table_json_and_exit(canned: list[Sighting]) -> None:
    result = run("clusters")
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == "error: no cluster heard on this LAN within 3s\n"

    canned += [
        clc(),
        member(Role.CC, "cluster1", 11, registered=True),
        member(Role.SC, "cluster1", 12),
        member(Role.NC, "cluster1", 21),
        member(Role.NC, "cluster2", 31),
    ]
    result = run("clusters")
    assert (result.exit_code, result.stderr) == (0, "")
    lines = result.stdout.splitlines()
    cluster1 = next(line for line in lines if "cluster1" in line)
    assert "cc-00000000000b 10.77.1.11 registered" in cluster1
    assert "sc-00000000000c 10.77.1.12" in cluster1 and cluster1.rstrip(" │").endswith("1")
    cluster2 = next(line for line in lines if "cluster2" in line)
    assert cluster2.split("│")[2].strip() == "-"

    data = json.loads(run("clusters", "--json").stdout)
    assert [c["name"] for c in data["clusters"]] == ["cluster1", "cluster2"]
    assert data["clusters"][0]["cc"][0]["registered"] is True
    assert data["clusters"][1]["nc_count"] == 1


@pytest.mark.parametrize("given", ["0s", "forever", "301s", "-1s"])
def test_a_bad_timeout_is_a_usage_error(given: str) -> None:
    for command in ("clc", "clusters"):
        result = run(command, "--timeout", given)
        assert result.exit_code == 2, result.stderr
        assert result.stderr.startswith("error: --timeout: ")
    assert LISTENED == []


def test_a_listener_that_cannot_start_is_exit_1(monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(
        seconds: float, *, ipv6: bool = False, backend_name: str = "auto"
    ) -> list[Sighting]:
        raise OSError(19, "No such device")

    monkeypatch.setattr(discover, "listen", broken)
    result = run("clusters")
    assert result.exit_code == 1
    assert result.stderr == (
        "error: cannot listen for mDNS announcements: [Errno 19] No such device\n"
    )


def test_discover_listens_through_the_backend_asked_for() -> None:
    run("clusters", "--timeout", "1s")
    run("clc", "--timeout", "1s", "--backend", "avahi")
    assert BACKENDS == ["auto", "avahi"]
    result = CliRunner().invoke(main, ["discover", "clc", "--backend", "bonjour"])
    assert result.exit_code == 2 and "bonjour" in result.output
