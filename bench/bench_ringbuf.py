#!/usr/bin/env python3
"""Consumer cost per event: capwatch's RingReader vs bcc's open_ring_buffer callback,
on the same real ring (capwatch's BPF program, every check emitted to ``checks``).

Two measurements, variants interleaved within each repetition, medians reported:

* backlog: a child makes N capability checks (settimeofday(NULL, NULL), one
  CAP_SYS_TIME check each) while nobody consumes; then each consumer drains the
  ring and we time its CPU (thread_time) and wall clock. This is the pure
  consumer cost per event for large batches.
* live: the child runs at full speed while the consumer loops (wait/poll with a
  50 ms timeout, then drain); we report events consumed, events lost (the
  kernel's failed-reserve counter), consumer CPU per event, events/s.

Run as root:  .venv/bin/python bench/bench_ringbuf.py [--events 200000] [--reps 5]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from capwatch.kernel.ringbuf import RingReader  # noqa: E402

CW_STAT_LOST_CHECKS = 1

_C_LOOP = r"""
#include <stdlib.h>
#include <unistd.h>
#include <sys/syscall.h>
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    for (long i = 0; i < n; i++)
        syscall(SYS_settimeofday, NULL, NULL);
    return 0;
}
"""
_PY_LOOP = (
    "import ctypes,sys\nl=ctypes.CDLL(None)\n"
    "for _ in range(int(sys.argv[1])): l.syscall(164, None, None)\n"
)


def workload_cmd(tmp: Path) -> list[str]:
    """A child making one CAP_SYS_TIME check per loop iteration: C if a compiler
    is there (about 2-3 M checks/s), else Python (slower)."""
    cc = shutil.which("cc")
    if cc:
        src = tmp / "loop.c"
        src.write_text(_C_LOOP)
        exe = tmp / "loop"
        subprocess.run([cc, "-O2", "-o", str(exe), str(src)], check=True)
        return [str(exe)]
    return [sys.executable, "-c", _PY_LOOP]


def load(check_pages: int) -> Any:
    from bcc import BPF  # only the bench and capwatch.kernel.bpf import bcc

    return BPF(
        src_file=str(REPO / "bpf" / "capwatch.bpf.c").encode(),
        cflags=[
            "-DCW_ATTACH_RAW_TP",
            "-DCW_EMIT_ALL",
            f"-I{REPO / 'bpf'}",
            f"-DCW_SELF_PID={os.getpid()}",
            f"-DCW_CHECK_PAGES={check_pages}",
        ],
    )


def lost_checks(bpf: Any) -> int:
    return sum(int(v) for v in bpf[b"stats"][ctypes.c_int(CW_STAT_LOST_CHECKS)])


class CwEvent(ctypes.Structure):
    """struct cw_event for bcc's callback (bcc 0.26's table.event() cannot parse __u64)."""

    _fields_ = (
        ("ts_ns", ctypes.c_uint64),
        ("cgroup_id", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("tid", ctypes.c_uint32),
        ("uid", ctypes.c_uint32),
        ("cap", ctypes.c_int32),
        ("syscall_nr", ctypes.c_int32),
        ("ret", ctypes.c_int32),
        ("flags", ctypes.c_uint32),
        ("suppressed", ctypes.c_uint32),
        ("comm", ctypes.c_char * 16),
    )


_EVENT_P = ctypes.POINTER(CwEvent)


class Consumers:
    """The variants, each a function that drains the checks ring once, returning
    how many events it consumed."""

    def __init__(self, bpf: Any) -> None:
        self.bpf = bpf
        table = bpf[b"checks"]
        self.reader = RingReader(table.map_fd, table.max_entries)
        self.mode = "event"
        self.count = 0
        self.pid_sum = 0

        def callback(ctx: Any, data: Any, size: int) -> int:
            # The way bcc's tools are written: cast to the event struct, use a field.
            if self.mode == "event":
                ev = ctypes.cast(data, _EVENT_P).contents
                self.pid_sum += ev.pid
            self.count += 1
            return 0

        table.open_ring_buffer(callback)

    def capwatch(self, max_records: int | None) -> int:
        n = 0
        while True:
            batch = self.reader.read_batch(max_records)
            if not len(batch):
                return n
            self.pid_sum += int(batch["pid"][-1])  # touch the data, like the others
            n += len(batch)

    def bcc(self, mode: str) -> int:
        self.mode = mode
        self.count = 0
        self.bpf.ring_buffer_consume()
        return self.count

    def variants(self) -> dict[str, Callable[[], int]]:
        return {
            "capwatch RingReader.read_batch()": lambda: self.capwatch(None),
            "capwatch read_batch(4096)": lambda: self.capwatch(4096),
            "capwatch read_batch(256)": lambda: self.capwatch(256),
            "bcc callback + ctypes cast": lambda: self.bcc("event"),
            "bcc callback, no decode": lambda: self.bcc("none"),
        }


def drain_all(cons: Consumers) -> None:
    cons.capwatch(None)


def backlog(cons: Consumers, cmd: list[str], n: int, reps: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {}
    for rep in range(reps):
        names = list(cons.variants().items())
        if rep % 2:  # alternate the order between repetitions
            names.reverse()
        for name, fn in names:
            drain_all(cons)
            subprocess.run([*cmd, str(n)], check=True)
            c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
            got = fn()
            c1, w1 = time.thread_time_ns(), time.perf_counter_ns()
            if got < n:
                raise SystemExit(f"{name}: consumed {got} events, expected at least {n}")
            results.setdefault(f"{name}|cpu", []).append((c1 - c0) / got)
            results.setdefault(f"{name}|wall", []).append((w1 - w0) / got)
            results.setdefault(f"{name}|n", []).append(got)
    return results


def live(cons: Consumers, bpf: Any, cmd: list[str], n: int, which: str) -> dict[str, float]:
    """The child floods checks while the consumer loops; ``which`` picks the loop:
    capwatch-wait (edge-triggered wait(50), drain), capwatch-timer (sleep 2 ms,
    drain), bcc (ring_buffer_poll(50) with the callback)."""
    drain_all(cons)
    lost0 = lost_checks(bpf)
    batches0 = cons.reader.batches
    child = subprocess.Popen([*cmd, str(n)])
    got = 0
    c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
    while child.poll() is None:
        # One read_batch per wake-up: what was there when it looked.
        if which == "capwatch-wait":
            cons.reader.wait(50)
            got += len(cons.reader.read_batch())
        elif which == "capwatch-timer":
            time.sleep(0.002)
            got += len(cons.reader.read_batch())
        else:
            cons.mode = "event"
            cons.count = 0
            bpf.ring_buffer_poll(50)
            got += cons.count
    w1 = time.perf_counter_ns()
    got += cons.bcc("event") if which == "bcc" else cons.capwatch(None)
    c1 = time.thread_time_ns()
    lost = lost_checks(bpf) - lost0
    batches = cons.reader.batches - batches0
    return {
        "consumed": got,
        "lost": lost,
        "cpu_ns": (c1 - c0) / max(got, 1),
        "offered_per_s": (got + lost) / ((w1 - w0) / 1e9),
        "consumed_per_s": got / ((w1 - w0) / 1e9),
        "batch": got / batches if batches else float("nan"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=200_000, help="checks per backlog run")
    ap.add_argument("--live-events", type=int, default=2_000_000, help="checks per live run")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--check-pages", type=int, default=4096, help="checks ring size, pages")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root: loads a BPF program")
    if args.events * 72 > args.check_pages * 4096:
        raise SystemExit("--events does not fit in the ring: raise --check-pages")

    with tempfile.TemporaryDirectory() as tmp:
        cmd = workload_cmd(Path(tmp))
        t0 = time.perf_counter()
        bpf = load(args.check_pages)
        load_s = time.perf_counter() - t0
        cons = Consumers(bpf)
        res = backlog(cons, cmd, args.events, args.reps)
        live_runs: dict[str, list[dict[str, float]]] = {
            "capwatch-wait": [],
            "capwatch-timer": [],
            "bcc": [],
        }
        for rep in range(args.reps):
            order = list(live_runs)
            for which in order[rep % 3 :] + order[: rep % 3]:  # rotate the order
                live_runs[which].append(live(cons, bpf, cmd, args.live_events, which))
        cons.reader.close()

    med = statistics.median
    base = med(res["bcc callback + ctypes cast|cpu"])
    print(
        f"# ring-buffer consumer cost ({os.cpu_count()} CPUs, Linux {platform.release()}, "
        f"workload: {'C' if cmd[0].endswith('loop') else 'Python'} settimeofday(NULL, NULL) loop; program loaded in {load_s:.1f} s)\n"
    )
    print(f"## backlog: {args.events} events drained at once, median of {args.reps}\n")
    print("| consumer | CPU ns/event | wall ns/event | bcc callback CPU / this |")
    print("|---|---:|---:|---:|")
    for name in cons.variants():
        cpu = med(res[f"{name}|cpu"])
        wall = med(res[f"{name}|wall"])
        print(f"| {name} | {cpu:.0f} | {wall:.0f} | {base / cpu:.1f}x |")
    print(f"\n## live: {args.live_events} checks at full speed, median of {args.reps}\n")
    print("| consumer loop | offered ev/s | consumed ev/s | lost | CPU ns/event | events/batch |")
    print("|---|---:|---:|---:|---:|---:|")
    for which, runs in live_runs.items():
        print(
            f"| {which} | {med(r['offered_per_s'] for r in runs) / 1e6:.2f} M "
            f"| {med(r['consumed_per_s'] for r in runs) / 1e6:.2f} M "
            f"| {med(r['lost'] for r in runs):.0f} "
            f"| {med(r['cpu_ns'] for r in runs):.0f} "
            f"| {med(r['batch'] for r in runs):.0f} |"
        )


if __name__ == "__main__":
    main()
