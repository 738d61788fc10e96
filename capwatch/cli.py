"""The capwatch command line. The one place errors become a line on stderr."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from capwatch import __version__
from capwatch.caps import CAPS, cap_name, decode_mask, parse_cap, parse_mask
from capwatch.errors import CapwatchError, UsageError
from capwatch.recent import DEFAULT_STATE_FILE

if TYPE_CHECKING:
    from capwatch.events import Batch, Event
    from capwatch.outcome import Joined

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line, not usage plus a line."""

    def error(self, message: str) -> NoReturn:
        prog = self.prog.removeprefix("capwatch").strip()
        where = f"{prog}: " if prog else ""
        raise UsageError(f"{where}{message} (see --help)")


def _positive_int(text: str) -> int:
    try:
        v = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return v


def _duration(text: str) -> float:
    t = text.strip().lower()
    scale = 1.0
    for suffix, mult in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if t.endswith(suffix):
            t, scale = t[: -len(suffix)], mult
            break
    try:
        v = float(t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 10, 10s, 5m)") from None
    if not 0 < v < float("inf"):  # also rejects NaN
        raise argparse.ArgumentTypeError(f"duration must be positive and finite: {text!r}")
    return v


def _pow2_arg(text: str) -> int:
    v = _positive_int(text)
    if v & (v - 1):
        raise argparse.ArgumentTypeError(f"must be a power of two: {text!r}")
    return v


def _dir_arg(text: str) -> str:
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"not a directory: {text!r}")
    return text


