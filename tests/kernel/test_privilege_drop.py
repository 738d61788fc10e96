"""The privilege drop of `capwatch serve`, read from the running process (issue 12, finding 6).

Every thread of a running serve (HTTP server, cgroup walker, name look-ups
included) has only CAP_BPF in its permitted, effective and bounding sets,
nothing inheritable or ambient, and no_new_privs; serve still reads its maps
after the drop (a denial made afterwards is counted).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench._harness import Serve
from capwatch.kernel.privs import thread_privileges
from tests.helpers import REPO, require_root
from tests.kernel.tracing import run_denied_date

pytestmark = pytest.mark.kernel

CAP_BPF = 1 << 39


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    require_root()
    s = Serve("--log-interval", "1s", "--state-file", str(tmp_path / "state" / "recent.json"))
    yield s
    if s.proc.poll() is None:
        s.proc.kill()
        s.proc.wait()


def sys_time_denials(s: Serve) -> float:
    return sum(
        v
        for k, v in s.metrics().items()
        if k.startswith("capwatch_denials_total{") and 'capability="CAP_SYS_TIME"' in k
    )


class TestServeDropsPrivileges:
    def test_every_thread_keeps_only_cap_bpf(self, serve: Serve) -> None:
        """/proc/<serve>/task/*/status: CapPrm = CapEff = CapBnd = CAP_BPF,
        CapInh = CapAmb = 0, NoNewPrivs = 1, on every thread (more than one runs)."""
        threads = thread_privileges(serve.proc.pid)
        assert len(threads) > 1
        for tid, facts in threads.items():
            assert {
                "CapInh": 0,
                "CapPrm": CAP_BPF,
                "CapEff": CAP_BPF,
                "CapBnd": CAP_BPF,
                "CapAmb": 0,
                "NoNewPrivs": 1,
            } == facts, tid

    def test_maps_are_read_after_the_drop(self, serve: Serve) -> None:
        """A denial made after the drop reaches /metrics (map reads work with CAP_BPF)."""
        before = sys_time_denials(serve)
        run_denied_date()
        deadline = time.monotonic() + 15
        while sys_time_denials(serve) < before + 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert before + 1 <= sys_time_denials(serve)
        serve.stop()
        dropped = [x for x in serve.log_lines() if x.get("event") == "capabilities_dropped"]
        assert [(["CAP_BPF"], True)] == [(x["kept"], x["bounding_reduced"]) for x in dropped]


def test_no_drop_privileges_keeps_them() -> None:
    """--no-drop-privileges: the threads keep what serve started with."""
    require_root()
    s = Serve("--no-drop-privileges")
    try:
        for facts in thread_privileges(s.proc.pid).values():
            assert facts["CapEff"] & ~CAP_BPF
            assert 0 == facts["NoNewPrivs"]
    finally:
        s.proc.kill()
        s.proc.wait()


_AFTER_THREAD = """
import threading, time
from capwatch.kernel.privs import KEEP_AFTER_ATTACH, drop_privileges
from capwatch.errors import CapwatchError
threading.Thread(target=time.sleep, args=(5,), daemon=True).start()
try:
    drop_privileges(KEEP_AFTER_ATTACH)
except CapwatchError as e:
    print(e)
"""

_DROP_THEN_EXEC = """
import subprocess, sys
from capwatch.kernel.privs import KEEP_AFTER_ATTACH, drop_privileges
d = drop_privileges(KEEP_AFTER_ATTACH)
print(d.kept, d.bounding_reduced)
sys.stdout.flush()
subprocess.run(["grep", "-E", "^(CapPrm|CapEff|CapBnd|NoNewPrivs)", "/proc/self/status"])
"""


class TestDropFunction:
    def test_refuses_once_a_thread_runs(self) -> None:
        """A thread started before the drop would keep its capabilities: refused."""
        require_root()
        r = subprocess.run(
            [sys.executable, "-c", _AFTER_THREAD],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=False,
        )
        assert "cannot drop privileges: 2 threads already run" in r.stdout, r.stderr

    def test_a_root_exec_after_the_drop_gains_nothing(self) -> None:
        """What capwatch execs after the drop (uid 0 still) gets no capability back."""
        require_root()
        r = subprocess.run(
            [sys.executable, "-c", _DROP_THEN_EXEC],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=False,
        )
        assert r.stdout.splitlines() == [
            "['CAP_BPF'] True",
            "CapPrm:\t0000000000000000",
            "CapEff:\t0000000000000000",
            "CapBnd:\t0000008000000000",
            "NoNewPrivs:\t1",
        ], r.stderr

    def test_without_cap_setpcap_the_rest_still_goes(self) -> None:
        """No CAP_SETPCAP (the least-privilege DaemonSet): the bounding set stays as
        the container runtime set it, everything else is dropped, no_new_privs set:
        a root exec keeps at most CAP_BPF (no securebits without CAP_SETPCAP)."""
        require_root()
        r = subprocess.run(
            [
                "capsh",
                "--drop=cap_setpcap",
                "--",
                "-c",
                f'exec "{sys.executable}" -c "$0"',
                _DROP_THEN_EXEC,
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=False,
        )
        lines = r.stdout.splitlines()
        assert "['CAP_BPF'] False" == lines[0], r.stderr
        assert ["CapPrm:\t0000008000000000", "CapEff:\t0000008000000000"] == lines[1:3]
        assert "CapBnd:\t0000000000000000" != lines[3]
        assert "NoNewPrivs:\t1" == lines[4]
