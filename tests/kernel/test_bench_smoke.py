"""The overhead benchmark runs end to end and prints its whole table (a smoke test, not a
timed assertion: the figures themselves are for docs/benchmarks.md)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench.bench_overhead import variants
from tests.helpers import REPO, require_root, require_tool

pytestmark = [pytest.mark.kernel]


@pytest.fixture(scope="module")
def quick_output() -> str:
    require_root()
    require_tool("cc")
    require_tool("bpftool")
    done = subprocess.run(
        [sys.executable, "-m", "bench.bench_overhead", "--quick", "--reps", "1", "--retries", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=55,
        check=False,
    )
    assert 0 == done.returncode, done.stderr[-2000:]
    return done.stdout


class TestBenchOverheadSmoke:
    def test_prints_every_row(self, quick_output: str) -> None:
        """Every variant (baseline, floor, counting designs, capwatch, peers) has a table row."""
        rows = [ln for ln in quick_output.splitlines() if ln.startswith("| ")]
        expected = [f"| {v.title} |" for v in variants()]
        assert ["| variant |", *expected] == [
            r[: len(e)] for r, e in zip(rows, ["| variant |", *expected], strict=True)
        ]

    def test_states_the_machine(self, quick_output: str) -> None:
        """The output names the CPU count and the kernel the figures come from."""
        machine = next(ln for ln in quick_output.splitlines() if ln.startswith("machine:"))
        assert "CPUs (nproc)" in machine
        assert "Linux " in machine

    def test_counts_are_exact(self, quick_output: str) -> None:
        """Every exact count map (capwatch's and the variants') equals the checks made."""
        rows = [ln for ln in quick_output.splitlines() if "exact" in ln or "MISMATCH" in ln]
        assert rows
        assert [] == [r for r in rows if "MISMATCH" in r]
