"""The CLC renewing its cloud CA certificate (same key: pins hold), `eucareg ca`, and the
registrar reporting certificates that were not renewed in time (`expiring`, `expired`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509

from eucareg.agent import cloudca
from eucareg.agent.cloudca import CloudCA
from eucareg.agent.watch import FileWatch
from eucareg.cli.main import main
from eucareg.core import renewal
from eucareg.core.model import Role
from eucareg.pki import certificates, keypairs
from eucareg.pki import credentials as cred
from eucareg.pki.cloud import read_held
from eucareg.registrar.engine import Issuer
from tests.unit.test_renewal import HOUR, SHORT, Clock, registrar_with_cc

YEAR = 365 * 86400.0
POLL = 60.0  # CloudCA.run looks again at least this often when it cannot watch the file
PATIENCE = 2 * POLL  # the bound on what a running agent must do: only a failing test waits it out
AT_ONCE = 10.0  # "at once", for a watch that works: an inotify event, one check


def clc_dir(tmp_path: Path, *, issued_at: float | None = None) -> tuple[Path, keypairs.PrivateKey]:
    """A CLC's key_dir with cloud-cert.pem (issued at `issued_at`), and its key."""
    key = keypairs.generate_key()
    key_dir = tmp_path / "keys"
    ca = certificates.create_cloud_ca(key, "ca-test", now=issued_at)
    cred.write_atomic(key_dir / cred.CLOUD_CERT, certificates.cert_pem(ca).encode())
    return key_dir, key


class CheckedCA(CloudCA):
    """The CLC's CloudCA, counting the checks it has finished (a test waits for the running
    agent's first one, not for a time)."""

    checks = 0

    async def check(self) -> bool:
        try:
            return await super().check()
        finally:
            self.checks += 1


