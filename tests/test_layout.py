"""The package layout is the architecture: these checks keep it honest.

- no import cycle between modules, nor between the sub-packages of eucareg;
- `eucareg.core` imports the standard library and itself only (it stays pure);
- the product never imports the lab (`eucalab`), which may import the product.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("eucareg", "eucalab")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, module: str, known: set[str]) -> Iterator[str]:
    """Every module `module` imports at run time (function-level imports included)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    todo: list[ast.AST] = [ast.parse(path.read_text(), str(path))]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            todo.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield sub if sub in known else base
        todo.extend(ast.iter_child_nodes(node))


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: set(_imports(path, name, known)) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in graph:
                continue
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _internal(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_no_import_cycle_between_modules() -> None:
    assert _cycles(_internal(_graph())) == []


def _subpackage(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def test_no_import_cycle_between_subpackages() -> None:
    packages: dict[str, set[str]] = {}
    for module, deps in _internal(_graph()).items():
        if not module.startswith("eucareg."):
            continue
        own = _subpackage(module)
        packages.setdefault(own, set()).update(
            _subpackage(d) for d in deps if d.startswith("eucareg.") and _subpackage(d) != own
        )
    assert _cycles(packages) == []


def test_core_imports_only_the_standard_library_and_itself() -> None:
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    bad = {
        f"{module} imports {dep}"
        for module, deps in _graph().items()
        if module.startswith("eucareg.core")
        for dep in deps
        if not dep.startswith("eucareg.core") and dep.split(".")[0] not in stdlib
    }
    assert sorted(bad) == []


def test_the_product_never_imports_the_lab() -> None:
    bad = {
        f"{module} imports {dep}"
        for module, deps in _graph().items()
        if module.split(".")[0] == "eucareg"
        for dep in deps
        if dep.split(".")[0] == "eucalab"
    }
    assert sorted(bad) == []


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ],
)
def test_the_cycle_finder_finds_cycles(
    graph: dict[str, set[str]], expected: list[list[str]]
) -> None:
    assert _cycles(graph) == expected


def test_an_agent_without_a_registrar_does_not_load_the_registrar_side() -> None:
    """An NC's agent (the CLI's `agent` command and the host) loads neither the store
    (SQLAlchemy), nor the API server (aiohttp.web, jsonschema): they cost it ~20 MiB."""
    import subprocess

    code = (
        "import sys, eucareg.cli.main, eucareg.agent.host\n"
        "heavy = [m for m in ('sqlalchemy', 'aiohttp.web', 'jsonschema', "
        "'eucareg.registrar.engine', 'eucareg.store.registry', 'eucareg.api.app') "
        "if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "", result.stdout
