"""`explain -- CMD` runs the command in a cgroup under the caller's own, without
preexec_fn (issue 12, finding 6). Real cgroups on the unified hierarchy."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from capwatch.commands.runcmd import ENTER_FAILED, make_command_cgroup, spawn_in_cgroup
from tests.helpers import REPO, require_root, require_tool
from tests.kernel.workloads import TempCgroup, unified_root

pytestmark = [pytest.mark.kernel]


def in_cgroup(cg: TempCgroup, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` with its first process moved into ``cg`` (a shell helper, as a user would)."""
    return subprocess.run(
        ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cg.path / "cgroup.procs"), *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )


def test_explain_command_cgroup_is_under_the_callers(tmp_path: Path) -> None:
    """capwatch explain started inside /capwatch-test-X runs its command in
    /capwatch-test-X/capwatch-run-*, not at the hierarchy root, and removes it after."""
    require_root()
    require_tool("capsh")
    cg = TempCgroup()
    seen = tmp_path / "cgroup"
    try:
        r = in_cgroup(
            cg,
            sys.executable,
            "-m",
            "capwatch.commands.cli",
            "explain",
            "--json",
            "--",
            "sh",
            "-c",
            f"cat /proc/self/cgroup > {seen}",
        )
        assert 0 == r.returncode, r.stderr
        [line] = [x for x in seen.read_text().splitlines() if x.startswith("0::")]
        assert line.startswith(f"0::/{cg.path.name}/capwatch-run-"), line
        assert [] == list(cg.path.glob("capwatch-run-*"))
        assert "cgroup is at the" not in r.stderr
    finally:
        cg.remove()


def test_spawn_while_threads_run(tmp_path: Path) -> None:
    """From a process with busy threads, the command starts inside the cgroup
    (its pid is the one in cgroup.procs) and runs to completion."""
    require_root()
    stop = threading.Event()
    threads = [threading.Thread(target=stop.wait, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    made = make_command_cgroup(str(unified_root()))
    try:
        child = spawn_in_cgroup(["sleep", "1"], made)
        deadline = time.monotonic() + 5
        procs: list[str] = []
        while time.monotonic() < deadline and str(child.pid) not in procs:
            procs = (Path(made.path) / "cgroup.procs").read_text().split()
            time.sleep(0.01)
        assert [str(child.pid)] == procs
        assert 0 == child.wait(timeout=10)
    finally:
        stop.set()
        made.remove()
    assert not Path(made.path).exists()


def test_a_cgroup_that_cannot_be_entered_is_reported(tmp_path: Path) -> None:
    """The cgroup vanished before the command started: the helper says so and exits 126;
    the command never runs."""
    require_root()
    made = make_command_cgroup(str(unified_root()))
    made.remove()
    p = spawn_in_cgroup(["touch", str(tmp_path / "ran")], made)
    assert ENTER_FAILED == p.wait(timeout=10)
    assert not (tmp_path / "ran").exists()
