"""Scrape cost of `capwatch serve` with many series, on the real kernel map.

    python -m bench.bench_scrape [--series 5000] [--reps 21]

Loads the real BPF program, fills its count map from user space with
SERIES distinct (cgroup, capability, verdict) keys, resolves each cgroup to
a systemd-service-shaped workload (so each key is its own label set), and
times a full /metrics render (generate_latest) against an empty-map render
in the same run. Medians; the machine has 2 cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

from prometheus_client import CollectorRegistry, generate_latest

from capwatch.attribution.containers import classify
from capwatch.kernel.bpf import ProgramConfig, load
from capwatch.sinks.exporter import CapwatchCollector, ExporterState


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--series", type=int, default=5000)
    ap.add_argument("--reps", type=int, default=21)
    a = ap.parse_args()
    with load(ProgramConfig()) as prog:
        collectors: dict[int, CapwatchCollector] = {}

        def render(state: ExporterState, fast: bool = True) -> float:
            """One /metrics render, as serve does it (fast) or via generate_latest."""
            col = collectors.setdefault(id(state), CapwatchCollector(state))
            t0 = time.perf_counter()
            if fast:
                col.exposition()
            else:
                reg = CollectorRegistry()
                reg.register(col)
                generate_latest(reg)
            return time.perf_counter() - t0

        cache: dict[int, object] = {}

        def resolve(cg: int) -> object:  # cached, as Attributor.resolve is
            w = cache.get(cg)
            if w is None:
                w = cache[cg] = classify(f"/system.slice/svc{cg}.service", cg)
            return w

        empty = ExporterState(prog, resolve, max_series=10**6)  # type: ignore[arg-type]
        base = [render(empty) for _ in range(a.reps)]
        table = prog._bpf[b"counts"]
        ncpu = os.cpu_count() or 1
        leaf = table.Leaf()
        for i in range(ncpu):
            leaf[i] = 1
        n = 0
        cg = 1_000_000
        while n < a.series:
            table[table.Key(cg, 25, 1)] = leaf
            n += 1
            cg += 1
        full = ExporterState(prog, resolve, max_series=10**6)  # type: ignore[arg-type]
        times, slow = [], []
        for _ in range(a.reps):  # interleaved
            times.append(render(full))
            slow.append(render(full, fast=False))
        series = len(full.series())
    b, f = statistics.median(base), statistics.median(times)
    print(f"machine: {os.cpu_count()} cores, Linux {platform.release()}")
    print("| scrape | series | median ms | ratio |")
    print("|---|---|---|---|")
    print(f"| kernel map with capwatch's own checks only | - | {b * 1e3:.2f} | 1.0 |")
    s = statistics.median(slow)
    print(
        f"| kernel map with {a.series} extra keys, capwatch serve's renderer | {series} | {f * 1e3:.2f} | {f / b:.1f} |"
    )
    print(f"| same, prometheus_client generate_latest | {series} | {s * 1e3:.2f} | {s / b:.1f} |")


if __name__ == "__main__":
    main()
