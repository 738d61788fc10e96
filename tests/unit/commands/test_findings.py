"""explain's and advise's sink (capwatch.commands.observe.Findings)."""

from __future__ import annotations

from capwatch.commands.observe import Findings, advice_of
from tests.helpers import a_denial


class TestOnlyTheFollowedCgroups:
    def test_checks_of_other_cgroups_are_not_kept(self) -> None:
        """advise -- podman run: a sink limited to the followed container's cgroups keeps its
        checks and drops the runtime's (the command's own cgroup), allowed or denied; the
        set it is given grows while the command runs."""
        followed: dict[int, object] = {}
        inside = Findings(only=followed)
        runtime = a_denial(cgroup_id=5, comm="podman", cap=24, syscall_nr=160, ret=-1)
        inside.write(runtime)
        followed[9] = object()  # the container's cgroup, once the follower takes it
        inside.write(a_denial(cgroup_id=9, ret=-1))
        inside.write(a_denial(cgroup_id=5, denied=False, cap=21))
        assert [9] == [c.cgroup_id for c in inside.denials]
        assert {} == inside.allowed
        assert ["CAP_SYS_TIME"] == advice_of(inside, 1.0, "t").to_dict()["capabilities"]

    def test_unlimited_keeps_everything_accepted(self) -> None:
        """Without ``only`` (explain, advise of a pid or container) every check is kept."""
        col = Findings()
        col.write(a_denial(cgroup_id=5, ret=-1))
        col.write(a_denial(cgroup_id=9, denied=False, cap=21))
        assert (1, 1) == (len(col.denials), sum(col.allowed.values()))
