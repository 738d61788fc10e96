"""The counting variants of bench/variants/*.bpf.c: each loaded once, attached
and detached around every run by the benchmark process, and a reader per
variant of the count it keeps for (cgroup, cap, allowed)."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

from bench.peers.runners import BENCH, Env, Run, Variant


class AttachOnly(Variant):
    """A BPF program of bench/variants/ loaded once, attached for each run by this process."""

    def __init__(
        self,
        key: str,
        title: str,
        source: str,
        reader: Callable[[Any, int, int], int] | None,
    ) -> None:
        self.key, self.title, self.source, self.reader = key, title, source, reader
        self.bpf: Any = None
        self.count0 = 0

    def prepare(self, env: Env) -> None:
        from bcc import BPF

        self.bpf = BPF(
            src_file=str(BENCH / "variants" / self.source).encode(),
            cflags=[f"-I{BENCH / 'variants'}", "-Wno-macro-redefined"],
        )
        self.bpf.load_func(b"count", BPF.RAW_TRACEPOINT)

    def start(self, env: Env, run: Run) -> None:
        self.bpf.attach_raw_tracepoint(tp=b"cap_capable", fn_name=b"count")

    def before_workload(self, env: Env) -> None:
        if self.reader is not None:
            self.count0 = self.reader(self.bpf, env.cgroup_id, env.cap)

    def stop(self, env: Env, run: Run) -> None:
        if self.reader is not None:
            run.count = self.reader(self.bpf, env.cgroup_id, env.cap) - self.count0
        self.bpf.detach_raw_tracepoint(tp=b"cap_capable")

    def close(self) -> None:
        if self.bpf is not None:
            self.bpf.cleanup()


def _sum(values: Any) -> int:
    return int(sum(int(v) for v in values))


def read_keyed(bpf: Any, cgroup_id: int, cap: int) -> int:
    """(a): per-CPU hash keyed (cgroup, cap, denied)."""
    table = bpf[b"counts"]
    try:
        return _sum(table[table.Key(cgroup_id, cap, 0)])
    except KeyError:
        return 0


def read_shared(bpf: Any, cgroup_id: int, cap: int) -> int:
    """(d): shared hash keyed (cgroup, cap, denied)."""
    table = bpf[b"counts"]
    try:
        return int(table[table.Key(cgroup_id, cap, 0)].value)
    except KeyError:
        return 0


def read_by_cgroup(bpf: Any, cgroup_id: int, cap: int) -> int:
    """(b): per-CPU hash keyed by cgroup, a row of [cap][denied] counters per CPU."""
    table = bpf[b"bycg"]
    try:
        rows = table[table.Key(cgroup_id)]
    except KeyError:
        return 0
    return int(sum(int(r.n[cap * 2]) for r in rows))


def read_cached_counts(bpf: Any, attempts: int = 1000) -> dict[tuple[int, int, bool], int]:
    """(c): exact counts from the per-CPU hash plus every CPU's cache of its last cgroup.

    A flush moves counts from a CPU's cache into the hash; a read that overlaps
    it would see them twice or not at all. So: caches, then the hash, then the
    caches again; accept only when no CPU flushed meanwhile (its sequence
    numbers are equal and unchanged), else retry. Between two flushes a CPU's
    slot of the hash does not change, and its cache only grows."""
    cache = bpf[b"cache"]
    counts = bpf[b"counts"]
    zero = ctypes.c_int(0)
    for _ in range(attempts):
        first = [(int(c.seq_head), int(c.seq_tail)) for c in cache[zero]]
        hashed = {
            (int(k.cgroup_id), int(k.cap), bool(k.denied)): _sum(v) for k, v in counts.items()
        }
        second = cache[zero]
        if all(
            h == t == int(c.seq_head) == int(c.seq_tail)
            for (h, t), c in zip(first, second, strict=True)
        ):
            out = dict(hashed)
            for c in second:
                for i, n in enumerate(c.n):
                    if n:
                        key = (int(c.cgroup_id), i >> 1, bool(i & 1))
                        out[key] = out.get(key, 0) + int(n)
            return out
    raise RuntimeError("count caches kept flushing during the read")


def read_cached(bpf: Any, cgroup_id: int, cap: int) -> int:
    return read_cached_counts(bpf).get((cgroup_id, cap, False), 0)
