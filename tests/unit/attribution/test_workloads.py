"""Identity of workloads as users see them, filters, and the hold queue."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest

from capwatch.attribution.containers import Attributor, Workload, classify, unresolved
from capwatch.attribution.workloads import HoldQueue, WorkloadFilter, identity_of, is_settled
from capwatch.decode.events import Event

CID = "340583a2a7181ca3900b47c12ac598e49d84f0a748abd3279b7ca3228a636bc1"
PODMAN_PATH = f"/libpod_parent/libpod-{CID}"


def ev(cgroup_id: int, pid: int = 1) -> Event:
    return Event(0, cgroup_id, pid, pid, 0, 25, 227, -1, 1, 0, "date")


class TestIdentity:
    def test_podman_with_name(self) -> None:
        """A named podman container: column shows the name; JSON carries id and runtime."""
        w = classify(PODMAN_PATH, 7)
        from dataclasses import replace

        ident = identity_of(replace(w, name="web"))
        assert {
            "container": "web",
            "kind": "podman",
            "runtime": "podman",
            "container_id": CID,
            "container_name": "web",
            "pod": "",
            "namespace": "",
        } == ident

    def test_host(self) -> None:
        """The root cgroup is the host."""
        assert ("host", "host") == (
            identity_of(classify("/", 1))["container"],
            identity_of(classify("/", 1))["runtime"],
        )


class TestFilter:
    REC: ClassVar[dict[str, str]] = {
        "container": "web",
        "kind": "podman",
        "container_id": CID,
        "container_name": "web",
        "pod": "",
        "namespace": "",
    }

    @pytest.mark.parametrize(
        ("kw", "keep"),
        [
            ({"container": "web"}, True),
            ({"container": CID[:12]}, True),
            ({"container": "db"}, False),
            ({"container": "34"}, False),
            ({"host_only": True}, False),
            ({"pod": "p"}, False),
            ({}, True),
        ],
    )
    def test_container_record(self, kw: dict[str, object], keep: bool) -> None:
        """--container matches a name or an id prefix (3+ characters); --host-only drops containers."""
        rec = SimpleNamespace(**self.REC)  # what the filter reads of a pipeline.Check
        assert keep == WorkloadFilter(**kw)(rec)  # type: ignore[arg-type]


class TestHoldQueue:
    def test_settled_events_pass_at_once(self) -> None:
        """Events of known workloads are emitted immediately."""
        out: list[Event] = []
        q = HoldQueue(lambda cg: classify("/", cg), out.append)
        q.push(ev(1))
        assert [1] == [e.cgroup_id for e in out]

    def test_unsettled_event_waits_and_keeps_order(self) -> None:
        """A new cgroup's event waits until resolved; later events wait behind it, in order."""
        now = [0.0]
        known: dict[int, Workload] = {1: classify("/", 1)}
        out: list[Event] = []
        q = HoldQueue(lambda cg: known.get(cg, unresolved(cg)), out.append, clock=lambda: now[0])
        q.push(ev(9, pid=1))
        q.push(ev(1, pid=2))
        q.flush()
        assert [] == out
        known[9] = classify("/system.slice/foo.service", 9)
        q.flush()
        assert [1, 2] == [e.pid for e in out]

    def test_hold_is_bounded(self) -> None:
        """An identity that never settles is shown after max_hold_s as it is."""
        now = [0.0]
        out: list[Event] = []
        q = HoldQueue(unresolved, out.append, max_hold_s=1.0, clock=lambda: now[0])
        q.push(ev(9))
        now[0] = 0.5
        q.flush()
        assert 1 == len(q)
        now[0] = 1.0
        q.flush()
        assert (0, 1) == (len(q), len(out))

    def test_container_without_name_is_not_settled(self) -> None:
        """A podman container whose name is not known yet is not settled."""
        assert not is_settled(classify(PODMAN_PATH, 7))
        assert is_settled(classify("/", 1))


class TestNotePid:
    def test_short_lived_cgroup_learnt_from_its_process(self, tmp_path: Path) -> None:
        """A cgroup removed before any walk is still attributed: its process's
        /proc/PID/cgroup gives the path (read once, when its first event comes)."""
        root = tmp_path / "cgroup"
        root.mkdir()
        proc = tmp_path / "proc"
        (proc / "42").mkdir(parents=True)
        (proc / "42" / "cgroup").write_text(f"0::{PODMAN_PATH}\n")
        a = Attributor(cgroup_root=str(root), proc_root=str(proc), names=False, background=False)
        try:
            out: list[Event] = []
            q = HoldQueue(a.resolve, out.append, note_pid=a.note_pid)
            q.push(ev(777, pid=42))
            w = a.resolve(777)
            assert ("podman", CID) == (w.runtime, w.container_id)
            assert PODMAN_PATH == w.cgroup_path
        finally:
            a.close()

    def test_moved_process_is_not_trusted(self, tmp_path: Path) -> None:
        """If the process's current cgroup exists with another id, nothing is learnt."""
        root = tmp_path / "cgroup"
        (root / "other").mkdir(parents=True)
        proc = tmp_path / "proc"
        (proc / "42").mkdir(parents=True)
        (proc / "42" / "cgroup").write_text("0::/other\n")
        a = Attributor(cgroup_root=str(root), proc_root=str(proc), names=False, background=False)
        try:
            a.note_pid(999_999, 42)
            assert a.resolve(999_999).cgroup_path is None
        finally:
            a.close()


    def test_a_gone_process_does_not_silence_a_live_one(self, tmp_path: Path) -> None:
        """The first process of a new cgroup (runc, gone at once) cannot tell its path;
        a later, living process of the same cgroup still can."""
        root = tmp_path / "cgroup"
        root.mkdir()
        proc = tmp_path / "proc"
        (proc / "43").mkdir(parents=True)
        (proc / "43" / "cgroup").write_text(f"0::{PODMAN_PATH}\n")
        a = Attributor(cgroup_root=str(root), proc_root=str(proc), names=False, background=False)
        try:
            a.note_pid(777, 42)  # no /proc/42: gone
            assert a.resolve(777).cgroup_path is None
            a.note_pid(777, 43)
            assert PODMAN_PATH == a.resolve(777).cgroup_path
        finally:
            a.close()


def test_hold_gives_up_on_a_workload_that_never_settles() -> None:
    """After one event of a cgroup waited the full hold, later events of it pass at once."""
    now = [0.0]
    out: list[Event] = []
    q = HoldQueue(unresolved, out.append, max_hold_s=1.0, clock=lambda: now[0])
    q.push(ev(9, pid=1))
    now[0] = 1.0
    q.flush()
    q.push(ev(9, pid=2))
    assert [1, 2] == [e.pid for e in out]