class RunningCA:
    """A CheckedCA running (`run()`), the certificates it announced (`on_change`) and the file
    watches it made."""

    def __init__(self, ca: CheckedCA, changes: list[x509.Certificate]) -> None:
        self.ca, self.changes = ca, changes
        self.watches: list[FileWatch] = []
        self.task: asyncio.Task[None] | None = None

    @property
    def polling(self) -> bool:
        """True if its watch could not use inotify (say, the user's instances all taken):
        then it looks again every POLL seconds, not at once."""
        return any(watch.polling for watch in self.watches)

    async def until(self, done: Callable[[], bool], what: str) -> float:
        """Wait for `done()` (bounded by PATIENCE), failing early if the agent stopped; the
        seconds it took."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        while not done():
            if self.task is not None and self.task.done():
                self.task.result()  # raises what stopped it
                raise AssertionError(f"the agent stopped before {what}")
            took = loop.time() - started
            assert took < PATIENCE, f"no {what} in {took:.0f} s (polling: {self.polling})"
            await asyncio.sleep(0.02)
        return loop.time() - started


@contextlib.asynccontextmanager
async def running_ca(
    key_dir: Path, key: keypairs.PrivateKey, held: x509.Certificate, mp: pytest.MonkeyPatch
) -> AsyncIterator[RunningCA]:
    """The CLC's CloudCA running on `key_dir` from `held`, once its first check is done (its
    watch is armed then: the watch starts before that check); cancelled when the block ends."""

    async def changed() -> None:
        agent.changes.append(agent.ca.cert)

    agent = RunningCA(CheckedCA(key_dir, key, held, changed), [])

    class RecordedWatch(FileWatch):
        def start(self) -> None:
            agent.watches.append(self)
            super().start()

    mp.setattr(cloudca, "FileWatch", RecordedWatch)
    agent.task = asyncio.create_task(agent.ca.run())
    try:
        await agent.until(lambda: agent.ca.checks > 0, "first check")
        yield agent
    finally:
        agent.task.cancel()
        await asyncio.gather(agent.task, return_exceptions=True)


async def test_a_cloud_ca_with_a_third_of_its_life_left_is_renewed_for_the_same_key(
    tmp_path: Path,
) -> None:
    clock = Clock()
    key_dir, key = clc_dir(tmp_path, issued_at=clock() - 14 * YEAR)  # 6 of 20 years left
    old = read_held(key_dir, key)
    changes: list[int] = []

    async def changed() -> None:
        changes.append(1)

    ca = CloudCA(key_dir, key, old, changed, clock=clock)
    assert await ca.check() is True
    assert changes == [1]
    new = read_held(key_dir, key)
    assert new == ca.cert and new.serial_number != old.serial_number
    assert certificates.cert_fingerprint(new) == certificates.cert_fingerprint(old)
    assert renewal.phase(certificates.validity(new), renewal.ca_margin(), clock()) is (
        renewal.Phase.CURRENT
    )
    assert await ca.check() is False  # renewed once, not again


async def test_a_current_cloud_ca_is_kept_and_a_foreign_one_is_not_taken_up(
    tmp_path: Path,
) -> None:
    key_dir, key = clc_dir(tmp_path)
    held = read_held(key_dir, key)
    changes: list[int] = []

    async def changed() -> None:
        changes.append(1)

    ca = CloudCA(key_dir, key, held, changed)
    assert await ca.check() is False
    # Someone puts another CA's certificate there: refused, the CLC keeps serving its own.
    other = certificates.create_cloud_ca(keypairs.generate_key(), "rogue")
    cred.write_atomic(key_dir / cred.CLOUD_CERT, certificates.cert_pem(other).encode())
    assert await ca.check() is False
    assert ca.cert == held and changes == []


async def test_the_running_clc_takes_up_an_operator_renewal_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_dir, key = clc_dir(tmp_path)
    held = read_held(key_dir, key)
    async with running_ca(key_dir, key, held, monkeypatch) as agent:
        renewed = certificates.renew_cloud_ca(key, held)
        cred.write_atomic(key_dir / cred.CLOUD_CERT, certificates.cert_pem(renewed).encode())
        took = await agent.until(lambda: agent.changes != [], "change announced")
        assert agent.ca.cert == renewed and agent.changes == [renewed]
        # At once where the watch works; polling (no inotify instance left), at its next look.
        assert took < AT_ONCE or agent.polling, f"taken up after {took:.1f} s"


def _config(tmp_path: Path, key: keypairs.PrivateKey, roles: str = "clc = {}") -> Path:
    state = tmp_path / "state"
    cred.write_atomic(state / "identity" / "clc.key.pem", keypairs.key_pem(key))
    path = tmp_path / "eucareg.toml"
    path.write_text(
        f'address = "10.0.0.1"\nstate_dir = "{state}"\nkey_dir = "{tmp_path / "keys"}"\n'
        f"[components]\n{roles}\n"
    )
    return path


def test_ca_renew_and_show_on_the_clc(tmp_path: Path) -> None:
    key_dir, key = clc_dir(tmp_path)
    before = read_held(key_dir, key)
    config = _config(tmp_path, key)
    runner = CliRunner()
    shown = runner.invoke(main, ["ca", "show", "--config", str(config), "--json"])
    assert shown.exit_code == 0, shown.output
    info = json.loads(shown.output)
    assert info["fingerprint"] == keypairs.fingerprint(key.public_key())
    assert info["serial"] == format(before.serial_number, "x") and info["state"] == "current"
    done = runner.invoke(main, ["ca", "renew", "--config", str(config), "--json"])
    assert done.exit_code == 0, done.output
    result = json.loads(done.output)
    after = read_held(key_dir, key)
    assert result["previous_serial"] == format(before.serial_number, "x")
    assert result["serial"] == format(after.serial_number, "x") != result["previous_serial"]
    assert result["fingerprint"] == info["fingerprint"]  # the pin holds


def test_ca_renew_refuses_where_there_is_no_clc_or_a_foreign_certificate(tmp_path: Path) -> None:
    key_dir, key = clc_dir(tmp_path)
    runner = CliRunner()
    no_clc = runner.invoke(
        main, ["ca", "renew", "--config", str(_config(tmp_path, key, 'nc = { cluster = "c1" }'))]
    )
    assert no_clc.exit_code != 0 and "this host runs no CLC" in no_clc.output
    other = certificates.create_cloud_ca(keypairs.generate_key(), "rogue")
    cred.write_atomic(key_dir / cred.CLOUD_CERT, certificates.cert_pem(other).encode())
    held = (key_dir / cred.CLOUD_CERT).read_bytes()
    refused = runner.invoke(main, ["ca", "renew", "--config", str(_config(tmp_path, key))])
    assert refused.exit_code == 1 and "does not certify this CLC's key" in refused.output
    assert (key_dir / cred.CLOUD_CERT).read_bytes() == held  # nothing replaced


# -- certificates not renewed in time --------------------------------------------------------


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    key = keypairs.generate_key()
    ca = certificates.create_cloud_ca(key, "expiry")
    return Issuer(key=key, cert=ca, cloud_cert=ca, policy=SHORT)


async def test_a_certificate_not_renewed_is_reported_expiring_then_expired_once_each(
    tmp_path: Path, issuer: Issuer
) -> None:
    clock = Clock()
    async with registrar_with_cc(tmp_path, issuer, clock) as (reg, cid, _):
        assert reg.expiry.scan() == []
        clock.offset = HOUR - 1100  # due (20 minutes left), but within the grace
        assert reg.expiry.scan() == []
        clock.offset = HOUR - 300  # due for 15 minutes: its agent is not coming
        [expiring] = reg.expiry.scan()
        assert (expiring.component_id, expiring.code) == (cid, "expiring")
        assert "has not collected the new one" in expiring.reason
        assert reg.expiry.scan() == []  # once
        # ... and `eucareg status` shows it among the warnings for as long as it lasts.
        assert reg.warnings() == [f"cc {cid}: {expiring.reason}"]
        clock.offset = HOUR + 10
        [expired] = reg.expiry.scan()
        assert expired.code == "expired" and "expired at" in expired.reason
        assert reg.expiry.scan() == []
        assert reg.memory.records[cid].role is Role.CC


async def test_a_restarted_registrar_does_not_report_an_overdue_certificate_again(
    tmp_path: Path, issuer: Issuer
) -> None:
    clock = Clock()
    async with registrar_with_cc(tmp_path, issuer, clock) as (reg, cid, key):
        clock.offset = HOUR - 300
        reg.expiry._tick()
        await reg.idle()
    for _ in range(2):  # restarted, twice
        async with registrar_with_cc(tmp_path, issuer, clock, cc=(cid, key)) as (reg, _, _):
            reg.expiry._tick()
            await reg.idle()
            codes = [e.code for e in reg.store.events(component_id=cid, kind="credentials")]
            assert codes == ["issued", "expiring"]
            assert reg.warnings() != []  # still shown in status while it lasts
    # Once it has ended, that is new: reported once.
    clock.offset = HOUR + 10
    async with registrar_with_cc(tmp_path, issuer, clock, cc=(cid, key)) as (reg, _, _):
        reg.expiry._tick()
        await reg.idle()
        reg.expiry._tick()
        await reg.idle()
        codes = [e.code for e in reg.store.events(component_id=cid, kind="credentials")]
        assert codes == ["issued", "expiring", "expired"]


async def test_the_scan_writes_its_events_and_a_renewal_ends_the_reports(
    tmp_path: Path, issuer: Issuer
) -> None:
    clock = Clock()
    async with registrar_with_cc(tmp_path, issuer, clock) as (reg, cid, key):
        clock.offset = HOUR - 300
        reg.expiry._tick()
        await reg.idle()
        codes = [e.code for e in reg.store.events(component_id=cid, kind="credentials")]
        assert codes == ["issued", "expiring"]
        await reg.credentials(cid, key.public_key(), wait=0)  # the agent comes back: renewed
        assert reg.expiry.scan() == []
        assert reg.warnings() == []
        assert 30 <= reg.expiry.interval() <= 3600