def _cap_arg(text: str) -> int:
    try:
        return parse_cap(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _mask_arg(text: str) -> int:
    try:
        return parse_mask(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_kernel_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--attach",
        default="auto",
        choices=["auto", "raw_tracepoint", "tracepoint", "fexit", "kprobe"],
        help="hook to attach to (default: the best that works)",
    )
    p.add_argument("--kernel-headers", type=_dir_arg, metavar="DIR", help="kernel header tree")
    p.add_argument(
        "--proc-root", type=_dir_arg, default="/proc", metavar="DIR", help="procfs (default /proc)"
    )
    p.add_argument(
        "--cgroup-root", type=_dir_arg, metavar="DIR", help="cgroup v2 mount (default: mountinfo)"
    )


def _build_parser() -> _Parser:
    p = _Parser(prog="capwatch", description="See and explain Linux capability checks.")
    p.add_argument("--version", action="version", version=f"capwatch {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    t = sub.add_parser("trace", help="stream capability checks live (denials by default)")
    mode = t.add_mutually_exclusive_group()
    mode.add_argument("--all", action="store_true", help="every check, allowed ones too")
    mode.add_argument("--unique", action="store_true", help="each distinct check once")
    t.add_argument("--pid", type=_positive_int, help="only this process (thread group id)")
    t.add_argument("--comm", help="only processes with this command name")
    t.add_argument("--cap", type=_cap_arg, help="only this capability (name or number)")
    t.add_argument("--container", help="only this container (id prefix or name)")
    t.add_argument("--pod", help="only this Kubernetes pod")
    t.add_argument("--namespace", help="only this Kubernetes namespace")
    t.add_argument("--host-only", action="store_true", help="only processes outside containers")
    t.add_argument("--json", action="store_true", help="JSON lines (default when not a terminal)")
    t.add_argument(
        "--outcome",
        action="store_true",
        help="show each denial's syscall result (cause or probe); hooks every syscall exit",
    )
    t.add_argument("--duration", type=_duration, help="stop after this long (e.g. 30s)")
    t.add_argument(
        "--ring-pages",
        type=_pow2_arg,
        default=4096,
        metavar="N",
        help="pages of the ring for allowed checks (--all/--unique; default 4096 = 16 MiB)",
    )
    t.add_argument(
        "--state-file",
        default=DEFAULT_STATE_FILE,
        metavar="FILE",
        help="where recent denials are kept for explain --last",
    )
    _add_kernel_opts(t)

    d = sub.add_parser("decode", help="decode a capability mask such as 0000001dbdbeffff")
    d.add_argument("mask", type=_mask_arg)
    d.add_argument("--json", action="store_true")

    ps = sub.add_parser("ps", help="capability sets of processes (all by default)")
    ps.add_argument("pids", nargs="*", type=_positive_int, metavar="PID")
    ps.add_argument("--json", action="store_true")
    ps.add_argument("--proc-root", type=_dir_arg, default="/proc", metavar="DIR")

    sv = sub.add_parser("serve", help="the DaemonSet mode: Prometheus metrics and the denial log")
    sv.add_argument(
        "--listen",
        default="127.0.0.1:9649",
        metavar="HOST:PORT",
        help="metrics address (default 127.0.0.1:9649; loopback unless told otherwise)",
    )
    sv.add_argument("--policy", metavar="FILE", help="expected-denials policy (default: shipped)")
    sv.add_argument("--node", help="node name for the log (default $NODE_NAME or the hostname)")
    sv.add_argument(
        "--outcome",
        action="store_true",
        help="join each denial with its syscall's result (hooks every syscall exit)",
    )
    sv.add_argument(
        "--max-series",
        type=_positive_int,
        default=5000,
        help="cap on capwatch_checks_total label sets (default 5000)",
    )
    sv.add_argument(
        "--series-ttl",
        type=_duration,
        default=600.0,
        help="drop series of cgroups gone and idle this long (default 10m)",
    )
    sv.add_argument(
        "--log-interval",
        type=_duration,
        default=60.0,
        help="one log line per distinct denial per interval (default 60s)",
    )
    sv.add_argument(
        "--state-file",
        default=DEFAULT_STATE_FILE,
        metavar="FILE",
        help="where recent denials are kept for explain --last",
    )
    sv.add_argument(
        "--no-drop-privileges",
        dest="drop_privileges",
        action="store_false",
        help="keep all capabilities after attaching",
    )
    _add_kernel_opts(sv)

    for name, helptext in (
        ("explain", "why a command, process or container was denied, and how to fix it"),
        ("advise", "the least capabilities a command, process or container needs"),
    ):
        ex = sub.add_parser(
            name,
            help=helptext,
            usage=f"capwatch {name} [options] (PID | --container NAME | -- COMMAND ...)",
        )
        ex.add_argument(
            "pid", nargs="?", type=_positive_int, metavar="PID", help="watch this process"
        )
        ex.add_argument("--container", help="watch this container (name or id prefix)")
        ex.add_argument(
            "--wait",
            type=_duration,
            default=0.0,
            metavar="DURATION",
            help="with --container: wait this long for it to start (default: it must run)",
        )
        ex.add_argument(
            "--duration",
            type=_duration,
            default=10.0 if name == "explain" else 30.0,
            help="how long to watch a PID or container (default %(default)ss)",
        )
        ex.add_argument(
            "--policy", metavar="FILE", help="expected-denials policy (default: shipped)"
        )
        ex.add_argument("--json", action="store_true")
        if name == "explain":
            ex.add_argument(
                "--last",
                type=_positive_int,
                nargs="?",
                const=5,
                metavar="N",
                help="explain the N most recent denials trace/serve recorded (default 5)",
            )
            ex.add_argument(
                "--state-file",
                default=DEFAULT_STATE_FILE,
                metavar="FILE",
                help=f"where trace and serve record recent denials ({DEFAULT_STATE_FILE})",
            )
        _add_kernel_opts(ex)

    doc = sub.add_parser("doctor", help="check what this kernel and host support")
    doc.add_argument("--json", action="store_true")
    doc.add_argument("--kernel-headers", type=_dir_arg, metavar="DIR")
    return p


# --- decode -----------------------------------------------------------------


def cmd_decode(args: argparse.Namespace, out: TextIO) -> int:
    dec = decode_mask(args.mask)
    if args.json:
        out.write(json.dumps(dec.to_dict()) + "\n")
        return 0
    out.write(f"mask 0x{dec.mask:016x}: {dec.headline()}\n")
    for c in CAPS:
        mark = "+" if c.number in dec.present else "-"
        out.write(f"  {mark} {c.number:>2} {c.name:<24} {c.summary}\n")
    for b in dec.unknown_bits:
        out.write(f"  + {b:>2} {cap_name(b):<24} (not a capability this table knows)\n")
    absent = ", ".join(cap_name(n) for n in dec.absent) or "none"
    out.write(f"absent: {absent}\n")
    return 0


# --- ps ---------------------------------------------------------------------


def _set_names(mask: int) -> str:
    dec = decode_mask(mask)
    if not dec.absent and not dec.unknown_bits:
        return "=all"
    if not dec.present and not dec.unknown_bits:
        return "none"
    if len(dec.absent) < len(dec.present):
        return "all except " + ",".join(cap_name(n)[4:].lower() for n in dec.absent)
    return ",".join(cap_name(n)[4:].lower() for n in dec.present)


def cmd_ps(args: argparse.Namespace, out: TextIO) -> int:
    from capwatch import procfs

    explicit = bool(args.pids)
    pids = args.pids or procfs.list_pids(proc_root=args.proc_root)
    rows: list[dict[str, Any]] = []
    for pid in pids:
        try:
            st = procfs.read_status(pid, proc_root=args.proc_root)
        except CapwatchError:
            if explicit:
                raise
            continue  # the process exited while we listed
        rows.append(
            {
                "pid": st.pid,
                "name": st.name,
                "uid": st.uid,
                **{k: f"{v:016x}" for k, v in st.caps().items()},
                "effective": [cap_name(n) for n in decode_mask(st.cap_eff).present],
                "bounding_lacks": [cap_name(n) for n in decode_mask(st.cap_bnd).absent],
            }
        )
        if not args.json:
            if len(rows) == 1:
                out.write(f"{'PID':>7} {'NAME':<15} {'UID':>5} {'CapEff':<16} EFFECTIVE\n")
            out.write(
                f"{st.pid:>7} {st.name[:15]:<15} {st.uid:>5} {st.cap_eff:016x} {_set_names(st.cap_eff)}\n"
            )
            if explicit:
                for k, v in st.caps().items():
                    out.write(f"{'':>7} {k}: {v:016x} {_set_names(v)}\n")
    if args.json:
        out.write(json.dumps(rows) + "\n")
    return 0


# --- trace ------------------------------------------------------------------


def cmd_trace(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from capwatch import _bpf
    from capwatch.containers import Attributor
    from capwatch.events import events_from_batch
    from capwatch.outcome import OutcomeJoiner
    from capwatch.recent import RecentDenials, with_caps
    from capwatch.render import Clock, JsonWriter, TableWriter, to_record
    from capwatch.session import Session, stop_on_signals
    from capwatch.workloads import HoldQueue, WorkloadFilter, make_identity

    keep = WorkloadFilter(
        container=args.container, pod=args.pod, namespace=args.namespace, host_only=args.host_only
    )
    attributor = Attributor(cgroup_root=args.cgroup_root, proc_root=args.proc_root)
    identity = make_identity(attributor)
    config = _bpf.ProgramConfig(
        emit_all=args.all,
        unique=args.unique,
        filter_pid=args.pid,
        filter_cap=args.cap,
        outcome=args.outcome,
        check_pages=args.ring_pages,
    )
    stop = threading.Event()
    stop_on_signals(stop)
    session = Session(config, args.attach, kernel_headers=args.kernel_headers)
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
    writer: JsonWriter | TableWriter = JsonWriter(out) if as_json else TableWriter(out)
    clock = Clock()
    if args.duration:
        timer = threading.Timer(args.duration, stop.set)
        timer.daemon = True
        timer.start()
    seen: set[tuple[Any, ...]] = set()
    shown = 0

    def show_joined(j: Joined) -> None:
        show(j.event, j)

    def show(ev: Event, joined: Joined | None = None) -> None:
        nonlocal shown
        rec = to_record(ev, clock, identity)
        if not keep(rec):
            return
        if joined is not None and ev.denied:
            rec.update(joined.fields())
        if args.unique:
            key = (rec["container"], rec["comm"], ev.cap, ev.denied, ev.syscall_nr)
            if key in seen:
                return
            seen.add(key)
        writer.write(rec)
        shown += 1
        if ev.denied:
            recent.add(rec if rec in recent else with_caps(rec, args.proc_root))

    recent = RecentDenials(args.state_file)
    joiner = OutcomeJoiner(show_joined) if args.outcome else None
    hold = HoldQueue(
        attributor.resolve,
        joiner.feed if joiner is not None else show,
        note_pid=attributor.note_pid,
    )

    def tick() -> None:
        hold.flush()
        if joiner is not None:
            joiner.expire(time.monotonic_ns())
        recent.flush()

    def on_batch(_ring: str, batch: Batch) -> None:
        for ev in events_from_batch(batch):
            if args.comm and ev.comm != args.comm:
                continue
            hold.push(ev)

    try:
        session.run(stop, on_batch, on_tick=tick)
        hold.flush(force=True)
        if joiner is not None:
            joiner.flush()
        recent.flush(force=True)
    finally:
        stats = session.program.read_stats()
        errors = session.decode_errors()
        session.close()
        attributor.close()
        lost = stats["lost_denials"] + stats["lost_checks"]
        err.write(
            f"capwatch: {shown} shown; lost {lost} (denials {stats['lost_denials']},"
            f" checks {stats['lost_checks']}); rate-limited denials {stats['suppressed']};"
            f" decode errors {errors}\n"
        )
    return 0


# --- doctor -----------------------------------------------------------------


def cmd_doctor(args: argparse.Namespace, out: TextIO) -> int:
    from capwatch.doctor import run_doctor

    report = run_doctor(kernel_headers=args.kernel_headers)
    if args.json:
        out.write(json.dumps(report.to_dict()) + "\n")
    else:
        out.write(report.render())
    return 0 if report.ok else 1


def _observe_cmd(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from capwatch import observe

    targets = sum(
        bool(x) for x in (args.cmd, args.pid, args.container, getattr(args, "last", None))
    )
    if targets != 1:
        raise UsageError(
            f"{args.command}: give exactly one of PID, --container NAME, -- COMMAND"
            + (", --last" if args.command == "explain" else "")
        )
    if args.command == "explain":
        return observe.run_explain(args, out, err)
    return observe.run_advise(args, out, err)


def _serve(args: argparse.Namespace, out: TextIO) -> int:
    from capwatch.serve import run_serve

    return run_serve(args, out)


# --- main -------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    out, err = sys.stdout, sys.stderr
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "decode": lambda a: cmd_decode(a, out),
        "ps": lambda a: cmd_ps(a, out),
        "trace": lambda a: cmd_trace(a, out, err),
        "doctor": lambda a: cmd_doctor(a, out),
        "serve": lambda a: _serve(a, out),
        "explain": lambda a: _observe_cmd(a, out, err),
        "advise": lambda a: _observe_cmd(a, out, err),
    }
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        cmd: list[str] = []
        if argv and argv[0] in ("explain", "advise") and "--" in argv:
            i = argv.index("--")
            argv, cmd = argv[:i], argv[i + 1 :]
        args = _build_parser().parse_args(argv)
        args.cmd = cmd
        return commands[args.command](args)
    except CapwatchError as exc:
        err.write(f"capwatch: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (capwatch trace | head): not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        return 0
    except Exception as exc:  # a bug: still one line, unless asked for the traceback
        if os.environ.get("CAPWATCH_DEBUG"):
            raise
        err.write(
            f"capwatch: internal error: {type(exc).__name__}: {' '.join(str(exc).split())}"
            " (set CAPWATCH_DEBUG=1 for the traceback, and please report it)\n"
        )
        return 70


if __name__ == "__main__":
    sys.exit(main())
