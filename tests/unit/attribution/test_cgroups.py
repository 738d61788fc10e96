"""Tests for capwatch.attribution.cgroups: mountinfo, tree walks, the id -> path resolver."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from capwatch.attribution.cgroups import (
    CgroupResolver,
    WalkResult,
    cgroup_id_of_path,
    cgroup_id_of_pid,
    cgroup_path_of_pid,
    find_cgroup2_mount,
    parse_mountinfo_cgroup2,
    walk_cgroup_tree,
)
from tests.helpers import FIXTURES

CGROUP_FIXTURES = FIXTURES / "cgroups"


class FakeClock:
    """A hand-driven monotonic clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_tree(root: Path, rel_paths: list[str]) -> dict[str, int]:
    """Create directories; return rel path -> inode (what a cgroup id would be)."""
    root.mkdir(parents=True, exist_ok=True)
    inodes = {"/": root.stat().st_ino}
    for rel in rel_paths:
        d = root / rel.lstrip("/")
        d.mkdir(parents=True, exist_ok=True)
    for rel in rel_paths:
        inodes[rel] = (root / rel.lstrip("/")).stat().st_ino
    return inodes


class TestParseMountinfo:
    @pytest.mark.parametrize(
        ("fixture", "expected"),
        [
            ("mountinfo-hybrid.txt", ["/sys/fs/cgroup/unified"]),
            ("mountinfo-v2.txt", ["/sys/fs/cgroup"]),
            ("mountinfo-nocgroup2.txt", []),
            ("mountinfo-escaped.txt", ["/host/sys/fs/my cgroup"]),
        ],
    )
    def test_lists_cgroup2_mount_points(self, fixture: str, expected: list[str]) -> None:
        """Only cgroup2 lines count (not cgroup v1 or the tmpfs holding them); escapes undone."""
        actual = parse_mountinfo_cgroup2((CGROUP_FIXTURES / fixture).read_text())
        assert expected == actual

    def test_skips_malformed_lines(self) -> None:
        """Lines without the ' - ' separator or with too few fields are ignored."""
        text = "garbage\n1 2 3\n41 31 0:38 / /x rw - cgroup2 cgroup2 rw\n"
        assert ["/x"] == parse_mountinfo_cgroup2(text)

    @given(
        st.text(
            alphabet=st.characters(codec="ascii", exclude_categories=["Cc"])
            | st.sampled_from(" \t\n\\"),
            min_size=1,
            max_size=40,
        )
    )
    def test_escape_round_trip(self, name: str) -> None:
        """A mount point escaped as the kernel does (space, tab, newline, backslash) parses back."""
        escaped = "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in name)
        line = f"41 31 0:38 / /m/{escaped} rw,relatime - cgroup2 cgroup2 rw\n"
        assert [f"/m/{name}"] == parse_mountinfo_cgroup2(line)


class TestFindCgroup2Mount:
    @pytest.mark.parametrize(
        ("fixture", "expected"),
        [
            ("mountinfo-hybrid.txt", "/sys/fs/cgroup/unified"),
            ("mountinfo-v2.txt", "/sys/fs/cgroup"),
            ("mountinfo-nocgroup2.txt", None),
        ],
    )
    def test_finds_unified_mount(self, fixture: str, expected: str | None) -> None:
        """Pure v2 at /sys/fs/cgroup, hybrid at /sys/fs/cgroup/unified, none on v1-only."""
        assert expected == find_cgroup2_mount(str(CGROUP_FIXTURES / fixture))

    def test_prefers_sys_fs_cgroup(self, tmp_path: Path) -> None:
        """With several cgroup2 mounts, /sys/fs/cgroup wins over the others."""
        f = tmp_path / "mountinfo"
        f.write_text(
            "1 0 0:1 / /other rw - cgroup2 cgroup2 rw\n"
            "2 0 0:1 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
            "3 0 0:1 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
        )
        assert "/sys/fs/cgroup" == find_cgroup2_mount(str(f))

    def test_missing_file_warns_and_returns_none(self, tmp_path: Path) -> None:
        """An unreadable mountinfo degrades to None with a warning, no exception."""
        with structlog.testing.capture_logs() as logs:
            actual = find_cgroup2_mount(str(tmp_path / "nope"))
        assert actual is None
        assert ["cgroup_mountinfo_unreadable"] == [e["event"] for e in logs]

    def test_this_host(self) -> None:
        """On this machine the default mountinfo names a directory that exists (or nothing)."""
        mount = find_cgroup2_mount()
        assert mount is None or os.path.isdir(mount)


