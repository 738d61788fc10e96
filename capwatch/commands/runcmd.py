"""Run a command in a cgroup of its own, for `capwatch explain|advise -- CMD`.

The cgroup is made under the caller's own cgroup (the ``0::`` line of
``/proc/self/cgroup``), so the command stays inside the caller's limits
(memory.max, pids.max, cpu.max of every ancestor apply to it). cgroup v2's
"no internal processes" rule forbids a cgroup that has processes from having
*controllers enabled* for its children, not from having children: a child with
no controller of its own can always be made and entered, and the ancestors'
limits still hold. Where the caller's cgroup cannot take a child (no write
access, a read-only or foreign mount), the parent of the caller's cgroup is
tried, then the hierarchy root, and the reason is kept.

The command is started without ``preexec_fn`` (unsafe once threads run: the
child of a fork may deadlock on a lock another thread held): a tiny ``sh``
helper writes itself into the cgroup's ``cgroup.procs`` and execs the command,
so the command's pid is the helper's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass

from capwatch.attribution.cgroups import cgroup_path_of_pid
from capwatch.errors import CapwatchError

__all__ = ["ENTER_FAILED", "CommandCgroup", "make_command_cgroup", "spawn_in_cgroup"]

#: The helper's exit status when it could not enter the cgroup.
ENTER_FAILED = 126

# $1: the cgroup.procs file; the rest: the command. "echo" is a shell builtin:
# the redirection is done by the shell process itself, which is then exec'd.
_ENTER = (
    'procs=$1; shift; { echo 0 >"$procs"; } 2>/dev/null '
    '|| { echo "capwatch: cannot enter the cgroup $procs" >&2; exit 126; }; exec "$@"'
)


@dataclass(frozen=True)
class CommandCgroup:
    """A cgroup made for one command: its directory, id, where it was put and why."""

    path: str
    cgroup_id: int
    placement: str  # "caller" (child of the caller's cgroup), "parent", "root"
    reason: str = ""  # why not under the caller's cgroup

    def remove(self) -> None:
        """Remove the cgroup (it must be empty); quiet if already gone."""
        with contextlib.suppress(OSError):
            os.rmdir(self.path)


def make_command_cgroup(cgroup_root: str, *, proc_root: str = "/proc") -> CommandCgroup:
    """Make ``capwatch-run-<random>`` under the caller's cgroup (see the module docstring)."""
    own = cgroup_path_of_pid("self", proc_root=proc_root)
    candidates: list[tuple[str, str]] = []
    if own is not None:
        candidates.append(("caller", own))
        if own.rstrip("/"):
            candidates.append(("parent", os.path.dirname(own.rstrip("/")) or "/"))
    candidates.append(("root", "/"))
    name = f"capwatch-run-{uuid.uuid4().hex[:8]}"
    reasons: list[str] = [] if own is not None else ["no cgroup v2 line in /proc/self/cgroup"]
    seen: set[str] = set()
    for placement, rel in candidates:
        if rel in seen:
            continue
        seen.add(rel)
        d = os.path.join(cgroup_root, rel.lstrip("/"), name)
        try:
            os.mkdir(d)
        except OSError as exc:
            reasons.append(f"{placement} ({rel}): {exc.strerror or exc}")
            continue
        return CommandCgroup(d, os.stat(d).st_ino, placement, "; ".join(reasons))
    raise CapwatchError(f"cannot make a cgroup for the command: {'; '.join(reasons)}")


def spawn_in_cgroup(argv: list[str], cgroup: CommandCgroup) -> subprocess.Popen[bytes]:
    """Start ``argv`` inside ``cgroup`` (its pid is the returned process's)."""
    if not argv:
        raise CapwatchError("no command given")
    if "/" not in argv[0] and shutil.which(argv[0]) is None:
        raise CapwatchError(f"cannot run {argv[0]}: command not found")
    sh = shutil.which("sh") or "/bin/sh"
    procs = os.path.join(cgroup.path, "cgroup.procs")
    try:
        return subprocess.Popen([sh, "-c", _ENTER, "capwatch-enter", procs, *argv])
    except OSError as exc:
        raise CapwatchError(f"cannot run {argv[0]}: {exc.strerror}") from None
