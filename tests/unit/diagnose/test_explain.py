"""Explaining denials and joining them with syscall outcomes, without a kernel."""

from __future__ import annotations

import errno
from dataclasses import replace

import pytest

from capwatch.decode.events import F_DENIED, F_OUTCOME, Event
from capwatch.decode.procfs import ProcStatus
from capwatch.diagnose.explain import DenialFacts, explain
from capwatch.diagnose.outcome import Joined, OutcomeJoiner, outcome_text, role_of

FULL = (1 << 41) - 1
SEED = 0x1DBDBEFFFF  # the seed post's container: no SYS_MODULE, SYS_BOOT, SYS_TIME, ...


def status(prm: int = FULL, eff: int = FULL, bnd: int = FULL, uid: int = 0) -> ProcStatus:
    return ProcStatus(
        pid=42,
        name="x",
        uid=uid,
        euid=uid,
        cap_inh=0,
        cap_prm=prm,
        cap_eff=eff,
        cap_bnd=bnd,
        cap_amb=0,
    )


def ev(
    tid: int,
    *,
    cap: int = 25,
    denied: bool = True,
    outcome: bool = False,
    ret: int = -1,
    ts: int = 0,
    nr: int = 227,
) -> Event:
    flags = (F_DENIED if denied else 0) | (F_OUTCOME if outcome else 0)
    return Event(ts, 1, tid, tid, 0, -1 if outcome else cap, nr, ret, flags, 0, "date")


class TestOutcomeText:
    @pytest.mark.parametrize(
        ("ret", "text", "role"),
        [
            (-errno.EPERM, "EPERM", "cause"),
            (-errno.EACCES, "EACCES", "cause"),
            (-errno.ENODEV, "ENODEV", "probe"),
            (0, "success", "probe"),
            (32, "success", "probe"),
            (None, "unknown", "unknown"),
            (-4095, "errno:4095", "probe"),
        ],
    )
    def test_table(self, ret: int | None, text: str, role: str) -> None:
        """EPERM/EACCES make a denial a cause; success or another errno a probe."""
        assert (text, role) == (outcome_text(ret), role_of(ret))


class TestJoiner:
    def test_outcome_joins_all_denials_of_the_thread(self) -> None:
        """Both denials of an ioctl get its ENODEV; another thread's denial waits for its own."""
        out: list[Joined] = []
        j = OutcomeJoiner(out.append)
        j.feed(ev(1, cap=12, nr=16))
        j.feed(ev(1, cap=16, nr=16))
        j.feed(ev(2, cap=25))
        j.feed(ev(1, outcome=True, ret=-errno.ENODEV, nr=16))
        assert [(12, -19), (16, -19)] == [(x.event.cap, x.ret) for x in out]
        j.feed(ev(2, outcome=True, ret=-1))
        assert (25, "EPERM", "cause") == (out[2].event.cap, out[2].outcome, out[2].role)

    def test_allowed_checks_pass_straight_through(self) -> None:
        """Allowed checks are not held: they have no outcome to wait for."""
        out: list[Joined] = []
        OutcomeJoiner(out.append).feed(ev(1, denied=False, ret=0))
        assert [None] == [x.ret for x in out]

    def test_expire_and_flush(self) -> None:
        """A denial whose outcome never comes is emitted as unknown after the wait, or at flush."""
        out: list[Joined] = []
        j = OutcomeJoiner(out.append, max_wait_ns=100)
        j.feed(ev(1, ts=1000))
        j.feed(ev(2, ts=1050))
        j.expire(1101)
        assert [(1, None)] == [(x.event.tid, x.ret) for x in out]
        j.flush()
        assert [1, 2] == [x.event.tid for x in out]


