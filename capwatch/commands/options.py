"""Option types and the options several commands share, defined once."""

from __future__ import annotations

import argparse
import os
from typing import Any

from capwatch.decode.caps import parse_cap, parse_mask
from capwatch.listen import Listen, listen_type
from capwatch.sinks.recent import DEFAULT_STATE_FILE

__all__ = [
    "add_from",
    "add_kernel_opts",
    "add_policy",
    "add_record_parser",
    "add_state_file",
    "add_top_parser",
    "cap_arg",
    "dir_arg",
    "duration",
    "listen_arg",
    "mask_arg",
    "positive_int",
    "pow2_arg",
    "size_arg",
]


def positive_int(text: str) -> int:
    try:
        v = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return v


def duration(text: str) -> float:
    t = text.strip().lower()
    scale = 1.0
    for suffix, mult in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0), ("d", 86400.0)):
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


def pow2_arg(text: str) -> int:
    v = positive_int(text)
    if v & (v - 1):
        raise argparse.ArgumentTypeError(f"must be a power of two: {text!r}")
    return v


def dir_arg(text: str) -> str:
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"not a directory: {text!r}")
    return text


def cap_arg(text: str) -> int:
    try:
        return parse_cap(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def mask_arg(text: str) -> int:
    try:
        return parse_mask(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def listen_arg(text: str) -> Listen:
    """HOST:PORT, [IPv6]:PORT -> Listen, checked when the command line is parsed."""
    return listen_type(text)


def add_kernel_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--attach",
        default="auto",
        choices=["auto", "raw_tracepoint", "tracepoint", "fexit", "kprobe"],
        help="hook to attach to (default: the best that works)",
    )
    p.add_argument("--kernel-headers", type=dir_arg, metavar="DIR", help="kernel header tree")
    p.add_argument(
        "--proc-root", type=dir_arg, default="/proc", metavar="DIR", help="procfs (default /proc)"
    )
    p.add_argument(
        "--cgroup-root", type=dir_arg, metavar="DIR", help="cgroup v2 mount (default: mountinfo)"
    )


def add_state_file(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state-file",
        default=DEFAULT_STATE_FILE,
        metavar="FILE",
        help=f"where trace and serve keep recent denials for explain --last ({DEFAULT_STATE_FILE})",
    )


def add_policy(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", metavar="FILE", help="expected-denials policy (default: shipped)")


def size_arg(text: str) -> int:
    """A size in bytes: 1048576, 512K, 100M, 2G."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    for suffix, m in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30)):
        if t.endswith(suffix):
            t, mult = t[:-1], m
            break
    try:
        v = int(float(t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 100M)") from None
    if v < 4096:
        raise argparse.ArgumentTypeError(f"too small: {text!r} (at least 4K)")
    return v


def add_from(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--from",
        dest="from_",
        action="append",
        metavar="FILE",
        help="replay a recording (capwatch record) instead of tracing live; repeat for a"
        " rotated set, oldest first",
    )


def add_record_parser(sub: argparse._SubParsersAction[Any]) -> None:
    r = sub.add_parser("record", help="record capability checks to a file, to replay elsewhere")
    r.add_argument("-o", "--output", required=True, metavar="FILE", help="the recording")
    mode = r.add_mutually_exclusive_group()
    mode.add_argument("--all", action="store_true", help="every check, allowed ones too")
    mode.add_argument("--unique", action="store_true", help="each distinct check once")
    r.add_argument("--pid", type=positive_int, help="only this process (thread group id)")
    r.add_argument("--cap", type=cap_arg, help="only this capability (name or number)")
    r.add_argument("--outcome", action="store_true", help="record each denial's syscall result too")
    r.add_argument("--duration", type=duration, help="stop after this long (e.g. 30s)")
    r.add_argument(
        "--max-size",
        type=size_arg,
        metavar="SIZE",
        help="start a new file past this size (FILE.1 is the one before; e.g. 100M)",
    )
    r.add_argument(
        "--keep", type=positive_int, default=4, metavar="N", help="rotated files kept (default 4)"
    )
    r.add_argument(
        "--ring-pages",
        type=pow2_arg,
        default=4096,
        metavar="N",
        help="pages of the ring for allowed checks (--all/--unique; default 4096 = 16 MiB)",
    )
    add_kernel_opts(r)


def add_top_parser(sub: argparse._SubParsersAction[Any]) -> None:
    t = sub.add_parser("top", help="a full-screen live view of capability checks by workload")
    t.add_argument("--all", action="store_true", help="learn every check's syscall (costs more)")
    t.add_argument("--once", action="store_true", help="print one snapshot and exit (no terminal)")
    t.add_argument("--interval", type=duration, default=1.0, help="refresh interval (default 1s)")
    t.add_argument(
        "--sort",
        choices=["denials", "rate", "total"],
        default="denials",
        help="row order (keys d, r, t; default denials first)",
    )
    t.add_argument("--filter", metavar="TEXT", help="only rows naming TEXT (key /)")
    add_from(t)
    t.add_argument(
        "--ring-pages",
        type=pow2_arg,
        default=4096,
        metavar="N",
        help="pages of the ring for allowed checks (--all; default 4096 = 16 MiB)",
    )
    add_policy(t)
    add_kernel_opts(t)
