"""Least-privilege advice from observations, without a kernel."""

from __future__ import annotations

from capwatch.decode.caps import cap_name
from capwatch.diagnose.advise import CTR_DEFAULT_CAPS, Observation, advise


class TestAdvise:
    def test_used_capabilities_are_proposed_with_evidence(self) -> None:
        """Allowed checks of the workload become the proposal, each with its evidence."""
        a = advise(
            [
                Observation(10, False, "bind", "nc", count=1),
                Observation(0, False, "fchownat", "chown"),
            ],
            duration_s=5,
            target="t",
        )
        assert [0, 10] == a.caps
        assert ["allowed in bind (nc) x1"] == a.grant[10]
        assert '    add: ["CHOWN", "NET_BIND_SERVICE"]\n' in a.kubernetes()
        assert "--cap-drop=ALL --cap-add=CHOWN --cap-add=NET_BIND_SERVICE" == a.docker()

    def test_ctr_flags(self) -> None:
        """ctr has no "drop ALL": every default ctr grants that is not proposed is dropped
        by its CAP_ name, and what is proposed beyond the defaults is added."""
        a = advise(
            [Observation(0, False, "fchownat", "chown"), Observation(25, False, "x", "date")],
            duration_s=5,
            target="t",
        )
        flags = a.ctr().split()
        drops = {flags[i + 1] for i, f in enumerate(flags) if f == "--cap-drop"}
        adds = {flags[i + 1] for i, f in enumerate(flags) if f == "--cap-add"}
        granted = ({cap_name(c) for c in CTR_DEFAULT_CAPS} - drops) | adds
        assert ({"CAP_CHOWN", "CAP_SYS_TIME"}, {"CAP_SYS_TIME"}) == (granted, adds)
        assert a.ctr() == a.to_dict()["ctr"]
        assert f"ctr: {a.ctr()}" in a.render()

    def test_probes_and_runtime_are_not_proposed(self) -> None:
        """Denied probes, known-probe rules, uncertain outcomes and runtime setup never make the list."""
        obs = [
            Observation(16, True, "ioctl", "ifconfig", role="probe", outcome="ENODEV"),
            Observation(21, False, "mmap", "app", probe_rule="vm-enough-memory-probe"),
            Observation(21, True, "execve", "runc:[2:INIT]", role="probe"),
            Observation(19, True, "openat", "app", role="unknown"),
            Observation(8, False, "prctl", "runc:[2:INIT]"),
        ]
        a = advise(obs, duration_s=5, target="t")
        assert [] == a.caps
        assert {8, 16, 19, 21} == set(a.ignored)
        assert "drop them all" in a.render()

    def test_denied_cause_must_be_added(self) -> None:
        """A denial that failed the call (EPERM) is proposed as missing."""
        a = advise(
            [Observation(25, True, "clock_settime", "date", role="cause", outcome="EPERM")],
            duration_s=5,
            target="t",
        )
        assert [25] == a.caps
        assert 25 in a.missing
        assert "(denied now: add it)" in a.render()

    def test_dangerous_warning(self) -> None:
        """Proposing SYS_ADMIN comes with a warning."""
        a = advise([Observation(21, False, "mount", "app")], duration_s=1, target="t")
        assert ["CAP_SYS_ADMIN"] == a.to_dict()["dangerous"]
