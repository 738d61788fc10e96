"""The recent-denials state file cannot be read by others or taken over (issue 12, finding 6)."""

from __future__ import annotations

import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from capwatch.sinks.recent import RecentDenials, read_recent
from tests.helpers import a_denial

DENIAL = a_denial(
    pid=4242,
    tid=4242,
    cgroup_id=9,
    container="web",
    kind="podman",
    runtime="podman",
    container_id="ab" * 32,
    container_name="web",
    joined=False,
)


def written(path: Path) -> RecentDenials:
    r = RecentDenials(str(path))
    r.write(DENIAL)
    r.flush(force=True)
    return r


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


class TestModes:
    def test_file_0600_in_a_new_0700_directory(self, tmp_path: Path) -> None:
        """A missing directory is made 0700; the file is 0600; explain --last reads it."""
        path = tmp_path / "state" / "recent.json"
        r = written(path)
        assert (False, 0o700, 0o600) == (r.disabled, mode(path.parent), mode(path))
        assert [("date", "CAP_SYS_TIME")] == [
            (e.comm, e.capability) for e in read_recent(str(path), 5)
        ]

    def test_own_loose_directory_is_tightened(self, tmp_path: Path) -> None:
        """An existing directory of ours at 0755 (an older capwatch made it) goes to 0700."""
        d = tmp_path / "state"
        d.mkdir(mode=0o755)
        d.chmod(0o755)
        written(d / "recent.json")
        assert 0o700 == mode(d)

    def test_no_temporary_file_left(self, tmp_path: Path) -> None:
        """Two writes leave exactly the state file."""
        path = tmp_path / "state" / "recent.json"
        r = written(path)
        r.write(replace(DENIAL, cap=21))
        r.flush(force=True)
        assert ["recent.json"] == os.listdir(path.parent)


class TestRefusals:
    def test_symlink_at_the_old_temporary_path(self, tmp_path: Path) -> None:
        """A symlink planted at `<path>.<pid>.tmp` (the name older versions wrote
        through) does not redirect the write: the victim is untouched."""
        d = tmp_path / "state"
        d.mkdir(mode=0o700)
        victim = tmp_path / "victim"
        victim.write_text("precious")
        (d / f"recent.json.{os.getpid()}.tmp").symlink_to(victim)
        r = written(d / "recent.json")
        assert (False, "precious") == (r.disabled, victim.read_text())
        assert not (d / "recent.json").is_symlink()

    def test_symlink_at_the_final_path(self, tmp_path: Path) -> None:
        """A symlink at the state file's path: refused, the target untouched."""
        d = tmp_path / "state"
        d.mkdir(mode=0o700)
        victim = tmp_path / "victim"
        victim.write_text("precious")
        (d / "recent.json").symlink_to(victim)
        r = written(d / "recent.json")
        assert (True, "precious") == (r.disabled, victim.read_text())
        assert (d / "recent.json").is_symlink()

    def test_symlinked_directory(self, tmp_path: Path) -> None:
        """The directory is a symlink to another: refused, nothing written there."""
        real = tmp_path / "elsewhere"
        real.mkdir(mode=0o700)
        (tmp_path / "state").symlink_to(real)
        r = written(tmp_path / "state" / "recent.json")
        assert (True, []) == (r.disabled, os.listdir(real))

    def test_directory_writable_by_others(self, tmp_path: Path) -> None:
        """A shared directory (mode 1777, like /tmp): refused, and left as it was."""
        d = tmp_path / "shared"
        d.mkdir()
        d.chmod(0o1777)
        r = written(d / "recent.json")
        assert (True, [], 0o1777) == (r.disabled, os.listdir(d), mode(d))

    @pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
    def test_directory_of_another_user(self, tmp_path: Path) -> None:
        """A directory that belongs to uid 4242: refused."""
        d = tmp_path / "theirs"
        d.mkdir(mode=0o700)
        os.chown(d, 4242, 4242)
        r = written(d / "recent.json")
        assert (True, []) == (r.disabled, os.listdir(d))

    def test_reader_does_not_follow_a_symlink(self, tmp_path: Path) -> None:
        """explain --last does not read through a symlink at the state file's path."""
        good = tmp_path / "good" / "recent.json"
        written(good)
        link = tmp_path / "link.json"
        link.symlink_to(good)
        assert [] == read_recent(str(link), 5)


class TestFairness:
    def test_a_flooding_tenant_cannot_push_a_victim_out(self, tmp_path: Path) -> None:
        """A user's delegated cgroups making 500 distinct denials after a container's
        one: explain --last still has the container's (the tenant loses its oldest)."""
        r = RecentDenials(str(tmp_path / "state" / "recent.json"), limit=100)
        r.write(DENIAL)  # the victim container's date -s
        for i in range(500):
            r.write(
                replace(
                    DENIAL,
                    comm=f"churn{i}",
                    kind="user-delegated",
                    container=f"user-61000:churn-{i}.scope",
                    container_id="",
                    container_name="",
                    cgroup_id=1000 + i,
                )
            )
        r.close()
        found = read_recent(r.path, 100)
        assert 100 == len(found)
        assert "date" in [e.comm for e in found]

    def test_unattributed_cgroups_count_as_one(self, tmp_path: Path) -> None:
        """Cgroups gone before attribution (kind unknown, cgroup:<id>) are one group:
        500 of them cannot push a container's denial out."""
        r = RecentDenials(str(tmp_path / "state" / "recent.json"), limit=100)
        r.write(DENIAL)
        for i in range(500):
            r.write(
                replace(
                    DENIAL,
                    comm="python3",
                    kind="unknown",
                    runtime="unknown",
                    container=f"cgroup:{1000 + i}",
                    container_id="",
                    container_name="",
                    cgroup_id=1000 + i,
                )
            )
        r.close()
        assert "date" in [e.comm for e in read_recent(r.path, 100)]

    def test_plain_recency_among_equals(self, tmp_path: Path) -> None:
        """Among workloads with one record each, the oldest goes first."""
        r = RecentDenials(str(tmp_path / "state" / "recent.json"), limit=3)
        for i in range(4):
            r.write(replace(DENIAL, container=f"c{i}", container_id=f"{i:064x}", comm=f"p{i}"))
        r.close()
        assert ["p3", "p2", "p1"] == [e.comm for e in read_recent(r.path, 10)]
