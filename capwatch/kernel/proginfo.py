"""What the kernel counts per BPF program: bpf(BPF_OBJ_GET_INFO_BY_FD).

The one figure capwatch needs is ``recursion_misses`` (Linux 5.12+): the runs
of a program that the kernel skipped because the program was already running
on that CPU. fexit trampolines (``__bpf_prog_enter_recur``) and, since 6.2 or
so, raw and regular tracepoints (``__bpf_trace_run``) guard each program that
way and count the skip; a check made while our program runs on the same CPU
(an interrupt that checks a capability) is then neither counted nor seen.
capwatch adds these misses to ``capwatch_checks_uncounted_total`` so that an
exact count is never claimed while some were skipped. kprobe programs are
guarded by the per-CPU ``bpf_prog_active`` instead, which 6.1 does not count
(docs/kernels.md says so).

x86-64 only, like the ring reader (kernel/ringbuf.check_memory_order).
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["INFO_SIZE", "RECURSION_MISSES_OFFSET", "recursion_misses"]

_NR_BPF_X86_64 = 321
_BPF_OBJ_GET_INFO_BY_FD = 15
#: offsetof(struct bpf_prog_info, recursion_misses) in uapi/linux/bpf.h, which
#: only grows at its end; tests/unit/kernel/test_proginfo.py checks it against
#: the host's header.
RECURSION_MISSES_OFFSET = 208
#: Enough of struct bpf_prog_info to reach recursion_misses.
INFO_SIZE = RECURSION_MISSES_OFFSET + 8


class _InfoAttr(ctypes.Structure):
    # the info member of union bpf_attr (BPF_OBJ_GET_INFO_BY_FD)
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)


def recursion_misses(prog_fd: int) -> int | None:
    """The kernel's count of skipped runs of the program behind ``prog_fd``;
    None when it cannot tell (not a BPF program, a kernel before 5.12, not x86-64)."""
    if os.uname().machine != "x86_64":
        return None
    buf = ctypes.create_string_buffer(INFO_SIZE)
    attr = _InfoAttr(prog_fd, INFO_SIZE, ctypes.addressof(buf))
    rc = _libc.syscall(
        ctypes.c_long(_NR_BPF_X86_64),
        ctypes.c_int(_BPF_OBJ_GET_INFO_BY_FD),
        ctypes.byref(attr),
        ctypes.c_uint(ctypes.sizeof(attr)),
    )
    if rc != 0 or attr.info_len < INFO_SIZE:
        return None  # the kernel wrote back how much of the struct it has
    return int.from_bytes(buf.raw[RECURSION_MISSES_OFFSET:INFO_SIZE], "little")
