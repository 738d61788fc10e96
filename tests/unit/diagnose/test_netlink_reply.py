"""Asynchronous refusals judged by the netlink reply (CW_F_REPLY records): pure parts."""

from __future__ import annotations

import errno

import pytest

from capwatch.decode.caps import parse_cap
from capwatch.decode.events import F_DENIED, F_EXIT, F_OUTCOME, F_REPLY, Event
from capwatch.decode.syscalls import syscall_table
from capwatch.diagnose.advise import Observation, advise
from capwatch.diagnose.explain import DenialFacts, explain
from capwatch.diagnose.outcome import Joined, OutcomeJoiner, reply_text, role_of
from capwatch.pipeline import Check
from tests.helpers import a_denial

NR = {name: nr for nr, name in syscall_table().items()}
NET_ADMIN = parse_cap("CAP_NET_ADMIN")
pytestmark = pytest.mark.skipif(not NR, reason="no syscall table for this machine")


def event(flags: int, *, ret: int = 0, cap: int = NET_ADMIN, nr: str = "sendmsg") -> Event:
    return Event(0, 1, 42, 42, 0, cap, NR[nr], ret, flags, 0, "ip")


@pytest.mark.parametrize(
    ("ret", "syscall", "exit_code", "reply", "role"),
    [
        (32, "sendmsg", None, -errno.EPERM, "cause"),  # the reply said EPERM
        (32, "sendmsg", 0, -errno.EPERM, "cause"),  # ... even if the process coped
        (32, "sendto", None, -errno.EACCES, "cause"),
        (32, "sendmsg", 2, 0, "probe"),  # acknowledged: exited 2 for another reason
        (32, "sendmsg", None, -errno.EEXIST, "probe"),  # refused, but not for the capability
        (32, "sendmsg", 2, None, "cause"),  # no reply seen: the exit status decides
        (32, "sendmsg", 0, None, "unknown"),
        (-errno.EPERM, "sendmsg", None, 0, "cause"),  # the call itself failed: reply moot
        (0, "clock_settime", None, -errno.EPERM, "probe"),  # not a send: no reply applies
    ],
)
def test_role_table(
    ret: int, syscall: str, exit_code: int | None, reply: int | None, role: str
) -> None:
    assert role == role_of(ret, syscall, exit_code, reply)


def test_reply_text() -> None:
    assert ("EPERM", "ack", "EEXIST", "") == (
        reply_text(-errno.EPERM),
        reply_text(0),
        reply_text(-errno.EEXIST),
        reply_text(None),
    )


class TestJoiner:
    def test_reply_reaches_the_held_denial_and_the_exit_finds_nothing(self) -> None:
        out: list[Joined] = []
        j = OutcomeJoiner(out.append)
        j.feed(event(F_DENIED))
        j.feed(event(F_OUTCOME, ret=64, cap=-1))
        assert [] == out
        j.feed(event(F_OUTCOME | F_REPLY, ret=-errno.EPERM, cap=-1, nr="recvmsg"))
        j.feed(event(F_OUTCOME | F_EXIT, ret=0, cap=-1, nr="exit_group"))
        assert [(64, None, -errno.EPERM, "cause")] == [
            (x.ret, x.exit_code, x.reply, x.role) for x in out
        ]
        assert {"outcome": "success", "role": "cause", "syscall_ret": 64, "reply": "EPERM"} == (
            out[0].fields()
        )

    def test_ack_makes_a_probe(self) -> None:
        out: list[Joined] = []
        j = OutcomeJoiner(out.append)
        j.feed(event(F_DENIED))
        j.feed(event(F_OUTCOME, ret=64, cap=-1))
        j.feed(event(F_OUTCOME | F_REPLY, ret=0, cap=-1, nr="recvfrom"))
        assert ["probe"] == [x.role for x in out]


def test_check_record_round_trip() -> None:
    c = a_denial(cap=NET_ADMIN, syscall_nr=NR["sendmsg"], ret=64, reply=-errno.EPERM)
    rec = c.to_dict()
    assert ("EPERM", -errno.EPERM, "cause") == (rec["reply"], rec["reply_ret"], rec["role"])
    assert c == Check.from_dict(rec)


