"""The capwatch command line. The one place errors become a line on stderr."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn, TextIO

from capwatch import __version__
from capwatch.commands.options import (
    add_from,
    add_kernel_opts,
    add_policy,
    add_record_parser,
    add_state_file,
    add_top_parser,
    cap_arg,
    dir_arg,
    duration,
    listen_arg,
    mask_arg,
    positive_int,
    pow2_arg,
)
from capwatch.errors import CapwatchError, UsageError
from capwatch.logs import configure as configure_logging

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line, not usage plus a line."""

    def error(self, message: str) -> NoReturn:
        prog = self.prog.removeprefix("capwatch").strip()
        where = f"{prog}: " if prog else ""
        raise UsageError(f"{where}{message} (see --help)")


def _build_parser() -> _Parser:
    p = _Parser(prog="capwatch", description="See and explain Linux capability checks.")
    p.add_argument("--version", action="version", version=f"capwatch {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    t = sub.add_parser("trace", help="stream capability checks live (denials by default)")
    mode = t.add_mutually_exclusive_group()
    mode.add_argument("--all", action="store_true", help="every check, allowed ones too")
    mode.add_argument("--unique", action="store_true", help="each distinct check once")
    t.add_argument("--pid", type=positive_int, help="only this process (thread group id)")
    t.add_argument("--comm", help="only processes with this command name")
    t.add_argument("--cap", type=cap_arg, help="only this capability (name or number)")
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
    t.add_argument("--duration", type=duration, help="stop after this long (e.g. 30s)")
    add_from(t)
    t.add_argument(
        "--record",
        metavar="FILE",
        help="also record what is traced to FILE (capwatch record's format), to replay with --from",
    )
    t.add_argument(
        "--ring-pages",
        type=pow2_arg,
        default=4096,
        metavar="N",
        help="pages of the ring for allowed checks (--all/--unique; default 4096 = 16 MiB)",
    )
    add_state_file(t)
    add_policy(t)
    add_kernel_opts(t)

    add_record_parser(sub)

    d = sub.add_parser("decode", help="decode a capability mask such as 0000001dbdbeffff")
    d.add_argument("mask", type=mask_arg)
    d.add_argument("--json", action="store_true")

    ps = sub.add_parser("ps", help="capability sets of processes (all by default)")
    ps.add_argument("pids", nargs="*", type=positive_int, metavar="PID")
    ps.add_argument("--json", action="store_true")
    ps.add_argument("--proc-root", type=dir_arg, default="/proc", metavar="DIR")

    sv = sub.add_parser("serve", help="the DaemonSet mode: Prometheus metrics and the denial log")
    sv.add_argument(
        "--listen",
        type=listen_arg,
        default=listen_arg("127.0.0.1:9649"),
        metavar="HOST:PORT",
        help="metrics address (default 127.0.0.1:9649; loopback unless told otherwise)",
    )
    add_policy(sv)
    sv.add_argument(
        "--node",
        "--node-name",
        dest="node",
        help="node name for the log and profiles (default $NODE_NAME or the hostname)",
    )
    sv.add_argument(
        "--kube-api",
        metavar="URL",
        help="Kubernetes API base URL outside a cluster (e.g. kubectl proxy's http://127.0.0.1:8001)",
    )
    sv.add_argument(
        "--profiles",
        action="store_true",
        help="capability profiles of Kubernetes workloads (each distinct allowed check streamed once)",
    )
    sv.add_argument(
        "--profile-refresh",
        type=duration,
        default=300.0,
        help="how often each distinct allowed check is streamed again (last-seen times; default 5m)",
    )
    sv.add_argument(
        "--outcome",
        action="store_true",
        help="join each denial with its syscall's result (hooks every syscall exit)",
    )
    sv.add_argument(
        "--max-series",
        type=positive_int,
        default=5000,
        help="cap on capwatch_checks_total label sets (default 5000)",
    )
    sv.add_argument(
        "--series-ttl",
        type=duration,
        default=600.0,
        help="drop series of cgroups gone and idle this long (default 10m)",
    )
    sv.add_argument(
        "--log-interval",
        type=duration,
        default=60.0,
        help="one log line per distinct denial per interval (default 60s)",
    )
    add_state_file(sv)
    sv.add_argument(
        "--no-drop-privileges",
        dest="drop_privileges",
        action="store_false",
        help="keep all capabilities after attaching",
    )
    add_kernel_opts(sv)

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
            "pid", nargs="?", type=positive_int, metavar="PID", help="watch this process"
        )
        ex.add_argument("--container", help="watch this container (name or id prefix)")
        ex.add_argument(
            "--wait",
            type=duration,
            default=0.0,
            metavar="DURATION",
            help="with --container: wait this long for it to start (default: it must run)",
        )
        ex.add_argument(
            "--duration",
            type=duration,
            default=10.0 if name == "explain" else 30.0,
            help="how long to watch a PID or container (default %(default)ss)",
        )
        add_policy(ex)
        ex.add_argument("--json", action="store_true")
        if name == "advise":
            ex.add_argument(
                "--prometheus",
                metavar="URL",
                help="every Kubernetes workload's least set, from serve --profiles via Prometheus",
            )
            ex.add_argument(
                "--from-serve",
                metavar="URL",
                help="the same from one serve's /metrics (one node, no Prometheus)",
            )
            ex.add_argument("--namespace", help="only workloads of this namespace")
            ex.add_argument("--workload", metavar="KIND/NAME", help="only this workload")
            ex.add_argument(
                "--since",
                type=duration,
                default=7 * 86400.0,
                help="how far back Prometheus looks (default 7d)",
            )
        add_from(ex)
        if name == "explain":
            ex.add_argument(
                "--last",
                type=positive_int,
                nargs="?",
                const=5,
                metavar="N",
                help="explain the N most recent denials trace/serve recorded (default 5)",
            )
            add_state_file(ex)
        add_kernel_opts(ex)

    add_top_parser(sub)

    doc = sub.add_parser("doctor", help="check what this kernel and host support")
    doc.add_argument("--json", action="store_true")
    doc.add_argument("--kernel-headers", type=dir_arg, metavar="DIR")
    return p


