"""What every `eucareg` command shares: the consoles, the one way to fail (a message on standard
error and an exit status, never a traceback), --json, and loading the configuration file.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from eucareg.config import file as config_mod
from eucareg.config.values import ConfigError

DEFAULT_CONFIG = Path("/etc/eucareg/eucareg.toml")
FC = TypeVar("FC", bound=Callable[..., Any])


class LazyConsole:
    """A rich Console made on first use. `eucareg agent` never prints through one, and every
    host runs it: rich is 2 MiB that a node's agent should not carry (docs/performance.md)."""

    def __init__(self, *, stderr: bool = False) -> None:
        self._stderr = stderr
        self._console: Any = None

    def __getattr__(self, name: str) -> Any:
        if self._console is None:
            from rich.console import Console

            stream = sys.stderr if self._stderr else sys.stdout
            # Piped output is not cut to 80 columns: tables stay one row per line for grep.
            self._console = Console(stderr=self._stderr, width=None if stream.isatty() else 160)
        return getattr(self._console, name)


console = LazyConsole()
err_console = LazyConsole(stderr=True)

json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def config_option(help_text: str) -> Callable[[FC], FC]:
    """The host's configuration file, /etc/eucareg/eucareg.toml unless told otherwise."""
    return click.option(
        "--config",
        "config_path",
        type=click.Path(path_type=Path, dir_okay=False),
        default=DEFAULT_CONFIG,
        show_default=True,
        help=help_text,
    )


def fail(message: str, code: int = 2) -> NoReturn:
    """Print `error: message` on standard error and exit (docs/cli.md, EXIT STATUS)."""
    from rich.markup import escape  # rich, only to print

    # The message quotes what others typed or announced: text, never markup.
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    sys.exit(code)


def load_config(path: Path) -> config_mod.Config:
    try:
        return config_mod.load(path)
    except ConfigError as exc:
        fail(str(exc))
    except UnicodeDecodeError:
        # config.load reads the file as UTF-8 and does not turn this into a ConfigError.
        fail(f"{path}: not valid TOML: the file is not UTF-8 text")


def print_json(data: Any, *, sort_keys: bool = False) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=sort_keys))
