"""Shared test helpers: root/kernel feature gates with clear skip reasons."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CAPWATCH = [sys.executable, "-m", "capwatch.cli"]


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: loads BPF programs")


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (deploy/host-setup.sh installs it)")
    return path


def run_capwatch(*args: str, timeout: float = 60, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CAPWATCH, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kw,  # type: ignore[call-overload]
    )
