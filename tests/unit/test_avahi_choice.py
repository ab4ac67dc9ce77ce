"""Which mDNS backend a host uses ([mdns] backend): the config key and its errors, `auto`'s
decision from what the system bus says (faked here; tests/integration/test_avahi_backend.py
asks real buses), the network-namespace check on a fake /proc, and ChosenBackend's start."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from eucareg.agent.host import choose_backend, mdns_in_use
from eucareg.config.file import from_mapping
from eucareg.config.values import ConfigError
from eucareg.mdns import avahi_dbus as ad
from eucareg.mdns import choice
from eucareg.mdns.choice import ChosenBackend, MdnsUnavailable, decide, preview
from eucareg.mdns.types import ServiceSpec, Sighting, SightingHandler


def config(**mdns: Any) -> Any:
    raw: dict[str, Any] = {"address": "10.0.0.5", "components": {"nc": {"cluster": "c1"}}}
    if mdns:
        raw["mdns"] = mdns
    return from_mapping(raw)


# -- the config key -------------------------------------------------------------------------------


def test_the_backend_is_auto_unless_the_config_says_otherwise() -> None:
    assert config().mdns_backend == "auto"
    for name in ("auto", "avahi", "zeroconf"):
        assert config(backend=name).mdns_backend == name
        assert choose_backend(config(backend=name)).setting == name  # type: ignore[attr-defined]


@pytest.mark.parametrize("bad", ["Avahi", "bonjour", "", 1, True, ["avahi"]])
def test_an_unknown_backend_is_refused_by_name(bad: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        config(backend=bad)
    assert str(caught.value).startswith(
        "mdns.backend: expected one of 'auto', 'avahi', 'zeroconf', got "
    )


def test_mdns_takes_no_other_keys() -> None:
    with pytest.raises(ConfigError, match="mdns"):
        config(backends="avahi")


# -- auto's decision ------------------------------------------------------------------------------


def test_forced_backends_need_no_probe() -> None:
    assert decide("zeroconf", None) == ("zeroconf", "forced by [mdns] backend")
    assert decide("avahi", None) == ("avahi", "forced by [mdns] backend")


def test_auto_follows_the_probe_and_says_why() -> None:
    assert decide("auto", ad.Probe(True, "it runs here")) == ("avahi", "auto: it runs here")
    assert decide("auto", ad.Probe(False, "no bus")) == ("zeroconf", "auto: no bus")
    with pytest.raises(ValueError):
        decide("auto", None)
    with pytest.raises(ValueError):
        decide("mdns", None)


def fake_proc(tmp_path: Path, ours: str, theirs: str | None, pid: int = 4242) -> Path:
    """A /proc with our and one other process's network namespace links."""
    for name, target in (("self", ours), (str(pid), theirs)):
        if target is None:
            continue
        (tmp_path / name / "ns").mkdir(parents=True)
        os.symlink(target, tmp_path / name / "ns" / "net")
    return tmp_path


def test_avahi_in_our_namespace_is_usable(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, "net:[4026531840]", "net:[4026531840]")
    assert ad.same_netns(4242, proc) == ad.Probe(
        True, "avahi-daemon (pid 4242) runs in this network namespace"
    )


def test_avahi_in_another_namespace_is_not(tmp_path: Path) -> None:
    # `ip netns exec` leaves the machine's system bus reachable: its avahi-daemon would
    # announce on the machine's LAN, not ours.
    probe = ad.same_netns(4242, fake_proc(tmp_path, "net:[4026532100]", "net:[4026531840]"))
    assert not probe.usable
    assert "another network namespace (net:[4026531840], ours net:[4026532100])" in probe.reason


def test_a_namespace_that_cannot_be_read_means_no_avahi(tmp_path: Path) -> None:
    # The daemon's pid is in another pid namespace, or /proc is hidden: do not guess.
    probe = ad.same_netns(4242, fake_proc(tmp_path, "net:[4026531840]", None))
    assert not probe.usable
    assert probe.reason.startswith("cannot tell avahi-daemon (pid 4242)'s network namespace")


async def test_probe_without_a_bus_says_so(tmp_path: Path) -> None:
    probe = await ad.probe(f"unix:path={tmp_path}/no-bus")
    assert not probe.usable
    assert probe.reason.startswith("no system bus: connect: cannot reach unix:path=")


