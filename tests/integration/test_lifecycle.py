"""A component's life with real agents: a reinstalled machine, SIGTERM while a hook runs, and
SIGTERM's goodbyes.

Every wait here is for the event that shows the decision (a record's status, an event, a log
line, a process group gone), bounded by a deadline; nothing sleeps and then asserts absence.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from eucalab.cloud import LabCloud
from eucalab.cloud_probes import all_registered, registered_components
from eucareg.core.model import Role
from eucareg.pki import credentials as cred
from eucareg.pki import keypairs
from tests.integration.conftest import CloudFactory

pytestmark = pytest.mark.integration

PLAN: dict[str, dict[str, str | None]] = {
    "cloud": {"clc": None, "cc": "cluster1"},
    "node1": {"nc": "cluster1"},
}
# Generous: the machine may have two cores and other work; positive waits only.
WAIT = 60.0
REPLACE_AFTER = 3.0


def row(rows: list[dict[str, Any]], component_id: str) -> dict[str, Any]:
    return next((r for r in rows if r["component_id"] == component_id), {})


def last_seq(cloud: LabCloud, host: str) -> int:
    events = cloud.events(host)
    return int(events[-1]["seq"]) if events else 0


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.1)


def converge(cloud: LabCloud) -> None:
    cloud.wait_for("cloud", all_registered(cloud.expected()), timeout=WAIT)
    wait_until(cloud.credentials_complete, WAIT, "credentials written on every host")


def new_identity(cloud: LabCloud, host: str) -> str:
    """Make the host's identity now (as `eucareg fingerprint` does); its component id."""
    cloud.prepare(host)
    config = str(cloud.host_dir(host) / "eucareg.toml")
    out = cloud.cli(host, "fingerprint", "--json", "--config", config).stdout
    return str(json.loads(out)[0]["component_id"])


def watch_started(cloud: LabCloud, host: str, component_id: str) -> bool:
    """The component's agent (log level debug) holds credentials and has sent the request
    that watches them: a credential request logged after "is registered"."""
    lines = cloud.logs(host).splitlines()
    registered = [i for i, line in enumerate(lines) if f"{component_id} is registered" in line]
    return bool(registered) and any(
        f"requesting credentials for {component_id}" in line for line in lines[registered[0] :]
    )


def log_time(cloud: LabCloud, host: str, needle: str) -> float:
    """When the host's agent logged ``needle`` first (its JSON log's `ts`)."""
    for line in cloud.logs(host).splitlines():
        if needle in line:
            return float(json.loads(line)["ts"])
    raise AssertionError(f"{host} never logged {needle!r}")


def stays_offline(cloud: LabCloud, component_id: str, timeout: float) -> None:
    """Shown offline in two successive answers within ``timeout`` (a state, not a blip)."""
    offline = 0
    deadline = time.monotonic() + timeout
    while offline < 2:
        online = row(cloud.registry("cloud"), component_id)["online"]
        assert time.monotonic() < deadline, f"{component_id} still online after {timeout}s"
        offline = offline + 1 if online is False else 0
        time.sleep(0.2)


def has_node_credentials(cloud: LabCloud, host: str) -> bool:
    key = keypairs.load_key(cloud.host_dir(host) / "state" / "identity" / "nc.key.pem")
    return cred.credentials_present(cloud.key_dir(host), Role.NC, key)


# -- a reinstalled machine --------------------------------------------------------------------


def _replaced(old: str, new: str) -> Callable[[list[dict[str, Any]]], bool]:
    def done(rows: list[dict[str, Any]]) -> bool:
        fresh = row(rows, new)
        return (
            row(rows, old).get("status") == "replaced"
            and fresh.get("status") == "registered"
            and bool(fresh.get("credentials_collected_at"))
        )

    return done


