#!/usr/bin/env python3
"""What a capability check costs with capwatch attached, against the floor and the peers.

One run, variants interleaved (A B C ... then the same in reverse order, and so
on), medians over the repetitions, every figure a ratio to what was measured in
the same run. The workload (bench/workload.c, compiled here with the host's cc)
is a tight loop of settimeofday(NULL, NULL), one CAP_SYS_TIME check each,
pinned to CPU 0 in a fresh cgroup; consumers run on CPU 1. During every run a
second process makes one denied settimeofday every 10 ms: the denials each
consumer received measure flood-proofness.

Variants: nothing attached (baseline); an empty program on the raw tracepoint
(the floor); the counting designs of bench/variants/ (attached and detached by
this process); capwatch's default mode and --all streaming (a Session in its
own process, bench/peers/capwatch_consumer.py); bpftrace counting into a map;
a bcc per-event ring-buffer callback tracer (bench/peers/bcc_ringbuf_peer.py).

Run as root:  python -m bench.bench_overhead [--reps 5] [--calls N] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from bench.peers.runners import (
    BENCH,
    CAPS,
    CONSUMER_CPU,
    WORKLOAD_CPU,
    BccPeer,
    Bpftrace,
    Capwatch,
    Child,
    Env,
    Run,
    Variant,
    cap_capable_attachments,
)
from bench.variants.programs import (
    AttachOnly,
    read_by_cgroup,
    read_cached,
    read_keyed,
    read_shared,
)

TRICKLE_MS = 10
MIN_CPU_SHARE = 0.95  # below: other tasks shared CPU 0 with the workload (noisy run)


# --------------------------------------------------------------------------- machine


def bpf_stats_enabled(proc_root: str = "/proc") -> int:
    """1 when the kernel times every BPF program run (inflates every BPF row)."""
    try:
        return int(Path(proc_root, "sys/kernel/bpf_stats_enabled").read_text())
    except (OSError, ValueError):
        return -1


def tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "absent"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "?"


def bcc_version() -> str:
    try:
        import bcc
    except ImportError:
        return "absent"
    return str(getattr(bcc, "__version__", "?"))


def machine_line(stats: int) -> str:
    return (
        f"{os.cpu_count()} CPUs (nproc), Linux {platform.release()} {platform.machine()}, "
        f"bcc {bcc_version()}, {tool_version(['bpftrace', '--version'])}, "
        f"bpf_stats_enabled={stats}"
    )


# --------------------------------------------------------------------------- cgroup


def unified_root(mountinfo: str = "/proc/self/mountinfo") -> Path:
    for line in Path(mountinfo).read_text().splitlines():
        parts = line.split()
        sep = parts.index("-")
        if parts[sep + 1] == "cgroup2":
            return Path(parts[4])
    raise SystemExit("no cgroup v2 hierarchy mounted: the count map is keyed by cgroup v2 id")


@contextlib.contextmanager
def bench_cgroup() -> Iterator[tuple[Path, int]]:
    """A fresh cgroup v2 directory for the workload: its (cgroup.procs, id)."""
    path = unified_root() / f"capwatch-bench-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        yield path / "cgroup.procs", os.stat(path).st_ino
    finally:
        for _ in range(50):
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def variants() -> list[Variant]:
    return [
        Variant(),
        AttachOnly("floor", "floor: empty program, raw tracepoint", "empty.bpf.c", None),
        AttachOnly(
            "a",
            "(a) per-CPU hash (cgroup, cap, verdict) -> u64 [today's program]",
            "a_pcpu_hash.bpf.c",
            read_keyed,
        ),
        AttachOnly(
            "b",
            "(b) per-CPU hash cgroup -> u64[64 caps x 2 verdicts]",
            "b_pcpu_hash_by_cgroup.bpf.c",
            read_by_cgroup,
        ),
        AttachOnly(
            "c",
            "(c) per-CPU cache of the last cgroup, flushed into (a)",
            "c_cpu_cache.bpf.c",
            read_cached,
        ),
        AttachOnly(
            "d",
            "(d) shared hash (cgroup, cap, verdict), atomic add",
            "d_shared_hash_atomic.bpf.c",
            read_shared,
        ),
        AttachOnly(
            "ref-arr",
            "ref: per-CPU array [cap][verdict] only (no cgroup: not a candidate)",
            "ref_pcpu_array.bpf.c",
            None,
        ),
        AttachOnly(
            "ref-task",
            "ref: the same + bpf_get_current_task() (not a candidate)",
            "ref_pcpu_array_task.bpf.c",
            None,
        ),
        AttachOnly(
            "ref-pid",
            "ref: the same + bpf_get_current_pid_tgid() (not a candidate)",
            "ref_pcpu_array_pidtgid.bpf.c",
            None,
        ),
        AttachOnly(
            "ref-cg",
            "ref: the same + bpf_get_current_cgroup_id() (not a candidate)",
            "ref_pcpu_array_cgid.bpf.c",
            None,
        ),
        Capwatch(emit_all=False),
        Capwatch(emit_all=False, outcome=True),
        Capwatch(emit_all=False, unique=True),
        Capwatch(emit_all=True),
        Bpftrace(raw=False),
        Bpftrace(raw=True),
        BccPeer(),
    ]


# --------------------------------------------------------------------------- one run


def parse_kv(line: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"(\w+)=(-?\d+)", line)}


def count_foreign(env: Env) -> int:
    """Attachments to cap_capable that are not this benchmark's."""
    ours = env.ours | {os.getpid()}
    return sum(1 for pid, _ in cap_capable_attachments() if pid not in ours)


