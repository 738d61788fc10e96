"""Join denials with the result of the syscall they happened in (--outcome).

Pure: fed decoded events in ring order. The kernel sends, after a thread's
denials inside one syscall, one CW_F_OUTCOME record with that syscall's
return value (bpf/capwatch.bpf.c). A denial whose syscall failed with EPERM
or EACCES is a likely *cause*; one whose syscall succeeded or failed with
another errno is a *probe* (the kernel asked, was told no, and went on:
CAP_SYS_MODULE in dev_load() before ENODEV, CAP_DAC_OVERRIDE before
CAP_DAC_READ_SEARCH...).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass

from capwatch.decode.events import Event

__all__ = ["Joined", "OutcomeJoiner", "outcome_text", "role_of"]

_CAUSE_ERRNOS = frozenset({errno.EPERM, errno.EACCES})


def outcome_text(ret: int | None) -> str:
    """'EPERM', 'ENODEV', 'success' or 'unknown' for a syscall's return value."""
    if ret is None:
        return "unknown"
    if ret >= 0:
        return "success"
    return errno.errorcode.get(-ret, f"errno:{-ret}")


def role_of(ret: int | None) -> str:
    """cause | probe | unknown."""
    if ret is None:
        return "unknown"
    if ret < 0 and -ret in _CAUSE_ERRNOS:
        return "cause"
    return "probe"


@dataclass(frozen=True, slots=True)
class Joined:
    event: Event
    ret: int | None  # the syscall's return value; None when unknown

    @property
    def outcome(self) -> str:
        return outcome_text(self.ret)

    @property
    def role(self) -> str:
        return role_of(self.ret)


class OutcomeJoiner:
    """Holds a thread's denials until its outcome record arrives.

    ``emit`` gets every denial once, joined. Denials whose outcome never comes
    (the thread exited inside the syscall, or the record was lost) are
    emitted with ``ret=None`` by :meth:`expire` after ``max_wait_ns``.
    """

    def __init__(self, emit: Callable[[Joined], None], *, max_wait_ns: int = 2_000_000_000) -> None:
        self._emit = emit
        self._pending: dict[int, list[Event]] = {}
        self.max_wait_ns = max_wait_ns

    def feed(self, ev: Event) -> None:
        if ev.is_outcome:
            for d in self._pending.pop(ev.tid, ()):
                self._emit(Joined(d, ev.ret))
            return
        if not ev.denied or ev.syscall_nr < 0:
            self._emit(Joined(ev, None))
            return
        self._pending.setdefault(ev.tid, []).append(ev)

    def expire(self, now_ns: int) -> None:
        for tid in [
            t for t, evs in self._pending.items() if now_ns - evs[0].ts_ns > self.max_wait_ns
        ]:
            for d in self._pending.pop(tid):
                self._emit(Joined(d, None))

    def flush(self) -> None:
        for tid in list(self._pending):
            for d in self._pending.pop(tid):
                self._emit(Joined(d, None))
