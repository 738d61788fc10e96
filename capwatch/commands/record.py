"""`capwatch record -o FILE`: the rings' records to a file, for replay elsewhere
(`trace/explain/advise/top --from FILE`). See capwatch.record."""

from __future__ import annotations

import argparse
import os
import socket
import threading
import time
from typing import Any, TextIO

from capwatch import __version__
from capwatch.errors import RecordingError
from capwatch.pipeline import Clock, status_of

__all__ = ["boot_time", "host_facts", "run_record"]


def boot_time(proc_root: str = "/proc") -> int | None:
    """The host's boot time (seconds since the epoch), from /proc/stat's btime."""
    try:
        with open(os.path.join(proc_root, "stat")) as f:
            for line in f:
                if line.startswith("btime "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def host_facts(args: argparse.Namespace, mode: str, config: Any) -> dict[str, Any]:
    return {
        "format": 1,
        "capwatch": __version__,
        "kernel": os.uname().release,
        "machine": os.uname().machine,
        "hostname": socket.gethostname(),
        "attach": mode,
        "boot_time": boot_time(args.proc_root),
        "clock_offset_ns": Clock().offset_ns,
        "started": time.time(),
        "config": {
            "emit_all": config.emit_all,
            "unique": config.unique,
            "outcome": config.outcome,
            "filter_pid": config.filter_pid,
            "filter_cap": config.filter_cap,
        },
    }


def run_record(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from capwatch.attribution.containers import Attributor
    from capwatch.commands.trace import program_config
    from capwatch.kernel.session import Session, stop_on_signals
    from capwatch.record.writer import Recorder

    where = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(where) or not os.access(where, os.W_OK):
        raise RecordingError(f"cannot write {args.output}: {where} is not a writable directory")
    config = program_config(args)
    stop = threading.Event()
    stop_on_signals(stop)
    session = Session(config, args.attach, kernel_headers=args.kernel_headers)
    attributor = Attributor(cgroup_root=args.cgroup_root, proc_root=args.proc_root)
    recorder: Recorder | None = None
    try:
        recorder = Recorder(
            args.output,
            host_facts(args, session.mode, config),
            attributor.resolve,
            status_of(args.proc_root),
            counts=session.program.read_counts,
            stats=session.program.read_stats,
            note_pid=attributor.note_pid,
            max_size=args.max_size,
            keep=args.keep,
        )
        what = "every check" if args.all else "distinct checks" if args.unique else "denials"
        err.write(
            f"capwatch: attached via {session.mode}; recording {what} to {args.output},"
            " Ctrl-C to stop\n"
        )
        err.flush()
        if args.duration:
            timer = threading.Timer(args.duration, stop.set)
            timer.daemon = True
            timer.start()
        session.run(stop, recorder.on_batch, on_tick=recorder.tick)
    finally:
        stats = session.program.read_stats()
        if recorder is not None:
            recorder.close()
        session.close()
        attributor.close()
    lost = stats["lost_denials"] + stats["lost_checks"] + stats["lost_outcomes"]
    assert recorder is not None
    err.write(
        f"capwatch: recorded {recorder.events} events in {recorder.file.frames} frames,"
        f" {recorder.file.bytes} bytes ({recorder.file.files} file(s)); lost {lost};"
        f" rate-limited denials {stats['suppressed']}\n"
    )
    return 0
