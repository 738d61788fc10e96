"""Issue 13, pure parts: asynchronous (netlink) refusals, one recent record per outcome,
the container in every finding, short-lived container processes, and the text fixes."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from capwatch.decode.caps import parse_cap
from capwatch.decode.events import F_DENIED, F_EXIT, F_OUTCOME, F_REFUSAL, Event
from capwatch.decode.procfs import ProcStatus
from capwatch.decode.syscalls import syscall_table
from capwatch.diagnose.advise import Observation, advise
from capwatch.diagnose.explain import DenialFacts, explain, fold
from capwatch.diagnose.outcome import Joined, OutcomeJoiner, role_of
from capwatch.pipeline import Check
from capwatch.sinks.recent import RecentDenials, read_recent
from tests.helpers import a_denial

NR = {name: nr for nr, name in syscall_table().items()}
NET_ADMIN = parse_cap("CAP_NET_ADMIN")
SYS_ADMIN = parse_cap("CAP_SYS_ADMIN")
SYS_TIME = parse_cap("CAP_SYS_TIME")
#: a container's bounding set without NET_ADMIN, SYS_ADMIN and SYS_TIME
SEED = ((1 << 41) - 1) & ~(1 << NET_ADMIN | 1 << SYS_ADMIN | 1 << SYS_TIME)


def status(bnd: int = SEED, uid: int = 0) -> ProcStatus:
    return ProcStatus(42, "ip", uid, uid, 0, bnd, bnd, bnd, 0)


def event(
    flags: int, *, ret: int = 0, cap: int = NET_ADMIN, nr: str = "sendmsg", ts: int = 0
) -> Event:
    return Event(ts, 1, 42, 42, 0, cap, NR[nr], ret, flags, 0, "ip")


pytestmark = pytest.mark.skipif(not NR, reason="no syscall table for this machine")


class TestAsynchronousRole:
    @pytest.mark.parametrize(
        ("ret", "syscall", "exit_code", "role"),
        [
            (32, "sendmsg", 2, "cause"),  # ip link add: RTNETLINK answers EPERM, exit 2
            (32, "sendto", 1, "cause"),
            (32, "sendmsg", 0, "unknown"),  # exited 0: may have coped, never "probe"
            (32, "sendmsg", None, "unknown"),  # exit not seen
            (5, "write", None, "unknown"),
            (0, "ioctl", None, "probe"),  # not a send: success is success
            (-errno.EPERM, "sendmsg", None, "cause"),  # netlink_sendmsg's own check
        ],
    )
    def test_table(self, ret: int, syscall: str, exit_code: int | None, role: str) -> None:
        """A denial in a send-family syscall that succeeded is never a probe."""
        assert role == role_of(ret, syscall, exit_code)


class TestJoinerWaitsForExit:
    def test_exit_status_reaches_the_denial(self) -> None:
        """denial in sendmsg, its outcome (success), then the process's exit record (2):
        one Joined with the exit status, a cause."""
        out: list[Joined] = []
        j = OutcomeJoiner(out.append)
        j.feed(event(F_DENIED))
        j.feed(event(F_OUTCOME, ret=32, cap=-1))
        assert [] == out  # held until the exit
        j.feed(event(F_OUTCOME | F_EXIT, ret=2, cap=-1, nr="exit_group"))
        assert [(32, 2, "cause", True)] == [
            (x.ret, x.exit_code, x.role, x.asynchronous) for x in out
        ]

    def test_no_exit_seen_is_unknown(self) -> None:
        """Without an exit record, flush and expire give the denial as unknown, not probe."""
        out: list[Joined] = []
        j = OutcomeJoiner(out.append, max_wait_ns=10)
        j.feed(event(F_DENIED, ts=0))
        j.feed(event(F_OUTCOME, ret=32, cap=-1, ts=1))
        j.expire(5)
        assert [] == out
        j.expire(100)
        assert ["unknown"] == [x.role for x in out]

    def test_refusal_records_go_to_their_own_callback(self) -> None:
        """A refusal record is no denial: it reaches on_refusal and nothing else."""
        out: list[Joined] = []
        refused: list[Event] = []
        j = OutcomeJoiner(out.append, on_refusal=refused.append)
        ev = event(F_OUTCOME | F_REFUSAL, ret=-errno.EPERM, cap=-1, nr="clock_settime")
        j.feed(ev)
        j.flush()
        assert ([], [ev]) == (out, refused)

    def test_fields_for_records(self) -> None:
        """What trace and serve store about the outcome: exit status included."""
        assert {"outcome": "success", "role": "cause", "syscall_ret": 32, "exit_code": 2} == (
            Joined(event(F_DENIED), 32, 2).fields()
        )


class TestExplainAsynchronous:
    def test_netlink_in_container_is_a_cause_with_the_fix(self) -> None:
        """ip in a podman container without NET_ADMIN: a cause, the podman fix, the container."""
        ex = explain(
            DenialFacts(
                cap=NET_ADMIN,
                syscall="sendmsg",
                comm="ip",
                pid=42,
                ret=32,
                exit_code=2,
                status=status(),
                kind="podman",
                container="web",
                container_id="3c1471702d71aa",
            )
        )
        assert ("cause", True, "bounding") == (ex.role, ex.asynchronous, ex.missing_from)
        assert [{"context": "podman", "fix": "podman run --cap-add=NET_ADMIN ..."}] == ex.fixes
        assert "asynchronous" in ex.summary
        assert "Nothing to grant" not in ex.summary
        assert ex.render().startswith(
            "CAP_NET_ADMIN denied to ip (pid 42) in podman container web (3c1471702d71) in sendmsg"
        )

    def test_reply_not_seen_is_unknown_not_probe(self) -> None:
        """Exit not seen: unknown, and the fix is still offered."""
        ex = explain(
            DenialFacts(cap=NET_ADMIN, syscall="sendto", comm="ip", pid=42, ret=20, status=status())
        )
        assert "unknown" == ex.role
        assert "Nothing to grant" not in ex.summary
        assert ex.fixes

    def test_advise_proposes_net_admin(self) -> None:
        """advise: an asynchronous cause is missing, with evidence that names the reply."""
        a = advise(
            [Observation(NET_ADMIN, True, "sendmsg", "ip", role="cause", outcome="success")],
            duration_s=5,
            target="t",
        )
        assert [NET_ADMIN] == a.caps
        assert "--cap-add=NET_ADMIN" in a.docker()
        assert "refused in the reply" in a.missing[NET_ADMIN][0]


def _denial(**kw: object) -> Check:
    return a_denial(**kw)


class TestRecentKeepsEachOutcome:
    def test_cause_then_success_stays_a_cause(self, tmp_path: Path) -> None:
        """The same (comm, cap, syscall) first refused (EPERM), then allowed through (success):
        explain --last shows the cause and the probe, not the probe only (defect 2)."""
        path = str(tmp_path / "recent.json")
        r = RecentDenials(path)
        r.write(_denial(ret=-1))
        r.write(_denial(ret=0))
        r.close()
        assert ["probe", "cause"] == [e.role for e in read_recent(path, 5)]

    def test_container_name_and_id_are_kept(self, tmp_path: Path) -> None:
        """explain --last names the container (name and id) and writes the podman fix (defect 3)."""
        path = str(tmp_path / "recent.json")
        r = RecentDenials(path)
        sets = ProcStatus(7, "date", 0, 0, 0, SEED, SEED, SEED, 0)
        r.write(
            _denial(
                ret=-1,
                container="web",
                kind="podman",
                runtime="podman",
                container_id="0123456789abcdef",
                container_name="web",
                status=sets,
            )
        )
        r.close()
        [ex] = read_recent(path, 1)
        d = ex.to_dict()
        assert ("web", "0123456789abcdef", "podman") == (
            d["container"],
            d["container_id"],
            d["kind"],
        )
        assert [{"context": "podman", "fix": "podman run --cap-add=SYS_TIME ..."}] == ex.fixes
        assert " in podman container web " in ex.render()


class TestShortLivedContainerProcess:
    def test_root_in_container_gets_no_setcap_or_run_as_root(self) -> None:
        """The process is gone (no sets read) but ran as root in a container: only the
        container's --cap-add is offered, the bounding set is named as inferred (defect 4)."""
        ex = explain(
            DenialFacts(
                cap=25, syscall="clock_settime", comm="date", pid=42, ret=-1, kind="podman", uid=0
            )
        )
        assert "bounding (inferred)" == ex.missing_from
        assert [{"context": "podman", "fix": "podman run --cap-add=SYS_TIME ..."}] == ex.fixes

    def test_caps_source_is_stated(self) -> None:
        """Sets read from somewhere other than the process say where from."""
        ex = explain(
            DenialFacts(
                cap=25,
                syscall="clock_settime",
                comm="date",
                pid=42,
                ret=-1,
                kind="podman",
                status=status(),
                caps_source="the container's OCI config",
            )
        )
        assert "(capability sets from the container's OCI config)" in ex.details


