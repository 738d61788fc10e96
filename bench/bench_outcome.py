"""What outcome mode costs the syscalls that make no capability check.

    python -m bench.bench_outcome [--reps 5] [--calls 2000000]

`--outcome` hooks raw_syscalls:sys_exit, which runs on every syscall of the
node. A tight loop of getppid() (no capability check) pinned to CPU 0 is
timed (thread CPU time per call) with nothing attached, with capwatch
default, with capwatch --outcome, and with explain's program (outcome, a pid
filter on another process) without and with refusal records, and with the
sys_enter hook explain adds to tell a refusal at entry (seccomp), interleaved,
medians over REPS. getppid() returns a pid (>= 20), so the check for a netlink
reply (a shared gate read) is paid on every call, as read() would.
Figures are added ns per getppid() against the baseline of the same
repetition. The machine has 2 cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from capwatch.kernel.bpf import ProgramConfig
from capwatch.kernel.session import Session

LOOP = r"""
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    cpu_set_t set; CPU_ZERO(&set); CPU_SET(0, &set); sched_setaffinity(0, sizeof(set), &set);
    struct timespec a, b;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &a);
    for (long i = 0; i < n; i++) syscall(SYS_getppid);
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &b);
    printf("%f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
    return 0;
}
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--calls", type=int, default=2_000_000)
    a = ap.parse_args(argv)
    d = Path(tempfile.mkdtemp(prefix="capwatch-bench-outcome-"))
    (d / "loop.c").write_text(LOOP)
    subprocess.run(["cc", "-O2", "-o", str(d / "loop"), str(d / "loop.c")], check=True)
    os.sched_setaffinity(0, {1})

    def loop() -> float:
        return float(
            subprocess.run(
                [str(d / "loop"), str(a.calls)], capture_output=True, text=True, check=True
            ).stdout
        )

    def attached(cfg: ProgramConfig) -> float:
        with Session(cfg) as s:
            stop = threading.Event()
            t = threading.Thread(target=s.run, args=(stop, lambda r, b: None))
            t.start()
            try:
                return loop()
            finally:
                stop.set()
                t.join()

    # explain's configurations watch one target (here this process, not the loop):
    # the loop's syscalls pay the outcome hook, and with refusals one compare more.
    me = os.getpid()
    configs = {
        "default": ProgramConfig(),
        "outcome": ProgramConfig(outcome=True),
        "explain": ProgramConfig(outcome=True, filter_pid=me),
        "refusals": ProgramConfig(outcome=True, filter_pid=me, refusals=True),
        "entry": ProgramConfig(outcome=True, filter_pid=me, refusals=True, refusal_entry=True),
    }
    rows: dict[str, list[float]] = {"baseline": [], **{k: [] for k in configs}}
    for _ in range(a.reps):
        base = loop()
        rows["baseline"].append(base)
        for k, cfg in configs.items():
            rows[k].append(attached(cfg) - base)
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(
        f"machine: {os.cpu_count()} cores, Linux {os.uname().release}; getppid() x {a.calls:,}, "
        f"{a.reps} repetitions interleaved, medians"
    )
    print("| variant | ns per getppid() | added ns | added / baseline |")
    print("|---|---:|---:|---:|")
    print(f"| nothing attached | {med['baseline']:.0f} | 0 | 0 |")
    for k, title in (
        ("default", "capwatch default (no syscall hook)"),
        ("outcome", "capwatch --outcome (sys_exit hook, gate closed)"),
        ("explain", "another process watched (outcome + pid filter: advise)"),
        ("refusals", "... + refusal records (trace --outcome --pid)"),
        ("entry", "... + the target's syscall entries watched (explain: a sys_enter hook)"),
    ):
        print(
            f"| {title} | {med['baseline'] + med[k]:.0f} | {med[k]:+.0f} | {med[k] / med['baseline']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