class TestWalkCgroupTree:
    def test_maps_inodes_to_relative_paths(self, tmp_path: Path) -> None:
        """Every directory's inode maps to its path relative to the root; files are skipped."""
        inodes = make_tree(
            tmp_path, ["/system.slice", "/system.slice/foo.service", "/libpod_parent/libpod-ab"]
        )
        inodes["/libpod_parent"] = (tmp_path / "libpod_parent").stat().st_ino
        (tmp_path / "cgroup.procs").write_text("1\n")
        (tmp_path / "system.slice" / "cgroup.procs").write_text("")
        expected = {ino: rel for rel, ino in inodes.items()}
        assert expected == walk_cgroup_tree(str(tmp_path))

    def test_does_not_follow_symlinks(self, tmp_path: Path) -> None:
        """A symlinked directory is not walked (no loops, no foreign inodes)."""
        make_tree(tmp_path, ["/a"])
        (tmp_path / "loop").symlink_to(tmp_path)
        assert {"/", "/a"} == set(walk_cgroup_tree(str(tmp_path)).values())

    def test_missing_root_is_empty(self, tmp_path: Path) -> None:
        """A root that does not exist yields an empty map."""
        assert {} == walk_cgroup_tree(str(tmp_path / "absent"))

    def test_unreadable_subdirectory_is_skipped(self, tmp_path: Path) -> None:
        """A subdirectory that cannot be listed keeps its own entry; the walk goes on."""
        make_tree(tmp_path, ["/locked/inner", "/open"])
        (tmp_path / "locked").chmod(0)
        try:
            paths = set(walk_cgroup_tree(str(tmp_path)).values())
        finally:
            (tmp_path / "locked").chmod(0o755)
        if os.geteuid() == 0:  # root reads mode-0 directories anyway
            assert {"/", "/locked", "/locked/inner", "/open"} == paths
        else:
            assert {"/", "/locked", "/open"} == paths

    def test_real_cgroup_root_includes_own_cgroup(self) -> None:
        """On the real unified hierarchy the walk finds this process's own cgroup id."""
        root = find_cgroup2_mount()
        if root is None:
            pytest.skip("no cgroup2 mount on this host")
        own = cgroup_id_of_pid("self", cgroup_root=root)
        assert own is not None
        assert cgroup_path_of_pid("self") == walk_cgroup_tree(root)[own]


class TestCgroupOfPid:
    def test_reads_unified_line(self, tmp_path: Path) -> None:
        """The 0:: line gives the path; its directory inode is the id."""
        proc = tmp_path / "proc"
        (proc / "42").mkdir(parents=True)
        (proc / "42" / "cgroup").write_text(
            "9:name=systemd:/\n4:memory:/other\n0::/libpod_parent/libpod-abc\n"
        )
        cg = tmp_path / "cg"
        inodes = make_tree(cg, ["/libpod_parent/libpod-abc"])
        assert "/libpod_parent/libpod-abc" == cgroup_path_of_pid(42, proc_root=str(proc))
        expected = inodes["/libpod_parent/libpod-abc"]
        assert expected == cgroup_id_of_pid(42, cgroup_root=str(cg), proc_root=str(proc))

    @pytest.mark.parametrize("content", ["", "4:memory:/x\n"])
    def test_no_unified_line(self, tmp_path: Path, content: str) -> None:
        """A v1-only /proc/<pid>/cgroup gives None."""
        (tmp_path / "7").mkdir()
        (tmp_path / "7" / "cgroup").write_text(content)
        assert cgroup_path_of_pid(7, proc_root=str(tmp_path)) is None

    def test_missing_pid_and_missing_dir(self, tmp_path: Path) -> None:
        """A vanished pid or cgroup directory gives None, not an exception."""
        assert (
            cgroup_id_of_pid(99999999, cgroup_root=str(tmp_path), proc_root=str(tmp_path)) is None
        )
        assert cgroup_id_of_path(str(tmp_path), "/gone") is None

    def test_root_path_is_root_inode(self, tmp_path: Path) -> None:
        """Path '/' is the cgroup root itself."""
        assert tmp_path.stat().st_ino == cgroup_id_of_path(str(tmp_path), "/")