class TestExplain:
    def test_date_in_container_bounding_set(self) -> None:
        """date -s in a podman container: EPERM, bounding set lacks SYS_TIME, fix --cap-add=SYS_TIME."""
        ex = explain(
            DenialFacts(
                cap=25,
                syscall="clock_settime",
                comm="date",
                pid=42,
                ret=-1,
                status=status(SEED, SEED, SEED),
                kind="podman",
                container="web",
            )
        )
        assert ("cause", "EPERM", "bounding") == (ex.role, ex.outcome, ex.missing_from)
        assert [{"context": "podman", "fix": "podman run --cap-add=SYS_TIME ..."}] == ex.fixes
        assert ex.warning is None

    def test_containerd_fix_in_ctr_words(self) -> None:
        """A container run by containerd itself: ctr's flag takes the CAP_ name (ctr refuses
        SYS_TIME: tests/kernel/test_runtimes.py), nerdctl's the short one; Kubernetes'
        securityContext only in containerd's k8s.io namespace."""
        facts = DenialFacts(
            cap=25,
            syscall="clock_settime",
            comm="date",
            pid=42,
            ret=-1,
            status=status(bnd=SEED),
            kind="containerd",
            container="t7",
            namespace="cwtest",
        )
        assert [
            {"context": "ctr", "fix": "ctr run --cap-add CAP_SYS_TIME ..."},
            {"context": "nerdctl", "fix": "nerdctl run --cap-add=SYS_TIME ..."},
        ] == explain(facts).fixes
        k8s = explain(replace(facts, namespace="k8s.io")).fixes
        assert ["kubernetes", "ctr", "nerdctl"] == [f["context"] for f in k8s]

    def test_kubernetes_fix_names_the_pod(self) -> None:
        """In a pod the fix is a securityContext naming the container and pod."""
        ex = explain(
            DenialFacts(
                cap=25,
                syscall="clock_settime",
                comm="date",
                pid=42,
                ret=-1,
                status=status(bnd=SEED),
                kind="kubernetes",
                container="app",
                pod="web-0",
                namespace="prod",
            )
        )
        assert (
            'securityContext: {capabilities: {add: ["SYS_TIME"]}} on container app of pod prod/web-0'
            == ex.fixes[0]["fix"]
        )

    def test_probe_enodev(self) -> None:
        """ifconfig on a missing device: SYS_MODULE denied but ioctl failed with ENODEV: a probe, no fix."""
        ex = explain(
            DenialFacts(
                cap=16,
                syscall="ioctl",
                comm="ifconfig",
                pid=42,
                ret=-errno.ENODEV,
                status=status(bnd=SEED),
                kind="podman",
            )
        )
        assert ("probe", "ENODEV", []) == (ex.role, ex.outcome, ex.fixes)
        assert "not EPERM" in ex.summary

    def test_known_probe_without_outcome(self) -> None:
        """Without outcome mode, a policy rule for a known probe still marks it a probe."""
        ex = explain(
            DenialFacts(
                cap=16,
                syscall="ioctl",
                comm="ifconfig",
                pid=42,
                known_probe="dev-load-module-probe",
            )
        )
        assert "probe" == ex.role
        assert "dev-load-module-probe" in ex.summary

    def test_permitted_not_effective(self) -> None:
        """Permitted but not effective: the program must raise it; fix names capset and setcap +ep."""
        eff = FULL & ~(1 << 25)
        ex = explain(
            DenialFacts(
                cap=25, syscall="clock_settime", comm="ntpd", pid=42, ret=-1, status=status(eff=eff)
            )
        )
        assert "effective" == ex.missing_from
        assert ["program"] == [f["context"] for f in ex.fixes]
        assert "setcap cap_sys_time+ep" in ex.fixes[0]["fix"]

    def test_non_root_user_lacks_permitted(self) -> None:
        """A non-root user: in bounding, not permitted: setcap / ambient fixes."""
        ex = explain(
            DenialFacts(
                cap=13,
                syscall="socket",
                comm="ping",
                pid=42,
                ret=-1,
                status=status(prm=0, eff=0, uid=1000),
            )
        )
        assert "permitted" == ex.missing_from
        assert {"file", "systemd"} == {f["context"] for f in ex.fixes}
        assert "setcap cap_net_raw+ep /path/to/ping" == ex.fixes[0]["fix"]

    def test_dangerous_capability_warns(self) -> None:
        """Granting SYS_MODULE to a container comes with a host-root warning."""
        ex = explain(
            DenialFacts(
                cap=16,
                syscall="init_module",
                comm="modprobe",
                pid=42,
                ret=-1,
                status=status(bnd=SEED),
                kind="docker",
            )
        )
        assert [{"context": "docker", "fix": "docker run --cap-add=SYS_MODULE ..."}] == ex.fixes
        assert ex.warning is not None
        assert "root on the host" in ex.warning

    def test_user_namespace(self) -> None:
        """A resource owned by a container's user namespace: the capability in that namespace
        is enough, so the usual fix stands, and the detail says so."""
        ex = explain(
            DenialFacts(
                cap=25,
                syscall="clock_settime",
                comm="date",
                pid=42,
                ret=-1,
                status=status(bnd=SEED),
                kind="podman",
                userns=True,
            )
        )
        assert [{"context": "podman", "fix": "podman run --cap-add=SYS_TIME ..."}] == ex.fixes
        assert any("belongs to a user namespace other than the host's" in d for d in ex.details)

    def test_process_gone(self) -> None:
        """Without the process's status, the set is unknown and both kinds of fix are offered."""
        ex = explain(DenialFacts(cap=25, syscall="clock_settime", comm="date", pid=42, ret=-1))
        assert "unknown" == ex.missing_from
        assert {"host", "file", "systemd"} == {f["context"] for f in ex.fixes}


class TestRecent:
    def test_repeat_keeps_first_sets_and_outcome_reaches_explain(self, tmp_path: object) -> None:
        """A repeated denial keeps the capability sets read the first time; --last tells a
        cause from a probe with the stored syscall result."""
        from dataclasses import replace
        from pathlib import Path

        from capwatch.decode.procfs import ProcStatus
        from capwatch.pipeline import Check
        from capwatch.sinks.recent import RecentDenials, read_recent

        path = str(Path(str(tmp_path)) / "recent.json")
        r = RecentDenials(path)
        check = Check(
            time=1_700_000_000.0,
            pid=7,
            tid=7,
            uid=0,
            comm="date",
            cgroup_id=5,
            container="web",
            kind="podman",
            runtime="podman",
            container_id="ab" * 32,
            container_name="web",
            pod="",
            namespace="",
            cap=25,
            denied=True,
            syscall_nr=227,  # clock_settime
            ret=-1,
            joined=True,
        )
        sets = ProcStatus(7, "date", 0, 0, 0, SEED, SEED, SEED, 0)
        r.write(replace(check, status=sets))
        r.write(check)  # the same denial again, the process already gone
        r.close()
        [ex] = read_recent(path, 5)
        assert ("cause", "bounding", 2) == (ex.role, ex.missing_from, ex.count)
        assert [{"context": "podman", "fix": "podman run --cap-add=SYS_TIME ..."}] == ex.fixes
