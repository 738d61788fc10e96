"""Attribution cost: cached lookup per event, miss path, and cgroup-tree walks.

Usage: .venv/bin/python bench/bench_attribution.py [--repeats 7] [--real-cgroupfs]

Prints a markdown table of medians over repeated runs, each with a baseline
measured in the same run:
  * Attributor.resolve() on cached ids vs a bare dict.get() over the same ids;
  * resolve() of never-seen ids (the miss path: lock, dict miss, wake the walker);
  * walk_cgroup_tree() over 5,000 directories vs a naive os.walk() + os.stat()
    per directory; with --real-cgroupfs also over 5,000 real cgroups created (and
    removed) under the unified hierarchy (needs root).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from capwatch.attribution.cgroups import CgroupResolver, find_cgroup2_mount, walk_cgroup_tree
from capwatch.attribution.containers import Attributor

CID = "3f1c2b9a8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a3928170f6e5d4c"


def build_tree(root: Path, total: int) -> list[Path]:
    """About ``total`` directories shaped like a busy Kubernetes node (systemd driver)."""
    made: list[Path] = []

    def mk(p: Path) -> None:
        p.mkdir()
        made.append(p)

    base = root / "kubepods.slice"
    mk(base)
    qos = [base / f"kubepods-{q}.slice" for q in ("burstable", "besteffort")]
    for q in qos:
        mk(q)
    i = 0
    while len(made) < total:
        q = qos[i % 2]
        uid = f"{i:08x}_1111_2222_3333_444455556666"
        pod = q / f"{q.stem}-pod{uid}.slice"
        mk(pod)
        for c in range(3):  # sandbox + 2 containers
            if len(made) >= total:
                break
            mk(pod / f"cri-containerd-{i:032x}{c:032x}.scope")
        i += 1
    return made


def naive_walk(root: str) -> dict[int, str]:
    """Baseline: os.walk plus one stat per directory."""
    out: dict[int, str] = {}
    for dirpath, _dirs, _files in os.walk(root):
        out[os.stat(dirpath).st_ino] = "/" + os.path.relpath(dirpath, root)
    return out


def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_lookups(repeats: int, rows: list[tuple[str, str, str, str]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        made = build_tree(root, 200)
        ids = [p.stat().st_ino for p in made][:100]
        a = Attributor(cgroup_root=tmp, names=False)
        try:
            for cid in ids:
                a.resolve(cid)
            batch = ids * 10_000  # 1,000,000 lookups over 100 hot ids
            resolve = a.resolve
            plain = dict(a._cache)
            get = plain.get

            def run_resolve() -> None:
                for cid in batch:
                    resolve(cid)

            def run_dict() -> None:
                for cid in batch:
                    get(cid)

            def run_loop() -> None:
                for _cid in batch:
                    pass

            r_res, r_dict, r_loop = [], [], []
            for _ in range(repeats):  # interleaved, so drift hits all three alike
                r_res.append(median_time(run_resolve, 1))
                r_dict.append(median_time(run_dict, 1))
                r_loop.append(median_time(run_loop, 1))
            n = len(batch)
            ns_res = statistics.median(r_res) / n * 1e9
            ns_dict = statistics.median(r_dict) / n * 1e9
            ns_loop = statistics.median(r_loop) / n * 1e9
            rows.append(
                (
                    "cached resolve()",
                    f"{ns_res:.0f} ns/op",
                    f"dict.get {ns_dict:.0f} ns/op",
                    f"{ns_res / ns_dict:.2f}x",
                )
            )
            rows.append(
                (
                    "cached resolve(), loop overhead removed",
                    f"{ns_res - ns_loop:.0f} ns/op",
                    f"dict.get {ns_dict - ns_loop:.0f} ns/op",
                    f"{(ns_res - ns_loop) / max(ns_dict - ns_loop, 1e-9):.2f}x",
                )
            )

            # The miss path: ids never seen, the walker thread only woken.
            misses = list(range(10**12, 10**12 + 20_000))
            res = []
            for _ in range(repeats):
                a._cache.clear()
                a._pending.clear()
                res.append(median_time(lambda: [resolve(c) for c in misses], 1))
            ns_miss = statistics.median(res) / len(misses) * 1e9
            rows.append(
                (
                    "resolve() of unknown ids (miss path)",
                    f"{ns_miss:.0f} ns/op",
                    f"dict.get {ns_dict:.0f} ns/op",
                    f"{ns_miss / ns_dict:.1f}x",
                )
            )
        finally:
            a.close()


def bench_walk(repeats: int, rows: list[tuple[str, str, str, str]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        made = build_tree(Path(tmp), 5000)
        found = walk_cgroup_tree(tmp)
        assert len(found) == len(made) + 1, (len(found), len(made))
        walk, naive = [], []
        for _ in range(repeats):
            walk.append(median_time(lambda: walk_cgroup_tree(tmp), 1))
            naive.append(median_time(lambda: naive_walk(tmp), 1))
        w, b = statistics.median(walk), statistics.median(naive)
        rows.append(
            (
                f"walk {len(made)} dirs (tmpdir)",
                f"{w * 1e3:.1f} ms",
                f"os.walk+stat {b * 1e3:.1f} ms",
                f"{w / b:.2f}x",
            )
        )
        resolver = CgroupResolver(tmp, background=False)
        full = median_time(resolver.walk, repeats)
        rows.append(("resolver re-walk + merge (tmpdir)", f"{full * 1e3:.1f} ms", "", ""))


def bench_real_cgroupfs(repeats: int, rows: list[tuple[str, str, str, str]]) -> None:
    root = find_cgroup2_mount()
    if root is None:
        rows.append(("walk real cgroupfs", "no cgroup2 mount", "", ""))
        return
    base = Path(root) / f"capwatch-bench-{os.getpid()}"
    base.mkdir()
    made: list[Path] = []
    try:
        t0 = time.perf_counter()
        made = build_tree(base, 5000)
        create = time.perf_counter() - t0
        walk, naive = [], []
        for _ in range(repeats):
            walk.append(median_time(lambda: walk_cgroup_tree(root), 1))
            naive.append(median_time(lambda: naive_walk(root), 1))
        total = len(walk_cgroup_tree(root))
        w, b = statistics.median(walk), statistics.median(naive)
        rows.append(
            (
                f"walk real cgroupfs ({total} cgroups)",
                f"{w * 1e3:.1f} ms",
                f"os.walk+stat {b * 1e3:.1f} ms",
                f"{w / b:.2f}x",
            )
        )
        rows.append(("(creating 5,000 cgroups took)", f"{create * 1e3:.0f} ms", "", ""))
    finally:
        for p in reversed(made):
            p.rmdir()
        base.rmdir()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--real-cgroupfs", action="store_true")
    args = parser.parse_args()
    rows: list[tuple[str, str, str, str]] = []
    bench_lookups(args.repeats, rows)
    bench_walk(args.repeats, rows)
    if args.real_cgroupfs:
        bench_real_cgroupfs(args.repeats, rows)
    print(
        f"cores: {os.cpu_count()}, kernel: {platform.release()}, "
        f"python: {platform.python_version()}, medians of {args.repeats} runs\n"
    )
    print("| measure | capwatch | baseline (same run) | ratio |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
