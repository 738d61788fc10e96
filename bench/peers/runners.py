"""How the benchmark runs what it measures: the variant protocol, and the
consumers that run as their own processes (capwatch's Session, bpftrace, the
bcc peer), with the /proc and bpftool readings that measure them."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent.parent
BENCH = REPO / "bench"
CAPS = {"settime": 25, "setuid": 7}  # CAP_SYS_TIME, CAP_SETUID
WORKLOAD_CPU, CONSUMER_CPU = 0, 1
BPFTRACE_TP = "tracepoint:capability:cap_capable { @[args->cap, args->ret] = count(); }"
BPFTRACE_RAW = "rawtracepoint:cap_capable { @[arg3, arg4] = count(); }"


# --------------------------------------------------------------------------- processes


def cpu_ns(pid: int, proc_root: str = "/proc") -> int:
    """CPU time of every live thread of ``pid`` (schedstat: ns, not 10 ms ticks)."""
    total = 0
    for task in Path(proc_root, str(pid), "task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


def rss_mb(pid: int, proc_root: str = "/proc") -> tuple[float, float]:
    """(resident now, peak resident) in MiB, from /proc/PID/status."""
    got = {}
    for line in Path(proc_root, str(pid), "status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            got[line[:5]] = int(line.split()[1]) / 1024
    return got.get("VmRSS", float("nan")), got.get("VmHWM", float("nan"))


def cap_capable_attachments() -> list[tuple[int, str]]:
    """(pid, kind) of every BPF attachment to cap_capable, from `bpftool perf list`."""
    out = subprocess.run(
        ["bpftool", "-j", "perf", "list"], capture_output=True, text=True, timeout=10, check=False
    )
    try:
        rows = json.loads(out.stdout or "[]")
    except json.JSONDecodeError:
        return []
    return [
        (int(r["pid"]), str(r.get("fd_type")))
        for r in rows
        if r.get("tracepoint") == "cap_capable" or r.get("func") == "cap_capable"
    ]


class Child:
    """A child process whose stdout is read line by line with a deadline."""

    def __init__(self, argv: list[str], stderr_dir: Path, **kw: Any) -> None:
        self.t0 = time.monotonic()
        self.argv = argv
        self.err_path = stderr_dir / f"stderr-{uuid.uuid4().hex[:8]}"
        with self.err_path.open("wb") as err:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, **kw)
        assert self.proc.stdout is not None
        self._fd = self.proc.stdout.fileno()
        self._buf = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def readline(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._fd], [], [], left)[0]:
                raise RuntimeError(f"{self.describe()}: no output within {timeout:.0f} s")
            chunk = os.read(self._fd, 65536)
            if not chunk:
                raise RuntimeError(f"{self.describe()}: exited early")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def wait_for(self, marker: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = self.readline(max(0.1, deadline - time.monotonic()))
            if marker in line:
                return line

    def finish(self, sig: int, timeout: float = 60) -> str:
        """Signal, wait, and return the rest of stdout."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        out, _ = self.proc.communicate(timeout=timeout)
        return (self._buf + (out or b"")).decode()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def describe(self) -> str:
        err = self.err_path.read_text(errors="replace").strip().splitlines()[-3:]
        return f"{Path(self.argv[0]).name} (pid {self.pid}; stderr: {' | '.join(err)})"


