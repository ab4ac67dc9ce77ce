"""The example hooks in hooks/ are idempotent: run by eucareg's own hook runner against a fake
`euca_conf` first on PATH, each registers its component once, succeeds without registering
again when it is re-run (a crash cut the first run short: EUCAREG_RERUN=1) and finds the
component already there, and fails with a non-zero status and a reason on a genuine error.

The fake keeps what is registered in a file, logs every call, lists like Eucalyptus 3's
`euca_conf --list-*` (one line per service: TYPE PARTITION NAME HOST STATE) and answers a second
registration of the same name with "already registered". Files in its state directory switch
on faults: `down` (nothing answers), `no-list` (an euca_conf without the --list options) and
`claims-registered` (every registration answers "already registered").
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from eucareg.core.model import HookOutcome, HookRun, Record, Role, Status
from eucareg.registrar.hooks import DEREGISTER, REGISTER, HookRunner
from tests.factories import ann, record_from

EXAMPLES = Path(__file__).resolve().parents[2] / "hooks"

FAKE_EUCA_CONF = '''#!{python}
"""A fake euca_conf: --register-{{nodes,cluster,sc,walrus}}, --list-{{nodes,clusters,...}}."""
import json, sys
from pathlib import Path

STATE = Path({state!r})
REGISTER = {{"--register-cluster": "CLUSTER", "--register-sc": "STORAGE",
            "--register-walrus": "WALRUS", "--register-nodes": "NODE"}}
LIST = {{"--list-clusters": "CLUSTER", "--list-scs": "STORAGE", "--list-walruses": "WALRUS",
        "--list-nodes": "NODE"}}
args = sys.argv[1:]
with open(STATE / "calls", "a") as log:
    log.write(json.dumps(args) + "\\n")
if (STATE / "down").exists():
    print("euca_conf: cannot reach CLC web service", file=sys.stderr)
    sys.exit(3)
db = STATE / "registered"
rows = [line.split() for line in db.read_text().splitlines()] if db.exists() else []
if args[0] in LIST:
    if (STATE / "no-list").exists():
        print(f"unknown option {{args[0]}}", file=sys.stderr)
        sys.exit(1)
    for kind, partition, name, host in rows:
        if kind == LIST[args[0]]:
            print(f"{{kind}}\\t{{partition}}\\t{{name}}\\t{{host}}\\tENABLED\\t{{{{}}}}")
    sys.exit(0)
DEREGISTER = {{"--deregister-cluster": "CLUSTER", "--deregister-sc": "STORAGE",
              "--deregister-walrus": "WALRUS", "--deregister-nodes": "NODE"}}
if args[0] in DEREGISTER:
    kind = DEREGISTER[args[0]]
    if kind == "NODE":
        gone = args[1].split()
    else:
        gone = [dict(zip(args[1::2], args[2::2]))["--component"]]
    keep = [r for r in rows if not (r[0] == kind and r[2] in gone)]
    if len(keep) == len(rows):
        print(f"ERROR: {{gone[0]}} is not registered.", file=sys.stderr)
        sys.exit(1)
    db.write_text("".join(" ".join(r) + "\\n" for r in keep))
    print(f"SERVICE\\t{{kind}}\\t{{gone[0]}}\\tderegistered")
    sys.exit(0)
kind = REGISTER[args[0]]
if kind == "NODE" and " " in args[1]:
    # Many nodes in one call, as euca_conf takes them: each registered or refused on its own
    # (a file "refuse-HOST" makes that host unreachable); non-zero if any was refused.
    failed = False
    for host in args[1].split():
        if (STATE / f"refuse-{{host}}").exists():
            print(f"ERROR: cannot reach node {{host}}", file=sys.stderr)
            failed = True
        elif any(r[2] == host for r in rows if r[0] == kind):
            print(f"ERROR: {{host}} is already registered.", file=sys.stderr)
            failed = True
        else:
            with open(db, "a") as out:
                out.write(f"{{kind}} - {{host}} {{host}}\\n")
            print(f"SERVICE\\t{{kind}}\\t-\\t{{host}}\\tregistered")
    sys.exit(1 if failed else 0)
if kind == "NODE":
    host, partition, name = args[1], "-", args[1]
else:
    opts = dict(zip(args[1::2], args[2::2]))
    host, partition, name = opts["--host"], opts["--partition"], opts["--component"]
if (STATE / "claims-registered").exists() or any(r[2] == name for r in rows if r[0] == kind):
    print(f"ERROR: {{name}} is already registered.", file=sys.stderr)
    sys.exit(1)
with open(db, "a") as out:
    out.write(f"{{kind}} {{partition}} {{name}} {{host}}\\n")
print(f"SERVICE\\t{{kind}}\\t{{partition}}\\t{{name}}\\tregistered")
'''


@dataclass(frozen=True)
class Example:
    role: Role
    cluster: str | None
    kind: str  # the fake's service type
    register: str  # the euca_conf option that registers

    @property
    def hook(self) -> str:
        return self.role.hook_name

    @property
    def deregister_hook(self) -> str:
        return f"deregister-{self.role.hook_name}"

    @property
    def deregister(self) -> str:
        """The euca_conf option that deregisters."""
        return self.register.replace("--register-", "--deregister-")


EXAMPLE_HOOKS = [
    Example(Role.WALRUS, None, "WALRUS", "--register-walrus"),
    Example(Role.CC, "cluster1", "CLUSTER", "--register-cluster"),
    Example(Role.SC, "cluster1", "STORAGE", "--register-sc"),
    Example(Role.NC, "cluster1", "NODE", "--register-nodes"),
]


@dataclass
class FakeEucaConf:
    state: Path

    def calls(self) -> list[list[str]]:
        path = self.state / "calls"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def registrations(self, option: str) -> list[list[str]]:
        return [c for c in self.calls() if c[0] == option]

    def registered(self) -> list[list[str]]:
        path = self.state / "registered"
        return [line.split() for line in path.read_text().splitlines()] if path.exists() else []

    def add(self, kind: str, partition: str, name: str, host: str) -> None:
        with (self.state / "registered").open("a") as out:
            out.write(f"{kind} {partition} {name} {host}\n")

    def fault(self, name: str) -> None:
        (self.state / name).touch()


@pytest.fixture
def euca_conf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeEucaConf:
    """The fake, first on the PATH the hook runner passes to hooks."""
    state = tmp_path / "euca"
    bin_dir = tmp_path / "bin"
    state.mkdir()
    bin_dir.mkdir()
    fake = bin_dir / "euca_conf"
    fake.write_text(FAKE_EUCA_CONF.format(python=sys.executable, state=str(state)))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}")
    return FakeEucaConf(state)


@pytest.fixture
def hook_dir(tmp_path: Path) -> Path:
    """The examples as an operator installs them (`install -m 0755 hooks/* hook_dir`)."""
    target = tmp_path / "hooks"
    target.mkdir()
    for example in EXAMPLE_HOOKS:
        for name in (example.hook, example.deregister_hook):
            shutil.copy2(EXAMPLES / name, target / name)
            (target / name).chmod(0o755)
    return target


def record_for(example: Example) -> Record:
    return record_from(ann(example.role, example.cluster), Status.REGISTERING, reason="test")


def name_of(example: Example, record: Record) -> str:
    """The Eucalyptus service name each example registers under."""
    return {
        Role.WALRUS: f"walrus-{record.component_id}",
        Role.CC: f"cc-{record.cluster}",
        Role.SC: f"sc-{record.cluster}",
        Role.NC: record.address,
    }[example.role]


def partition_of(example: Example, record: Record) -> str:
    """The partition each example registers in, as the fake records it."""
    return {Role.WALRUS: "walrus", Role.NC: "-"}.get(example.role, str(record.cluster))


async def run_hook(
    hook_dir: Path, record: Record, *, rerun: bool = False, attempt: int = 1, event: str = REGISTER
) -> HookRun:
    async def journal(*_runs: HookRun) -> None:
        return None

    runner = HookRunner(hook_dir, 20, journal)
    return await runner.run(record, rerun=rerun, attempt=attempt, event=event)


def last_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[-1]


pytestmark = pytest.mark.parametrize("example", EXAMPLE_HOOKS, ids=lambda e: e.hook)


def test_the_example_is_a_posix_sh_script(example: Example) -> None:
    path = EXAMPLES / example.hook
    assert path.read_text().startswith("#!/bin/sh\n")
    assert os.access(path, os.X_OK)


async def test_the_first_run_registers(
    example: Example, euca_conf: FakeEucaConf, hook_dir: Path
) -> None:
    record = record_for(example)
    run = await run_hook(hook_dir, record)
    assert run.outcome is HookOutcome.OK, run
    [call] = euca_conf.registrations(example.register)
    assert euca_conf.registered() == [
        [example.kind, partition_of(example, record), name_of(example, record), record.address]
    ]
    if example.role is Role.NC:
        assert call == ["--register-nodes", record.address]
    else:
        assert call[call.index("--host") + 1] == record.address
        assert call[call.index("--component") + 1] == name_of(example, record)


async def test_a_rerun_finds_it_registered_and_registers_nothing(
    example: Example, euca_conf: FakeEucaConf, hook_dir: Path
) -> None:
    record = record_for(example)
    assert (await run_hook(hook_dir, record)).outcome is HookOutcome.OK
    # The registrar died before it recorded the outcome: the hook runs once more, marked.
    again = await run_hook(hook_dir, record, rerun=True, attempt=1)
    assert again.outcome is HookOutcome.OK, again
    assert again.exit_code == 0
    assert "re-run (attempt 1) after an interrupted run" in again.stdout
    assert "already registered" in again.stdout
    assert len(euca_conf.registrations(example.register)) == 1
    assert len(euca_conf.registered()) == 1


async def test_already_registered_as_euca_conf_answers_is_success_without_a_list(
    example: Example, euca_conf: FakeEucaConf, hook_dir: Path
) -> None:
    """An euca_conf that cannot list: its "already registered" answer is believed."""
    record = record_for(example)
    assert (await run_hook(hook_dir, record)).outcome is HookOutcome.OK
    euca_conf.fault("no-list")
    again = await run_hook(hook_dir, record, rerun=True, attempt=2)
    assert again.outcome is HookOutcome.OK, again
    assert "was already registered" in again.stdout
    # It asked, was told "already registered", and nothing was registered twice.
    assert len(euca_conf.registrations(example.register)) == 2
    assert len(euca_conf.registered()) == 1


async def test_a_genuine_failure_exits_non_zero_with_the_reason_last(
    example: Example, euca_conf: FakeEucaConf, hook_dir: Path
) -> None:
    euca_conf.fault("down")
    run = await run_hook(hook_dir, record_for(example))
    assert run.outcome is HookOutcome.FAILED
    assert run.exit_code == 3
    assert last_line(run.stderr) == (
        f"euca_conf {example.register} failed (exit 3): euca_conf: cannot reach CLC web service"
    )
    assert euca_conf.registered() == []


async def test_already_registered_but_not_listed_here_is_a_failure(
    example: Example, euca_conf: FakeEucaConf, hook_dir: Path
) -> None:
    """The list can be read and does not show this component at this address: the "already
    registered" answer is about someone else, and the hook must not claim success."""
    record = record_for(example)
    if example.role is not Role.NC:
        # The name is held by another host.
        name = name_of(example, record)
        euca_conf.add(example.kind, partition_of(example, record), name, "192.0.2.250")
    euca_conf.fault("claims-registered")
    run = await run_hook(hook_dir, record)
    assert run.outcome is HookOutcome.FAILED, run
    assert run.exit_code == 1
    assert "already registered" in last_line(run.stderr)
    assert record.address in last_line(run.stderr)


