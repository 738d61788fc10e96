"""Read what the running kernel says about capwatch's hooks, without compiling.

Thin and kernel-facing (sysfs, tracefs); the decisions made from these facts
are pure and live in capwatch.kernel.attach (unit-tested there). Roots are
arguments so that tests can point them at fixture trees.
"""

from __future__ import annotations

import platform
from pathlib import Path

from capwatch.kernel.attach import KernelFacts

__all__ = ["read_kernel_facts"]

_TRACEFS = ("kernel/tracing", "kernel/debug/tracing")


def _btf_names(btf: Path, names: tuple[bytes, ...]) -> dict[bytes, bool] | None:
    """Whether each name is in the BTF string table (NUL-delimited): a type or
    function of that name exists. None when the BTF cannot be read."""
    try:
        data = btf.read_bytes()
    except OSError:
        return None
    return {n: b"\0" + n + b"\0" in data for n in names}


def read_kernel_facts(sys_root: str = "/sys", release: str | None = None) -> KernelFacts:
    sys_dir = Path(sys_root)
    events = next(
        (sys_dir / t / "events" for t in _TRACEFS if (sys_dir / t / "events").is_dir()), None
    )
    tracefs = events is not None
    tp_in_tracefs = (events / "capability" / "cap_capable").is_dir() if events else None
    btf_path = sys_dir / "kernel/btf/vmlinux"
    btf = btf_path.exists()
    names = _btf_names(btf_path, (b"btf_trace_cap_capable", b"cap_capable")) if btf else None
    kprobes: bool | None
    if (sys_dir / "bus/event_source/devices/kprobe").exists():
        kprobes = True
    elif events is not None:
        kprobes = (events.parent / "kprobe_events").exists()
    else:
        kprobes = None  # neither the PMU nor tracefs: cannot tell, let the attach say
    return KernelFacts(
        release=release or platform.release(),
        tracefs=tracefs,
        tp_in_tracefs=tp_in_tracefs,
        btf=btf,
        btf_tp_type=None if names is None else names[b"btf_trace_cap_capable"],
        btf_cap_capable=None if names is None else names[b"cap_capable"],
        kprobes=kprobes,
    )
