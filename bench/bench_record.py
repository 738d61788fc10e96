"""What recording costs per event at the --all rate (issue 16), against the
live consumer in the same run.

    .venv/bin/python -m bench.bench_record [--calls 1000000] [--repeat 5]

1. Capture: a Session with --all while bench/workload.c floods allowed
   CAP_SETUID checks (setuid(0)) at full speed; the batches as the ring gave
   them are kept (real records, real cgroup ids).
2. Per event, median of --repeat runs over the same captured batches:
   - record: capwatch.record.writer.Recorder (copy, cgroup ids, one zlib frame
     and one write(2) per drain, to a file on disk), attribution by the real
     Attributor; to the last byte written, and on the consumer's thread only
     (compression and writing run in the recorder's own thread);
   - consumer: the benchmark's live consumer (bench/peers/capwatch_consumer.py:
     a vectorised tally per pid and capability), the floor any consumer pays;
   - pipeline: trace --all's pipeline (decode, attribute, classify, a Check
     per event) into a sink that drops them.
   Ratios record/consumer and record/pipeline.
3. Live: `capwatch record --all` during the same flood; the kernel's loss
   counters and the records written against the calls made.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import numpy as np

from bench._harness import REPO, compile_c
from capwatch.attribution.containers import Attributor
from capwatch.commands.trace import trace_pipeline
from capwatch.decode.events import Batch
from capwatch.diagnose.policy import Policy
from capwatch.kernel.bpf import ProgramConfig
from capwatch.kernel.session import Session
from capwatch.pipeline import Check, status_of
from capwatch.record.writer import Recorder

Drain = list[tuple[str, Batch]]


def capture(workload: str, calls: int) -> list[Drain]:
    session = Session(ProgramConfig(emit_all=True))
    drains: list[Drain] = []
    current: Drain = []
    stop = threading.Event()

    def on_batch(ring: str, batch: Batch) -> None:
        current.append((ring, batch.copy()))

    def on_tick() -> None:
        nonlocal current
        if current:
            drains.append(current)
            current = []

    t = threading.Thread(target=session.run, args=(stop, on_batch), kwargs={"on_tick": on_tick})
    t.start()
    subprocess.run([workload, "flood", str(calls), "setuid", "0"], capture_output=True, check=True)
    time.sleep(0.3)
    stop.set()
    t.join()
    on_tick()
    session.close()
    return drains


class Drop:
    def write(self, check: Check) -> None:
        pass

    def tick(self) -> None:
        pass

    def close(self) -> None:
        pass


def per_event(run: Callable[[list[Drain]], None], drains: list[Drain], repeat: int) -> float:
    n = sum(len(b) for d in drains for _, b in d)
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        run(drains)
        runs.append((time.perf_counter_ns() - t0) / n)
    return statistics.median(runs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args(argv)
    workload = compile_c("workload")
    drains = capture(workload, a.calls)
    events = sum(len(b) for d in drains for _, b in d)
    print(f"captured {events} records in {len(drains)} drains ({events / len(drains):.0f}/drain)")
    attributor = Attributor()
    tmp = tempfile.mkdtemp(prefix="capwatch-bench-record-")
    sizes: list[int] = []

    path_ns: list[float] = []

    def record(ds: list[Drain]) -> None:
        path = os.path.join(tmp, "r.cwrec")
        r = Recorder(path, {"clock_offset_ns": 0}, attributor.resolve, status_of("/proc"))
        t0 = time.perf_counter_ns()
        for d in ds:
            for ring, b in d:
                r.on_batch(ring, b)
            r.tick()
        path_ns.append((time.perf_counter_ns() - t0) / events)
        r.close()
        sizes.append(os.path.getsize(path))

    def consumer(ds: list[Drain]) -> None:
        tally: dict[int, int] = {}
        for d in ds:
            for _, b in d:
                keys = (b["pid"].astype(np.uint64) << np.uint64(8)) | (
                    b["cap"].astype(np.uint64) & np.uint64(0xFF)
                )
                uniq, counts = np.unique(keys, return_counts=True)
                for k, c in zip(uniq.tolist(), counts.tolist(), strict=True):
                    tally[k] = tally.get(k, 0) + c

    def pipeline(ds: list[Drain]) -> None:
        p = trace_pipeline(attributor.resolve, [Drop()], policy=Policy.load(None), outcome=False)
        for d in ds:
            for ring, b in d:
                p.on_batch(ring, b)
            p.tick()
        p.close()

    # the pipeline is ~100x slower: measured on the first 100,000 records
    head: list[Drain] = []
    n = 0
    for d in drains:
        if n >= 100_000:
            break
        head.append(d)
        n += sum(len(b) for _, b in d)
    rec_ns = per_event(record, drains, a.repeat)
    con_ns = per_event(consumer, drains, a.repeat)
    pipe_ns = per_event(pipeline, head, max(1, a.repeat // 2))
    attributor.close()
    rec_path = statistics.median(path_ns)
    print(
        f"record   {rec_ns:8.1f} ns/event to the last byte on disk"
        f" ({sizes[-1] / events:.2f} bytes/event, 64 raw);"
        f" {rec_path:.1f} ns/event on the consumer's thread"
    )
    print(f"consumer {con_ns:8.1f} ns/event  (bench's live consumer: vectorised tally)")
    print(f"pipeline {pipe_ns:8.1f} ns/event  (trace --all's pipeline, no output)")
    print(
        f"ratio record/consumer {rec_ns / con_ns:.2f} (consumer's thread only:"
        f" {rec_path / con_ns:.2f})  record/pipeline {rec_ns / pipe_ns:.3f}"
    )

    out = os.path.join(tmp, "live.cwrec")
    proc = subprocess.Popen(
        [sys.executable, "-m", "capwatch.commands.cli", "record", "--all", "-o", out],
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert proc.stderr is not None
    while "attached via" not in proc.stderr.readline():
        if proc.poll() is not None:
            print("capwatch record did not start")
            return 1
    w = subprocess.run(
        [workload, "flood", str(a.calls), "setuid", "0"], capture_output=True, text=True, check=True
    )
    time.sleep(0.5)
    proc.send_signal(2)
    _, err = proc.communicate(timeout=60)
    m = re.search(r"recorded (\d+) events.*?(\d+) bytes.*?lost (\d+)", err)
    calls = re.search(r"ns=(\d+)", w.stdout)
    secs = int(calls.group(1)) / 1e9 if calls else 0.0
    print(
        f"live: {a.calls} setuid calls in {secs:.2f}s ({a.calls / max(secs, 1e-9):,.0f}/s);"
        f" capwatch record --all: {err.strip().splitlines()[-1].removeprefix('capwatch: ')}"
    )
    if m:
        print(f"live: records written per call {int(m.group(1)) / a.calls:.3f}, lost {m.group(3)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