def _check_replacement(
    cloud: LabCloud, host: str, old: str, new: str, since: int, silent_from: float
) -> None:
    """What an operator sees once `new` replaced `old` at node1's address."""
    rows = cloud.registry("cloud")
    address = str(cloud.lab.address("node1"))
    gone, fresh = row(rows, old), row(rows, new)
    assert gone["address"] == fresh["address"] == address
    assert new in gone["reason"] and "credentials revoked" in gone["reason"]
    assert fresh["replaces"] == old
    # Admitted by the install window opened at the cloud's first start, which is still open:
    # nobody changed any trust setting for it.
    assert fresh["admitted_by"] == "install-window"
    assert [e for e in cloud.events("cloud", "&kind=trust") if e["seq"] > since] == []
    replaced = [e for e in cloud.events("cloud", f"&component={old}") if e["seq"] > since]
    assert [(e["kind"], e["code"]) for e in replaced] == [("replaced", "reinstalled")]
    # Not before the old one had been silent for replace_after.
    assert replaced[0]["at"] >= silent_from + REPLACE_AFTER
    # It waited (if at all) only for the old one's silence, then went the usual way.
    steps = [
        (e["kind"], e["code"])
        for e in cloud.events("cloud", f"&component={new}")
        if e["kind"] != "credentials"
    ]
    assert [kind for kind, _ in steps[-3:]] == ["awaiting-key", "registering", "registered"]
    assert set(steps[:-3]) <= {("pending", "address-held"), ("refused", "address-in-use")}
    # One hook run for each identity, and the new one holds credentials for its new key.
    node_hooks = [line for line in cloud.hook_log("cloud") if line.startswith("node ")]
    assert node_hooks == [f"node {old} {address} cluster1", f"node {new} {address} cluster1"]
    wait_until(lambda: has_node_credentials(cloud, host), WAIT, "new node credentials")


def test_reinstalled_node_is_readmitted_by_itself(cloud_factory: CloudFactory) -> None:
    """An NC's machine is reinstalled: its agent stops, its state (key, id) is wiped, and it
    starts again at the same address. Once the old identity has been silent for
    replace_after, the new one is admitted (the install window is still open) and the old
    record is shown replaced, with no operator action and no trust change."""
    cloud = cloud_factory(
        PLAN, registrar={"replace_after": f"{REPLACE_AFTER:g}s"}, log_level={"node1": "debug"}
    )
    cloud.start_all(["cloud", "node1"])
    converge(cloud)
    old = cloud.component_id("node1", "nc")
    # Registered agents always watch their credentials: stop it with that request sent.
    wait_until(lambda: watch_started(cloud, "node1", old), WAIT, "credential watch")
    since = last_seq(cloud, "cloud")
    stopped = time.time()
    cloud.stop("node1")
    shutil.rmtree(cloud.host_dir("node1") / "state")
    new = new_identity(cloud, "node1")
    assert new != old
    cloud.start("node1")
    cloud.wait_for_registry("cloud", _replaced(old, new), timeout=WAIT)
    _check_replacement(cloud, "node1", old, new, since, stopped)
    assert row(cloud.registry("cloud"), old)["online"] is False


