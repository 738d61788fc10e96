"""Cost of the denial log: per denial on the hot path, and per written line
with the stdlib json encoder against orjson (does orjson earn its place?).

    .venv/bin/python bench/bench_denylog.py [--repeat 7]

Prints medians over repeated runs and ratios to baselines measured in the same
run: a bare dict-count of the same key (what any aggregation costs at least),
and the stdlib json line.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from collections.abc import Callable
from typing import Any

from capwatch.sinks import denylog
from capwatch.sinks.denylog import Denial, DenialLog

D = Denial(
    time=1.7e9,
    node="node-1",
    namespace="shop",
    pod="web-7d9f",
    container="web",
    runtime="containerd",
    comm="date",
    pid=4242,
    uid=1000,
    capability="CAP_SYS_TIME",
    syscall="clock_settime",
    expected=False,
)


def _median_ns(fn: Callable[[], int], repeat: int) -> float:
    """Median nanoseconds per operation; fn runs a batch and returns its size."""
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        n = fn()
        runs.append((time.perf_counter_ns() - t0) / n)
    return statistics.median(runs)


def bare_count(n: int = 200_000) -> int:
    counts: dict[tuple[Any, ...], int] = {}
    for _ in range(n):
        key = (D.expected, D.namespace, D.pod, D.container, D.comm, D.capability, D.syscall)
        counts[key] = counts.get(key, 0) + 1 + D.suppressed
    return n


def repeated_denial(n: int = 200_000) -> int:
    log = DenialLog(io.StringIO(), fmt="json", clock=lambda: 1.7e9)
    for _ in range(n):
        log.record(D)
    return n


def distinct_lines(n: int = 5_000) -> int:
    """Every record is a new key, so every record writes a line."""
    log = DenialLog(
        io.StringIO(), fmt="json", max_keys=n + 1, max_keys_per_workload=n + 1, clock=lambda: 1.7e9
    )
    denials = [
        Denial(**{**{f: getattr(D, f) for f in D.__dataclass_fields__}, "comm": f"p{i}"})
        for i in range(n)
    ]
    for d in denials:
        log.record(d)
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()

    base = _median_ns(bare_count, args.repeat)
    hot = _median_ns(repeated_denial, args.repeat)
    print(f"bare dict count of one key           {base:8.0f} ns/denial (baseline)")
    print(f"DenialLog.record, repeated key       {hot:8.0f} ns/denial  ratio {hot / base:.1f}x")

    stdlib = _median_ns(distinct_lines, args.repeat)
    print(f"line written, stdlib json            {stdlib:8.0f} ns/line (baseline)")
    try:
        import orjson
    except ImportError:
        print("orjson not installed: skipped")
        return

    def orjson_dumps(obj: Any, **_kw: Any) -> str:
        return orjson.dumps(obj, default=str).decode()

    saved = denylog._dumps
    denylog._dumps = orjson_dumps
    try:
        fast = _median_ns(distinct_lines, args.repeat)
    finally:
        denylog._dumps = saved
    print(f"line written, orjson                 {fast:8.0f} ns/line  ratio {fast / stdlib:.2f}x")
    # Lines are bounded: at most ~2 per key per interval. At the default caps
    # (1000 keys x 2 classes, 60 s) the worst case is about 4,000 lines a minute.
    worst = 4_000 / 60
    print(
        f"worst case at default caps ~{worst:.0f} lines/s: stdlib {worst * stdlib / 1e6:.2f} ms/s, "
        f"orjson {worst * fast / 1e6:.2f} ms/s of CPU"
    )


if __name__ == "__main__":
    main()
