"""docs/operations.md against the code: every `eucareg …` command line (code blocks and inline
code) names a real subcommand, real options and valid choices of the click CLI; every
configuration key it names, and every TOML example, is accepted by the configuration parser;
every repository file and doc section it points to exists.

The handbook is what an operator types from: when a command, option or key changes, this test
fails until the page says so too. No network, no agent: the CLI tree and the parser only.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest

from eucareg.cli.main import main
from eucareg.config.file import from_mapping
from eucareg.config.values import ConfigError
from eucareg.core import legacy
from eucareg.core.model import HookOutcome
from eucareg.registrar.euca_keys import INVALID, MISSING, OFF, READY

ROOT = Path(__file__).resolve().parents[2]
DOC_PATH = ROOT / "docs" / "operations.md"
DOC = DOC_PATH.read_text()

# A line of a code block that mentions the command (not eucareg-agent, not /etc/eucareg/…).
MENTION = re.compile(r"(?:^|[\s;|&(=])(?:\S*/bin/)?eucareg(?=\s|$)")
PROMPT = re.compile(r"^\s*(?:[\w.@-]+)?\$\s+")
OPERATORS = {"|", "||", "&&", ";", "&"}
# Blocks whose lines are shell commands or their output, and unit files (not toml or json).
SHELL_LANGS = {"", "sh", "shell", "console", "bash", "ini"}
REPO_PATH = re.compile(
    r"(?<![\w/.$<-])((?:docs|packaging|hooks|eucareg|eucalab|tests|scripts|bench)/[\w./-]*\w)"
)
# A minimal valid host, for checking keys and snippets that are not a whole file.
BASE: dict[str, Any] = {
    "address": "10.0.2.99",
    "components": {"nc": {"cluster": "cluster1", "installed": True}},
}


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    return re.findall(r"^```([a-z]*)\n(.*?)^```", text, re.M | re.S)


def prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return re.sub(r"^```[a-z]*\n.*?^```", "", text, flags=re.M | re.S)


# -- command lines ---------------------------------------------------------------------------


def shell_lines(body: str) -> Iterator[str]:
    """Each logical line of a shell block that mentions eucareg: prompt removed, backslash
    continuations and quotes that span lines joined."""
    lines = body.splitlines()
    i = 0
    while i < len(lines):
        line = PROMPT.sub("", lines[i])
        i += 1
        if not MENTION.search(line):
            continue
        while True:
            if line.endswith("\\") and i < len(lines):
                line = line[:-1] + " " + lines[i]
                i += 1
                continue
            try:
                shlex.split(line, comments=True)
            except ValueError:  # a quote that closes on a later line (a jq program)
                if i >= len(lines):
                    raise
                line += "\n" + lines[i]
                i += 1
                continue
            break
        yield line


def is_eucareg(token: str) -> bool:
    return token == "eucareg" or token.endswith("/bin/eucareg")


def commands_in(line: str) -> list[list[str]]:
    """The eucareg invocations in one shell line, each as its argument list (from `eucareg`)."""
    tokens = shlex.split(line, comments=True)
    segments: list[list[str]] = [[]]
    for token in tokens:
        if token in OPERATORS:
            segments.append([])
        else:
            segments[-1].append(token)
    found = []
    for words in segments:
        while words:
            head = words[0]
            if is_eucareg(head):
                found.append(["eucareg", *words[1:]])
                break
            if head == "sudo":
                words = words[1:]
            elif head == "ssh" and len(words) > 1:
                words = words[2:]
            elif re.fullmatch(r"[A-Za-z_]+=.*", head):
                value = head.split("=", 1)[1]
                words = [value, *words[1:]] if is_eucareg(value) else words[1:]
            else:
                break
    return found


def doc_shell_lines() -> list[str]:
    return [
        line for lang, body in code_blocks(DOC) if lang in SHELL_LANGS for line in shell_lines(body)
    ]


def doc_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every eucareg command line on the page."""
    out: list[tuple[str, list[str]]] = []
    for line in doc_shell_lines():
        out.extend((line, argv) for argv in commands_in(line))
    for span in re.findall(r"`(eucareg [^`]+)`", prose(DOC)):
        text = " ".join(span.split())
        out.extend((text, argv) for argv in commands_in(text))
    return out


def placeholder(value: str) -> bool:
    """A value the reader fills in: ID, HOST, sha256:…, a shell variable."""
    return value.isupper() or "…" in value or "$" in value


def takes_value(option: click.Option) -> bool:
    return not option.is_flag and not option.count


