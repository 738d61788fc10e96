"""`capwatch trace`: the pipeline with the table/JSON writer and the recent-denials store."""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TextIO

from capwatch.attribution.containers import Workload
from capwatch.attribution.workloads import WorkloadFilter
from capwatch.decode.events import Batch, Event
from capwatch.decode.procfs import ProcStatus
from capwatch.diagnose.policy import Policy
from capwatch.pipeline import Clock, Pipeline, Sink, fd_kind_of, status_of

if TYPE_CHECKING:
    from capwatch.kernel.bpf import ProgramConfig
    from capwatch.record.writer import Recorder

__all__ = ["program_config", "run_trace", "trace_pipeline"]


def program_config(args: argparse.Namespace) -> ProgramConfig:
    """The kernel program trace and record load: the same options, one place."""
    from capwatch.kernel.bpf import ProgramConfig

    return ProgramConfig(
        emit_all=args.all,
        unique=args.unique,
        filter_pid=args.pid,
        filter_cap=args.cap,
        outcome=args.outcome,
        check_pages=args.ring_pages,
    )


def trace_pipeline(
    resolve: Callable[[int], Workload],
    sinks: Sequence[Sink],
    *,
    policy: Policy,
    outcome: bool,
    comm: str | None = None,
    keep: WorkloadFilter | None = None,
    unique: bool = False,
    proc_root: str = "/proc",
    note_pid: Callable[[int, int], None] | None = None,
    snapshot: Callable[[Event], ProcStatus | None] | None = None,
    accept: Callable[[Event], bool] | None = None,
    clock: Clock | None = None,
    monotonic_ns: Callable[[], int] | None = None,
    fd_kind: Callable[[int, int], str | None] | None = None,
) -> Pipeline:
    """trace's configuration: both rings, the command-line filters, classified
    like serve's (the same denial makes the same record). A replay passes the
    recording's ``snapshot``, ``clock`` and ``monotonic_ns``, and ``accept``
    for what the kernel filtered live (--pid, --cap)."""
    by_comm = (lambda ev: ev.comm == comm) if comm else None
    return Pipeline(
        resolve,
        sinks,
        policy=policy,
        outcome=outcome,
        accept=_both(by_comm, accept),
        keep=keep if keep is not None and keep.active else None,
        unique=unique,
        snapshot=snapshot or status_of(proc_root),
        fd_kind=fd_kind,
        note_pid=note_pid,
        clock=clock,
        monotonic_ns=monotonic_ns or time.monotonic_ns,
    )


def _both(
    a: Callable[[Event], bool] | None, b: Callable[[Event], bool] | None
) -> Callable[[Event], bool] | None:
    if a is None or b is None:
        return a or b
    return lambda ev: a(ev) and b(ev)


def _tee(
    recorder: Recorder, pipeline: Pipeline
) -> tuple[Callable[[str, Batch], None], Callable[[], None]]:
    """trace --record: each batch to the recording and the pipeline; at each
    tick the recording first, so it holds the identities the pipeline then used."""

    def on_batch(ring: str, batch: Batch) -> None:
        recorder.on_batch(ring, batch)
        pipeline.on_batch(ring, batch)

    def on_tick() -> None:
        recorder.tick()
        pipeline.tick()

    return on_batch, on_tick


def run_trace(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from capwatch.attribution.containers import Attributor
    from capwatch.kernel.session import Session, stop_on_signals
    from capwatch.sinks.recent import RecentDenials
    from capwatch.sinks.render import JsonWriter, TableWriter

    policy = Policy.load(args.policy)
    keep = WorkloadFilter(
        container=args.container, pod=args.pod, namespace=args.namespace, host_only=args.host_only
    )
    config = program_config(args)
    stop = threading.Event()
    stop_on_signals(stop)
    session = Session(config, args.attach, kernel_headers=args.kernel_headers)
    attributor = Attributor(cgroup_root=args.cgroup_root, proc_root=args.proc_root)
    for a in session.program.attempts:
        if a.error is not None:
            err.write(f"capwatch: {a.mode} not used: {a.error}\n")
    what = "every check" if args.all else "distinct checks" if args.unique else "denials"
    err.write(
        f"capwatch: attached via {session.mode} in {session.attach_seconds:.1f}s"
        f" (kernel headers: {session.program.headers.source}); tracing {what}, Ctrl-C to stop\n"
    )
    err.flush()
    as_json = args.json or not out.isatty()
    writer = JsonWriter(out) if as_json else TableWriter(out)
    if args.duration:
        timer = threading.Timer(args.duration, stop.set)
        timer.daemon = True
        timer.start()
    pipeline = trace_pipeline(
        attributor.resolve,
        [writer, RecentDenials(args.state_file)],
        policy=policy,
        outcome=args.outcome,
        comm=args.comm,
        keep=keep,
        unique=args.unique,
        proc_root=args.proc_root,
        note_pid=attributor.note_pid,
        fd_kind=fd_kind_of(args.proc_root),
    )
    on_batch: Callable[[str, Batch], None] = pipeline.on_batch
    on_tick: Callable[[], None] = pipeline.tick
    recorder: Recorder | None = None
    if args.record:
        from capwatch.commands.record import host_facts
        from capwatch.record.writer import Recorder

        recorder = Recorder(
            args.record,
            host_facts(args, session.mode, config),
            attributor.resolve,
            status_of(args.proc_root),
            counts=session.program.read_counts,
            stats=session.program.read_stats,
            note_pid=attributor.note_pid,
        )
        on_batch, on_tick = _tee(recorder, pipeline)
    try:
        session.run(stop, on_batch, on_tick=on_tick)
        pipeline.close()
        if recorder is not None:
            recorder.close()
    finally:
        stats = session.program.read_stats()
        errors = session.decode_errors()
        session.close()
        attributor.close()
        lost = stats["lost_denials"] + stats["lost_checks"]
        err.write(
            f"capwatch: {pipeline.written} shown; lost {lost} (denials {stats['lost_denials']},"
            f" checks {stats['lost_checks']}); rate-limited denials {stats['suppressed']};"
            f" decode errors {errors}\n"
        )
    return 0