def wait_attached(child: Child, timeout: float = 60) -> float:
    """Seconds from the child's start until bpftool sees it attached to cap_capable."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(pid == child.pid for pid, _ in cap_capable_attachments()):
            return time.monotonic() - child.t0
        if child.proc.poll() is not None:
            raise RuntimeError(f"{child.describe()}: exited before attaching")
        time.sleep(0.005)
    raise RuntimeError(f"{child.describe()}: not attached after {timeout:.0f} s")


def wait_drained(pid: int, quiet_ns: int = 2_000_000, step_s: float = 0.1) -> int:
    """Wait until ``pid`` stops using CPU (it has consumed its backlog); its CPU ns."""
    prev = cpu_ns(pid)
    for _ in range(600):
        time.sleep(step_s)
        now = cpu_ns(pid)
        if now - prev < quiet_ns:
            return now
        prev = now
    return prev


# --------------------------------------------------------------------------- runs


@dataclasses.dataclass
class Run:
    """One variant, one repetition."""

    variant: str
    rep: int
    calls: int
    ns_per_call: float
    cpu_share: float  # the workload's CPU time / its wall time (1.0: CPU 0 was all ours)
    foreign: int  # attachments to cap_capable by other processes during the run
    denials_made: int
    denials_got: int | None = None
    startup_s: float | None = None
    session_s: float | None = None
    received: int | None = None
    lost: int | None = None
    lost_detail: str = ""
    consumed_per_s: float | None = None
    consumer_cpu_ns: int | None = None
    rss_mb: float | None = None  # at the end of the run
    peak_rss_mb: float | None = None  # includes the BPF compile (clang inside bcc)
    count: int | None = None
    note: str = ""
    attempts: int = 1
    workload_pid: int = 0
    trickle_pid: int = 0
    t0_ns: int = 0  # CLOCK_MONOTONIC start of the workload's loop


@dataclasses.dataclass
class Env:
    workload: Path
    procs: Path
    cgroup_id: int
    kind: str
    calls: int
    tmp: Path
    ours: set[int] = dataclasses.field(default_factory=set)

    @property
    def cap(self) -> int:
        return CAPS[self.kind]


class Variant:
    """Baseline: nothing attached. Subclasses attach something around the workload."""

    key = "baseline"
    title = "baseline: nothing attached"
    streams = False  # every check crosses a ring buffer to a consumer

    def prepare(self, env: Env) -> None:
        """Once, before the first repetition (compile, probe support)."""

    def start(self, env: Env, run: Run) -> None:
        """Attach; fill ``run.startup_s`` where it means something."""

    def before_workload(self, env: Env) -> None:
        """Just before the workload starts (snapshots)."""

    def stop(self, env: Env, run: Run) -> None:
        """After the workload and the trickle ended: drain, read, detach."""

    def close(self) -> None:
        """Once, at the end."""

    def unsupported(self) -> str | None:
        return None


class ConsumerProcess(Variant):
    """A tracer in its own process (pinned, like this one, to the consumer CPU)."""

    stop_signal = signal.SIGTERM
    ready_marker = "ready"

    def __init__(self) -> None:
        self.child: Child | None = None
        self.cpu0 = 0

    def argv(self, env: Env) -> list[str]:
        raise NotImplementedError

    def start(self, env: Env, run: Run) -> None:
        self.child = Child(self.argv(env), env.tmp, cwd=REPO)
        try:
            first = self.child.wait_for(self.ready_marker, timeout=120)
            run.startup_s = wait_attached(self.child)
        except BaseException:
            self.child.kill()
            raise
        self.on_ready(first, run)
        env.ours.add(self.child.pid)

    def on_ready(self, line: str, run: Run) -> None:
        pass

    def before_workload(self, env: Env) -> None:
        assert self.child is not None
        self.cpu0 = cpu_ns(self.child.pid)

    def stop(self, env: Env, run: Run) -> None:
        child = self.child
        assert child is not None
        try:
            cpu1 = wait_drained(child.pid)
            run.consumer_cpu_ns = cpu1 - self.cpu0
            run.rss_mb, run.peak_rss_mb = rss_mb(child.pid)
            out = child.finish(self.stop_signal)
        except BaseException:
            child.kill()
            raise
        finally:
            env.ours.discard(child.pid)
        if child.proc.returncode not in (0, -self.stop_signal):
            raise RuntimeError(f"{child.describe()}: exit status {child.proc.returncode}")
        self.parse(out, env, run)

    def parse(self, out: str, env: Env, run: Run) -> None:
        raise NotImplementedError


def last_json(out: str) -> dict[str, Any]:
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            return dict(json.loads(line))
    raise RuntimeError(f"no JSON report in consumer output: {out[-300:]!r}")


def rate(received: int, last_event_ns: int, t0_ns: int) -> float | None:
    if received <= 0 or last_event_ns <= t0_ns:
        return None
    return received / ((last_event_ns - t0_ns) / 1e9)


class Capwatch(ConsumerProcess):
    def __init__(self, emit_all: bool, outcome: bool = False, unique: bool = False) -> None:
        super().__init__()
        self.emit_all = emit_all
        self.outcome = outcome
        self.unique = unique
        self.streams = emit_all
        self.key = (
            "cw-all"
            if emit_all
            else "cw-outcome"
            if outcome
            else "cw-profiles"
            if unique
            else "cw-default"
        )
        self.title = (
            "capwatch --all (every check to the ring, Session batches)"
            if emit_all
            else "capwatch --outcome (default + a syscall-exit hook on every syscall)"
            if outcome
            else "capwatch serve --profiles (default + each distinct allowed check once)"
            if unique
            else "capwatch default (counts in the map, denials to the ring)"
        )
        self.ready_marker = "attach_s"

    def argv(self, env: Env) -> list[str]:
        return [
            sys.executable,
            "-m",
            "bench.peers.capwatch_consumer",
            *(["--all"] if self.emit_all else []),
            *(["--outcome"] if self.outcome else []),
            *(["--unique"] if self.unique else []),
            f"--cgroup-id={env.cgroup_id}",
            f"--cap={env.cap}",
        ]

    def on_ready(self, line: str, run: Run) -> None:
        info = json.loads(line)
        run.session_s = float(info["attach_s"])
        run.note = f"mode {info['mode']}"

    def parse(self, out: str, env: Env, run: Run) -> None:
        rep = last_json(out)
        by_ring = {r: {int(k): n for k, n in d.items()} for r, d in rep["by_ring"].items()}
        run.count = int(rep["count"])
        run.denials_got = by_ring.get("denials", {}).get(run.trickle_pid << 8 | CAPS["settime"], 0)
        stats = rep["stats"]
        if self.emit_all:
            run.received = by_ring.get("checks", {}).get(run.workload_pid << 8 | env.cap, 0)
            run.lost = int(stats["lost_checks"])
            run.lost_detail = f"calls-received={run.calls - run.received}"
            run.consumed_per_s = rate(run.received, int(rep["last_event_ns"]), run.t0_ns)
        else:
            run.lost = int(stats["lost_denials"])
        if rep["decode_errors"]:
            run.note += f", {rep['decode_errors']} decode errors"


class BccPeer(ConsumerProcess):
    key = "bcc-ringbuf"
    title = "peer: bcc ring buffer, per-event Python callback"
    streams = True

    def argv(self, env: Env) -> list[str]:
        return [sys.executable, str(BENCH / "peers" / "bcc_ringbuf_peer.py")]

    def parse(self, out: str, env: Env, run: Run) -> None:
        rep = last_json(out)
        tally = rep["by_pid_cap"]
        run.received = tally.get(f"{run.workload_pid}/{env.cap}", [0, 0])[0]
        run.lost = run.calls - run.received
        run.lost_detail = "calls-received"
        run.denials_got = tally.get(f"{run.trickle_pid}/{CAPS['settime']}", [0, 0])[1]
        run.consumed_per_s = rate(run.received, int(rep["last_event_ns"]), run.t0_ns)


class Bpftrace(ConsumerProcess):
    stop_signal = signal.SIGINT
    ready_marker = "Attaching"

    def __init__(self, raw: bool) -> None:
        super().__init__()
        self.raw = raw
        self.program = BPFTRACE_RAW if raw else BPFTRACE_TP
        self.key = "bpftrace-rawtp" if raw else "bpftrace-tp"
        self.title = f"peer: bpftrace `{self.program}`"
        self.reason: str | None = None

    def prepare(self, env: Env) -> None:
        if shutil.which("bpftrace") is None:
            self.reason = "bpftrace is not installed"
        elif self.raw:
            # bpftrace's rawtracepoint probe type is newer than some distributions' bpftrace.
            probe = subprocess.run(
                ["bpftrace", "-e", f"{self.program} BEGIN {{ exit(); }}"],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            if probe.returncode != 0:
                lines = [ln for ln in probe.stderr.splitlines() if "RLIMIT_MEMLOCK" not in ln]
                self.reason = f"unusable here: {' '.join(lines)[:160]}"

    def unsupported(self) -> str | None:
        return self.reason

    def argv(self, env: Env) -> list[str]:
        return ["bpftrace", "-e", self.program]

    def parse(self, out: str, env: Env, run: Run) -> None:
        counts = {
            (int(m[1]), int(m[2])): int(m[3])
            for m in re.finditer(r"^@\[(-?\d+), (-?\d+)\]: (\d+)$", out, re.M)
        }
        # Not keyed by pid or cgroup: every process's CAP_SYS_TIME checks are in here.
        run.note = f"@[{env.cap}, 0]={counts.get((env.cap, 0), 0)} (all processes)"
        run.denials_got = counts.get((env.cap, -1), 0)