def check_command(argv: list[str]) -> None:
    """Raise AssertionError naming what in argv the CLI does not have."""
    assert argv[0] == "eucareg"
    cmd: click.Command = main
    path = ["eucareg"]
    args = argv[1:]
    saw_option = False
    while isinstance(cmd, click.Group):
        if args and args[0].startswith("-"):
            assert _option(cmd, args[0].split("=", 1)[0]) is not None, (
                f"`{' '.join(path)}` has no option {args[0]}"
            )
            saw_option, args = True, args[1:]
            continue
        if not args:
            assert saw_option, f"`{' '.join(path)}` needs a subcommand"
            return
        sub = cmd.commands.get(args[0])
        assert sub is not None, f"`{' '.join(path)}` has no subcommand {args[0]!r}"
        cmd, path, args = sub, [*path, args[0]], args[1:]
    positionals: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if token == "--":
            positionals.extend(args[i:])
            break
        if token.startswith("-") and len(token) > 1 and not token[1].isdigit():
            name, eq, inline = token.partition("=")
            option = _option(cmd, name)
            assert option is not None, f"`{' '.join(path)}` has no option {name}"
            if takes_value(option) and not eq:
                assert i < len(args), f"`{' '.join(path)}` {name} needs a value"
                inline = args[i]
                i += 1
            if takes_value(option):
                _check_choice(option, inline, f"`{' '.join(path)}` {name}")
        else:
            positionals.append(token)
    arguments = [p for p in cmd.params if isinstance(p, click.Argument)]
    for argument, value in zip(arguments, positionals, strict=False):
        _check_choice(argument, value, f"`{' '.join(path)}` {argument.name}")


def _option(cmd: click.Command, name: str) -> click.Option | None:
    for param in cmd.get_params(click.Context(cmd)):
        if isinstance(param, click.Option) and name in (*param.opts, *param.secondary_opts):
            return param
    return None


def _check_choice(param: click.Parameter, value: str, where: str) -> None:
    if isinstance(param.type, click.Choice) and not placeholder(value):
        assert value in param.type.choices, f"{where}: {value!r} is not one of {param.type.choices}"


COMMANDS = doc_commands()


def test_the_page_has_the_commands_of_each_task() -> None:
    named = {" ".join(argv[1:3]) for _, argv in COMMANDS}
    for expected in (
        "setup cc",
        "agent --config",
        "check-config",
        "fingerprint",
        "approve nc-f70308446378",
        "install-mode open",
        "token create",
        "lock",
        "mode off",
        "deregister nc-f70308446378",
        "events --component",
        "status --json",
        "join https://clc.example:8780",
    ):
        assert expected in named, f"docs/operations.md shows no `eucareg {expected}`"


@pytest.mark.parametrize(("where", "argv"), COMMANDS, ids=[" ".join(a) for _, a in COMMANDS])
def test_each_command_line_is_one_the_cli_takes(where: str, argv: list[str]) -> None:
    check_command(argv)


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        ("eucareg aprove ID", "no subcommand 'aprove'"),
        ("eucareg token make --role nc", "no subcommand 'make'"),
        ("eucareg token", "needs a subcommand"),
        ("eucareg events --kinds refused", "has no option --kinds"),
        ("eucareg lock --task nc", "'nc' is not one of"),
        ("eucareg mode sometimes", "'sometimes' is not one of"),
        ("eucareg install-mode open --for", "--for needs a value"),
        ("eucareg status --json=yes --jsn", "has no option --jsn"),
    ],
)
def test_the_command_check_refuses_what_the_cli_does_not_have(argv: str, problem: str) -> None:
    with pytest.raises(AssertionError, match=re.escape(problem)):
        check_command(argv.split())


def test_no_eucareg_command_line_is_overlooked() -> None:
    # Only file operations on the installed command, and output lines ("error: …"), may
    # name it without running it.
    overlooked = [
        line
        for line in doc_shell_lines()
        if not commands_in(line)
        and shlex.split(line)[0] not in {"ln", "install", "cp"}
        and not shlex.split(line)[0].endswith(":")
    ]
    assert overlooked == []


def test_commands_are_found_behind_prompts_wrappers_and_pipes() -> None:
    body = (
        "clc$ eucareg status --json | jq -r '\n  .tree\n  | keys'\n"
        "ssh root@clc eucareg trust   # a comment\n"
        "sudo eucareg pending && eucareg events --kind refused\n"
        "ExecStart=/opt/eucareg/bin/eucareg agent --config /etc/eucareg/eucareg.toml\n"
        "journalctl -u eucareg-agent -f\n"
        "eucareg token create --role nc \\\n    --uses 1\n"
    )
    found = [argv for line in shell_lines(body) for argv in commands_in(line)]
    assert found == [
        ["eucareg", "status", "--json"],
        ["eucareg", "trust"],
        ["eucareg", "pending"],
        ["eucareg", "events", "--kind", "refused"],
        ["eucareg", "agent", "--config", "/etc/eucareg/eucareg.toml"],
        ["eucareg", "token", "create", "--role", "nc", "--uses", "1"],
    ]


# -- configuration keys ----------------------------------------------------------------------


def named_keys() -> set[tuple[str, ...]]:
    """Every `[table] key` and `[table]` named in the prose, as a key path."""
    out: set[tuple[str, ...]] = set()
    for table, key in re.findall(r"`\[([a-z_.]+)\](?:\s+([a-z_]+))?`", prose(DOC)):
        out.add((*table.split("."), *([key] if key else [])))
    return out