def test_newcomer_is_decided_again_once_the_old_one_stops_polling(
    cloud_factory: CloudFactory,
) -> None:
    """docs/registration.md, "replaced": while the old component is heard (announcing, or
    holding a credential request open) the newcomer is refused address-in-use; once the old
    one has been silent on every source for replace_after, the newcomer may take over,
    "decided again by itself when that time is up".

    Here the old NC stops announcing first (its sshd dies) while its agent keeps watching
    its credentials; the reinstalled identity shows up at its address; then the old agent
    stops too. (Until fc14830 the newcomer stayed refused: only an mDNS withdrawal armed the
    re-decision, not the end of the last open request.)
    """
    plan = {**PLAN, "newnode": {"nc": "cluster1"}}
    cloud = cloud_factory(
        plan, registrar={"replace_after": f"{REPLACE_AFTER:g}s"}, sshd={"node1": "127.0.0.1:2222"}
    )
    address = str(cloud.lab.address("node1"))
    cloud.settings = {**cloud.settings, "addresses": {"newnode": {"nc": address}}}
    sshd = cloud.fake_sshd("node1")
    cloud.start_all(["cloud", "node1"])
    cloud.wait_for("cloud", all_registered({"cc": 1, "nc": 1}), timeout=WAIT)
    wait_until(lambda: has_node_credentials(cloud, "node1"), WAIT, "node1 credentials")
    old = cloud.component_id("node1", "nc")

    # The old one withdraws its announcement, but its agent still holds a request open.
    cloud.lab.stop(sshd)
    withdrew = f"component {old} withdrew its announcement"
    cloud.agents["cloud"].wait_for_log(withdrew, timeout=WAIT)
    cloud.wait_for_registry("cloud", lambda rows: row(rows, old).get("online") is True)
    # Once replace_after has passed since the withdrawal (so a re-decision timed from it
    # would be spent), the new identity announces the old address and is refused: the old
    # one is still heard.
    withdrawn_at = log_time(cloud, "cloud", withdrew)
    while time.time() < withdrawn_at + REPLACE_AFTER + 0.5:
        time.sleep(0.1)
    new = new_identity(cloud, "newnode")
    since = last_seq(cloud, "cloud")
    cloud.start("newnode")
    refused = cloud.wait_for_event("cloud", new, "refused", "address-in-use", timeout=WAIT)
    assert old in refused["reason"]
    assert row(cloud.registry("cloud"), old)["online"] is True

    # The old agent stops: silent on every source from now on.
    silent_from = time.time()
    cloud.stop("node1")
    stays_offline(cloud, old, timeout=10)
    # Decided again by itself: admitted replace_after later (plus the registration).
    cloud.wait_for_registry("cloud", _replaced(old, new), timeout=WAIT)
    _check_replacement(cloud, "newnode", old, new, since, silent_from)


# -- SIGTERM while a hook runs ----------------------------------------------------------------


def _group(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, anywhere on the machine: PIDs are
    global as root sees /proc, whatever namespace a process runs in."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def test_sigterm_during_a_hook_kills_its_process_group(
    cloud_factory: CloudFactory, tmp_path: Path
) -> None:
    pidfile = tmp_path / "hook.pid"
    hook = (
        "#!/bin/sh\n"
        "# a registration that hangs: two sleeps, one in the background, in the hook's group\n"
        "sleep 60 &\n"
        f"echo \"$$ $(cut -d' ' -f5 /proc/$$/stat)\" > {pidfile}.tmp\n"
        f"mv {pidfile}.tmp {pidfile}\n"
        "sleep 60\n"
    )
    cloud = cloud_factory(PLAN, hooks={"cloud": {"node": hook}}, registrar={"hook_timeout": "300s"})
    cloud.start("cloud")
    cloud.wait_for("cloud", all_registered({"cc": 1}), timeout=WAIT)
    node = new_identity(cloud, "node1")
    cloud.start("node1")
    wait_until(pidfile.exists, WAIT, "the node hook started")
    pid, pgid = map(int, pidfile.read_text().split())
    assert pid == pgid  # the hook leads a process group (a session) of its own
    # The script and both sleeps: the whole group is running.
    wait_until(lambda: len(_group(pgid)) >= 3, WAIT, "hook group of three processes")
    status = cloud.status("cloud")
    assert {r["component_id"]: r["status"] for r in registered_components(status)}[node] == (
        "registering"
    )

    terminated = time.monotonic()  # at most the moment of SIGTERM
    code, took = cloud.terminate("cloud", timeout=10)
    cloud.stop("cloud")  # reap it
    assert code == 0, f"agent exit status {code}"
    assert took < 3.0, f"the agent took {took:.2f}s to stop"
    # No process of the hook's group is alive 3 s after SIGTERM (nor later: a group id is
    # not reused while the group has members, and it had none left).
    wait_until(lambda: not _group(pgid), max(0.0, terminated + 3.0 - time.monotonic()), "hook")
    while time.monotonic() < terminated + 3.0:
        time.sleep(0.05)
    assert _group(pgid) == []
    assert "agent stopped in" in cloud.agents["cloud"].log_text()


