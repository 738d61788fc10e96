"""Following the containers a command starts, and waiting for one (capwatch.diagnose.follow)."""

from __future__ import annotations

import pytest

from capwatch.attribution.containers import classify
from capwatch.diagnose.explain import DenialFacts, explain
from capwatch.diagnose.follow import (
    ContainerFollower,
    match_container,
    requested_name,
    started_runtime,
    tolerate_runtime,
    wait_for,
)

CID = "c9aaf7c882cf5ab0d09692df980ace38151a1473cba01d8db2acd8c8e2ad10db"
OTHER = "95b6f9caecb3ea984b256e8c4cc0f87e7feca5e7d24e542beb36e9c5398c6d2f"
# cgroup paths as podman 4.3 (cgroupfs manager) made them here, /proc/self/cgroup
PODMAN = classify(f"/libpod_parent/libpod-{CID}", 101)
PODMAN_OTHER = classify(f"/libpod_parent/libpod-{OTHER}", 102)
CONMON = classify(f"/libpod_parent/conmon-{CID}", 103)  # hypothetical monitor path
HOST = classify("/user.slice/user-0.slice/session-1.scope", 104)


class TestCommand:
    @pytest.mark.parametrize(
        ("argv", "runtime"),
        [
            (["podman", "run", "--rm", "alpine", "date"], "podman"),
            (["/usr/bin/podman", "--runtime", "runc", "run", "img"], "podman"),
            (["sudo", "-E", "docker", "container", "run", "img"], "docker"),
            (["env", "A=1", "podman", "start", "web"], "podman"),
            (["nerdctl", "run", "img"], "containerd"),
            (["podman", "ps"], None),
            (["podman", "--runtime", "runc"], None),
            (["ip", "link"], None),
            ([], None),
        ],
    )
    def test_started_runtime(self, argv: list[str], runtime: str | None) -> None:
        """A command that starts a container names its runtime; others none."""
        assert runtime == started_runtime(argv)

    @pytest.mark.parametrize(
        ("argv", "name"),
        [
            (["podman", "run", "--name", "web", "img"], "web"),
            (["podman", "run", "--name=web", "img"], "web"),
            (["podman", "run", "img", "--", "--name", "x"], None),
            (["podman", "run", "img"], None),
        ],
    )
    def test_requested_name(self, argv: list[str], name: str | None) -> None:
        """--name X and --name=X are the container's name; nothing after --."""
        assert name == requested_name(argv)


class TestFollower:
    def test_new_container_of_the_runtime_is_followed(self) -> None:
        """Only a container cgroup of the command's runtime that did not exist before."""
        f = ContainerFollower("podman", None, known={102})
        tree = {101: PODMAN, 102: PODMAN_OTHER, 103: CONMON, 104: HOST}
        assert [101] == f.scan(tree, lambda _id: "")
        assert [] == f.scan(tree, lambda _id: "")  # once
        assert {101} == set(f.followed)

    def test_named_container_waits_for_its_name(self) -> None:
        """With --name, a cgroup whose name is not known yet is asked about again; another
        name is rejected for good."""
        f = ContainerFollower("podman", "web")
        names = {CID: "", OTHER: "db"}
        assert f.decide(101, PODMAN, names.__getitem__) is None
        assert f.decide(102, PODMAN_OTHER, names.__getitem__) is False
        names[CID] = "web"
        assert f.decide(101, PODMAN, names.__getitem__) is True
        assert f.decide(102, PODMAN_OTHER, lambda _id: "web") is False

    def test_other_runtime_is_not_followed(self) -> None:
        """A docker command does not follow a podman container that starts meanwhile."""
        f = ContainerFollower("docker", None)
        assert f.decide(101, PODMAN, lambda _id: "") is False


def finding(comm: str, syscall: str = "setrlimit", cap: int = 24) -> DenialFacts:
    return DenialFacts(cap=cap, syscall=syscall, comm=comm, pid=5, ret=-1)


class TestTolerateRuntime:
    def test_runtime_denials_of_a_successful_command_are_probes(self) -> None:
        """podman's setrlimit (CAP_SYS_RESOURCE) and conmon's write: tolerated when the command
        succeeded; the workload's own cause stays a cause."""
        exps = [
            explain(finding("podman")),
            explain(finding("conmon", "write")),
            explain(finding("date", "clock_settime", 25)),
        ]
        out = tolerate_runtime(exps, 0)
        assert [("probe", []), ("probe", []), ("cause", True)] == [
            (e.role, e.fixes) if e.comm != "date" else (e.role, bool(e.fixes)) for e in out
        ]
        assert out[0].summary.startswith("Container runtime set-up: podman was refused")

    def test_failed_command_makes_them_unknown(self) -> None:
        """When the command failed, the runtime's refusal may or may not be why (podman
        also fails for an entrypoint not found): unknown, never a confident cause."""
        [e] = tolerate_runtime([explain(finding("podman"))], 125)
        assert "unknown" == e.role
        assert "the command failed (status 125), which may or may not be why" in e.summary

    def test_runc_exec_of_the_entrypoint_is_the_workloads(self) -> None:
        """runc's init exec is the entrypoint's: not tolerated."""
        [e] = tolerate_runtime([explain(finding("runc:[2:INIT]", "execve", 21))], 0)
        assert "cause" == e.role


class TestMatchAndWait:
    def test_match_by_name_or_prefix(self) -> None:
        """A name (podman/docker) or an id prefix of 3+ finds the container's cgroups; the
        monitor is left out; an ambiguous prefix is an error."""
        tree = {101: PODMAN, 102: PODMAN_OTHER, 103: CONMON}
        names = {CID: "web", OTHER: "db"}
        m = match_container(tree, "web", lambda _rt, cid: names[cid])
        assert m is not None
        assert (CID[:12], frozenset({101})) == (m.short_id, m.cgroups)
        assert match_container(tree, "nothing", lambda _rt, cid: names[cid]) is None
        both = {101: PODMAN, 105: classify(f"/libpod_parent/libpod-{CID[:4]}{OTHER[4:]}", 105)}
        with pytest.raises(ValueError, match="matches 2 containers"):
            match_container(both, CID[:4], lambda _rt, _cid: "")

    def test_wait_for_polls_until_found_or_deadline(self) -> None:
        """--wait: polls until the container appears; gives up after the timeout, having
        polled once more at the deadline."""
        now = [0.0]
        polls: list[float] = []

        def sleep(s: float) -> None:
            now[0] += s

        def poll() -> str | None:
            polls.append(now[0])
            return "found" if now[0] >= 1.0 else None

        assert "found" == wait_for(poll, 5, interval_s=0.5, clock=lambda: now[0], sleep=sleep)
        assert [0.0, 0.5, 1.0] == polls
        polls.clear()
        now[0] = 0.0
        assert (
            wait_for(
                lambda: poll() and None, 0.7, interval_s=0.5, clock=lambda: now[0], sleep=sleep
            )
            is None
        )
        assert [0.0, 0.5, 0.7] == polls
