"""`capwatch doctor`: what this kernel and host support, each attach mode tried for real."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from typing import Any

from capwatch.errors import CapwatchError

__all__ = ["Check", "DoctorReport", "run_doctor"]


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True


@dataclass
class DoctorReport:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks if c.required)

    def add(self, name: str, ok: bool, detail: str, *, required: bool = True) -> None:
        self.checks.append(Check(name, ok, detail, required))

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checks": [
                {"name": c.name, "ok": c.ok, "required": c.required, "detail": c.detail}
                for c in self.checks
            ],
        }

    def render(self) -> str:
        lines = []
        for c in self.checks:
            mark = "ok  " if c.ok else ("FAIL" if c.required else "no  ")
            lines.append(f"[{mark}] {c.name:<22} {c.detail}")
        lines.append("capwatch can run here" if self.ok else "capwatch cannot run here")
        return "\n".join(lines) + "\n"


def _mounted(path: str) -> bool:
    return os.path.ismount(path)


def run_doctor(
    *, kernel_headers: str | None = None, modes: tuple[str, ...] | None = None
) -> DoctorReport:
    from capwatch.kernel import bpf as _bpf
    from capwatch.kernel.attach import MODES
    from capwatch.kernel.headers import find_headers

    r = DoctorReport()
    r.add("kernel", True, f"{platform.system()} {platform.release()} {platform.machine()}")
    btf = os.path.exists("/sys/kernel/btf/vmlinux")
    r.add(
        "btf",
        btf,
        "/sys/kernel/btf/vmlinux" if btf else "no BTF: fexit unavailable",
        required=False,
    )
    tr = _mounted("/sys/kernel/tracing") or _mounted("/sys/kernel/debug")
    r.add(
        "tracefs",
        tr,
        "mounted" if tr else "mount -t tracefs nodev /sys/kernel/tracing",
        required=False,
    )
    from capwatch.kernel.attach import tracepoint_exists, unavailable
    from capwatch.kernel.facts import read_kernel_facts

    facts = read_kernel_facts()
    tp = tracepoint_exists(facts)
    if tp and facts.tracefs:
        tp_detail = "capability:cap_capable"
    elif tp:
        tp_detail = unavailable("tracepoint", facts) or "capability:cap_capable"
    elif tp is False:
        tp_detail = f"not in this kernel: {unavailable('tracepoint', facts)}"
    else:
        tp_detail = "cannot tell: neither tracefs nor BTF; mount -t tracefs nodev /sys/kernel/tracing"
    r.add("tracepoint", bool(tp), tp_detail, required=False)
    try:
        _bpf.check_privileges()
        r.add("privileges", True, "CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN)")
    except CapwatchError as exc:
        r.add("privileges", False, str(exc))
        return r
    try:
        h = find_headers(kernel_headers)
        r.add("kernel headers", True, f"{h.source}: {h.path}")
    except CapwatchError as exc:
        r.add("kernel headers", False, str(exc))
        return r
    any_ok = False
    for mode in modes or MODES:
        # What the kernel's facts rule out is said, not compiled (a compile takes
        # seconds, minutes under emulation), as auto decides (attach.select_mode).
        why_not = unavailable(mode, facts)
        if why_not:
            r.add(f"attach {mode}", False, f"not tried: {why_not}", required=False)
            continue
        try:
            prog = _bpf.load(
                _bpf.ProgramConfig(denial_pages=1), mode, kernel_headers=kernel_headers
            )
        except CapwatchError as exc:
            r.add(f"attach {mode}", False, str(exc), required=False)
            continue
        prog.close()
        any_ok = True
        r.add(f"attach {mode}", True, "loads and attaches", required=False)
    r.add("attach (any)", any_ok, "at least one mode works" if any_ok else "no attach mode works")
    return r
