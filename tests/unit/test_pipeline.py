"""capwatch.pipeline: one path from ring batches to sinks, whichever command watches."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np

from capwatch.attribution.containers import Workload, classify
from capwatch.commands.serve import serve_pipeline
from capwatch.commands.trace import trace_pipeline
from capwatch.decode.events import EVENT_DTYPE, F_DENIED, F_OUTCOME, Batch
from capwatch.diagnose.policy import Policy
from capwatch.pipeline import Check, facts_of
from capwatch.sinks.recent import RecentDenials, read_recent
from tests.helpers import FIXTURES

PODMAN_ID = "4f" * 32
PATHS = {
    7: "/machine.slice/libpod-" + PODMAN_ID + ".scope/container",
    9: "/system.slice/ntp.service",
    1: "/",
}
CLOCK_SETTIME, IOCTL, MMAP, SETUID = 227, 16, 9, 105


def resolve(cgroup_id: int) -> Workload:
    return classify(PATHS.get(cgroup_id, "/"), cgroup_id)


def batch(rows: list[tuple[int, int, int, int, int, int, int, int, int, bytes]]) -> Batch:
    """Records as the kernel writes them (struct cw_event), in ring order:
    (ts, cgroup, pid, cap, syscall, ret, flags, suppressed, tid, comm)."""
    b = np.zeros(len(rows), dtype=EVENT_DTYPE)
    for i, (ts, cg, pid, cap, nr, ret, flags, sup, tid, comm) in enumerate(rows):
        b[i] = (ts, cg, pid, tid or pid, 0, cap, nr, ret, flags, sup, comm)
    return b


#: A recorded scenario: date denied CAP_SYS_TIME (its clock_settime failed with
#: EPERM), ifconfig's CAP_NET_ADMIN probe (ioctl then failed with ENODEV), an
#: mmap's CAP_SYS_ADMIN check (expected by the default policy, 3 more rate-limited),
#: and an allowed setuid check on the other ring.
DENIALS = batch(
    [
        (1_000, 7, 101, 25, CLOCK_SETTIME, 0, F_DENIED, 0, 0, b"date"),
        (1_100, 7, 101, 0, CLOCK_SETTIME, -errno.EPERM, F_OUTCOME, 0, 0, b"date"),
        (2_000, 9, 202, 12, IOCTL, 0, F_DENIED, 0, 0, b"ifconfig"),
        (2_100, 9, 202, 0, IOCTL, -errno.ENODEV, F_OUTCOME, 0, 0, b"ifconfig"),
        (3_000, 9, 303, 21, MMAP, 0, F_DENIED, 3, 0, b"worker"),
        (3_100, 9, 303, 0, MMAP, 0, F_OUTCOME, 0, 0, b"worker"),
    ]
)
CHECKS = batch([(4_000, 1, 404, 7, SETUID, 0, 0, 0, 0, b"su")])


class Recorder:
    def __init__(self) -> None:
        self.checks: list[Check] = []
        self.ticks = 0
        self.closed = False

    def write(self, check: Check) -> None:
        self.checks.append(check)

    def tick(self) -> None:
        self.ticks += 1

    def close(self) -> None:
        self.closed = True


def run(pipeline_of: object, *, proc_root: str = "/nonexistent") -> list[Check]:
    rec = Recorder()
    p = pipeline_of(rec, proc_root)  # type: ignore[operator]
    p.on_batch("denials", DENIALS)
    p.on_batch("checks", CHECKS)
    p.tick()
    p.close()
    assert rec.closed
    return rec.checks


def without_time(c: Check) -> dict[str, object]:
    d = c.to_dict(with_caps=True)
    del d["time"]
    return d


def trace_of(rec: Recorder, proc_root: str) -> object:
    return trace_pipeline(
        resolve, [rec], policy=Policy.load(None), outcome=True, proc_root=proc_root
    )


def serve_of(rec: Recorder, proc_root: str) -> object:
    return serve_pipeline(
        resolve, [rec], policy=Policy.load(None), outcome=True, proc_root=proc_root
    )


class TestOneRecordWhicheverCommand:
    def test_trace_and_serve_make_the_same_denial_records(self) -> None:
        """The same recorded batch through trace's and serve's configurations gives
        the same records for every denial (serve does not stream allowed checks)."""
        traced = [c for c in run(trace_of) if c.denied]
        served = run(serve_of)
        # each pipeline has its own clock (monotonic to wall): equal to a millisecond
        assert all(abs(a.time - b.time) < 1e-3 for a, b in zip(traced, served, strict=True))
        assert [without_time(c) for c in traced] == [without_time(c) for c in served]
        assert 3 == len(served)

    def test_denials_are_classified_by_policy_and_outcome_in_both(self) -> None:
        """Each denial carries its class: a cause is unexpected; a probe whose syscall
        failed otherwise, and a policy's known probe, are expected, with the reason."""
        for checks in (run(trace_of), run(serve_of)):
            by_comm = {c.comm: c for c in checks if c.denied}
            assert (False, None, "cause") == (
                by_comm["date"].expected,
                by_comm["date"].rule,
                by_comm["date"].role,
            )
            assert (True, "outcome:ENODEV") == (
                by_comm["ifconfig"].expected,
                by_comm["ifconfig"].rule,
            )
            assert (True, "vm-enough-memory-probe", 4) == (
                by_comm["worker"].expected,
                by_comm["worker"].rule,
                by_comm["worker"].count,
            )

    def test_trace_streams_allowed_checks_unclassified(self) -> None:
        """trace shows allowed checks too; they carry no class."""
        [allowed] = [c for c in run(trace_of) if not c.denied]
        assert ("su", "CAP_SETUID", "allowed", None, None) == (
            allowed.comm,
            allowed.capability,
            allowed.verdict,
            allowed.expected,
            allowed.outcome,
        )

    def test_container_identity_is_in_the_record(self) -> None:
        """The podman container's id reaches the record (its name is learnt later)."""
        [date] = [c for c in run(serve_of) if c.comm == "date"]
        assert ("podman", PODMAN_ID) == (date.runtime, date.container_id)


