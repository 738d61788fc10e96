"""The package's public surface, its layers, and the one-door rule."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import capwatch

PKG = Path(capwatch.__file__).parent

#: The layers, lowest first: a module may import from its own layer and the
#: ones below it, never from one above (docs/design.md, "Layers").
LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"errors", "logs", "ratelimit", "text", "listen"}),
    frozenset({"decode"}),
    frozenset({"kernel"}),
    frozenset({"attribution"}),
    frozenset({"diagnose"}),
    frozenset({"pipeline"}),
    frozenset({"record"}),
    frozenset({"sinks"}),
    frozenset({"commands"}),
)


def _layer(module: str) -> int | None:
    """The layer of ``capwatch.X...`` (None for the package itself)."""
    parts = module.split(".")
    if parts[0] != "capwatch" or len(parts) < 2 or parts[1].startswith("__"):
        return None  # the package itself (capwatch.__version__)
    for i, names in enumerate(LAYERS):
        if parts[1] in names:
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and docs/design.md")


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts)
        out.append((name.removesuffix(".__init__"), path))
    return out


def _imports(path: Path, module: str) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{module}: relative import (capwatch uses absolute ones)"
            mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
    return found


class TestPackage:
    def test_all_is_honest(self) -> None:
        """Every name in each module's __all__ exists."""
        for name in capwatch.__all__:
            assert hasattr(capwatch, name), name
        for name, _ in _modules():
            if name.rsplit(".", 1)[-1].startswith("_") and not name.endswith("__init__"):
                continue
            mod = importlib.import_module(name)
            for attr in getattr(mod, "__all__", []):
                assert hasattr(mod, attr), f"{name}.{attr}"

    def test_no_import_from_a_higher_layer(self) -> None:
        """decode < kernel < attribution < diagnose < pipeline < record < sinks < commands."""
        bad = []
        for name, path in _modules():
            mine = _layer(name)
            if mine is None:
                continue
            for imp in _imports(path, name):
                theirs = _layer(imp) if imp.startswith("capwatch.") else None
                if theirs is not None and theirs > mine:
                    bad.append(f"{name} imports {imp}")
        assert [] == sorted(set(bad))

    def test_the_layer_rule_catches_an_upward_import(self, tmp_path: Path) -> None:
        """The checker itself: an upward import is reported."""
        f = tmp_path / "m.py"
        f.write_text("from capwatch.commands.cli import main\n")
        imports = _imports(f, "capwatch.decode.m")
        assert any((_layer(i) or 0) > (_layer("capwatch.decode.m") or 0) for i in imports)

    def test_only_the_kernel_layer_imports_bcc(self) -> None:
        """Only capwatch/kernel/bpf.py imports bcc (one door to the kernel)."""
        importers = set()
        for name, path in _modules():
            if any(i == "bcc" or i.startswith("bcc.") for i in _imports(path, name)):
                importers.add(name)
        assert {"capwatch.kernel.bpf"} == importers

    def test_importing_needs_no_bcc(self) -> None:
        """Importing the CLI and decoders does not import bcc (tests and tools run without root)."""
        code = (
            "import sys, capwatch.commands.cli, capwatch.sinks.exporter,"
            " capwatch.commands.observe, capwatch.pipeline; print('bcc' in sys.modules)"
        )
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert "False" == r.stdout.strip()


def test_bpf_source_is_clang_formatted() -> None:
    """bpf/ follows bpf/.clang-format (kernel style)."""
    import shutil

    import pytest

    cf = shutil.which("clang-format")
    if cf is None:
        pytest.skip("clang-format is not installed (deploy/host-setup.sh installs it)")
    bpf = PKG.parent / "bpf"
    files = sorted(str(p) for p in bpf.glob("*.[ch]"))
    r = subprocess.run([cf, "--dry-run", "-Werror", *files], capture_output=True, text=True, check=False)
    assert 0 == r.returncode, r.stderr[-2000:]