async def test_check_config_preview() -> None:
    async def here() -> ad.Probe:
        return ad.Probe(True, "avahi-daemon (pid 7) runs in this network namespace")

    assert await preview("auto", here) == {
        "setting": "auto",
        "backend": "avahi",
        "reason": "auto: avahi-daemon (pid 7) runs in this network namespace",
    }
    assert (await preview("zeroconf", here))["backend"] == "zeroconf"


# -- ChosenBackend --------------------------------------------------------------------------------


class FakeBackend:
    def __init__(self, name: str, fail: Exception | None = None) -> None:
        self.name, self.fail = name, fail
        self.handlers: list[SightingHandler] = []
        self.started = self.closed = False
        self.published: list[ServiceSpec] = []

    async def start(self) -> None:
        if self.fail is not None:
            raise self.fail
        self.started = True

    async def close(self) -> None:
        self.closed = True

    async def publish(self, spec: ServiceSpec) -> None:
        self.published.append(spec)

    async def withdraw(self, instance: str) -> None: ...

    def greet(self, instance: str) -> bool:
        return True

    def watch(self, handler: SightingHandler) -> None:
        self.handlers.append(handler)


@pytest.fixture
def made(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[FakeBackend]]:
    """choice.make() hands out fakes; an "avahi" one fails to start if told to."""
    out: dict[str, list[FakeBackend]] = {"avahi": [], "zeroconf": [], "fail": []}

    def make(name: str, *, ipv6: bool) -> FakeBackend:
        fail = ad.AvahiError("connect", "cannot reach the system bus") if out["fail"] else None
        backend = FakeBackend(name, fail if name == "avahi" else None)
        out[name].append(backend)
        return backend

    monkeypatch.setattr(choice, "make", make)
    return out


def prober(usable: bool) -> Any:
    async def probe() -> ad.Probe:
        return ad.Probe(usable, "avahi-daemon (pid 9) runs in this network namespace")

    return probe


async def test_auto_starts_the_backend_the_probe_allows(made: dict[str, list[Any]]) -> None:
    backend = ChosenBackend("auto", ipv6=False, prober=prober(True))
    heard: list[Sighting] = []
    backend.watch(heard.append)  # before start: handed over once the backend exists
    assert backend.describe()["backend"] == "pending"
    await backend.start()
    (inner,) = made["avahi"]
    assert inner.started and inner.handlers == [heard.append]
    assert backend.describe() == {
        "backend": "avahi",
        "setting": "auto",
        "reason": "auto: avahi-daemon (pid 9) runs in this network namespace",
    }
    assert mdns_in_use(backend) == backend.describe()
    await backend.close()
    assert inner.closed


async def test_auto_falls_back_to_zeroconf_when_avahi_fails_at_start(
    made: dict[str, list[Any]],
) -> None:
    made["fail"].append(True)
    backend = ChosenBackend("auto", ipv6=False, prober=prober(True))
    await backend.start()
    assert backend.name == "zeroconf" and made["zeroconf"][0].started
    assert backend.reason.startswith("auto: Avahi failed at start (connect: cannot reach")


async def test_forced_avahi_that_cannot_start_stops_the_agent_with_a_clear_error(
    made: dict[str, list[Any]],
) -> None:
    made["fail"].append(True)
    backend = ChosenBackend("avahi", ipv6=False)
    # An OSError: `eucareg agent` says "agent cannot run: ..." and exits 1.
    with pytest.raises(MdnsUnavailable, match=r'backend = "avahi", but avahi-daemon cannot be'):
        await backend.start()
    assert made["zeroconf"] == []  # never a silent fallback from a forced choice


def test_status_of_a_host_without_mdns() -> None:
    assert mdns_in_use(object())["backend"] == "none"


def test_status_shows_the_backend_in_use_as_plain_text() -> None:
    import io

    from rich.console import Console

    from eucareg.cli.render import render_tree

    reason = "auto: avahi-daemon (pid 612) runs in this network namespace [x]"
    status = {"tree": {}, "mdns": {"backend": "avahi", "setting": "auto", "reason": reason}}
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(render_tree(status))
    assert f"mDNS: avahi ({reason})" in console.export_text()  # "[x]" is not read as markup
