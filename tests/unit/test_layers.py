"""Imports run downward only. A module may import its own package and the packages below it:

    common → contract → client → export → publish → training → api → runtime → benchmarks

and `serving/` (code that runs inside Triton's python stubs) imports only `common/` and `contract/`
(what both sides of the wire share):
nothing of the export, training or facade stacks is installed in a production Triton image. Only
`benchmarks/` (measuring in-process pipelines) may import `serving/`.
Every import counts, including ones inside functions: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
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
