"""The most recent distinct denials, kept in a small state file for
`capwatch explain --last` (written by trace and serve; read by explain).

The file holds at most ``limit`` JSON records (the newest last), replaced
atomically at most once a second, so a denial flood costs one small write a
second. Each record carries what explain needs, the process's capability
sets read when the denial arrived included. A refusal that no capability
explains (trace --outcome with one target) is kept with its verdict, its
evidence and its fix, one record per (container, comm, syscall, verdict).

The history says which workloads were denied what: the file is 0600, in a
0700 directory (created so, or an existing one of ours tightened to it). A
directory that is a symlink, another user's, or writable by others (``/tmp``)
is refused, as is a symlink planted at the file's path: the writes stop with
one warning. Each write goes to a temporary file of a random name, opened with
O_CREAT|O_EXCL|O_NOFOLLOW relative to the directory's descriptor, then renamed
over the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
import time
from collections import OrderedDict
from typing import Any

import structlog

from capwatch.diagnose.explain import Explanation, explain, fold
from capwatch.diagnose.refusals import Refusal
from capwatch.pipeline import Check, facts_of

__all__ = [
    "DEFAULT_STATE_FILE",
    "RecentDenials",
    "StateFileRefused",
    "read_recent",
    "write_private",
]

DEFAULT_STATE_FILE = "/run/capwatch/recent.json"

_log = structlog.get_logger(__name__)


class StateFileRefused(OSError):
    """The state file's directory or path is not safe to write."""


def _open_state_dir(directory: str) -> int:
    """An O_DIRECTORY|O_NOFOLLOW descriptor of ``directory``, made 0700 if missing;
    refused if it is a symlink, another user's, or writable by group or others."""
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory, 0o700)
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if os.path.islink(directory):
            raise StateFileRefused(f"{directory} is a symlink") from None
        raise e
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise StateFileRefused(f"{directory} belongs to uid {st.st_uid}")
        if st.st_mode & 0o022:
            raise StateFileRefused(f"{directory} is writable by others")
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.fchmod(fd, 0o700)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_private(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data``: mode 0600, in a 0700 directory, through a
    random-named O_EXCL|O_NOFOLLOW temporary file. Raises OSError
    (:class:`StateFileRefused` for an unsafe directory or a symlink at ``path``)."""
    directory, name = os.path.split(os.path.abspath(path))
    dfd = _open_state_dir(directory)
    try:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISLNK(os.lstat(name, dir_fd=dfd).st_mode):
                raise StateFileRefused(f"{path} is a symlink")
        tmp = f".{name}.{secrets.token_hex(8)}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600, dir_fd=dfd)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise
    finally:
        os.close(dfd)


class RecentDenials:
    def __init__(
        self, path: str = DEFAULT_STATE_FILE, *, limit: int = 100, min_interval: float = 1.0
    ) -> None:
        self.path = path
        self.limit = limit
        self.min_interval = min_interval
        self._items: OrderedDict[tuple[Any, ...], dict[str, Any]] = OrderedDict()
        self._dirty = False
        self._last_write = 0.0
        self.disabled = False

    @staticmethod
    def key(rec: dict[str, Any]) -> tuple[Any, ...]:
        # the outcome and role are part of the key: a cause followed by a success of
        # the same (comm, cap, syscall) stays a cause, beside the probe; a refusal's
        # verdict too (seccomp one time, file permissions another)
        found = rec.get("refusal")
        return (
            rec.get("container"),
            rec.get("comm"),
            rec.get("cap"),
            rec.get("syscall"),
            rec.get("outcome"),
            rec.get("role"),
            found.get("verdict") if isinstance(found, dict) else None,
        )

    # -- the pipeline sink ---------------------------------------------------

    def write(self, check: Check) -> None:
        if check.denied:
            self.add(check.to_dict(with_caps=True), check.count)

    def tick(self) -> None:
        self.flush()

    def close(self) -> None:
        self.flush(force=True)

    def add(self, rec: dict[str, Any], n: int = 1) -> None:
        key = self.key(rec)
        old = self._items.pop(key, None)
        if old is None:
            rec = {**rec, "count": n}
        else:
            # keep what the first sighting knew (the process's sets, read while it lived)
            rec = {**old, **{k: v for k, v in rec.items() if v is not None}}
            rec["count"] = old.get("count", 1) + n
        self._items[key] = rec
        while len(self._items) > self.limit:
            self._evict()
        self._dirty = True

    @staticmethod
    def owner(rec: dict[str, Any]) -> tuple[Any, ...]:
        """Whose denial this is, for fairness: a user's delegated cgroups are all
        that user's (it can make them at will), cgroups never attributed are one
        group; a container, pod or host cgroup is itself."""
        kind = rec.get("kind")
        if kind == "user-delegated":
            return ("user", str(rec.get("container", "")).split(":", 1)[0])
        if kind == "unknown":
            # cgroups gone before they could be attributed (a tenant's churn): one
            # group, whatever their ids, or each would count as a workload of its own
            return ("unknown",)
        return (kind, rec.get("container_id") or rec.get("container"))

    def _evict(self) -> None:
        """Drop the oldest record of whoever holds the most: a tenant flooding
        distinct denials cannot push another workload's out of explain --last."""
        counts: dict[tuple[Any, ...], int] = {}
        for r in self._items.values():
            o = self.owner(r)
            counts[o] = counts.get(o, 0) + 1
        most = max(counts.values())
        for k, r in self._items.items():  # oldest first
            if counts[self.owner(r)] == most:
                del self._items[k]
                return

    def flush(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if (
            self.disabled
            or not self._dirty
            or (not force and now - self._last_write < self.min_interval)
        ):
            return
        self._last_write = now
        self._dirty = False
        try:
            write_private(self.path, json.dumps(list(self._items.values())).encode())
        except OSError as e:
            # refused, read-only or no room: explain --last just has less to say
            self.disabled = True
            _log.warning("state_file_disabled", path=self.path, reason=str(e))


def read_recent(path: str, n: int) -> list[Explanation | Refusal]:
    """Explain the ``n`` most recent distinct denials recorded in ``path``: the
    capability findings (newest first), then the refusals with their verdicts."""
    items: list[dict[str, Any]] = []
    with contextlib.suppress(OSError, ValueError):
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with open(fd, encoding="utf-8") as f:
            loaded = json.load(f)
        if isinstance(loaded, list):
            items = [x for x in loaded if isinstance(x, dict)]
    out: list[Explanation] = []
    refusals: list[Refusal] = []
    for rec in items[-n:][::-1]:
        try:
            check = Check.from_dict(rec)
            count = int(rec.get("count", 1))
        except ValueError:
            continue  # a record from another version: skip it
        if check.refusal is not None:
            check.refusal.count = count
            refusals.append(check.refusal)
        else:
            out.append(explain(facts_of(check, count=count)))
    return [*fold(out), *refusals]
