"""The kernel's own count of skipped program runs, read from a real attached program."""

from __future__ import annotations

import subprocess

import pytest

from capwatch.kernel.bpf import ProgramConfig, load
from tests.helpers import require_root

pytestmark = [pytest.mark.kernel]


def test_attached_program_reports_recursion_misses() -> None:
    """The cap_capable program this kernel runs reports a recursion count (0 here: nothing
    recursed), and read_stats carries it, so capwatch_checks_uncounted_total includes it."""
    require_root()
    prog = load(ProgramConfig(denial_pages=1), "auto")
    try:
        subprocess.run(["true"], check=True)  # some checks ran through the program
        assert 0 == prog.recursion_misses(), prog.hooks()
        assert 0 == prog.read_stats()["recursion_misses"]
    finally:
        prog.close()
