"""The package's public surface, and the one-door rule."""

from __future__ import annotations

import ast
from pathlib import Path

import capwatch

PKG = Path(capwatch.__file__).parent


class TestPackage:
    def test_all_is_honest(self) -> None:
        """Every name in capwatch.__all__ exists, and every public module's __all__ too."""
        for name in capwatch.__all__:
            assert hasattr(capwatch, name), name
        import importlib

        for path in sorted(PKG.glob("*.py")):
            if path.name.startswith("_"):
                continue
            mod = importlib.import_module(f"capwatch.{path.stem}")
            for name in getattr(mod, "__all__", []):
                assert hasattr(mod, name), f"{path.stem}.{name}"

    def test_only_one_module_imports_bcc(self) -> None:
        """Only capwatch/_bpf.py imports bcc (STYLE: one door to the kernel)."""
        importers = set()
        for path in PKG.glob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                if any(n == "bcc" or n.startswith("bcc.") for n in names):
                    importers.add(path.name)
        assert {"_bpf.py"} == importers

    def test_importing_needs_no_bcc(self) -> None:
        """Importing the CLI and decoders does not import bcc (tests and tools run without root)."""
        import subprocess
        import sys

        code = "import sys, capwatch.cli, capwatch.exporter, capwatch.observe; print('bcc' in sys.modules)"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert "False" == r.stdout.strip()


def test_bpf_source_is_clang_formatted() -> None:
    """bpf/ follows bpf/.clang-format (kernel style)."""
    import shutil
    import subprocess

    import pytest

    cf = shutil.which("clang-format")
    if cf is None:
        pytest.skip("clang-format is not installed (deploy/host-setup.sh installs it)")
    bpf = PKG.parent / "bpf"
    files = sorted(str(p) for p in bpf.glob("*.[ch]"))
    r = subprocess.run([cf, "--dry-run", "-Werror", *files], capture_output=True, text=True, check=False)
    assert 0 == r.returncode, r.stderr[-2000:]
