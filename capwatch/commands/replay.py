"""`trace --from`, `explain --from`, `advise --from`: the live configurations of
the pipeline, fed by a recording instead of the rings (capwatch.record.replay).

Attribution, the process sets and the clock are the recording's. A recording
whose last frame was cut replays every whole frame, then says so in one line
and exits 1; a malformed one is one line and exit 1 before anything is shown.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Callable
from typing import TextIO

from capwatch.attribution.workloads import WorkloadFilter
from capwatch.commands.observe import Findings, advice_of
from capwatch.commands.trace import trace_pipeline
from capwatch.decode.events import Event
from capwatch.diagnose.policy import Policy
from capwatch.errors import CapwatchError, UsageError
from capwatch.pipeline import Pipeline
from capwatch.record.replay import Recording

__all__ = ["run_advise_from", "run_explain_from", "run_trace_from"]


def _event_filter(pid: int | None, cap: int | None) -> Callable[[Event], bool] | None:
    """What the kernel filters live (--pid, --cap), applied to a recording."""
    if pid is None and cap is None:
        return None
    return lambda ev: (pid is None or ev.pid == pid) and (cap is None or ev.cap == cap)


def _about(rec: Recording) -> str:
    h = rec.host
    return (
        f"recorded on {h.get('hostname', '?')} (kernel {h.get('kernel', '?')},"
        f" attached via {h.get('attach', '?')}, capwatch {h.get('capwatch', '?')})"
    )


def _finish(rec: Recording, err: TextIO, what: str) -> int:
    err.write(f"capwatch: replayed {rec.events} records from {rec.frames} frames; {what}\n")
    if rec.cut is not None:
        err.write(f"capwatch: {rec.cut}\n")
        return 1
    return 0


def run_trace_from(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from capwatch.sinks.render import JsonWriter, TableWriter

    if args.record:
        raise UsageError("trace: --record and --from together (a recording is already one)")
    rec = Recording(args.from_)
    if args.outcome and not rec.config.get("outcome"):
        raise UsageError("trace --outcome: this recording was made without --outcome")
    if args.all and not rec.config.get("emit_all"):
        err.write("capwatch: this recording holds denials only (recorded without --all)\n")
    err.write(f"capwatch: replaying {', '.join(args.from_)}, {_about(rec)}\n")
    err.flush()
    keep = WorkloadFilter(
        container=args.container, pod=args.pod, namespace=args.namespace, host_only=args.host_only
    )
    as_json = args.json or not out.isatty()
    writer = JsonWriter(out) if as_json else TableWriter(out)
    pipeline = trace_pipeline(
        rec.resolve,
        [writer],
        policy=Policy.load(args.policy),
        outcome=args.outcome,
        comm=args.comm,
        keep=keep,
        unique=args.unique,
        snapshot=rec.snapshot,
        accept=_event_filter(args.pid, args.cap),
        clock=rec.clock,
        monotonic_ns=rec.now_ns,
    )
    rec.feed(pipeline)
    return _finish(rec, err, f"{pipeline.written} shown")


def run_explain_from(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Explain a recording's denials as `explain --last` explains what trace
    kept: trace's pipeline, the recent-denials store, its reader."""
    from capwatch.sinks.recent import RecentDenials, read_recent

    rec = Recording(args.from_)
    keep = WorkloadFilter(container=args.container)
    with tempfile.TemporaryDirectory(prefix="capwatch-explain-") as tmp:
        state = os.path.join(tmp, "recent.json")
        store = RecentDenials(state, limit=100_000)
        pipeline = trace_pipeline(
            rec.resolve,
            [store],
            policy=Policy.load(args.policy),
            outcome=bool(rec.config.get("outcome")),
            keep=keep,
            snapshot=rec.snapshot,
            accept=_event_filter(args.pid, None),
            clock=rec.clock,
            monotonic_ns=rec.now_ns,
        )
        rec.feed(pipeline)
        exps = read_recent(state, args.last or 100_000)
    if args.json:
        out.write(json.dumps([e.to_dict() for e in exps]) + "\n")
    elif exps:
        out.write("\n".join(e.render() for e in exps))
    else:
        out.write("no capability was denied in this recording\n")
    return _finish(rec, err, f"{len(exps)} distinct denials")


def run_advise_from(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """advise's configuration (outcomes joined, allowed checks classified)."""
    rec = Recording(args.from_)
    if not rec.config.get("emit_all"):
        err.write(
            "capwatch: warning: recorded without --all: the capabilities used are not in it,"
            " only the denials\n"
        )
    col = Findings()
    keep = WorkloadFilter(container=args.container)
    accept = _event_filter(args.pid, None)
    pipeline = Pipeline(
        rec.resolve,
        [col],
        policy=Policy.load(args.policy),
        outcome=bool(rec.config.get("outcome")),
        accept=accept,
        keep=keep if keep.active else None,
        classify_allowed=True,
        snapshot=rec.snapshot,
        clock=rec.clock,
        monotonic_ns=rec.now_ns,
    )
    rec.feed(pipeline)
    label = f"pid {args.pid}" if args.pid else args.container or "the recording"
    a = advice_of(col, rec.duration_s, label)
    out.write(json.dumps(a.to_dict()) + "\n" if args.json else a.render())
    return _finish(rec, err, f"{len(col.denials)} denials")


def check_from(args: argparse.Namespace) -> None:
    if getattr(args, "cmd", None):
        raise UsageError(f"{args.command} --from: a recording, not a command to run")
    for p in args.from_:
        if not os.path.isfile(p):
            raise CapwatchError(f"{p}: no such recording")
