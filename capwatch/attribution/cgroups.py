"""cgroup id -> cgroup path, on the unified (v2) hierarchy.

``bpf_get_current_cgroup_id()`` returns the kernfs node id of the task's cgroup
on the unified hierarchy, which is also the inode number of the cgroup's
directory (64-bit kernfs ids since Linux 5.5, commit 67c0496e87d1; on 64-bit
architectures ``st_ino`` carries the whole id). So an id is resolved by walking
the cgroup2 mount and noting each directory's inode; ``readdir`` hands the inode
back (``d_ino``), so a walk needs no ``stat`` per directory.

The resolver keeps the map in a dict (a lookup is one dict read). An unknown id
asks for a re-walk and returns ``None`` at once; walks run on a background
thread, at most one per ``min_walk_interval``, so a flood of unknown ids cannot
cause a walk per event. Ids that disappear from the tree are kept for
``dead_ttl`` seconds (events of a container that just exited are still in
flight) and then forgotten.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

__all__ = [
    "CgroupResolver",
    "WalkResult",
    "cgroup_id_of_path",
    "cgroup_id_of_pid",
    "cgroup_owners",
    "cgroup_path_of_pid",
    "find_cgroup2_mount",
    "live_member",
    "parse_mountinfo_cgroup2",
    "walk_cgroup_tree",
]

_log = structlog.get_logger(__name__)

# Where a cgroup2 mount usually sits: pure v2 hosts first, then hybrid ones.
_PREFERRED_MOUNTS = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")


def _unescape_mountinfo(field: str) -> str:
    r"""Undo mountinfo's octal escapes (``\040`` for space, ``\011``, ``\012``, ``\134``)."""
    if "\\" not in field:
        return field
    out: list[str] = []
    i = 0
    while i < len(field):
        chunk = field[i : i + 4]
        if len(chunk) == 4 and chunk[0] == "\\" and chunk[1:].isdigit():
            out.append(chr(int(chunk[1:], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo_cgroup2(text: str) -> list[str]:
    """Return the mount points of every cgroup2 filesystem listed in mountinfo ``text``.

    Line format (proc(5)): ``id parent maj:min root mountpoint opts [optional...] -
    fstype source superopts``; the optional fields end at the lone ``-``.
    """
    mounts: list[str] = []
    for line in text.splitlines():
        fields = line.split()
        try:
            sep = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) > sep + 1 and fields[sep + 1] == "cgroup2":
            mounts.append(_unescape_mountinfo(fields[4]))
    return mounts


def find_cgroup2_mount(mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """Return the cgroup2 mount point listed in the file ``mountinfo``, or None.

    With several cgroup2 mounts, ``/sys/fs/cgroup`` (pure v2) wins over
    ``/sys/fs/cgroup/unified`` (hybrid), which wins over any other.
    """
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            mounts = parse_mountinfo_cgroup2(f.read())
    except OSError as e:
        _log.warning("cgroup_mountinfo_unreadable", path=mountinfo, error=str(e))
        return None
    for preferred in _PREFERRED_MOUNTS:
        if preferred in mounts:
            return preferred
    return mounts[0] if mounts else None


def walk_cgroup_tree(root: str) -> dict[int, str]:
    """Map the inode of every directory under ``root`` (``root`` included) to its path.

    Paths are relative to ``root`` and start with ``/`` (the root itself is ``/``),
    the form ``/proc/<pid>/cgroup`` prints. Works on any directory tree.
    Directories that vanish or cannot be read mid-walk are skipped; a missing
    root gives an empty map.
    """
    try:
        root_ino = os.stat(root).st_ino
    except OSError:
        return {}
    found: dict[int, str] = {root_ino: "/"}
    stack: list[tuple[str, str]] = [(root, "")]
    while stack:
        real, rel = stack.pop()
        try:
            with os.scandir(real) as it:
                for entry in it:
                    # d_type and d_ino come with readdir: no stat per entry.
                    if entry.is_dir(follow_symlinks=False):
                        child_rel = f"{rel}/{entry.name}"
                        found[entry.inode()] = child_rel
                        stack.append((entry.path, child_rel))
        except OSError:
            continue
    return found


def cgroup_path_of_pid(pid: int | str, *, proc_root: str = "/proc") -> str | None:
    """Return the unified-hierarchy cgroup path of ``pid`` (the ``0::`` line), or None."""
    try:
        with open(f"{proc_root}/{pid}/cgroup", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].rstrip("\n")
    except OSError:
        return None
    return None


def cgroup_id_of_path(cgroup_root: str, path: str) -> int | None:
    """Return the cgroup id (directory inode) of ``path`` under ``cgroup_root``, or None."""
    try:
        return os.stat(os.path.join(cgroup_root, path.lstrip("/"))).st_ino
    except OSError:
        return None


def cgroup_id_of_pid(pid: int | str, *, cgroup_root: str, proc_root: str = "/proc") -> int | None:
    """Return the cgroup id of ``pid``, as ``bpf_get_current_cgroup_id()`` would see it."""
    path = cgroup_path_of_pid(pid, proc_root=proc_root)
    if path is None:
        return None
    return cgroup_id_of_path(cgroup_root, path)


def cgroup_owners(cgroup_root: str, path: str) -> tuple[int | None, ...]:
    """The uid owning each directory along ``path`` under ``cgroup_root``: item
    ``i`` is the owner of the first ``i + 1`` components (None where it cannot be
    read, e.g. a cgroup already removed). One ``lstat`` per component; the facts
    :func:`capwatch.attribution.containers.classify` takes to tell a runtime's cgroup from a
    user's delegated one."""
    owners: list[int | None] = []
    current = cgroup_root
    for part in [p for p in path.split("/") if p]:
        current = os.path.join(current, part)
        try:
            owners.append(os.lstat(current).st_uid)
        except OSError:
            owners.append(None)
    return tuple(owners)


@dataclass(frozen=True, slots=True)
class WalkResult:
    """What one walk changed: ids seen for the first time, ids forgotten after their TTL."""

    started: float
    added: frozenset[int]
    forgotten: frozenset[int]
    periodic: bool


WalkListener = Callable[[WalkResult], None]


class CgroupResolver:
    """Resolve cgroup ids to paths under ``root``; see the module docstring.

    ``background=False`` walks synchronously inside :meth:`lookup` (still at most
    once per ``min_walk_interval``); tests and one-shot tools use it.
    """

    def __init__(
        self,
        root: str | None,
        *,
        min_walk_interval: float = 0.5,
        dead_ttl: float = 300.0,
        rescan_interval: float = 60.0,
        background: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = root
        self._min_walk_interval = min_walk_interval
        self._dead_ttl = dead_ttl
        self._rescan_interval = rescan_interval
        self.clock = clock
        self._paths: dict[int, str] = {}
        self._dead_since: dict[int, float] = {}
        self._listeners: list[WalkListener] = []
        self._walk_lock = threading.Lock()
        self._last_walk: float | None = None
        self.walks = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if root is None or not os.path.isdir(root):
            _log.warning(
                "cgroup_root_unavailable",
                root=root,
                effect="cgroup ids are shown as cgroup:<id>",
            )
            self.root = None
            return
        self.walk()
        if background:
            self._thread = threading.Thread(
                target=self._run, name="capwatch-cgroup-walk", daemon=True
            )
            self._thread.start()

    def subscribe(self, listener: WalkListener) -> None:
        """Call ``listener`` (on the walking thread) after every walk."""
        self._listeners.append(listener)

    def lookup(self, cgroup_id: int) -> str | None:
        """Return the path of ``cgroup_id`` or None; a miss asks for a re-walk, never waits."""
        path = self._paths.get(cgroup_id)
        if path is None and self.root is not None:
            if self._thread is not None:
                if not self._wake.is_set():  # a flood of misses costs one flag read each
                    self._wake.set()
            elif self._due():
                self.walk()
                path = self._paths.get(cgroup_id)
        return path

    def known(self) -> dict[int, str]:
        """Return a copy of the current id -> path map."""
        return dict(self._paths)

    def learn(self, cgroup_id: int, path: str) -> None:
        """Record a path learnt elsewhere (a process's /proc/PID/cgroup): a cgroup
        that lived shorter than a walk keeps its identity. If the directory is
        already gone, it is dead from now on and forgotten after the TTL."""
        with self._walk_lock:
            if self._paths.get(cgroup_id) == path:
                return
            paths = dict(self._paths)
            paths[cgroup_id] = path
            alive = self.root is not None and os.path.isdir(
                os.path.join(self.root, path.lstrip("/"))
            )
            if not alive:
                self._dead_since.setdefault(cgroup_id, self.clock())
            self._paths = paths

    def _due(self) -> bool:
        last = self._last_walk
        return last is None or self.clock() - last >= self._min_walk_interval

    def walk(self, *, periodic: bool = False) -> WalkResult:
        """Walk the tree now, merge, expire dead ids, tell listeners; return what changed."""
        with self._walk_lock:
            started = self.clock()
            self._last_walk = started
            fresh = walk_cgroup_tree(self.root) if self.root is not None else {}
            self.walks += 1
            old = self._paths
            merged = dict(fresh)
            forgotten: set[int] = set()
            for cid, path in old.items():
                if cid in fresh:
                    continue
                since = self._dead_since.setdefault(cid, started)
                if started - since >= self._dead_ttl:
                    forgotten.add(cid)
                else:
                    merged[cid] = path
            for cid in forgotten:
                del self._dead_since[cid]
            for cid in list(self._dead_since):
                if cid in fresh:
                    del self._dead_since[cid]
            added = frozenset(fresh.keys() - old.keys())
            self._paths = merged  # one reference swap: readers never see a half-built map
            result = WalkResult(started, added, frozenset(forgotten), periodic)
        for listener in list(self._listeners):
            try:
                listener(result)
            except Exception as e:  # a listener bug must not stop resolution
                _log.warning("cgroup_walk_listener_failed", error=repr(e))
        return result

    def _run(self) -> None:
        while not self._stop.is_set():
            asked = self._wake.wait(self._rescan_interval)
            if self._stop.is_set():
                return
            last = self._last_walk
            if asked and last is not None:
                wait = self._min_walk_interval - (self.clock() - last)
                if wait > 0 and self._stop.wait(wait):
                    return
            # Cleared after the rate-limit pause: misses during it share this walk.
            self._wake.clear()
            try:
                self.walk(periodic=not asked)
            except Exception as e:  # never let the walker die silently
                _log.warning("cgroup_walk_failed", root=self.root, error=repr(e))

    def close(self) -> None:
        """Stop the walking thread."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def live_member(
    cgroup_root: str | None, path: str | None, gone: int, *, proc_root: str = "/proc"
) -> int | None:
    """A live process of the cgroup at ``path`` other than ``gone``: it shares the
    gone one's container (bounding set, seccomp filter, root). None when there is none."""
    if path is None or cgroup_root is None:
        return None
    try:
        with open(os.path.join(cgroup_root, path.lstrip("/"), "cgroup.procs")) as f:
            pids = [int(p) for p in f.read().split()]
    except (OSError, ValueError):
        return None
    return next(
        (
            p
            for p in pids
            if p != gone and os.path.exists(os.path.join(proc_root, str(p), "status"))
        ),
        None,
    )
