"""Real processes that make capability checks on cue, for kernel tests.

Each child starts, prints its pid, waits for a line on stdin ("go"), makes its
checks, prints how many, and exits: the test can build a BPF program that
filters on the pid before the first check is made.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

_CHILD = r"""
import ctypes, os, platform, sys, time
libc = ctypes.CDLL(None, use_errno=True)
# the raw syscall: glibc's settimeofday() dereferences a NULL timeval
SYS_settimeofday = {"x86_64": 164, "aarch64": 170}[platform.machine()]
kind, n, interval = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
print(os.getpid(), flush=True)
sys.stdin.readline()
done = 0
for _ in range(n):
    if kind == "setuid":
        os.setuid(0)
    elif kind == "settime":  # one CAP_SYS_TIME check; denied without the capability
        libc.syscall(SYS_settimeofday, None, None)
    done += 1
    if interval:
        time.sleep(interval)
print(done, flush=True)
"""


class Child:
    """A python child doing ``n`` checks of ``kind`` when told to go."""

    def __init__(
        self,
        kind: str,
        n: int,
        *,
        interval: float = 0.0,
        drop: str | None = None,
        cgroup: TempCgroup | None = None,
    ) -> None:
        argv = [sys.executable, "-c", _CHILD, kind, str(n), str(interval)]
        if drop:
            # capsh drops from the bounding set and execs: the pid stays the child's.
            argv = ["capsh", f"--drop={drop}", "--", "-c", 'exec "$0" "$@"', *argv]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.pid = int(self.proc.stdout.readline())
        if cgroup is not None:
            (cgroup.path / "cgroup.procs").write_text(str(self.pid))

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def wait(self, timeout: float = 120) -> int:
        out, _ = self.proc.communicate(timeout=timeout)
        assert 0 == self.proc.returncode
        return int(out.split()[-1])


def unified_root() -> Path:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        parts = line.split()
        sep = parts.index("-")
        if parts[sep + 1] == "cgroup2":
            return Path(parts[4])
    pytest.skip("no cgroup v2 hierarchy mounted")


class TempCgroup:
    """A fresh cgroup v2 directory; its inode is the id BPF reports."""

    def __init__(self) -> None:
        self.path = unified_root() / f"capwatch-test-{uuid.uuid4().hex[:8]}"
        self.path.mkdir()
        self.id = os.stat(self.path).st_ino

    def remove(self) -> None:
        parent = self.path.parent / "cgroup.procs"
        for pid in (self.path / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                parent.write_text(pid)
        self.path.rmdir()