def wait_quiet(env: Env, timeout_s: float) -> None:
    """Give other users of the machine a chance to detach from cap_capable."""
    deadline = time.monotonic() + timeout_s
    while count_foreign(env) and time.monotonic() < deadline:
        time.sleep(0.2)


def run_once(v: Variant, env: Env, rep: int) -> Run:
    run = Run(v.key, rep, env.calls, 0.0, 0.0, 0, 0)
    v.start(env, run)
    trickle: Child | None = None
    try:
        trickle = Child([str(env.workload), "trickle", str(TRICKLE_MS), str(CONSUMER_CPU)], env.tmp)
        trickle.wait_for("ready", timeout=10)
        run.foreign = count_foreign(env)
        v.before_workload(env)
        flood = subprocess.Popen(
            [
                str(env.workload),
                "flood",
                str(env.calls),
                env.kind,
                str(WORKLOAD_CPU),
                str(env.procs),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        out, _ = flood.communicate(timeout=600)
        if flood.returncode != 0:
            raise RuntimeError(f"workload failed ({flood.returncode}): {out}")
        res = parse_kv(out)
        run.foreign = max(run.foreign, count_foreign(env))
        made = parse_kv(trickle.finish(signal.SIGTERM, timeout=10))
        run.denials_made = made["denied"]
        run.ns_per_call = res["cpu_ns"] / res["calls"]
        run.cpu_share = res["cpu_ns"] / res["ns"]
        run.workload_pid, run.trickle_pid, run.t0_ns = flood.pid, trickle.pid, res["t0"]
        v.stop(env, run)
    finally:
        if trickle is not None:
            trickle.kill()
    return run


# --------------------------------------------------------------------------- report


def fmt(x: float | None, spec: str = ".0f", dash: str = "—") -> str:
    return dash if x is None else format(x, spec)


def median_or_none(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarize(
    vs: list[Variant], runs: list[Run], reps: int, calls: int
) -> tuple[list[str], list[str]]:
    """The markdown table and the notes under it."""
    by = {v.key: [r for r in runs if r.variant == v.key] for v in vs}
    base = {r.rep: r.ns_per_call for r in by["baseline"]}
    floor = {r.rep: r.ns_per_call - base[r.rep] for r in by.get("floor", []) if r.rep in base}
    lines = [
        "| variant | ns/call | added ns/check [min, max] | x floor | events/s consumed "
        "| lost | consumer CPU ns/event | consumer RSS MB (peak) | start → attached s "
        "| count map | denials delivered |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    notes: list[str] = []
    for v in vs:
        rs = by[v.key]
        why = v.unsupported()
        if why is not None or not rs:
            lines.append(f"| {v.title} | {why or 'not run'} |  |  |  |  |  |  |  |  |  |")
            continue
        ns = statistics.median(r.ns_per_call for r in rs)
        added = [r.ns_per_call - base[r.rep] for r in rs if r.rep in base]
        ratio = [
            (r.ns_per_call - base[r.rep]) / floor[r.rep]
            for r in rs
            if r.rep in floor and floor[r.rep] > 0
        ]
        if v.key == "baseline":
            added_s, ratio_s = "0", "—"
        else:
            added_s = (
                f"{statistics.median(added):+.0f} [{min(added):+.0f}, {max(added):+.0f}]"
                if added
                else "—"
            )
            ratio_s = f"{statistics.median(ratio):.2f}" if ratio else "—"
        streamed = [r for r in rs if r.received is not None]
        rate_s = fmt(
            median_or_none([r.consumed_per_s for r in streamed if r.consumed_per_s]), ".3g"
        )
        if rate_s != "—":
            rate_s = f"{float(rate_s) / 1e6:.2f} M"
        lost_runs = [r for r in rs if r.lost is not None]
        lost_s = "—"
        if lost_runs:
            lost_med = statistics.median(r.lost or 0 for r in lost_runs)
            lost_s = f"{lost_med:,.0f}/run"
            if v.streams and lost_med:
                lost_s += f" ({100 * lost_med / calls:.0f}%)"
        cpu_ev = [
            r.consumer_cpu_ns / r.received for r in streamed if r.consumer_cpu_ns and r.received
        ]
        cpu_s = fmt(median_or_none(cpu_ev))
        if not v.streams and any(r.consumer_cpu_ns is not None for r in rs):
            tot = median_or_none(
                [r.consumer_cpu_ns / 1e6 for r in rs if r.consumer_cpu_ns is not None]
            )
            cpu_s = f"({fmt(tot, '.0f')} ms/run)"
        rss = median_or_none([r.rss_mb for r in rs if r.rss_mb is not None])
        peak = median_or_none([r.peak_rss_mb for r in rs if r.peak_rss_mb is not None])
        rss_s = "—" if rss is None else f"{rss:.0f} ({fmt(peak)})"
        start = median_or_none([r.startup_s for r in rs if r.startup_s is not None])
        sess = median_or_none([r.session_s for r in rs if r.session_s is not None])
        start_s = fmt(start, ".2f") + (f" (Session {sess:.2f})" if sess is not None else "")
        counted = [r for r in rs if r.count is not None]
        if counted:
            bad = [r for r in counted if r.count != r.calls]
            count_s = (
                f"exact ({len(counted)}/{len(counted)})"
                if not bad
                else f"MISMATCH ({len(bad)}/{len(counted)}: {bad[0].count} vs {bad[0].calls})"
            )
        else:
            count_s = "—"
        got = [r for r in rs if r.denials_got is not None]
        if got:
            g, m = sum(r.denials_got or 0 for r in got), sum(r.denials_made for r in got)
            den_s = f"{g}/{m} ({100 * g / m:.0f}%)" if m else "0/0"
        else:
            den_s = "—"
        lines.append(
            f"| {v.title} | {ns:.0f} | {added_s} | {ratio_s} | {rate_s} | {lost_s} | {cpu_s} "
            f"| {rss_s} | {start_s} | {count_s} | {den_s} |"
        )
        for r in rs:
            if r.note and r.rep == rs[-1].rep:
                notes.append(f"- {v.key}: {r.note}")
            if r.lost_detail and r.lost and r.rep == rs[-1].rep:
                notes.append(f"- {v.key}: lost {r.lost} ({r.lost_detail}) in repetition {r.rep}")
    return lines, notes


# --------------------------------------------------------------------------- main


def build_workload(tmp: Path) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise SystemExit("no C compiler (cc) found: the workload is compiled at run time")
    exe = tmp / "workload"
    subprocess.run([cc, "-O2", "-o", str(exe), str(BENCH / "workload.c")], check=True)
    return exe


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 5; --quick 2)")
    ap.add_argument(
        "--calls",
        type=int,
        default=None,
        help="checks per run (default 3,000,000; --quick 200,000)",
    )
    ap.add_argument("--quick", action="store_true", help="a smoke run: few calls, 2 repetitions")
    ap.add_argument("--workload", choices=sorted(CAPS), default="settime")
    ap.add_argument(
        "--only", default="", help="comma-separated variant keys (baseline and floor always run)"
    )
    ap.add_argument(
        "--retries",
        type=int,
        default=2,
        help="re-run a variant whose run was disturbed (another tracer attached to"
        f" cap_capable, or the workload had under {MIN_CPU_SHARE * 100:.0f} percent of CPU 0)",
    )
    ap.add_argument("--json", type=Path, help="also write every run's figures here")
    ap.add_argument(
        "--allow-bpf-stats", action="store_true", help="measure even if bpf_stats_enabled is 1"
    )
    args = ap.parse_args(argv)
    reps = args.reps or (2 if args.quick else 5)
    calls = args.calls or (200_000 if args.quick else 3_000_000)

    if os.geteuid() != 0:
        raise SystemExit("needs root: loads BPF programs")
    if shutil.which("bpftool") is None:
        raise SystemExit("needs bpftool: it tells when each tracer is attached")
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("needs 2 CPUs: the workload on CPU 0, consumers on CPU 1")
    stats = bpf_stats_enabled()
    print(f"bpf_stats_enabled = {stats}", file=sys.stderr)
    if stats == 1 and not args.allow_bpf_stats:
        raise SystemExit(
            "/proc/sys/kernel/bpf_stats_enabled is 1: the kernel times every BPF run and every"
            " BPF row would be inflated (+100 ns here). Set it to 0, or pass --allow-bpf-stats."
        )
    from capwatch.kernel.headers import find_headers

    os.environ.update(find_headers(None).env)  # the same kernel headers capwatch compiles with
    os.sched_setaffinity(0, {CONSUMER_CPU})  # children inherit; the workload pins itself to 0

    vs = variants()
    if args.only:
        keep = {"baseline", "floor", *args.only.split(",")}
        vs = [v for v in vs if v.key in keep]
    runs: list[Run] = []
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="capwatch-bench-") as tmpdir, bench_cgroup() as cg:
        tmp = Path(tmpdir)
        env = Env(build_workload(tmp), cg[0], cg[1], args.workload, calls, tmp)
        try:
            for v in vs:
                v.prepare(env)
            active = [v for v in vs if v.unsupported() is None]
            for rep in range(reps):
                order = active if rep % 2 == 0 else active[::-1]
                for v in order:
                    for attempt in range(args.retries + 1):
                        wait_quiet(env, 10)
                        run = run_once(v, env, rep)
                        run.attempts = attempt + 1
                        if not run.foreign and run.cpu_share >= MIN_CPU_SHARE:
                            break
                        print(f"rep {rep + 1} {v.key}: noisy run, again", file=sys.stderr)
                    runs.append(run)
                    print(
                        f"rep {rep + 1}/{reps} {v.key:15s} {run.ns_per_call:7.1f} ns/call"
                        f" cpu share {run.cpu_share:.3f}"
                        + (f" foreign attachments {run.foreign}" if run.foreign else ""),
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            for v in vs:
                v.close()
    elapsed = time.monotonic() - t_start

    lines, notes = summarize(vs, runs, reps, calls)
    what = {"settime": "settimeofday(NULL, NULL)", "setuid": "setuid(0)"}[args.workload]
    print(f"# capwatch overhead benchmark\n\nmachine: {machine_line(stats)}")
    print(
        f"workload: {what} x {calls:,} per run (one CAP_{'SYS_TIME' if args.workload == 'settime' else 'SETUID'}"
        f" check each), pinned to CPU {WORKLOAD_CPU}, in a fresh cgroup; consumers on CPU"
        f" {CONSUMER_CPU}; {reps} repetitions interleaved, medians; a denied settimeofday every"
        f" {TRICKLE_MS} ms from another process during every run; {elapsed:.0f} s in all\n"
    )
    print("\n".join(lines))
    print()
    share = min((r.cpu_share for r in runs), default=1.0)
    foreign = sum(1 for r in runs if r.foreign)
    retried = sum(1 for r in runs if r.attempts > 1)
    print(
        "- ns/call: the workload thread's CPU time per call; added = variant - baseline of the"
        " same repetition; x floor = added / the empty program's added, same repetition."
    )
    print(
        f"- workload CPU share (its CPU time / wall time), lowest of all runs: {share:.3f}"
        + (" (other tasks took CPU 0 at times)" if share < 0.97 else "")
    )
    if retried:
        print(f"- {retried} runs were disturbed and measured again (--retries)")
    if foreign:
        print(
            f"- WARNING: {foreign} of {len(runs)} runs had other processes' programs attached"
            " to cap_capable: their cost is in those runs' figures."
        )
    print("\n".join(notes))
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(r) for r in runs], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
