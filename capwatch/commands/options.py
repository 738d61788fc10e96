"""Option types and the options several commands share, defined once."""

from __future__ import annotations

import argparse
import os

from capwatch.decode.caps import parse_cap, parse_mask
from capwatch.listen import Listen, listen_type
from capwatch.sinks.recent import DEFAULT_STATE_FILE

__all__ = [
    "add_kernel_opts",
    "add_policy",
    "add_state_file",
    "cap_arg",
    "dir_arg",
    "duration",
    "listen_arg",
    "mask_arg",
    "positive_int",
    "pow2_arg",
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
