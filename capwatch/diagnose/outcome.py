"""Join denials with the result of the syscall they happened in (--outcome).

Pure: fed decoded events in ring order. The kernel sends, after a thread's
denials inside one syscall, one CW_F_OUTCOME record with that syscall's
return value (bpf/capwatch.bpf.c). A denial whose syscall failed with EPERM
or EACCES is a likely *cause*; one whose syscall succeeded or failed with
another errno is a *probe* (the kernel asked, was told no, and went on:
CAP_SYS_MODULE in dev_load() before ENODEV, CAP_DAC_OVERRIDE before
CAP_DAC_READ_SEARCH...).

Asynchronous refusals: a denial inside a send-family syscall that succeeded
may still have failed the request, because netlink (rtnetlink, genetlink,
nfnetlink) reports the error in the reply a later recvmsg reads. Such a
denial is never called a probe from the syscall's return alone: it waits for
the netlink reply the process reads next (unless the syscall wrote to an
fd that is no netlink socket: a file, a pipe, another socket family; then
its return decides) (a CW_F_REPLY record with the
reply's error): a *cause* when the reply says EPERM/EACCES, a *probe* when it
acknowledges the request or refuses it with another errno. When no reply is
seen it waits for the process's exit status (a CW_F_EXIT record): a *cause*
when the process exited non-zero, *unknown* otherwise.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, replace

from capwatch.decode.events import Event
from capwatch.decode.syscalls import syscall_name

__all__ = [
    "ASYNC_SYSCALLS",
    "FILE_WRITES",
    "Joined",
    "OutcomeJoiner",
    "is_async_candidate",
    "outcome_text",
    "reply_text",
    "role_of",
]

_CAUSE_ERRNOS = frozenset({errno.EPERM, errno.EACCES})

#: Syscalls whose success does not mean the request was granted: on a netlink
#: socket the kernel answers with NLMSG_ERROR in a later read (the BPF side
#: lists the same syscalls by number, cw_is_send in bpf/capwatch.bpf.c).
ASYNC_SYSCALLS = frozenset({"write", "writev", "sendto", "sendmsg", "sendmmsg"})


def is_async_candidate(ret: int | None, syscall: str, channel: str = "") -> bool:
    """A denial whose refusal may have been reported later, in a reply: a
    send-family syscall that succeeded, on a netlink socket or on an fd of
    unknown kind (``channel`` "" or "netlink"; "file" or "socket" answer no reply)."""
    return (
        ret is not None and ret >= 0 and syscall in ASYNC_SYSCALLS and channel in ("", "netlink")
    )


def outcome_text(ret: int | None) -> str:
    """'EPERM', 'ENODEV', 'success' or 'unknown' for a syscall's return value."""
    if ret is None:
        return "unknown"
    if ret >= 0:
        return "success"
    return errno.errorcode.get(-ret, f"errno:{-ret}")


def role_of(
    ret: int | None,
    syscall: str = "",
    exit_code: int | None = None,
    reply: int | None = None,
    channel: str = "",
) -> str:
    """cause | probe | unknown.

    A denial in a send-family syscall that succeeded is judged by the netlink
    reply read next (``reply``: its error, 0 for an acknowledgement): a cause
    when it says EPERM/EACCES, a probe otherwise. Without a reply: a cause
    when the process then exited non-zero (for write/writev only when the fd
    was seen to be a netlink socket: files take writes too), unknown otherwise.
    """
    if ret is None:
        return "unknown"
    if ret < 0 and -ret in _CAUSE_ERRNOS:
        return "cause"
    if is_async_candidate(ret, syscall, channel):
        if reply is not None:
            return "cause" if -reply in _CAUSE_ERRNOS else "probe"
        if exit_code and (channel == "netlink" or syscall not in FILE_WRITES):
            return "cause"
        # write/writev to an fd of unknown kind: to a file it is a probe, to a
        # netlink socket maybe a cause; the exit status cannot tell which.
        return "unknown"
    return "probe"


#: Send-family syscalls that files and pipes take too: their fd must be known to
#: be a netlink socket (or a reply seen) before an exit status makes them a cause.
FILE_WRITES = frozenset({"write", "writev"})