# -- the deregister examples (docs/hooks.md, "Deregistering") --------------------------------


def test_the_deregister_example_is_a_posix_sh_script(example: Example) -> None:
    path = EXAMPLES / example.deregister_hook
    assert path.read_text().startswith("#!/bin/sh\n")
    assert os.access(path, os.X_OK)


async def test_deregistering_undoes_the_registration(
    example: Example, euca_conf: FakeEucaConf, hook_dir: Path
) -> None:
    record = record_for(example)
    assert (await run_hook(hook_dir, record)).outcome is HookOutcome.OK
    assert len(euca_conf.registered()) == 1
    run = await run_hook(hook_dir, record, event=DEREGISTER)
    assert run.outcome is HookOutcome.OK, run
    assert run.hook.endswith(f"/{example.deregister_hook}")
    assert euca_conf.registered() == []
    [call] = [c for c in euca_conf.calls() if c[0] == example.deregister]
    assert name_of(example, record) in " ".join(call)
    if example.role is not Role.NC:
        assert call[call.index("--host") + 1] == record.address


async def test_deregistering_what_is_not_registered_is_success_without_a_call(
    example: Example, euca_conf: FakeEucaConf, hook_dir: Path
) -> None:
    """A retried run, or a component Eucalyptus never had: nothing to undo."""
    run = await run_hook(hook_dir, record_for(example), event=DEREGISTER, attempt=2)
    assert run.outcome is HookOutcome.OK, run
    assert "is not registered (any more)" in run.stdout
    assert not [c for c in euca_conf.calls() if c[0] == example.deregister]


async def test_deregistering_without_a_list_trusts_the_not_registered_answer(
    example: Example, euca_conf: FakeEucaConf, hook_dir: Path
) -> None:
    euca_conf.fault("no-list")
    run = await run_hook(hook_dir, record_for(example), event=DEREGISTER)
    assert run.outcome is HookOutcome.OK, run
    assert "was not registered" in run.stdout
    assert len([c for c in euca_conf.calls() if c[0] == example.deregister]) == 1


async def test_a_deregister_failure_exits_non_zero_with_the_reason_last(
    example: Example, euca_conf: FakeEucaConf, hook_dir: Path
) -> None:
    record = record_for(example)
    assert (await run_hook(hook_dir, record)).outcome is HookOutcome.OK
    euca_conf.fault("down")
    run = await run_hook(hook_dir, record, event=DEREGISTER)
    assert run.outcome is HookOutcome.FAILED
    assert run.exit_code == 3
    assert last_line(run.stderr) == (
        f"euca_conf {example.deregister} failed (exit 3): euca_conf: cannot reach CLC web service"
    )
    assert len(euca_conf.registered()) == 1  # still registered: nothing claimed otherwise