class TestCgroupResolver:
    def test_initial_walk_resolves(self, tmp_path: Path) -> None:
        """Ids present at start resolve without another walk."""
        inodes = make_tree(tmp_path, ["/a/b"])
        r = CgroupResolver(str(tmp_path), background=False)
        assert "/a/b" == r.lookup(inodes["/a/b"])
        assert 1 == r.walks

    def test_miss_walks_at_most_once_per_interval(self, tmp_path: Path) -> None:
        """Unknown ids trigger a re-walk, rate-limited: a flood of misses causes one walk."""
        clock = FakeClock()
        r = CgroupResolver(str(tmp_path), background=False, min_walk_interval=0.5, clock=clock)
        new = make_tree(tmp_path, ["/new"])["/new"]
        assert r.lookup(new) is None  # still within the interval of the initial walk
        for bogus in range(10**9, 10**9 + 1000):
            r.lookup(bogus)
        assert 1 == r.walks
        clock.now += 0.6
        assert "/new" == r.lookup(new)
        for bogus in range(10**9, 10**9 + 1000):
            r.lookup(bogus)
        assert 2 == r.walks

    def test_dead_ids_forgotten_after_ttl(self, tmp_path: Path) -> None:
        """A removed cgroup keeps resolving for dead_ttl, then is forgotten and reported."""
        clock = FakeClock()
        gone = make_tree(tmp_path, ["/gone"])["/gone"]
        r = CgroupResolver(str(tmp_path), background=False, dead_ttl=10.0, clock=clock)
        results: list[WalkResult] = []
        r.subscribe(results.append)
        (tmp_path / "gone").rmdir()
        clock.now += 1
        r.walk()
        assert "/gone" == r.lookup(gone)
        clock.now += 9.5
        r.walk()
        assert "/gone" == r.lookup(gone)
        clock.now += 1
        r.walk()
        assert [frozenset(), frozenset(), frozenset({gone})] == [x.forgotten for x in results]
        assert gone not in r.known()

    def test_reappearing_id_is_not_forgotten(self, tmp_path: Path) -> None:
        """An id missing from one walk but back in the next is not expired later."""
        clock = FakeClock()
        ino = make_tree(tmp_path, ["/x"])["/x"]
        r = CgroupResolver(str(tmp_path), background=False, dead_ttl=5.0, clock=clock)
        (tmp_path / "x").rename(tmp_path / "y")
        clock.now += 1
        r.walk()
        (tmp_path / "y").rename(tmp_path / "x")
        clock.now += 1
        r.walk()
        clock.now += 10
        r.walk()
        assert "/x" == r.lookup(ino)

    def test_walk_reports_added_ids(self, tmp_path: Path) -> None:
        """A walk lists the ids it saw for the first time."""
        r = CgroupResolver(str(tmp_path), background=False)
        ino = make_tree(tmp_path, ["/fresh"])["/fresh"]
        assert frozenset({ino}) == r.walk().added

    def test_missing_root_degrades(self, tmp_path: Path) -> None:
        """A missing root warns once and every lookup is None (no walk, no exception)."""
        with structlog.testing.capture_logs() as logs:
            r = CgroupResolver(str(tmp_path / "absent"), background=False)
        assert ["cgroup_root_unavailable"] == [e["event"] for e in logs]
        assert r.lookup(1) is None
        assert 0 == r.walks

    def test_none_root_degrades(self) -> None:
        """No cgroup2 mount at all (root None) behaves like a missing root."""
        r = CgroupResolver(None)
        assert r.lookup(1) is None
        r.close()

    def test_background_miss_returns_at_once_then_resolves(self, tmp_path: Path) -> None:
        """With the walker thread, a miss returns None at once and the id resolves soon:
        the walk it asked for runs on the walker thread, never on the caller's."""
        r = CgroupResolver(str(tmp_path), min_walk_interval=0.05)
        walked_on: list[threading.Thread] = []
        r.subscribe(lambda _: walked_on.append(threading.current_thread()))
        try:
            ino = make_tree(tmp_path, ["/late"])["/late"]
            assert r.lookup(ino) is None
            deadline = time.monotonic() + 5
            while r.lookup(ino) is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert "/late" == r.lookup(ino)
        finally:
            r.close()
        assert walked_on
        assert threading.current_thread() not in walked_on

    def test_listener_errors_do_not_break_walks(self, tmp_path: Path) -> None:
        """A failing listener is logged; the walk result stands."""
        r = CgroupResolver(str(tmp_path), background=False)

        def boom(_: WalkResult) -> None:
            raise RuntimeError("listener bug")

        r.subscribe(boom)
        ino = make_tree(tmp_path, ["/z"])["/z"]
        with structlog.testing.capture_logs() as logs:
            r.walk()
        assert "/z" == r.lookup(ino)
        assert ["cgroup_walk_listener_failed"] == [e["event"] for e in logs]


def test_live_member_skips_the_gone_process(tmp_path: Path) -> None:
    """The first process of the cgroup that is not the gone one and still has a /proc entry."""
    from capwatch.attribution.cgroups import live_member

    cg = tmp_path / "cg" / "machine.slice" / "libpod-x.scope"
    cg.mkdir(parents=True)
    (cg / "cgroup.procs").write_text("10\n11\n12\n")
    proc = tmp_path / "proc"
    for pid in (10, 12):
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "status").write_text("Name:\tsh\n")
    root, path = str(tmp_path / "cg"), "/machine.slice/libpod-x.scope"
    assert 12 == live_member(root, path, 10, proc_root=str(proc))  # 11 has no /proc entry
    assert live_member(root, "/nope", 10, proc_root=str(proc)) is None
    assert live_member(None, path, 10, proc_root=str(proc)) is None