def accepts(path: tuple[str, ...]) -> bool:
    """Whether the parser knows the table or key at `path`: a value it cannot take there must
    be refused for its value (or taken), never as an unknown key or component."""
    raw: dict[str, Any] = {
        "address": BASE["address"],
        "components": {"nc": dict(BASE["components"]["nc"])},
    }
    if path[0] == "components" and len(path) > 1:
        body = raw["components"].setdefault(path[1], {})
        if path[1] in ("cc", "sc", "nc"):
            body.setdefault("cluster", "cluster1")
        if len(path) > 2:
            body[path[2]] = object()
    elif len(path) == 1:
        raw[path[0]] = {}
    else:
        raw.setdefault(path[0], {})[path[1]] = object()
    try:
        from_mapping(raw)
    except ConfigError as exc:
        return "unknown key" not in str(exc) and "unknown component" not in str(exc)
    except (TypeError, ValueError):
        pass  # the key's own check choked on the probe value: the key exists
    return True


def test_the_probe_host_is_valid() -> None:
    from_mapping(BASE)


def test_every_key_named_is_one_the_parser_takes() -> None:
    keys = named_keys()
    assert ("registrar", "pending_timeout") in keys and ("components", "nc", "token") in keys
    unknown = sorted(".".join(path) for path in keys if not accepts(path))
    assert unknown == []


@pytest.mark.parametrize(
    "path",
    [("registrar", "pending_timeot"), ("mdns", "bogus"), ("components", "node"), ("eucareg",)],
)
def test_the_key_check_refuses_unknown_keys(path: tuple[str, ...]) -> None:
    assert not accepts(path)


def toml_examples() -> list[str]:
    return [body for lang, body in code_blocks(DOC) if lang == "toml"]


@pytest.mark.parametrize("body", toml_examples())
def test_each_toml_example_loads_as_the_agent_loads_it(body: str) -> None:
    snippet = tomllib.loads(body)
    raw = {**({} if "components" in snippet else {"components": BASE["components"]}), **snippet}
    raw.setdefault("address", BASE["address"])
    from_mapping(raw)


# -- event codes ---------------------------------------------------------------------------


def cited_codes() -> set[str]:
    """Every backticked kebab-case word: event codes and kinds, statuses, decision codes."""
    spans = re.findall(r"`([^`\s]+)`", DOC)
    return {s for s in spans if re.fullmatch(r"[a-z]+(?:-[a-z0-9.]+)+", s)}


def constructed_codes() -> set[str]:
    """Codes the code builds rather than spells out."""
    ten_o_four = {"txtvers": "1", "protovers": "1", "eucavers": "1.6.2", "type": "node"}
    heard = [
        legacy.classify("Eucalyptus cluster controller", {}),
        legacy.classify("cluster1 node #2", ten_o_four),
    ]
    euca_keys = {f"euca-keys-{state}" for state in (READY, MISSING, INVALID, OFF)}
    return (
        {f"hook-{outcome.value}" for outcome in HookOutcome}
        | {h.code for h in heard if h is not None}
        | (euca_keys - {"euca-keys-ready"})
    )


def test_every_code_cited_is_one_the_code_uses() -> None:
    source = "".join(p.read_text() for p in (ROOT / "eucareg").rglob("*.py"))
    spelled = {c for c in cited_codes() if f'"{c}"' in source or f"'{c}'" in source}
    commands = set(main.commands)  # check-config
    scripts = {p.name for p in (ROOT / "hooks").iterdir()}  # deregister-node
    tools = {"avahi-browse", "avahi-daemon"}
    unknown = cited_codes() - spelled - constructed_codes() - commands - scripts - tools
    assert {"waiting-for-cluster", "token-spent", "legacy-10.04", "hook-timeout"} <= cited_codes()
    assert unknown == set()


# -- links -----------------------------------------------------------------------------------


def test_every_repository_path_named_exists() -> None:
    paths = set(REPO_PATH.findall(DOC))
    assert "packaging/systemd/eucareg-agent.service" in paths and "docs/cli.md" in paths
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert missing == []


def test_every_markdown_link_target_exists() -> None:
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", DOC):
        if "://" not in target:
            assert (DOC_PATH.parent / target).exists(), target


def test_every_section_named_in_another_doc_is_a_heading_there() -> None:
    named = re.findall(r"`(docs/[\w.-]+\.md)`, \"([^\"]+)\"", DOC)
    assert named, "the page names no sections of other docs"
    for doc, heading in named:
        headings = re.findall(r"^#+ (.*)$", (ROOT / doc).read_text(), re.M)
        assert any(h.strip().startswith(heading) for h in headings), f"{doc}: {heading!r}"


def test_the_handbook_is_linked_from_the_readme_and_the_man_page() -> None:
    assert "`docs/operations.md`" in (ROOT / "README.md").read_text()
    see_also = (ROOT / "docs" / "cli.md").read_text().split("## SEE ALSO", 1)[1]
    assert "`docs/operations.md`" in see_also