class TestWords:
    def facts(self, reply: int | None, exit_code: int | None) -> DenialFacts:
        return DenialFacts(
            cap=NET_ADMIN,
            syscall="sendmsg",
            comm="ip",
            pid=42,
            ret=64,
            exit_code=exit_code,
            reply=reply,
        )

    def test_cause_names_the_reply(self) -> None:
        ex = explain(self.facts(-errno.EPERM, 0))
        assert ("cause", "EPERM") == (ex.role, ex.reply)
        assert "the reply ip read said EPERM" in ex.summary

    def test_ack_is_nothing_to_grant(self) -> None:
        ex = explain(self.facts(0, 2))
        assert ("probe", "ack") == (ex.role, ex.reply)
        assert "the netlink reply acknowledged the request" in ex.summary
        assert "Nothing to grant" in ex.summary

    def test_other_errno_is_not_the_capability(self) -> None:
        ex = explain(self.facts(-errno.EEXIST, 2))
        assert "refused it with EEXIST, not EPERM" in ex.summary

    def test_no_reply_says_so(self) -> None:
        ex = explain(self.facts(None, 2))
        assert ("cause", "") == (ex.role, ex.reply)
        assert "(the reply was not seen)" in ex.summary

    def test_advise_evidence_names_the_reply(self) -> None:
        a = advise(
            [
                Observation(NET_ADMIN, True, "sendmsg", "ip", "cause", "success", reply="EPERM"),
                Observation(NET_ADMIN, True, "sendto", "tc", "probe", "success", reply="ack"),
            ],
            duration_s=1,
            target="t",
        )
        assert [
            "denied in sendmsg (ip) x1, refused in the reply (the call returned success;"
            " the netlink reply said EPERM)"
        ] == a.missing[NET_ADMIN]


class TestChannel:
    """A send-family syscall that wrote to a file, a pipe or a non-netlink socket
    answers in no reply: its return decides at once (conmon writing oom_score_adj)."""

    def joined(self, kind: str | None) -> list[Joined]:
        from capwatch.decode.events import F_FD

        out: list[Joined] = []
        j = OutcomeJoiner(
            out.append, fd_kind=lambda pid, fd: kind if (pid, fd) == (42, 7) else None
        )
        j.feed(event(F_DENIED, nr="write"))
        # an outcome record's ``suppressed`` carries the fd (F_FD)
        j.feed(Event(0, 1, 42, 42, 0, -1, NR["write"], 8, F_OUTCOME | F_FD, 7, "ip"))
        return out

    def test_file_is_judged_now(self) -> None:
        assert [("probe", "file", False)] == [
            (x.role, x.channel, x.asynchronous) for x in self.joined("file")
        ]

    def test_netlink_waits_for_the_reply(self) -> None:
        assert [] == self.joined("netlink")

    def test_unknown_fd_waits_as_before(self) -> None:
        assert [] == self.joined(None)

    def test_record_keeps_the_channel(self) -> None:
        c = a_denial(cap=NET_ADMIN, syscall_nr=NR["write"], ret=8, channel="file")
        assert ("probe", "file") == (c.role, c.to_dict()["channel"])
        assert c == Check.from_dict(c.to_dict())


@pytest.mark.parametrize(
    ("syscall", "channel", "role"),
    [
        ("write", "", "unknown"),  # a file or a netlink socket: the exit status cannot tell
        ("writev", "", "unknown"),
        ("write", "netlink", "cause"),
        ("write", "file", "probe"),
        ("sendmsg", "", "cause"),  # a socket: netlink is the one that answers in a reply
        ("sendto", "socket", "probe"),
    ],
)
def test_exit_status_decides_only_for_netlink(syscall: str, channel: str, role: str) -> None:
    """No reply seen and the process exited 3."""
    assert role == role_of(8, syscall, 3, None, channel)
