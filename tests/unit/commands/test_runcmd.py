"""Where `explain -- CMD` puts its cgroup: the caller's, else a fallback with a
reason. A directory tree with a real-shaped /proc/self/cgroup stands in for the
hierarchy (the kernel test uses the real one)."""

from __future__ import annotations

from pathlib import Path

import pytest

from capwatch.commands.runcmd import make_command_cgroup, spawn_in_cgroup
from capwatch.errors import CapwatchError

HYBRID = (
    "9:name=systemd:/user.slice/user-0.slice/session-4.scope\n"
    "4:memory:/user.slice/user-0.slice/session-4.scope\n"
    "0::{own}\n"
)


def fake_proc(tmp_path: Path, own: str | None) -> str:
    d = tmp_path / "proc" / "self"
    d.mkdir(parents=True)
    text = HYBRID.format(own=own) if own is not None else "4:memory:/x\n"
    (d / "cgroup").write_text(text)
    return str(tmp_path / "proc")


def test_under_the_callers_cgroup(tmp_path: Path) -> None:
    """The 0:: line names the caller's cgroup: the new one is its child."""
    root = tmp_path / "cg"
    (root / "user.slice" / "session-4.scope").mkdir(parents=True)
    made = make_command_cgroup(
        str(root), proc_root=fake_proc(tmp_path, "/user.slice/session-4.scope")
    )
    assert ("caller", "") == (made.placement, made.reason)
    assert Path(made.path).parent == root / "user.slice" / "session-4.scope"
    assert Path(made.path).name.startswith("capwatch-run-")


def test_falls_back_to_the_parent_with_a_reason(tmp_path: Path) -> None:
    """The caller's cgroup cannot take a child (here: not there): its parent, and why."""
    root = tmp_path / "cg"
    (root / "user.slice").mkdir(parents=True)
    made = make_command_cgroup(
        str(root), proc_root=fake_proc(tmp_path, "/user.slice/session-4.scope")
    )
    assert "parent" == made.placement
    assert Path(made.path).parent == root / "user.slice"
    assert "caller (/user.slice/session-4.scope): No such file or directory" == made.reason


def test_no_v2_line_uses_the_root(tmp_path: Path) -> None:
    """No 0:: line: the root, with that reason."""
    root = tmp_path / "cg"
    root.mkdir()
    made = make_command_cgroup(str(root), proc_root=fake_proc(tmp_path, None))
    assert ("root", "no cgroup v2 line in /proc/self/cgroup") == (made.placement, made.reason)
    made.remove()
    assert [] == list(root.iterdir())


def test_nowhere_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CapwatchError, match="cannot make a cgroup for the command: caller"):
        make_command_cgroup(str(tmp_path / "absent"), proc_root=fake_proc(tmp_path, "/a"))


def test_missing_command_is_one_clear_error(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    root.mkdir()
    made = make_command_cgroup(str(root), proc_root=fake_proc(tmp_path, "/"))
    with pytest.raises(CapwatchError, match="cannot run no-such-command-x: command not found"):
        spawn_in_cgroup(["no-such-command-x"], made)
