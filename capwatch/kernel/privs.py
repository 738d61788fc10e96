"""Drop capabilities capwatch no longer needs once the program is attached.

After attaching, capwatch only reads its maps and rings through file
descriptors it already holds. With kernel.unprivileged_bpf_disabled set (the
default on most distributions), every bpf(2) command checks CAP_BPF (or
CAP_SYS_ADMIN) at entry (kernel/bpf/syscall.c, bpf_capable() in __sys_bpf
since Linux 5.8), so CAP_BPF stays; reading other users' /proc/PID/status
needs none. Everything else goes from the permitted and effective sets.
"""

from __future__ import annotations

import ctypes
import os

from capwatch.decode.caps import cap_name

__all__ = ["KEEP_AFTER_ATTACH", "drop_capabilities"]

CAP_SYS_ADMIN, CAP_BPF = 21, 39
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_SYS_CAPSET = {"x86_64": 126, "aarch64": 91}

#: What serve keeps after attaching: CAP_BPF for map reads. On kernels before
#: 5.8 (no CAP_BPF) CAP_SYS_ADMIN does that job.
KEEP_AFTER_ATTACH = frozenset({CAP_BPF, CAP_SYS_ADMIN})


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def drop_capabilities(keep: frozenset[int], *, kernel_has_cap_bpf: bool = True) -> list[str]:
    """Reduce this process's permitted and effective sets to ``keep`` (of what it has).

    Returns the names kept. Raises OSError if capset(2) fails. Threads started
    before this call keep their own sets (capabilities are per thread), so call
    it before starting threads, or accept that they keep theirs.
    """
    if kernel_has_cap_bpf:
        keep = keep - {CAP_SYS_ADMIN}
    with open("/proc/self/status", encoding="ascii") as f:
        prm = next(int(line.split()[1], 16) for line in f if line.startswith("CapPrm:"))
    mask = 0
    for c in keep:
        if prm >> c & 1:
            mask |= 1 << c
    libc = ctypes.CDLL(None, use_errno=True)
    hdr = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    for i in range(2):
        word = (mask >> (32 * i)) & 0xFFFFFFFF
        data[i].effective = word
        data[i].permitted = word
        data[i].inheritable = 0
    nr = _SYS_CAPSET.get(os.uname().machine)
    if nr is None:
        raise OSError(0, "capset syscall number unknown for this architecture")
    if libc.syscall(nr, ctypes.byref(hdr), ctypes.byref(data)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return sorted(cap_name(c) for c in range(64) if mask >> c & 1)
