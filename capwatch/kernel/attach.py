"""Attach-mode selection: pure logic, no kernel (unit-tested with fake loaders).

Preference (docs/design.md, "Kernel side"): the raw tracepoint cap_capable (Linux 6.14+), the
regular tracepoint capability:cap_capable, fexit on cap_capable, then
kprobe + kretprobe on cap_capable (older kernels).

Where the kernel can tell without a compile (tracefs events, BTF type names,
the kprobe PMU: see capwatch.kernel.facts), a mode that cannot work is passed
over with a reason in a user's words before anything is compiled; each BPF
compile costs seconds, a minute under emulation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from capwatch.errors import AttachError, UsageError

__all__ = [
    "MODES",
    "Attempt",
    "KernelFacts",
    "Selection",
    "select_mode",
    "tracepoint_exists",
    "unavailable",
]

MODES: tuple[str, ...] = ("raw_tracepoint", "tracepoint", "fexit", "kprobe")
T = TypeVar("T")


@dataclass(frozen=True)
class Attempt:
    mode: str
    error: str | None  # None: it worked
    compiled: bool = True  # False: passed over from the kernel's facts, nothing compiled


@dataclass(frozen=True)
class KernelFacts:
    """What the running kernel says about the hooks, read without compiling.
    None: the kernel could not tell (then the mode is tried for real)."""

    release: str
    tracefs: bool  # mounted, with an events/ directory
    tp_in_tracefs: bool | None  # events/capability/cap_capable (None: no tracefs)
    btf: bool  # /sys/kernel/btf/vmlinux
    btf_tp_type: bool | None  # BTF type btf_trace_cap_capable (None: no BTF)
    btf_cap_capable: bool | None  # BTF function cap_capable, fexit's target (None: no BTF)
    kprobes: bool | None  # kprobe PMU or tracefs kprobe_events (None: cannot tell)


def tracepoint_exists(f: KernelFacts) -> bool | None:
    """Whether this kernel has the capability:cap_capable tracepoint (6.14+)."""
    if f.tp_in_tracefs is not None:
        return f.tp_in_tracefs
    return f.btf_tp_type


def unavailable(mode: str, f: KernelFacts) -> str | None:
    """Why ``mode`` cannot work on this kernel, in a user's words; None when it may."""
    if mode in ("raw_tracepoint", "tracepoint"):
        exists = tracepoint_exists(f)
        if exists is False:
            return (
                f"the capability:cap_capable tracepoint needs Linux 6.14+; this is {f.release}"
            )
        if mode == "tracepoint" and exists and not f.tracefs:
            return (
                "the capability:cap_capable tracepoint is read through tracefs, which is not"
                " mounted: mount -t tracefs nodev /sys/kernel/tracing"
            )
        return None
    if mode == "fexit":
        if not f.btf:
            return (
                "fexit needs the kernel's BTF (/sys/kernel/btf/vmlinux, CONFIG_DEBUG_INFO_BTF);"
                f" {f.release} has none"
            )
        if f.btf_cap_capable is False:
            return f"cap_capable is not in the BTF of {f.release}: fexit cannot attach to it"
        return None
    if mode == "kprobe" and f.kprobes is False:
        return (
            f"kprobes are not available in {f.release} (no kprobe PMU or tracefs"
            " kprobe_events: CONFIG_KPROBE_EVENTS)"
        )
    return None


@dataclass(frozen=True)
class Selection(Generic[T]):
    mode: str
    result: T
    attempts: tuple[Attempt, ...]  # every mode tried, in order, with its reason


def select_mode(
    requested: str, try_mode: Callable[[str], T], facts: KernelFacts | None = None
) -> Selection[T]:
    """Try ``requested`` (or each mode in order for ``auto``) with ``try_mode``.

    ``try_mode`` returns the loaded program or raises an exception whose
    message says why the mode failed. With ``facts``, a mode the kernel says
    cannot work is passed over (recorded, not compiled). Raises AttachError
    with a one-line summary of every attempt when nothing works.
    """
    if requested != "auto" and requested not in MODES:
        raise UsageError(f"unknown attach mode {requested!r}: choose auto, {', '.join(MODES)}")
    order = MODES if requested == "auto" else (requested,)
    attempts: list[Attempt] = []
    for mode in order:
        reason = unavailable(mode, facts) if facts is not None else None
        if reason is not None:
            if requested != "auto":
                raise AttachError(f"attach mode {mode} failed ({mode}: {reason})")
            attempts.append(Attempt(mode, reason, compiled=False))
            continue
        try:
            result = try_mode(mode)
        except Exception as exc:
            attempts.append(Attempt(mode, _one_line(exc)))
            continue
        attempts.append(Attempt(mode, None))
        return Selection(mode, result, tuple(attempts))
    summary = "; ".join(f"{a.mode}: {a.error}" for a in attempts)
    if requested == "auto":
        raise AttachError(f"no attach mode works on this kernel ({summary})")
    raise AttachError(f"attach mode {requested} failed ({summary})")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
