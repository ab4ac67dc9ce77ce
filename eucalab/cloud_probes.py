"""Reading a lab cloud's registrars as their operators do, over each host's operator socket:
the API's answers (status, events, registry, hook runs), polling them until a condition holds,
and what the plan and the hosts' files say has happened."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

from eucalab.errors import LabError
from eucalab.plans import CloudPlan
from eucareg.config.file import SOCKET_FILE
from eucareg.core.model import Role

__all__ = [
    "admin_token",
    "all_registered",
    "api",
    "component_id",
    "credentials_complete",
    "events",
    "expected",
    "hook_runs",
    "poll",
    "registered_components",
    "registry",
    "status",
    "wait_for",
    "wait_for_event",
    "wait_for_events",
    "wait_for_registry",
]

T = TypeVar("T")


class ProbedCloud(Protocol):
    """What the probes read (eucalab/cloud.py's LabCloud, which hands itself over): the plan and
    the host directories, and its own reads of the API, which the polls and waits go through."""

    @property
    def plan(self) -> CloudPlan: ...

    def host_dir(self, host: str) -> Path: ...

    def key_dir(self, host: str) -> Path: ...

    def admin_token(self, host: str) -> str: ...

    def api(self, host: str, path: str, timeout: float = 20) -> dict[str, Any]: ...

    def status(self, host: str) -> dict[str, Any]: ...

    def events(self, host: str, query: str = "") -> list[dict[str, Any]]: ...

    def registry(self, host: str) -> list[dict[str, Any]]: ...

    def wait_for_events(
        self,
        host: str,
        done: Callable[[list[dict[str, Any]]], bool],
        query: str = "",
        timeout: float = 60,
        interval: float = 0.3,
    ) -> list[dict[str, Any]]: ...


def admin_token(cloud: ProbedCloud, host: str) -> str:
    return (cloud.host_dir(host) / "state" / "admin.token").read_text().strip()


def api(cloud: ProbedCloud, host: str, path: str, timeout: float = 20) -> dict[str, Any]:
    """GET the registrar API as the host's operator, over its operator socket (a file: no
    need to enter the host's namespace)."""
    state = cloud.host_dir(host) / "state"
    try:
        bearer = f"Bearer {cloud.admin_token(host)}"
    except FileNotFoundError as exc:
        raise LabError(f"no admin credential on {host} yet") from exc
    conn = http.client.HTTPConnection("localhost", timeout=timeout)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(str(state / SOCKET_FILE))
        conn.sock = sock
        conn.request("GET", path, headers={"Authorization": bearer})
        response = conn.getresponse()
        raw = response.read()
    except OSError as exc:
        raise LabError(f"GET {path} on {host} failed: {exc}") from exc
    finally:
        conn.close()
    if response.status != 200:
        raise LabError(f"GET {path} on {host} failed: HTTP {response.status} {raw[:300]!r}")
    data: dict[str, Any] = json.loads(raw)
    return data


def status(cloud: ProbedCloud, host: str) -> dict[str, Any]:
    return cloud.api(host, "/v1/status")


def events(cloud: ProbedCloud, host: str, query: str = "") -> list[dict[str, Any]]:
    return list(cloud.api(host, f"/v1/events?limit=100000{query}")["events"])


def registry(cloud: ProbedCloud, host: str) -> list[dict[str, Any]]:
    """Every record of a registrar (``GET /v1/registry``), whatever its state."""
    return list(cloud.api(host, "/v1/registry")["components"])


def hook_runs(cloud: ProbedCloud, host: str, component_id: str = "") -> list[dict[str, Any]]:
    query = f"?component={component_id}" if component_id else ""
    return list(cloud.api(host, f"/v1/hooks{query}")["hook_runs"])


def wait_for_events(
    cloud: ProbedCloud,
    host: str,
    done: Callable[[list[dict[str, Any]]], bool],
    query: str = "",
    timeout: float = 60,
    interval: float = 0.3,
) -> list[dict[str, Any]]:
    """Poll a registrar's events (``query``: e.g. ``"&component=ID"``) until
    ``done(events)``: how a test waits for the decision it then checks."""
    deadline = time.monotonic() + timeout
    last: list[dict[str, Any]] | str = "no answer yet"
    while time.monotonic() < deadline:
        try:
            last = cloud.events(host, query)
        except (LabError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
            last = str(exc)
        else:
            if done(last):
                return last
        time.sleep(interval)
    summary = json.dumps(last, indent=1)[-4000:] if isinstance(last, list) else last
    raise LabError(f"events on {host} not reached within {timeout}s; last:\n{summary}")


def wait_for_event(
    cloud: ProbedCloud,
    host: str,
    component_id: str,
    kind: str,
    code: str | None = None,
    *,
    after: int = 0,
    timeout: float = 60,
) -> dict[str, Any]:
    """The first event of this kind (and code) for a component with seq > ``after``."""

    def match(event: dict[str, Any]) -> bool:
        return bool(
            event["kind"] == kind
            and (code is None or event["code"] == code)
            and event["seq"] > after
        )

    events = cloud.wait_for_events(
        host,
        lambda evs: any(match(e) for e in evs),
        f"&component={component_id}",
        timeout=timeout,
    )
    return next(e for e in events if match(e))


def wait_for(
    cloud: ProbedCloud,
    host: str,
    done: Callable[[dict[str, Any]], bool],
    timeout: float = 60,
    interval: float = 0.3,
) -> dict[str, Any]:
    """Poll a registrar's status until `done(status)`; LabError with the last status."""
    return poll(f"status on {host}", lambda: cloud.status(host), done, timeout, interval)


def wait_for_registry(
    cloud: ProbedCloud,
    host: str,
    done: Callable[[list[dict[str, Any]]], bool],
    timeout: float = 60,
    interval: float = 0.3,
) -> list[dict[str, Any]]:
    """Poll a registrar's flat registry (every record, any status) until ``done``."""
    return poll(f"registry on {host}", lambda: cloud.registry(host), done, timeout, interval)


def expected(cloud: ProbedCloud) -> dict[str, int]:
    """How many components of each role the plan registers (the CLC registers itself)."""
    counts: dict[str, int] = {}
    for host_plan in cloud.plan.values():
        for role in host_plan:
            if role != Role.CLC.value:
                counts[role] = counts.get(role, 0) + 1
    return counts


def credentials_complete(cloud: ProbedCloud) -> bool:
    from eucareg.pki.credentials import required_files

    for host, host_plan in cloud.plan.items():
        present = {p.name for p in cloud.key_dir(host).glob("*.pem")}
        for role in host_plan:
            if not set(required_files(Role(role))) <= present:
                return False
    return True


def component_id(cloud: ProbedCloud, host: str, role: str) -> str:
    """The id of a host's component, from its identity file (made at its first start,
    or by `eucareg fingerprint`)."""
    return (cloud.host_dir(host) / "state" / "identity" / f"{role}.id").read_text().strip()


def poll(
    what: str, fetch: Callable[[], T], done: Callable[[T], bool], timeout: float, interval: float
) -> T:
    """fetch() until done(answer); LabError naming `what` with the last answer otherwise."""
    deadline = time.monotonic() + timeout
    last: T | str = "no answer yet"
    while time.monotonic() < deadline:
        try:
            answer = fetch()
        except (LabError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
            last = str(exc)
        else:
            if done(answer):
                return answer
            last = answer
        time.sleep(interval)
    summary = last if isinstance(last, str) else json.dumps(last, indent=1)[-4000:]
    raise LabError(f"{what} not reached within {timeout}s; last:\n{summary}")


def registered_components(status: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every component row in a status tree, whatever its state."""
    tree = status.get("tree", {})
    rows: list[dict[str, Any]] = list(tree.get("walrus", [])) + list(tree.get("unmatched", []))
    for cluster in tree.get("clusters", []):
        for role in ("cc", "sc", "nc"):
            rows.extend(cluster[role])
    return rows


def all_registered(expected: Mapping[str, int]) -> Callable[[dict[str, Any]], bool]:
    """A status predicate: exactly the expected components, all registered and collected."""

    def check(status: dict[str, Any]) -> bool:
        rows = registered_components(status)
        counts: dict[str, int] = {}
        for row in rows:
            if row["status"] != "registered" or not row.get("credentials_collected_at"):
                return False
            counts[row["role"]] = counts.get(row["role"], 0) + 1
        return counts == dict(expected)

    return check
