"""The tree stays clean and layered (CI runs this through `make test`): ruff check and format
pass, the import-linter contracts of pyproject.toml hold, no import cycle among her2exp's modules
(imports inside functions count), no module over 500 lines and no function over 80."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import BIN, REPO

PACKAGE = REPO / "her2exp"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def test_ruff_check_and_format() -> None:
    for args in (["check", "."], ["format", "--check", "."]):
        proc = subprocess.run([str(BIN / "ruff"), *args], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, f"ruff {' '.join(args)}:\n{proc.stdout}{proc.stderr}"


def test_import_contracts_hold() -> None:
    """The floors (layers) and the light config/cli (forbidden) contracts, as `make lint` runs them."""
    proc = subprocess.run(
        [str(BIN / "lint-imports"), "--no-cache"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def import_cycles() -> list[list[str]]:
    """Strongly connected groups of her2exp modules, counting imports inside functions (not
    `if TYPE_CHECKING:` ones). A package's `__init__` importing its own children (a re-export)
    is not counted; a child importing the package is."""
    import grimp

    graph = grimp.build_graph("her2exp", exclude_type_checking_imports=True, cache_dir=None)
    edges = {
        m: {
            t
            for t in graph.find_modules_directly_imported_by(m)
            if t != m and not t.startswith(m + ".")
        }
        for m in graph.modules
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for module in sorted(edges):
        if module not in index:
            visit(module)
    return cycles


def test_no_import_cycle() -> None:
    assert import_cycles() == []


def test_modules_and_functions_stay_small() -> None:
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        rel = path.relative_to(REPO)
        if (n := len(source.splitlines())) > MAX_MODULE_LINES:
            too_long.append(f"{rel}: {n} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                if (n := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES:
                    too_long.append(f"{rel}:{node.lineno} {node.name}: {n} lines")
    assert too_long == []
