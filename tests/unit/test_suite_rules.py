"""Rules the test suite keeps (STYLE.md): test modules do not import each other,
and tests observe capwatch through its public surface, not private attributes."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]

#: The shared helper modules; everything else under tests/ is a test module.
HELPERS = frozenset(
    {
        "tests.helpers",
        "tests.kernel.tracing",
        "tests.kernel.podman",
        "tests.kernel.workloads",
        "tests.kernel.runtimes",
        "tests.vm",  # the package, for its harness module
        "tests.vm.harness",
    }
)


def imported_test_modules(tree: ast.AST) -> set[str]:
    """The ``tests.*`` modules a module imports (``from tests.x import y`` names tests.x)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "tests")
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level or mod.split(".")[0] == "tests":
                found.add("." * node.level + mod)
    return found


def private_reads(tree: ast.AST) -> list[str]:
    """``x._name`` reads whose owner is not the test's own object (self, cls), and
    ``from capwatch... import _name``: private state of the code under test."""
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            name = node.attr
            if not name.startswith("_") or name.startswith("__"):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            found.append(f"line {node.lineno}: .{name}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("capwatch"):
            found += [
                f"line {node.lineno}: import {a.name}"
                for a in node.names
                if a.name.startswith("_") and not a.name.startswith("__")
            ]
    return found


def _modules() -> list[tuple[str, ast.AST]]:
    out = []
    for path in sorted(TESTS.rglob("*.py")):
        rel = path.relative_to(TESTS.parent).with_suffix("")
        out.append((".".join(rel.parts), ast.parse(path.read_text(), str(path))))
    return out


def test_test_modules_import_only_the_helpers() -> None:
    """No test module imports another one; only the helper modules are shared."""
    bad = [
        f"{name} imports {imp}"
        for name, tree in _modules()
        for imp in sorted(imported_test_modules(tree) - HELPERS)
    ]
    assert [] == bad


def test_no_test_reads_private_state() -> None:
    """No ``obj._private`` outside a test's own class, no private imports from capwatch."""
    bad = [f"{name} {hit}" for name, tree in _modules() for hit in private_reads(tree)]
    assert [] == bad


def test_the_rules_catch_what_they_forbid() -> None:
    """The checkers themselves, on a small module that breaks both rules."""
    tree = ast.parse(
        "from tests.unit.sinks.test_exporter import workloads\n"
        "import tests.conftest\n"
        "from capwatch.kernel.bpf import _CountBatch\n"
        "from tests.helpers import REPO\n"
        "def test_x(a):\n"
        "    assert a._cache\n"
        "    self._mine = 1\n"
    )
    imported = imported_test_modules(tree) - HELPERS
    assert {"tests.unit.sinks.test_exporter", "tests.conftest"} == imported
    assert ["line 3: import _CountBatch", "line 6: ._cache"] == sorted(private_reads(tree))
