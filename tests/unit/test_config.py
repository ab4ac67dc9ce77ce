"""Configuration: defaults that make a one-line file work, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from eucareg.config import file as config
from eucareg.config.values import ConfigError, parse_duration
from eucareg.core.model import Role


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "eucareg.toml"
    path.write_text(text)
    return path


def test_one_line_config_with_defaults(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, 'address = "10.1.2.3"\ncomponents.nc.cluster = "c1"\n'))
    assert [c.role for c in cfg.components] == [Role.NC]
    assert cfg.api_port == config.DEFAULT_API_PORT
    assert cfg.key_dir == cfg.state_dir / "keys"
    assert cfg.sshd == ("127.0.0.1", 22)
    nc = cfg.component(Role.NC)
    assert nc is not None and str(nc.address) == "10.1.2.3"
    assert nc.installed == Path("/var/lib/dpkg/info/eucalyptus-nc.list")
    assert not cfg.runs_registrar


def test_full_config(tmp_path: Path) -> None:
    cfg = config.load(
        write(
            tmp_path,
            """
address = "10.1.2.3"
state_dir = "/srv/eucareg"
hook_dir = "/srv/hooks"
api_port = 9000
[preconditions]
sshd = false
recheck_interval = "250ms"
[registrar]
pending_timeout = "30m"
hook_timeout = 10
[components.clc]
installed = true
[components.cc]
cluster = "c1"
[components.nc]
cluster = "c1"
address = "10.9.9.9"
""",
        )
    )
    assert cfg.sshd is None and cfg.recheck_interval == 0.25
    assert cfg.pending_timeout == 1800 and cfg.hook_timeout == 10
    assert cfg.runs_registrar and cfg.api_port == 9000
    assert str(cfg.component(Role.NC).address) == "10.9.9.9"  # type: ignore[union-attr]
    assert cfg.component(Role.CLC).installed is None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('address = "10.1.2.3"\n', "components: required"),
        ('address = "10.1.2.3"\n[components.nc]\n', "components.nc.cluster: required"),
        ('address = "10.1.2.3"\n[components.toaster]\n', "components.toaster: unknown"),
        ('address = "fe80::1"\n[components.clc]\n', "address: fe80::1 is a link-local"),
        ('address = "10.1.2.3"\napi_port = 0\n[components.clc]\n', "api_port"),
        ('address = "10.1.2.3"\nstate_dir = "rel"\n[components.clc]\n', "state_dir"),
        ('address = "10.1.2.3"\nfoo = 1\n[components.clc]\n', "foo: unknown key"),
        (
            'address = "10.1.2.3"\n[registrar]\npending_timeout = "soon"\n[components.clc]\n',
            "registrar.pending_timeout",
        ),
        (
            'address = "10.1.2.3"\n[preconditions]\nsshd = "nope"\n[components.clc]\n',
            "preconditions.sshd",
        ),
        ('address = "10.1.2.3"\n[components.walrus]\ncluster = "c1"\n', "belongs to no cluster"),
        (
            'address = "10.1.2.3"\n[components.cc]\ncluster="a"\n[components.nc]\ncluster="b"\n',
            "differs from this host's CC",
        ),
        ("address = \n", "not valid TOML"),
        (
            'address = "10.1.2.3"\nca_fingerprint = "abc"\n[components.nc]\ncluster="a"\n',
            "ca_fingerprint",
        ),
        (
            'address = "10.1.2.3"\n[components.nc]\ncluster="a"\ntoken = "nope"\n',
            "components.nc.token: not an eucareg join token",
        ),
        (
            'address = "10.1.2.3"\nfallback_registrar = "ftp://x"\n[components.clc]\n',
            "fallback_registrar",
        ),
        (
            'address = "10.1.2.3"\n[registrar]\nmax_events = 99\n[components.clc]\n',
            "registrar.max_events: must be between 100 and 10000000, got 99",
        ),
        (
            'address = "10.1.2.3"\n[registrar]\nmax_unadmitted = 1e4\n[components.clc]\n',
            "registrar.max_unadmitted: expected a whole number",
        ),
        (
            'address = "10.1.2.3"\n[registrar]\nkeep_history = "forever"\n[components.clc]\n',
            "registrar.keep_history",
        ),
    ],
)
def test_bad_config_names_key_and_reason(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.load(write(tmp_path, text))
    assert needle in str(err.value)
    assert str(tmp_path) in str(err.value)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        config.load(tmp_path / "absent.toml")


def test_durations() -> None:
    assert parse_duration("1h", "k") == 3600
    assert parse_duration("1.5m", "k") == 90
    assert parse_duration(2, "k") == 2
    for bad in ("", "0s", "-1s", True, "5 parsecs"):
        with pytest.raises(ConfigError, match=r"^k:"):
            parse_duration(bad, "k")


CLC = 'address = "10.1.2.3"\n[components.clc]\n'


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        # Found by the property tests: each raised something other than ConfigError, or was
        # accepted and failed later where the value was used.
        ("api_port = " + "1" * 5000 + "\n" + CLC, "not valid TOML: a number too long"),
        ("api_port = 0x" + "f" * 5000 + "\n" + CLC, "api_port: expected a TCP port number"),
        ('state_dir = "/a\\u0000b"\n' + CLC, "state_dir: expected a path"),
        (CLC + 'installed = "/a\\u0000b"\n', "components.clc.installed: expected a path"),
        (CLC + '[preconditions]\nsshd = "\\u0000:22"\n', "preconditions.sshd"),
        (CLC + '[preconditions]\nsshd = "a..b:22"\n', "preconditions.sshd"),
        (CLC + '[preconditions]\nsshd = "[10.0.0.1]:22"\n', "preconditions.sshd"),
        ('fallback_registrar = "http://a..b:8780"\n' + CLC, "fallback_registrar"),
        ('fallback_registrar = "http://x:0"\n' + CLC, "fallback_registrar"),
        ('allowed_ranges = ["fe80::%eth0/64"]\n' + CLC, "allowed_ranges: 'fe80::%eth0/64' carries"),
        (CLC + '"a\\nb" = 1\n', "components.clc.'a\\nb': unknown key"),
        ('log_level = "' + "x" * 10000 + '"\n' + CLC, "log_level: expected one of"),
    ],
)
def test_hostile_values_are_config_errors_naming_the_key(
    tmp_path: Path, text: str, needle: str
) -> None:
    with pytest.raises(ConfigError) as err:
        config.load(write(tmp_path, text))
    message = str(err.value)
    assert needle in message
    assert "\n" not in message and len(message) < len(str(tmp_path)) + 300


@pytest.mark.parametrize(
    ("sshd", "expected"),
    [
        ("127.0.0.1:22", ("127.0.0.1", 22)),
        ("[::1]:2222", ("::1", 2222)),
        ("::1:22", ("::1", 22)),
        ("ssh.example.com.:22", ("ssh.example.com.", 22)),
    ],
)
def test_sshd_hosts(tmp_path: Path, sshd: str, expected: tuple[str, int]) -> None:
    cfg = config.load(write(tmp_path, CLC + f'[preconditions]\nsshd = "{sshd}"\n'))
    assert cfg.sshd == expected


def test_a_mapping_with_a_huge_number_is_a_config_error() -> None:
    raw = {"address": "10.1.2.3", "fallback_registrar": 10**5000, "components": {"clc": {}}}
    with pytest.raises(ConfigError, match=r"^fallback_registrar: .*too large to show"):
        config.from_mapping(raw)


def test_history_and_flood_limits_have_defaults_and_can_be_set(tmp_path: Path) -> None:
    base = 'address = "10.1.2.3"\n[components.clc]\n'
    cfg = config.load(write(tmp_path, base))
    assert (cfg.keep_history, cfg.max_events, cfg.max_hook_runs, cfg.max_unadmitted) == (
        90 * 86400.0,
        200_000,
        50_000,
        5000,
    )
    text = (
        'address = "10.1.2.3"\n[registrar]\nkeep_history = "7d"\nmax_events = 1000\n'
        "max_hook_runs = 500\nmax_unadmitted = 20000\n[components.clc]\n"
    )
    cfg = config.load(write(tmp_path, text))
    assert (cfg.keep_history, cfg.max_events, cfg.max_hook_runs, cfg.max_unadmitted) == (
        7 * 86400.0,
        1000,
        500,
        20000,
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [("", 64), ("max_hooks_running = 1\n", 1), ("max_hooks_running = 1024\n", 1024)],
)
def test_hooks_running_at_once_has_a_default_and_bounds(
    tmp_path: Path, value: str, expected: int
) -> None:
    text = f'address = "10.1.2.3"\n[registrar]\n{value}[components.clc]\n'
    assert config.load(write(tmp_path, text)).max_hooks_running == expected


@pytest.mark.parametrize("value", ["0", "1025", "2.5", '"eight"', "true"])
def test_hooks_running_at_once_out_of_bounds_is_refused(tmp_path: Path, value: str) -> None:
    text = f'address = "10.1.2.3"\n[registrar]\nmax_hooks_running = {value}\n[components.clc]\n'
    with pytest.raises(ConfigError, match=r": registrar\.max_hooks_running: "):
        config.load(write(tmp_path, text))


def test_batch_hooks_default_to_none_and_name_scripts(tmp_path: Path) -> None:
    base = 'address = "10.1.2.3"\n[registrar]\n{}[components.clc]\n'
    cfg = config.load(write(tmp_path, base.format("")))
    assert (cfg.batch_hooks, cfg.batch_max, cfg.batch_wait) == (frozenset(), 100, 0.5)
    text = 'batch_hooks = ["node", "storage"]\nbatch_max = 2\nbatch_wait = "60s"\n'
    cfg = config.load(write(tmp_path, base.format(text)))
    assert (cfg.batch_hooks, cfg.batch_max, cfg.batch_wait) == (
        frozenset({Role.NC, Role.SC}),
        2,
        60.0,
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('batch_hooks = "node"', r"registrar\.batch_hooks: expected a list of hook names"),
        ('batch_hooks = ["nc"]', r"registrar\.batch_hooks: 'nc' is not a hook; expected walrus"),
        ('batch_hooks = ["cloud"]', r"registrar\.batch_hooks: 'cloud' is not a hook"),
        ("batch_hooks = [1]", r"registrar\.batch_hooks: expected a list"),
        ('batch_hooks = ["node", "node"]', r"registrar\.batch_hooks: a hook is named twice"),
        ("batch_max = 1", r"registrar\.batch_max: "),
        ("batch_max = 10001", r"registrar\.batch_max: "),
        ('batch_wait = "61s"', r"registrar\.batch_wait: must be at most"),
        ('batch_wait = "0s"', r"registrar\.batch_wait: must be longer than zero"),
        ("batch_size = 5", r"registrar\.batch_size"),
    ],
)
def test_bad_batch_settings_are_refused_by_name(tmp_path: Path, line: str, message: str) -> None:
    text = f'address = "10.1.2.3"\n[registrar]\n{line}\n[components.clc]\n'
    with pytest.raises(ConfigError, match=message):
        config.load(write(tmp_path, text))


def test_fallback_timing_has_defaults_and_can_be_set(tmp_path: Path) -> None:
    base = 'address = "10.1.2.3"\ncomponents.nc.cluster = "c1"\n'
    cfg = config.load(write(tmp_path, base))
    assert (cfg.fallback_after, cfg.report_interval) == (10.0, 30.0)
    top = 'fallback_after = "0"\n'
    cfg = config.load(write(tmp_path, top + base + '[registrar]\nreport_interval = "2m"\n'))
    assert (cfg.fallback_after, cfg.report_interval) == (0.0, 120.0)
    assert config.load(write(tmp_path, 'fallback_after = "45s"\n' + base)).fallback_after == 45


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("fallback_after = true", "fallback_after"),
        ('fallback_after = "-1s"', "fallback_after"),
        ('fallback_after = "2h"', "fallback_after"),
        ('registrar.report_interval = "500ms"', "registrar.report_interval: at least 1s"),
        ('registrar.report_interval = "0"', "registrar.report_interval"),
        ('registrar.report_interval = "2h"', "registrar.report_interval"),
    ],
)
def test_bad_fallback_timing_is_refused_by_name(tmp_path: Path, line: str, message: str) -> None:
    text = f'address = "10.1.2.3"\n{line}\ncomponents.nc.cluster = "c1"\n'
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        config.load(write(tmp_path, text))