def _observe_cmd(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from capwatch.commands import observe

    if args.from_:
        from capwatch.commands import replay

        replay.check_from(args)
        if args.command == "explain":
            return replay.run_explain_from(args, out, err)
        return replay.run_advise_from(args, out, err)

    targets = sum(
        bool(x)
        for x in (
            args.cmd,
            args.pid,
            args.container,
            getattr(args, "last", None),
            getattr(args, "prometheus", None),
            getattr(args, "from_serve", None),
        )
    )
    if targets != 1:
        raise UsageError(
            f"{args.command}: give exactly one of PID, --container NAME, -- COMMAND"
            + (", --last" if args.command == "explain" else ", --prometheus URL, --from-serve URL")
        )
    if args.command == "advise" and (args.prometheus or args.from_serve):
        from capwatch.commands.profile_report import run_profile_report

        return run_profile_report(args, out)
    if args.command == "explain":
        return observe.run_explain(args, out, err)
    return observe.run_advise(args, out, err)


def _run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """One module per command, imported only when it runs (bcc stays off ``--help``)."""
    if args.command == "serve":
        from capwatch.commands.serve import run_serve

        return run_serve(args, out)  # its log is stdout: it configures logging itself
    configure_logging(err)  # stdout is data: module loggers write to stderr
    if args.command == "trace":
        if args.from_:
            from capwatch.commands.replay import run_trace_from

            return run_trace_from(args, out, err)
        from capwatch.commands.trace import run_trace

        return run_trace(args, out, err)
    if args.command == "top":
        from capwatch.commands.top import run_top

        return run_top(args, out, err)
    if args.command == "record":
        from capwatch.commands.record import run_record

        return run_record(args, out, err)
    if args.command in ("explain", "advise"):
        return _observe_cmd(args, out, err)
    from capwatch.commands import info

    if args.command == "decode":
        return info.cmd_decode(args, out)
    if args.command == "ps":
        return info.cmd_ps(args, out)
    return info.cmd_doctor(args, out)


# --- main -------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    out, err = sys.stdout, sys.stderr
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        cmd: list[str] = []
        if argv and argv[0] in ("explain", "advise") and "--" in argv:
            i = argv.index("--")
            argv, cmd = argv[:i], argv[i + 1 :]
        args = _build_parser().parse_args(argv)
        args.cmd = cmd
        return _run(args, out, err)
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