# -- SIGTERM says goodbye ---------------------------------------------------------------------

BROWSER = """
import threading, time
from zeroconf import IPVersion, ServiceBrowser, Zeroconf

def seen(zeroconf, service_type, name, state_change):
    print(f"{state_change.name.lower()} {name} {time.time():.3f}", flush=True)

zc = Zeroconf(ip_version=IPVersion.V4Only)
browser = ServiceBrowser(zc, "_eucalyptus._tcp.local.", handlers=[seen])
print("browsing", flush=True)
threading.Event().wait()
"""


def test_sigterm_stops_an_agent_within_3s_and_says_goodbye(cloud_factory: CloudFactory) -> None:
    """The goodbyes reach the registrar and an independent browser on a third host within
    seconds, and the registrar shows the NC offline; without goodbyes, browsers keep a
    service for its records' TTL (python-zeroconf: 120 s, PTR and TXT 75 min)."""
    cloud = cloud_factory({**PLAN, "watcher": {}}, log_level={"node1": "debug"})
    watcher = cloud.lab.spawn("watcher", "browser", [sys.executable, "-c", BROWSER])
    watcher.wait_for_log("browsing", timeout=WAIT)
    cloud.start_all(["cloud", "node1"])
    converge(cloud)
    node = cloud.component_id("node1", "nc")
    instance = f"node-{node}._eucalyptus._tcp.local."
    watcher.wait_for_log(f"added {instance}", timeout=WAIT)
    # Registered agents always watch their credentials: stop it with that request sent.
    wait_until(lambda: watch_started(cloud, "node1", node), WAIT, "credential watch")

    code, took = cloud.terminate("node1", timeout=10)
    cloud.stop("node1")
    assert code == 0, f"agent exit status {code}"
    assert took < 3.0, f"the agent took {took:.2f}s to stop"
    assert "withdrew node-" in cloud.logs("node1")
    # The registrar and the other browser drop it at once: goodbye packets, not a TTL.
    cloud.agents["cloud"].wait_for_log(f"component {node} withdrew its announcement", timeout=10)
    watcher.wait_for_log(f"removed {instance}", timeout=10)
    stays_offline(cloud, node, timeout=10)
    # Going away deregisters nothing.
    assert row(cloud.registry("cloud"), node)["status"] == "registered"


def test_a_held_credential_request_ends_when_its_agent_stops(cloud_factory: CloudFactory) -> None:
    """A registered NC that stopped announcing (its sshd died) is still heard through the
    credential request its agent holds open. When that agent stops, the registrar must not
    count the request until its 25 s wait runs out."""
    cloud = cloud_factory(PLAN, sshd={"node1": "127.0.0.1:2222"})
    sshd = cloud.fake_sshd("node1")
    cloud.start_all(["cloud", "node1"])
    converge(cloud)
    node = cloud.component_id("node1", "nc")
    cloud.lab.stop(sshd)
    cloud.agents["node1"].wait_for_log("not announcing nc: sshd does not answer", timeout=WAIT)
    cloud.agents["cloud"].wait_for_log(f"component {node} withdrew its announcement", timeout=WAIT)
    # Not announcing, yet online: only its open credential request makes it so.
    cloud.wait_for_registry("cloud", lambda rows: row(rows, node).get("online") is True)

    code, took = cloud.terminate("node1", timeout=10)
    cloud.stop("node1")
    assert code == 0 and took < 3.0, (code, took)
    stays_offline(cloud, node, timeout=10)
