"""Drop the privileges capwatch no longer needs once the program is attached.

After attaching, ``serve`` only reads its maps and rings through file
descriptors it already holds, walks the cgroup tree, and reads
``/proc/<pid>/status`` and ``/proc/<pid>/cgroup`` (world-readable) and root's
own files (podman's store, the state file: uid 0 stays their owner). What is
kept, with its reason:

* ``CAP_BPF``: with ``kernel.unprivileged_bpf_disabled`` set (the default on
  most distributions), every bpf(2) command checks ``bpf_capable()`` at entry
  (kernel/bpf/syscall.c, ``__sys_bpf``), map look-ups on a held fd included.
  Before Linux 5.8 (no CAP_BPF), ``CAP_SYS_ADMIN`` does that job.

Not kept, tested by the serve test reading maps after the drop: CAP_PERFMON
(attaching only), CAP_SYS_PTRACE (no /proc/<pid>/ns or /proc/<pid>/exe is
read), CAP_DAC_READ_SEARCH (what is read is world-readable or root's own).

The drop (libcap-ng, Debian's ``python3-cap-ng``): permitted and effective
reduced to what is kept, inheritable and ambient cleared, the bounding set
reduced to what is kept and the securebits NOROOT / NO_SETUID_FIXUP locked
(``capng_lock``; both need CAP_SETPCAP, held on a host and in the privileged
DaemonSet; without it, as in the least-privilege overlay, whose bounding set
Kubernetes already limited to BPF+PERFMON, they are left and reported), and
no_new_privs set, so that nothing capwatch execs can gain a capability back.

Capabilities, the bounding set and no_new_privs are per thread, and libcap-ng
changes the calling thread only: the drop refuses to run while the process
has more than one thread, and checks every thread's
``/proc/self/task/*/status`` afterwards. Any failure raises
:class:`~capwatch.errors.CapwatchError` (fatal for serve unless
``--no-drop-privileges``).
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from capwatch.decode.caps import cap_name
from capwatch.errors import CapwatchError

__all__ = ["KEEP_AFTER_ATTACH", "Dropped", "drop_privileges", "thread_privileges"]

CAP_SYS_ADMIN, CAP_SETPCAP, CAP_BPF = 21, 8, 39
_PR_SET_NO_NEW_PRIVS = 38

#: What serve keeps after attaching: CAP_BPF for map reads. On kernels before
#: 5.8 (no CAP_BPF) CAP_SYS_ADMIN does that job.
KEEP_AFTER_ATTACH = frozenset({CAP_BPF, CAP_SYS_ADMIN})

_FIELDS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs")


@dataclass(frozen=True)
class Dropped:
    """What the drop left: capability names kept, and whether the bounding set
    could be reduced (it needs CAP_SETPCAP)."""

    kept: list[str]
    bounding_reduced: bool
    threads: int


def thread_privileges(
    pid: int | str = "self", proc_root: str = "/proc"
) -> dict[int, dict[str, int]]:
    """Capability sets and NoNewPrivs of every thread of ``pid``, by thread id."""
    out: dict[int, dict[str, int]] = {}
    base = f"{proc_root}/{pid}/task"
    for tid in os.listdir(base):
        facts: dict[str, int] = {}
        try:
            with open(f"{base}/{tid}/status", encoding="ascii", errors="replace") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key in _FIELDS:
                        facts[key] = int(value.strip(), 16 if key.startswith("Cap") else 10)
        except OSError:
            continue  # the thread ended
        out[int(tid)] = facts
    return out


def _cap_last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40


def drop_privileges(keep: frozenset[int]) -> Dropped:
    """Reduce this process to ``keep`` (of what it holds); see the module docstring."""
    try:
        import capng  # type: ignore[import-untyped]  # Debian python3-cap-ng, no stubs
    except ImportError:
        raise CapwatchError(
            "cannot drop privileges: python3-cap-ng is not installed "
            "(apt-get install python3-cap-ng; or run with --no-drop-privileges)"
        ) from None
    threads = os.listdir("/proc/self/task")
    if len(threads) != 1:
        raise CapwatchError(
            f"cannot drop privileges: {len(threads)} threads already run "
            "(capabilities are per thread)"
        )
    if _cap_last_cap() >= CAP_BPF:
        keep = keep - {CAP_SYS_ADMIN}
    before = thread_privileges()[int(threads[0])]
    have = before["CapPrm"]
    can_bound = bool(have >> CAP_SETPCAP & 1)
    kept = frozenset(c for c in keep if have >> c & 1)

    capng.capng_clear(capng.CAPNG_SELECT_ALL)
    sets = capng.CAPNG_EFFECTIVE | capng.CAPNG_PERMITTED
    if can_bound:
        sets |= capng.CAPNG_BOUNDING_SET
    for c in kept:
        if capng.capng_update(capng.CAPNG_ADD, sets, c) != 0:
            raise CapwatchError(f"cannot drop privileges: libcap-ng refused {cap_name(c)}")
    if can_bound and capng.capng_lock() != 0:  # securebits (CAP_SETPCAP), then no_new_privs
        raise CapwatchError("cannot drop privileges: could not lock the securebits")
    select = capng.CAPNG_SELECT_ALL if can_bound else capng.CAPNG_SELECT_CAPS
    rc = capng.capng_apply(select)
    if rc != 0:
        raise CapwatchError(f"cannot drop privileges: capng_apply failed ({rc})")
    # without the bounding set, ambient still goes (clearing it needs no capability)
    if (
        not can_bound
        and capng.CAPNG_SUPPORTS_AMBIENT
        and capng.capng_apply(capng.CAPNG_SELECT_AMBIENT) != 0
    ):
        raise CapwatchError("cannot drop privileges: could not clear the ambient set")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        e = ctypes.get_errno()
        raise CapwatchError(f"cannot drop privileges: no_new_privs: {os.strerror(e)}")

    mask = sum(1 << c for c in kept)
    after = thread_privileges()
    for tid, facts in after.items():
        wrong = [
            k
            for k, ok in (
                ("CapPrm", facts.get("CapPrm") == mask),
                ("CapEff", facts.get("CapEff") == mask),
                ("CapInh", facts.get("CapInh") == 0),
                ("CapAmb", facts.get("CapAmb", 0) == 0),
                ("NoNewPrivs", facts.get("NoNewPrivs") == 1),
                ("CapBnd", not can_bound or facts.get("CapBnd") == mask),
            )
            if not ok
        ]
        if wrong:
            raise CapwatchError(
                f"cannot drop privileges: thread {tid} still has {', '.join(wrong)} set"
            )
    return Dropped(
        kept=sorted(cap_name(c) for c in kept), bounding_reduced=can_bound, threads=len(after)
    )