class TestRecordRoundTrip:
    def test_to_dict_and_back(self) -> None:
        """A state file's record turns back into the same check (sets included)."""
        proc = str(FIXTURES / "proc")
        rec = Recorder()
        p = serve_pipeline(resolve, [rec], policy=Policy.load(None), outcome=True, proc_root=proc)
        p.on_batch(
            "denials",
            batch(
                [
                    (1_000, 7, 1234, 25, CLOCK_SETTIME, 0, F_DENIED, 0, 0, b"date"),
                    (1_100, 7, 1234, 0, CLOCK_SETTIME, -errno.EPERM, F_OUTCOME, 0, 0, b"date"),
                ]
            ),
        )
        p.close()
        [check] = rec.checks
        assert check.status is not None, "the sets of pid 1234 in the fixture /proc were read"
        again = Check.from_dict(check.to_dict(with_caps=True))
        assert check.to_dict(with_caps=True) == again.to_dict(with_caps=True)
        assert facts_of(check) == facts_of(again)

    def test_from_dict_rejects_a_foreign_record(self) -> None:
        """A record without the fields a check needs is a ValueError, not a KeyError."""
        import pytest

        with pytest.raises(ValueError, match="not a capwatch record"):
            Check.from_dict({"comm": "x"})


class TestRecentSink:
    def test_serve_records_recent_denials_with_their_outcome(self, tmp_path: Path) -> None:
        """serve's pipeline keeps each distinct denial for explain --last, with its
        syscall result: explain reads a cause, with the fix for the context."""
        path = str(tmp_path / "recent.json")
        p = serve_pipeline(resolve, [RecentDenials(path)], policy=Policy.load(None), outcome=True)
        p.on_batch("denials", DENIALS)
        p.close()
        exps = read_recent(path, 5)
        date = next(e for e in exps if e.comm == "date")
        assert ("CAP_SYS_TIME", "clock_settime", "cause") == (
            date.capability,
            date.syscall,
            date.role,
        )
        assert "podman" == date.fixes[0]["context"]