def reply_text(reply: int | None) -> str:
    """'EPERM', 'ack' (the request was acknowledged) or '' (no reply seen)."""
    if reply is None:
        return ""
    return "ack" if reply == 0 else errno.errorcode.get(-reply, f"errno:{-reply}")


@dataclass(frozen=True, slots=True)
class Joined:
    event: Event
    ret: int | None  # the syscall's return value; None when unknown
    exit_code: int | None = None  # the process's exit status, for asynchronous candidates
    reply: int | None = None  # the netlink reply's error (0: ack), for asynchronous candidates
    channel: str = ""  # what a send-family syscall wrote to: netlink | socket | file | "" unknown

    @property
    def outcome(self) -> str:
        return outcome_text(self.ret)

    @property
    def syscall(self) -> str:
        return syscall_name(self.event.syscall_nr)

    @property
    def asynchronous(self) -> bool:
        """The syscall succeeded but its refusal may have come in a reply (netlink)."""
        return is_async_candidate(self.ret, self.syscall, self.channel)

    @property
    def role(self) -> str:
        return role_of(self.ret, self.syscall, self.exit_code, self.reply, self.channel)

    def fields(self) -> dict[str, object]:
        """What a record of this denial carries about its outcome (trace, serve, recent)."""
        out: dict[str, object] = {"outcome": self.outcome, "role": self.role}
        if self.ret is not None:
            out["syscall_ret"] = self.ret
        if self.exit_code is not None:
            out["exit_code"] = self.exit_code
        if self.reply is not None:
            out["reply"] = reply_text(self.reply)
        if self.channel:
            out["channel"] = self.channel
        return out


class OutcomeJoiner:
    """Holds a thread's denials until its outcome record arrives.

    ``emit`` gets every denial once, joined. Denials whose outcome never comes
    (the thread exited inside the syscall, or the record was lost) are
    emitted with ``ret=None`` by :meth:`expire` after ``max_wait_ns``.
    Asynchronous candidates (:func:`is_async_candidate`) are held by process
    until its netlink reply (emitted with ``reply``), its exit record (emitted
    with ``exit_code``) or ``max_wait_ns``.
    Refusal records (no capability denied) go to ``on_refusal`` when given.
    ``fd_kind(pid, fd)`` (live only: it reads /proc) tells what a send-family
    syscall wrote to; a file, pipe or non-netlink socket answers no reply, so
    such a denial is judged by the syscall's return at once.
    """

    def __init__(
        self,
        emit: Callable[[Joined], None],
        *,
        max_wait_ns: int = 2_000_000_000,
        on_refusal: Callable[[Event], None] | None = None,
        fd_kind: Callable[[int, int], str | None] | None = None,
    ) -> None:
        self._emit = emit
        self._on_refusal = on_refusal
        self._fd_kind = fd_kind
        self._pending: dict[int, list[Event]] = {}
        self._async: dict[int, list[Joined]] = {}
        self.max_wait_ns = max_wait_ns

    def feed(self, ev: Event) -> None:
        if ev.is_reply:
            for j in self._async.pop(ev.pid, ()):
                self._emit(replace(j, reply=ev.ret))
            return
        if ev.is_exit:
            for j in self._async.pop(ev.pid, ()):
                self._emit(replace(j, exit_code=ev.ret))
            return
        if ev.is_refusal:
            if self._on_refusal is not None:
                self._on_refusal(ev)
            return
        if ev.is_outcome:
            held = self._pending.pop(ev.tid, ())
            channel = ""
            if held and ev.fd is not None and self._fd_kind is not None:
                channel = self._fd_kind(ev.pid, ev.fd) or ""
            for d in held:
                j = Joined(d, ev.ret, channel=channel)
                if j.asynchronous:
                    self._async.setdefault(d.pid, []).append(j)
                else:
                    self._emit(j)
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
        for pid in [
            p for p, js in self._async.items() if now_ns - js[0].event.ts_ns > self.max_wait_ns
        ]:
            for j in self._async.pop(pid):
                self._emit(j)

    def flush(self) -> None:
        for tid in list(self._pending):
            for d in self._pending.pop(tid):
                self._emit(Joined(d, None))
        for pid in list(self._async):
            for j in self._async.pop(pid):
                self._emit(j)
