"""The event record: the Python mirror of ``struct cw_event`` in bpf/capwatch.h.

One layout, defined twice (C and here); ``tests/unit/test_events.py`` compiles the
header with the host C compiler and checks that size and every offset agree.
Batches are decoded with numpy (one call for thousands of records); single
records with :data:`EVENT_STRUCT`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from capwatch.text import from_bytes

__all__ = [
    "EVENT_DTYPE",
    "EVENT_SIZE",
    "EVENT_STRUCT",
    "F_DENIED",
    "F_ENTERED",
    "F_ENTRY_KNOWN",
    "F_EXIT",
    "F_FD",
    "F_INSETID",
    "F_NOAUDIT",
    "F_OPTS_KNOWN",
    "F_OUTCOME",
    "F_REFUSAL",
    "F_REPLY",
    "F_USERNS",
    "F_USERNS_KNOWN",
    "Batch",
    "Event",
    "decode_record",
    "events_from_batch",
]

F_DENIED = 0x01
F_NOAUDIT = 0x02
F_INSETID = 0x04
F_OPTS_KNOWN = 0x08
F_USERNS = 0x10
F_USERNS_KNOWN = 0x20
F_OUTCOME = 0x40
F_EXIT = 0x100  # with F_OUTCOME: ret is a process's exit status (capwatch.h)
F_REFUSAL = 0x200  # with F_OUTCOME: EPERM/EACCES with no capability denied in the syscall
F_REPLY = 0x400  # with F_OUTCOME: ret is the error of the netlink reply such a process read
F_FD = 0x800  # with F_OUTCOME: ``suppressed`` is the fd a send-family syscall wrote to
F_ENTERED = 0x1000  # on a refusal record: the syscall was seen to enter (it ran)
F_ENTRY_KNOWN = 0x2000  # on a refusal record: entries were watched (F_ENTERED means something)

#: numpy mirror of struct cw_event (little-endian, as on x86_64 and arm64).
EVENT_DTYPE = np.dtype(
    [
        ("ts_ns", "<u8"),
        ("cgroup_id", "<u8"),
        ("pid", "<u4"),
        ("tid", "<u4"),
        ("uid", "<u4"),
        ("cap", "<i4"),
        ("syscall_nr", "<i4"),
        ("ret", "<i4"),
        ("flags", "<u4"),
        ("suppressed", "<u4"),
        ("comm", "S16"),
    ]
)
#: A decoded batch of records: a numpy structured array of EVENT_DTYPE.
Batch = npt.NDArray[np.void]
EVENT_STRUCT = struct.Struct("<QQIIIiiiII16s")
EVENT_SIZE = EVENT_STRUCT.size
assert EVENT_DTYPE.itemsize == EVENT_SIZE == 64


@dataclass(frozen=True, slots=True)
class Event:
    """One capability check as the kernel reported it (raw numbers, no names)."""

    ts_ns: int
    cgroup_id: int
    pid: int
    tid: int
    uid: int
    cap: int
    syscall_nr: int
    ret: int
    flags: int
    suppressed: int
    comm: str

    @property
    def denied(self) -> bool:
        return bool(self.flags & F_DENIED)

    @property
    def is_outcome(self) -> bool:
        """Not a check: the return value of the syscall of this thread's last denials."""
        return bool(self.flags & F_OUTCOME)

    @property
    def is_exit(self) -> bool:
        """Not a check: ``ret`` is the exit status of a process that had a denial in a
        send-family syscall that succeeded (its refusal may have come in a reply)."""
        return bool(self.flags & F_EXIT)

    @property
    def fd(self) -> int | None:
        """The fd a send-family syscall that succeeded wrote to (outcome records), or None."""
        return self.suppressed if self.flags & F_FD else None

    @property
    def entered(self) -> bool | None:
        """Refusal records: whether the syscall entered (ran); None when entries were
        not watched. Not entered: refused at entry, by a seccomp filter (or a ptrace
        tracer), before it could run."""
        if not self.flags & F_ENTRY_KNOWN:
            return None
        return bool(self.flags & F_ENTERED)

    @property
    def is_reply(self) -> bool:
        """Not a check: ``ret`` is the error field (0: acknowledged) of the first
        NLMSG_ERROR reply that a process waiting like :attr:`is_exit`'s read."""
        return bool(self.flags & F_REPLY)

    @property
    def is_refusal(self) -> bool:
        """Not a check: a syscall ended in EPERM/EACCES (``ret``) with no capability denied."""
        return bool(self.flags & F_REFUSAL)

    @property
    def opts_known(self) -> bool:
        return bool(self.flags & F_OPTS_KNOWN)

    @property
    def noaudit(self) -> bool | None:
        """True/False where the hook exposes cap_capable's opts, else None."""
        return bool(self.flags & F_NOAUDIT) if self.opts_known else None

    @property
    def insetid(self) -> bool | None:
        return bool(self.flags & F_INSETID) if self.opts_known else None

    @property
    def in_userns(self) -> bool | None:
        """The resource's (target) user namespace is not the initial one; None if not known."""
        return bool(self.flags & F_USERNS) if self.flags & F_USERNS_KNOWN else None


def _comm(raw: bytes) -> str:
    # Lossless: a comm is raw bytes (prctl(PR_SET_NAME)); sinks escape (capwatch.text).
    return from_bytes(raw.split(b"\0", 1)[0])


def _event(f: Sequence[Any]) -> Event:
    return Event(f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8], f[9], _comm(f[10]))


def decode_record(data: bytes | bytearray | memoryview) -> Event:
    """Decode one record; raises ValueError when it is not EVENT_SIZE bytes."""
    if len(data) != EVENT_SIZE:
        raise ValueError(f"event record is {len(data)} bytes, expected {EVENT_SIZE}")
    f: tuple[Any, ...] = EVENT_STRUCT.unpack(data)
    return _event(f)


def events_from_batch(batch: Batch) -> list[Event]:
    """Turn a decoded numpy batch into Event objects (for the slow, detailed path)."""
    out: list[Event] = []
    for row in batch.tolist():
        out.append(_event(row))
    return out
