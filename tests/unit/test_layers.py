"""Imports run downward only. A module may import its own package and the packages below it:

    common → contract → client → export → publish → training → api → runtime → benchmarks

and `serving/` (code that runs inside Triton's python stubs) imports only `common/` and `contract/`
(what both sides of the wire share):
nothing of the export, training or facade stacks is installed in a production Triton image. Only
`benchmarks/` (measuring in-process pipelines) may import `serving/`.
Every import counts, including ones inside functions: a lazy import is still a dependency.

Within the order, modules import each other without circles (a lazy import that closes one is
still a circle), and no function is over 100 lines outside benchmarks/ and tests/.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from common.paths import PROJECT_ROOT

LAYERS: tuple[str, ...] = (
    "common",
    "contract",
    "client",
    "export",
    "publish",
    "training",
    "api",
    "runtime",
    "benchmarks",
)
ALLOWED: dict[str, frozenset[str]] = {
    **{pkg: frozenset(LAYERS[: i + 1]) for i, pkg in enumerate(LAYERS)},
    "serving": frozenset({"common", "contract", "serving"}),
}
# Benchmarks measure everything, the in-process pipelines of serving/ included.
ALLOWED["benchmarks"] = ALLOWED["benchmarks"] | {"serving"}
# Triton's python model entry points: thin re-exports of serving/.
ALLOWED["model_repository"] = frozenset({"serving"})


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level project package) for every import in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, n.split(".")[0]) for n in names if n.split(".")[0] in ALLOWED]
    return found


def back_edges(root: Path = PROJECT_ROOT) -> list[str]:
    edges = []
    for pkg, allowed in ALLOWED.items():
        for path in sorted((root / pkg).rglob("*.py")):
            for line, target in project_imports(path):
                if target not in allowed:
                    edges.append(
                        f"{path.relative_to(root)}:{line} imports {target} ({pkg} may import {sorted(allowed)})"
                    )
    return edges


def test_no_module_imports_upward() -> None:
    assert back_edges() == []


@pytest.mark.parametrize(
    ("pkg", "source", "caught"),
    [
        ("export", "from training.classifier import ClassifierTrainSettings\n", True),
        ("serving", "def f():\n    from publish.repository import versions\n", True),
        ("export", "from publish.repository import versions\n", True),
        ("publish", "from export.flux_build import build_flux\n", False),
        ("common", "import contract.specs\n", True),
        ("serving", "from client.triton_client import TritonClient\n", True),
        ("api", "from training.jobs import JobStore\n", False),
    ],
)
def test_the_check_catches_a_back_edge(tmp_path: Path, pkg: str, source: str, caught: bool) -> None:
    (tmp_path / pkg).mkdir()
    (tmp_path / pkg / "mod.py").write_text(source)
    assert bool(back_edges(tmp_path)) is caught


# ----------------------------------------------------------------------------- import circles

PACKAGES: tuple[str, ...] = (*LAYERS, "serving")
"""The project's Python packages: every module in them is a node of the import graph."""


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> Iterator[str]:
    """The dotted names an import statement reaches: `import a.b`, and for `from a import b` both
    `a.b` (when b is a submodule) and `a` (when b is a name defined there)."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    base = node.module or ""
    if node.level:  # relative: counted from this module's package
        package = module.split(".") if is_package else module.split(".")[:-1]
        anchor = package[: len(package) - node.level + 1]
        base = ".".join([*anchor, *([base] if base else [])])
    yield base
    yield from (f"{base}.{alias.name}" for alias in node.names)


def import_graph(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its body (functions included)."""
    files = {
        module_name(root, path): path
        for pkg in packages
        if (root / pkg).is_dir()
        for path in (root / pkg).rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                targets.update(_imported(node, module, path.name == "__init__.py"))
        graph[module] = {t for t in targets if t in files and t != module}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative:
    the project's import chains are deeper than Python's recursion is comfortable with)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return sorted(found)


def test_no_import_circles() -> None:
    assert circles(import_graph(PROJECT_ROOT)) == []


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        pytest.param({"a/x.py": "import a.y\n", "a/y.py": "from a.x import f\n"}, [["a.x", "a.y"]], id="top-level"),
        pytest.param(
            {"a/x.py": "from a.y import g\n", "a/y.py": "def g():\n    from a.x import f\n"},
            [["a.x", "a.y"]],
            id="closed-by-a-lazy-import",
        ),
        pytest.param(
            {"a/x.py": "from a import y\n", "a/y.py": "from a import x\n"},
            [["a.x", "a.y"]],
            id="from-package-import-submodule",
        ),
        pytest.param({"a/x.py": "from . import y\n", "a/y.py": "from .x import f\n"}, [["a.x", "a.y"]], id="relative"),
        pytest.param(
            {
                "a/x.py": "import b.z\n",
                "b/z.py": "from b.w import h\n",
                "b/w.py": "class C:\n    def m(self):\n        import a.x\n",
            },
            [["a.x", "b.w", "b.z"]],
            id="across-packages",
        ),
        pytest.param(
            {
                "a/__init__.py": "NAME = 1\n",
                "a/x.py": "from a import NAME\nimport a.y\n",
                "a/y.py": "import b.z\n",
                "b/z.py": "import os\n",
            },
            [],
            id="clean",
        ),
    ],
)
def test_the_check_catches_a_circle(tmp_path: Path, files: dict[str, str], expected: list[list[str]]) -> None:
    for rel, source in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(source)
    assert circles(import_graph(tmp_path, ("a", "b"))) == expected


# ----------------------------------------------------------------------------- function length

MAX_FUNCTION_LINES = 100
LENGTH_CHECKED: tuple[str, ...] = tuple(pkg for pkg in ALLOWED if pkg != "benchmarks")
"""Every package but benchmarks/ (measurement scripts); tests/ is not among them."""


def long_functions(root: Path = PROJECT_ROOT, packages: Iterable[str] = LENGTH_CHECKED) -> list[str]:
    """`file:line name (N lines)` for every function or method longer than MAX_FUNCTION_LINES."""
    found = []
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = (node.end_lineno or node.lineno) - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_is_over_100_lines() -> None:
    assert long_functions() == []


def _function(name: str, lines: int, indent: str = "") -> str:
    body = "".join(f"{indent}    x{i} = {i}\n" for i in range(lines - 1))
    return f"{indent}def {name}():\n{body}"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (_function("f", 100), []),
        (_function("f", 101), ["api/m.py:1 f (101 lines)"]),
        ("x = 1\n" + _function("f", 101).replace("def f", "async def f"), ["api/m.py:2 f (101 lines)"]),
        ("class C:\n" + _function("method", 101, "    "), ["api/m.py:2 method (101 lines)"]),
        (
            "def outer():\n" + _function("inner", 101, "    "),
            ["api/m.py:1 outer (102 lines)", "api/m.py:2 inner (101 lines)"],
        ),
    ],
)
def test_the_check_catches_a_long_function(tmp_path: Path, source: str, expected: list[str]) -> None:
    for pkg, text in (("api", source), ("benchmarks", _function("g", 150)), ("tests", _function("g", 150))):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "m.py").write_text(text)
    assert long_functions(tmp_path) == expected