class TestText:
    def test_host_process_warning_does_not_speak_of_containers(self) -> None:
        """A dangerous capability refused to a host process: the host's warning, word for word,
        and nothing of containers; the same denial in a container keeps the container's."""
        host = explain(
            DenialFacts(cap=SYS_ADMIN, syscall="mount", comm="m", pid=1, ret=-1, status=status())
        )
        assert (
            "CAP_SYS_ADMIN is dangerous: a process holding it can take over the host. "
            "Grant it to this program only, not to its whole service or shell."
        ) == host.warning
        assert "container" not in host.render()
        boxed = explain(
            DenialFacts(
                cap=SYS_ADMIN,
                syscall="mount",
                comm="m",
                pid=1,
                ret=-1,
                status=status(),
                kind="podman",
                container="web",
            )
        )
        assert boxed.warning is not None
        assert "granting it to a container is as good as giving it root" in boxed.warning

    def test_dac_pair_either_would_do(self) -> None:
        """DAC_OVERRIDE and DAC_READ_SEARCH both refused in one openat: each finding names the
        other in the one sentence that says either would do; a lone DAC_OVERRIDE (a write)
        says nothing of the kind."""
        override, read_search = parse_cap("CAP_DAC_OVERRIDE"), parse_cap("CAP_DAC_READ_SEARCH")
        both = [
            explain(
                DenialFacts(cap=c, syscall="openat", comm="cat", pid=9, ret=-13, status=status())
            )
            for c in (read_search, override)
        ]
        out = fold(both)
        assert [
            "CAP_DAC_READ_SEARCH and CAP_DAC_OVERRIDE were both refused in this openat: "
            "either would do (CAP_DAC_READ_SEARCH is the narrower, for reading and searching "
            "only).",
            "CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH were both refused in this openat: "
            "either would do (CAP_DAC_READ_SEARCH is the narrower, for reading and searching "
            "only).",
        ] == [next((d for d in e.details if "either would do" in d), None) for e in out]
        [alone] = fold(
            [
                explain(
                    DenialFacts(
                        cap=override, syscall="openat", comm="tee", pid=9, ret=-13, status=status()
                    )
                )
            ]
        )
        assert not any("either would do" in d for d in alone.details)

    def test_kallsyms_syslog_changes_the_result(self) -> None:
        """CAP_SYSLOG refused in an openat that succeeded: the addresses read are zeros."""
        ex = explain(
            DenialFacts(cap=parse_cap("CAP_SYSLOG"), syscall="openat", comm="cat", pid=9, ret=3)
        )
        assert "Nothing to grant" not in ex.summary
        assert "zeros" in ex.summary

    def test_memory_accounting_probes_fold_into_one(self) -> None:
        """CAP_SYS_ADMIN probes of mmap, brk, clone and execve become one line, counts summed."""
        exps = [
            explain(DenialFacts(cap=SYS_ADMIN, syscall=s, comm=c, pid=9, ret=0, count=n))
            for s, c, n in (("mmap", "sh", 3), ("brk", "sh", 2), ("execve", "ip", 1))
        ]
        exps.append(
            explain(DenialFacts(cap=NET_ADMIN, syscall="sendmsg", comm="ip", pid=9, ret=-1))
        )
        out = fold(exps)
        assert [("mmap,brk,execve", "sh,ip", 6), ("sendmsg", "ip", 1)] == [
            (e.syscall, e.comm, e.count) for e in out
        ]

    def test_advise_merges_repeated_evidence(self) -> None:
        """Three identical observations are one line of evidence with x3, and one capability
        'amounts' to root."""
        o = Observation(SYS_ADMIN, True, "mount", "m", role="cause", outcome="EPERM")
        a = advise([o, o, o], duration_s=1, target="t")
        assert ["denied in mount (m) x3, the call failed with EPERM"] == a.missing[SYS_ADMIN]
        assert "CAP_SYS_ADMIN amounts to root" in a.render()
