"""RingReader on real BPF ring buffers: capwatch's own program, every check emitted.

The program is compiled once for the module (about 2.5 s) with CW_EMIT_ALL, so
allowed checks go to the ``checks`` ring and denials to ``denials``. Child
processes make a known number of capability checks; the reader must return
exactly those, with the right capability and syscall numbers.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from capwatch.decode.events import F_DENIED
from capwatch.kernel.ringbuf import RingReader, ringbuf_data_size
from tests.helpers import REPO, require_root, require_tool

pytestmark = pytest.mark.kernel

CAP_SETUID = 7
CAP_SYS_TIME = 25
SYS_SETUID = 105  # x86_64
SYS_SETTIMEOFDAY = 164  # x86_64
SYS_CLOCK_SETTIME = 227  # x86_64

# One capability check per iteration, nothing else: settimeofday(NULL, NULL)
# reaches security_settime64() -> CAP_SYS_TIME (through syscall(2): glibc's
# wrapper returns early for NULL, NULL); setuid(0) as root -> CAP_SETUID.
_CHILD = """
import ctypes, os, sys
n = int(sys.argv[2])
if sys.argv[1] == "settimeofday":
    libc = ctypes.CDLL(None)
    for _ in range(n):
        libc.syscall(164, None, None)
else:
    for _ in range(n):
        os.setuid(0)
"""


@pytest.fixture(scope="module")
def program() -> Iterator[Any]:
    require_root()
    if os.uname().machine != "x86_64":
        pytest.skip("syscall numbers below are x86_64's")
    bcc = pytest.importorskip("bcc")
    bpf = bcc.BPF(
        src_file=str(REPO / "bpf" / "capwatch.bpf.c").encode(),
        cflags=[
            "-DCW_ATTACH_RAW_TP",
            "-DCW_EMIT_ALL",
            f"-I{REPO / 'bpf'}",
            f"-DCW_SELF_PID={os.getpid()}",
        ],
    )
    yield bpf
    bpf.cleanup()


@pytest.fixture
def checks(program: Any) -> Iterator[RingReader]:
    table = program[b"checks"]
    with RingReader(table.map_fd, table.max_entries) as reader:
        drain(reader)  # whatever other processes did before this test
        yield reader


@pytest.fixture
def denials(program: Any) -> Iterator[RingReader]:
    table = program[b"denials"]
    with RingReader(table.map_fd, table.max_entries) as reader:
        drain(reader)
        yield reader


def drain(reader: RingReader) -> np.ndarray:
    parts = []
    while len(batch := reader.read_batch()):
        parts.append(batch)
    return np.concatenate(parts) if parts else reader.read_batch()


def run_child(kind: str, n: int) -> int:
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, kind, str(n)])
    assert 0 == proc.wait(timeout=60)
    return proc.pid


class TestRealRing:
    def test_size_asked_of_the_kernel_matches_bcc(self, program: Any) -> None:
        """bpf(BPF_OBJ_GET_INFO_BY_FD) gives the same data size bcc compiled in."""
        for name in (b"checks", b"denials"):
            table = program[name]
            assert int(table.max_entries) == ringbuf_data_size(table.map_fd)

    @pytest.mark.parametrize(
        ("kind", "cap", "syscall_nr", "n"),
        [
            ("settimeofday", CAP_SYS_TIME, SYS_SETTIMEOFDAY, 1),
            ("settimeofday", CAP_SYS_TIME, SYS_SETTIMEOFDAY, 50_000),
            ("setuid", CAP_SETUID, SYS_SETUID, 3000),
        ],
    )
    def test_reader_gets_exactly_the_checks_made(
        self, checks: RingReader, kind: str, cap: int, syscall_nr: int, n: int
    ) -> None:
        """N checks made by a child come back as exactly N allowed events of its pid."""
        pid = run_child(kind, n)
        events = drain(checks)
        mine = events[(events["pid"] == pid) & (events["syscall_nr"] == syscall_nr)]
        assert n == len(mine)
        assert {cap} == set(mine["cap"].tolist())
        assert {0} == set(mine["ret"].tolist())
        assert 0 == int(np.count_nonzero(mine["flags"] & F_DENIED))
        assert b"python" in mine["comm"][0]
        assert 0 == checks.decode_errors

    def test_batches_are_bounded_and_ordered(self, checks: RingReader) -> None:
        """max_records splits a big backlog into batches without loss or reordering."""
        pid = run_child("settimeofday", 5000)
        parts = []
        while len(batch := checks.read_batch(700)):
            assert len(batch) <= 700
            parts.append(batch)
        events = np.concatenate(parts)
        mine = events[events["pid"] == pid]
        assert 5000 == int(np.count_nonzero(mine["cap"] == CAP_SYS_TIME))
        ts = events["ts_ns"].astype(np.int64)
        assert bool(np.all(np.diff(ts[events["pid"] == pid]) >= 0))

    def test_denial_wakes_the_reader_and_is_decoded(self, denials: RingReader) -> None:
        """A CAP_SYS_TIME denial (date -s without the capability) wakes wait() and
        arrives on the denials ring, flagged denied."""
        capsh = require_tool("capsh")
        proc = subprocess.Popen(
            [capsh, "--drop=cap_sys_time", "--", "-c", "exec date -s 2020-01-01"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        woke = denials.wait(5000)  # usually blocks in epoll until date is denied
        assert 0 != proc.wait(timeout=30)  # the clock was not changed
        assert woke
        events = drain(denials)
        mine = events[(events["comm"] == b"date") & (events["cap"] == CAP_SYS_TIME)]
        assert 1 <= len(mine)
        assert {SYS_CLOCK_SETTIME} == set(mine["syscall_nr"].tolist())
        assert all(int(f) & F_DENIED for f in mine["flags"])
        assert all(int(r) != 0 for r in mine["ret"])