class TestSnapshots:
    def test_sets_are_read_when_the_denial_arrives_before_any_hold(self) -> None:
        """A denying process's sets are read on arrival: an unnamed workload's event
        waits in the hold queue, but its sets were taken before."""
        reads: list[int] = []
        unnamed = Workload(kind="unknown", cgroup_id=5)  # not walked yet: held
        rec = Recorder()

        def snapshot(ev: object) -> None:
            reads.append(ev.pid)  # type: ignore[attr-defined]

        from capwatch.pipeline import Pipeline

        p = Pipeline(lambda cg: unnamed, [rec], snapshot=snapshot)  # type: ignore[arg-type]
        p.on_batch("denials", batch([(1, 5, 77, 25, CLOCK_SETTIME, 0, F_DENIED, 0, 0, b"x")]))
        assert ([77], []) == (reads, rec.checks)
        p.close()
        assert [77] == [c.pid for c in rec.checks]


class TestTenantControlledEvidence:
    """A send-family denial judged a probe by what the process itself controls (the
    netlink reply it read, what its fd is when capwatch looks) is shown as a probe
    but never classified as expected: a tenant could forge an ack, or dup2 a file
    over its netlink socket, to keep its denial away from the unexpected-denial alert."""

    SENDMSG, WRITE = 46, 1

    def serve_checks(
        self,
        rows: list[tuple[int, int, int, int, int, int, int, int, int, bytes]],
        kind: str | None = None,
    ) -> list[Check]:
        from capwatch.pipeline import Pipeline

        rec = Recorder()
        p = Pipeline(
            resolve,
            [rec],
            policy=Policy.load(None),
            outcome=True,
            fd_kind=lambda _pid, _fd: kind,
        )
        p.on_batch("denials", batch(rows))
        p.close()
        return [c for c in rec.checks if c.denied]

    def test_forged_ack_is_a_probe_but_not_expected(self) -> None:
        from capwatch.decode.events import F_REPLY

        [c] = self.serve_checks(
            [
                (1_000, 7, 101, 12, self.SENDMSG, 0, F_DENIED, 0, 0, b"ip"),
                (1_100, 7, 101, 0, self.SENDMSG, 32, F_OUTCOME, 0, 0, b"ip"),
                (1_200, 7, 101, 0, 47, 0, F_OUTCOME | F_REPLY, 0, 0, b"ip"),
            ]
        )
        assert ("probe", "ack", False, None) == (
            c.role,
            c.to_dict()["reply"],
            c.expected,
            c.rule,
        )

    def test_synchronous_probe_is_still_expected(self) -> None:
        [c] = self.serve_checks(
            [
                (2_000, 9, 202, 12, IOCTL, 0, F_DENIED, 0, 0, b"ifconfig"),
                (2_100, 9, 202, 0, IOCTL, -errno.ENODEV, F_OUTCOME, 0, 0, b"ifconfig"),
            ]
        )
        assert (True, "outcome:ENODEV") == (c.expected, c.rule)

    def test_fd_seen_as_a_file_is_a_probe_but_not_expected(self) -> None:
        from capwatch.decode.events import F_FD

        [c] = self.serve_checks(
            [
                (3_000, 7, 303, 4, self.WRITE, 0, F_DENIED, 0, 0, b"sh"),
                (3_100, 7, 303, 0, self.WRITE, 2, F_OUTCOME | F_FD, 5, 0, b"sh"),
            ],
            kind="file",
        )
        assert ("probe", "file", False) == (c.role, c.channel, c.expected)
