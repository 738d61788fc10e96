"""Container names from podman and docker, learned off the event path.

podman's ``<graphroot>/<driver>-containers/containers.json`` (one file listing id
and names of every container, re-read when its mtime changes), docker's
``<docker_root>/containers/<id>/config.v2.json`` then its Engine API, and
containerd's task state (:mod:`capwatch.attribution.runtime_api`, its own thread,
no exec); ``podman inspect`` at most once per id as podman's fallback. Used by
:class:`capwatch.attribution.containers.Attributor`, which asks only for
containers in the places runtimes put them (containers.classify), never for a
user's cgroups.

Bounded: at most ``max_pending`` ids wait for a look-up (more are dropped and
counted in ``dropped``; a dropped id is asked again on a later miss), and the
look-up thread does at most ``rate`` look-ups a second (``burst`` at once), so a
flood of new container ids costs a bounded number of file reads and execs.
"""

from __future__ import annotations

import glob
import json
import os
import queue
import shutil
import subprocess
import threading
from collections.abc import Callable

import structlog

from capwatch.attribution.runtime_api import ContainerdTask, Pending, RuntimeNames
from capwatch.ratelimit import TokenBucket

__all__ = ["ContainerNames", "NameListener"]

_log = structlog.get_logger(__name__)

NameListener = Callable[[str], None]
_MAX_ASKED = 16384  # bound on remembered ids (cleared when full: they may be asked again)


