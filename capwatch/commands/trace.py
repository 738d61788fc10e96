"""`capwatch trace`: the pipeline with the table/JSON writer and the recent-denials store.

With --outcome and one target (--pid, or a --container running in one cgroup)
the kernel also sends the target's syscalls refused with EPERM/EACCES and no
capability denied (seccomp, file capabilities, file modes...): each is shown
with its verdict, evidence and fix, and kept so in the state file.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TextIO

from capwatch.attribution.cgroups import live_member
from capwatch.attribution.containers import Workload
from capwatch.attribution.workloads import WorkloadFilter
from capwatch.decode.events import Batch, Event
from capwatch.decode.procfs import ProcStatus
from capwatch.decode.syscalls import syscall_name
from capwatch.diagnose.policy import Policy
from capwatch.diagnose.refusals import (
    RefusalFacts,
    gather,
    not_a_refusal,
    tolerated_runtime,
    with_stand_in,
)
from capwatch.errors import CapwatchError
from capwatch.pipeline import Clock, Pipeline, Sink, fd_kind_of, status_of

if TYPE_CHECKING:
    from capwatch.kernel.bpf import ProgramConfig
    from capwatch.record.writer import Recorder

__all__ = [
    "REFUSALS_NEED_ONE_TARGET",
    "program_config",
    "refusal_evidence",
    "run_trace",
    "trace_pipeline",
]

REFUSALS_NEED_ONE_TARGET = (
    "capwatch: note: refusals that no capability explains (seccomp, file capabilities,"
    " file permissions, LSMs...) are shown only for one target: --pid PID, or --container"
    " NAME running in one cgroup\n"
)


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
    refusal_facts: Callable[[Event], RefusalFacts | None] | None = None,
    clock: Clock | None = None,
    monotonic_ns: Callable[[], int] | None = None,
    fd_kind: Callable[[int, int], str | None] | None = None,
) -> Pipeline:
    """trace's configuration: both rings, the command-line filters, classified
    like serve's (the same denial makes the same record). A replay passes the
    recording's ``snapshot``, ``clock`` and ``monotonic_ns``, and ``accept``
    for what the kernel filtered live (--pid, --cap). ``refusal_facts`` reads a
    refusal's evidence on arrival (live only: :func:`refusal_evidence`)."""
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
        refusal_facts=refusal_facts,
        note_pid=note_pid,
        clock=clock,
        monotonic_ns=monotonic_ns or time.monotonic_ns,
    )


def refusal_evidence(
    resolve: Callable[[int], Workload],
    path_of: Callable[[int, int], str | None],
    *,
    proc_root: str = "/proc",
    cgroup_root: str | None = None,
) -> Callable[[Event], RefusalFacts | None]:
    """What a refusal record needs, read when it arrives: the process's status, the
    path it named (``path_of``: the kernel's map) and that file; a process already
    gone is stood in for by a live one of its cgroup (the same bounding set, seccomp
    filter and root). None for a runtime's tolerated set-up refusals."""

    def read(ev: Event) -> RefusalFacts | None:
        syscall = syscall_name(ev.syscall_nr)
        if tolerated_runtime(ev.comm, syscall) or not_a_refusal(syscall, ev.ret):
            return None
        w = resolve(ev.cgroup_id)
        facts = gather(
            syscall=syscall,
            ret=ev.ret,
            comm=ev.comm,
            pid=ev.pid,
            uid=ev.uid,
            path=path_of(ev.tid, ev.syscall_nr),
            proc_root=proc_root,
            entered=ev.entered,
            kind="kubernetes" if w.kind == "kubernetes" or w.pod else (w.runtime or w.kind),
        )
        if facts.seccomp is None or (facts.file is not None and not facts.file.exists):
            other = live_member(cgroup_root, w.cgroup_path, ev.pid, proc_root=proc_root)
            if other is not None:
                facts = with_stand_in(facts, other, proc_root)
        return facts

    return read


def _one_target(args: argparse.Namespace, err: TextIO) -> tuple[bool, int | None]:
    """Whether refusals can be shown (--outcome, one target), and the cgroup to filter
    on in the kernel for --container (one running container in one cgroup)."""
    if not args.outcome:
        return False, None
    if args.pid:
        return True, None
    if args.container and not (args.pod or args.namespace or args.host_only):
        from capwatch.commands.observe import container_cgroups

        with contextlib.suppress(CapwatchError):
            _, cgroups = container_cgroups(args, args.container)
            if len(cgroups) == 1:
                return True, next(iter(cgroups))
    err.write(REFUSALS_NEED_ONE_TARGET)
    return False, None


def _both(
    a: Callable[[Event], bool] | None, b: Callable[[Event], bool] | None
) -> Callable[[Event], bool] | None:
    if a is None or b is None:
        return a or b
    return lambda ev: a(ev) and b(ev)


def _recorded_snapshot(recorder: Recorder) -> Callable[[Event], ProcStatus | None]:
    def get(ev: Event) -> ProcStatus | None:
        return recorder.snapshots.get(ev.pid, ev.uid, ev.comm)

    return get


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
    refusals, cgroup = _one_target(args, err)
    config = program_config(args)
    if refusals:  # the kernel filters on the target: nothing else pays
        config = dataclasses.replace(
            config, refusals=True, filter_cgroup=cgroup or config.filter_cgroup
        )
    stop = threading.Event()
    stop_on_signals(stop)
    session = Session(config, args.attach, kernel_headers=args.kernel_headers)
    attributor = Attributor(cgroup_root=args.cgroup_root, proc_root=args.proc_root)
    for a in session.program.attempts:
        if a.error is not None:
            err.write(f"capwatch: {a.mode} not used: {a.error}\n")
    what = "every check" if args.all else "distinct checks" if args.unique else "denials"
    what += " and refused syscalls" if refusals else ""
    err.write(
        f"capwatch: attached via {session.mode} in {session.attach_seconds:.1f}s"
        f" (kernel headers: {session.program.headers.source}); tracing {what}, Ctrl-C to stop\n"
    )
    err.flush()
    as_json = args.json or not out.isatty()
    writer = (JsonWriter if as_json else TableWriter)(out, verdicts=refusals)
    if args.duration:
        timer = threading.Timer(args.duration, stop.set)
        timer.daemon = True
        timer.start()
    recorder: Recorder | None = None
    snapshot: Callable[[Event], ProcStatus | None] | None = None
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
        # One read of a denying process's sets, the recording's (it sees each batch
        # first): the live trace then shows what a replay of the file will show,
        # never a second read that a process gone meanwhile makes differ.
        snapshot = _recorded_snapshot(recorder)
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
        snapshot=snapshot,
        fd_kind=fd_kind_of(args.proc_root),
        refusal_facts=(
            refusal_evidence(
                attributor.resolve,
                session.program.refusal_path,
                proc_root=args.proc_root,
                cgroup_root=attributor.cgroup_root,
            )
            if refusals
            else None
        ),
    )
    on_batch: Callable[[str, Batch], None] = pipeline.on_batch
    on_tick: Callable[[], None] = pipeline.tick
    if recorder is not None:
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