class ContainerNames:
    """podman/docker container names by full id, learned on a background thread.

    :meth:`lookup` is a dict read; a miss queues the id (once) and returns None.
    Listeners get the container id once its name is known.
    """

    def __init__(
        self,
        *,
        storage_root: str = "/var/lib/containers/storage",
        docker_root: str = "/var/lib/docker",
        inspect: bool = True,
        background: bool = True,
        max_pending: int = 256,
        rate: float = 5.0,
        burst: int = 20,
        bucket: TokenBucket | None = None,
        runtimes: RuntimeNames | None = None,
    ) -> None:
        self.storage_root = storage_root
        self.docker_root = docker_root
        self._inspect = inspect
        self._names: dict[str, str] = {}
        self._asked: set[str] = set()
        self._listeners: list[NameListener] = []
        self._podman_mtimes: dict[str, float] = {}
        self._queue: queue.SimpleQueue[tuple[str, str] | None] = queue.SimpleQueue()
        self.max_pending = max_pending
        self._bucket = bucket or TokenBucket(rate, burst)
        self._stop = threading.Event()
        self.inspections = 0
        self.requested = 0  # ids queued for a look-up
        self.fetched = 0  # look-ups done by the thread
        self.dropped = 0  # ids not queued: max_pending were waiting
        self._owns_runtimes = runtimes is None
        self.runtimes = runtimes if runtimes is not None else RuntimeNames(background=background)
        self.runtimes.subscribe(self._on_runtime)
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(
                target=self._run, name="capwatch-container-names", daemon=True
            )
            self._thread.start()

    def subscribe(self, listener: NameListener) -> None:
        """Call ``listener(container_id)`` when a name is learned."""
        self._listeners.append(listener)

    def lookup(self, runtime: str, container_id: str) -> str | None:
        """Return the name if known; otherwise queue a look-up (once per id) and return None."""
        name = self._names.get(container_id)
        if name is None and container_id not in self._asked:
            if self._thread is not None:
                if self._queue.qsize() >= self.max_pending:
                    self.dropped += 1
                    if self.dropped == 1 or self.dropped % 1000 == 0:
                        _log.warning(
                            "container_name_lookups_dropped",
                            dropped=self.dropped,
                            max_pending=self.max_pending,
                        )
                    return None
                if len(self._asked) >= _MAX_ASKED:
                    self._asked.clear()
                self._asked.add(container_id)
                self.requested += 1
                self._queue.put((runtime, container_id))
            else:
                self._asked.add(container_id)
                self.fetch(runtime, container_id)
                name = self._names.get(container_id)
        return name

    def fetch(self, runtime: str, container_id: str) -> str | None:
        """Find the name now (file reads, maybe one ``inspect``): blocking, off the event path."""
        name = self._names.get(container_id)
        if name is None and runtime == "podman":
            self._load_podman_store()
            name = self._names.get(container_id)
        elif name is None and runtime == "docker":
            # the Engine API; with a background thread this queues the id, whose
            # name then comes through _on_runtime (retried while docker is down)
            name = self._read_docker_config(container_id) or self.runtimes.docker_name(
                container_id
            )
        if name is None and self._inspect and runtime == "podman":
            name = self._run_inspect(runtime, container_id)
        if name:
            self._learn({container_id: name})
        return name

    def containerd_task(self, cgroup_path: str) -> ContainerdTask | Pending | None:
        """The containerd task of this cgroup, None if none, ``PENDING`` while looked up."""
        return self.runtimes.containerd_task(cgroup_path)

    def _on_runtime(self, key: str) -> None:
        # a docker id now named, or a cgroup path containerd was asked about
        name = self.runtimes.known_docker(key)
        if name is not None:
            self._learn({key: name})
        else:
            self._tell(key)

    def _tell(self, key: str) -> None:
        for listener in list(self._listeners):
            try:
                listener(key)
            except Exception as e:
                _log.warning("container_name_listener_failed", error=repr(e))

    def _learn(self, names: dict[str, str]) -> None:
        new = {cid: n for cid, n in names.items() if self._names.get(cid) != n}
        self._names.update(new)
        for cid in new:
            self._tell(cid)

    def _load_podman_store(self) -> None:
        # containers/storage keeps one containers.json per storage driver
        # (overlay-containers/, vfs-containers/, ...): id, names, image, layer.
        for path in glob.glob(os.path.join(self.storage_root, "*-containers", "containers.json")):
            try:
                mtime = os.stat(path).st_mtime
                if self._podman_mtimes.get(path) == mtime:
                    continue
                with open(path, encoding="utf-8") as f:
                    records = json.load(f)
                self._podman_mtimes[path] = mtime
            except (OSError, ValueError) as e:
                _log.warning("podman_store_unreadable", path=path, error=str(e))
                continue
            found: dict[str, str] = {}
            for record in records if isinstance(records, list) else []:
                if not isinstance(record, dict):
                    continue
                cid, names = record.get("id"), record.get("names")
                if isinstance(cid, str) and isinstance(names, list) and names:
                    found[cid] = str(names[0])
            self._learn(found)

    def _read_docker_config(self, container_id: str) -> str | None:
        path = os.path.join(self.docker_root, "containers", container_id, "config.v2.json")
        try:
            with open(path, encoding="utf-8") as f:
                name = json.load(f).get("Name")
        except (OSError, ValueError, AttributeError):
            return None
        return name.lstrip("/") if isinstance(name, str) and name else None

    def _run_inspect(self, runtime: str, container_id: str) -> str | None:
        binary = shutil.which(runtime) if runtime in ("podman", "docker") else None
        if binary is None:
            return None
        self.inspections += 1
        try:
            proc = subprocess.run(
                [binary, "inspect", "--format", "{{.Name}}", container_id],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        name = proc.stdout.strip().lstrip("/")
        return name if proc.returncode == 0 and name else None

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if item[1] in self._names:
                continue  # learned meanwhile (one read of podman's store names them all)
            # one token per look-up: while none is there, ids wait in the bounded queue
            if not self._bucket.take(self._stop):
                return
            self.fetched += 1
            try:
                self.fetch(*item)
            except Exception as e:
                _log.warning("container_name_lookup_failed", id=item[1], error=repr(e))

    def close(self) -> None:
        """Stop the look-up threads."""
        if self._owns_runtimes:
            self.runtimes.close()
        if self._thread is not None:
            self._stop.set()
            self._queue.put(None)
            self._thread.join(timeout=15)
            self._thread = None
