"""cgroup id -> workload: which container, pod, service or host a check came from.

Three layers, from pure to stateful:

* :func:`classify` turns a cgroup path into a :class:`Workload` (runtime,
  container id, pod UID, systemd unit). Pure, table-tested.
* :class:`ContainerNames` learns podman/docker container names off the event
  path: podman's ``<graphroot>/<driver>-containers/containers.json`` (one file
  listing id and names of every container, re-read when its mtime changes),
  docker's ``<docker_root>/containers/<id>/config.v2.json``; ``podman inspect``
  / ``docker inspect`` at most once per id as the fallback.
* :class:`Attributor`, the facade the tracer calls: ``resolve(cgroup_id)`` is a
  dict hit on the common path; a miss classifies the path the
  :class:`~capwatch.cgroups.CgroupResolver` knows, adds names from the name
  sources and the Kubernetes :class:`~capwatch.k8s.PodCache`, and caches the
  result. Name sources and walks report back from their own threads and the
  affected entries are rebuilt on their next lookup.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import structlog

from capwatch._names import ContainerNames
from capwatch.cgroups import (
    CgroupResolver,
    WalkResult,
    cgroup_id_of_path,
    cgroup_id_of_pid,
    cgroup_path_of_pid,
    find_cgroup2_mount,
)
from capwatch.runtime_api import ContainerdTask

if TYPE_CHECKING:
    from capwatch.k8s import PodCache

__all__ = [
    "KINDS",
    "Attributor",
    "ContainerNames",
    "Workload",
    "as_containerd",
    "classify",
    "unresolved",
]

_log = structlog.get_logger(__name__)

KINDS = frozenset(
    {"docker", "containerd", "crio", "podman", "kubernetes", "systemd", "host", "unknown"}
)
SHORT_ID = 12


@dataclass(frozen=True, slots=True)
class Workload:
    """Who a cgroup belongs to. ``label`` is the short form for a table column.

    ``kind`` is one of :data:`KINDS`; ``runtime`` is the container engine
    (docker, containerd, crio, podman) when known, else the kind. ``monitor`` marks
    a runtime's monitor process (conmon), which runs beside the container, not in it.
    ``name`` is the container's name as its runtime (or Kubernetes) reports it.
    ``namespace`` is the pod's Kubernetes namespace, or for a container run by
    containerd itself (``ctr run``), its containerd namespace.
    """

    kind: str
    runtime: str = ""
    container_id: str = ""
    pod_uid: str = ""
    service: str = ""
    cgroup_path: str | None = None
    cgroup_id: int = 0
    name: str = ""
    pod: str = ""
    namespace: str = ""
    container_name: str = ""
    monitor: bool = False
    naming: bool = False  # a runtime is being asked who this is (not final yet)
    label: str = field(init=False, default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "label", self._make_label())

    def _make_label(self) -> str:
        short = self.container_id[:SHORT_ID]
        if self.cgroup_path is None:
            return f"cgroup:{self.cgroup_id}"
        if self.monitor:
            return f"conmon:{self.name or short}"
        if self.kind == "kubernetes":
            if self.pod:
                return f"{self.pod}/{self.container_name or short or 'pod'}"
            return short or (f"pod:{self.pod_uid}" if self.pod_uid else "kubepods")
        if self.container_id:
            return self.name or short
        if self.kind == "systemd":
            return self.service
        if self.kind == "host":
            return "host"
        return self.cgroup_path

    def to_json(self) -> dict[str, str | int | bool]:
        """The non-empty fields, for JSON output (``label`` included)."""
        out: dict[str, str | int | bool] = {"kind": self.kind, "label": self.label}
        for key in (
            "runtime",
            "container_id",
            "name",
            "pod",
            "namespace",
            "container_name",
            "pod_uid",
            "service",
            "cgroup_path",
        ):
            value = getattr(self, key)
            if value:
                out[key] = value
        out["cgroup_id"] = self.cgroup_id
        if self.monitor:
            out["monitor"] = True
        return out


def unresolved(cgroup_id: int) -> Workload:
    """The workload shown for an id whose cgroup path is not known (``cgroup:<id>``)."""
    return Workload(kind="unknown", runtime="unknown", cgroup_id=cgroup_id)


# --- classification -------------------------------------------------------------

_ID = r"([0-9a-f]{64})"
# (pattern on one path component, runtime, is the runtime's monitor process)
_CONTAINER_PATTERNS: tuple[tuple[re.Pattern[str], str, bool], ...] = (
    (re.compile(rf"docker-{_ID}\.scope"), "docker", False),
    (re.compile(rf"cri-containerd-{_ID}\.scope"), "containerd", False),
    (re.compile(rf"nerdctl-{_ID}\.scope"), "containerd", False),
    (re.compile(rf"crio-conmon-{_ID}(?:\.scope)?"), "crio", True),
    (re.compile(rf"crio-{_ID}(?:\.scope)?"), "crio", False),
    (re.compile(rf"libpod-conmon-{_ID}(?:\.scope)?"), "podman", True),
    (re.compile(rf"libpod-{_ID}(?:\.scope)?"), "podman", False),
)
_BARE_ID = re.compile(_ID)
# Pod UIDs are UUIDs, or a 32-hex config hash for static pods; the systemd
# driver writes their dashes as underscores (kubepods-burstable-pod<uid>.slice).
_UID = r"[0-9a-f]{8}[-_]?[0-9a-f]{4}[-_]?[0-9a-f]{4}[-_]?[0-9a-f]{4}[-_]?[0-9a-f]{12}"
_POD = re.compile(rf"(?:.*-)?pod({_UID})(?:\.slice)?")
_UNIT = re.compile(r".+\.(?:service|scope)")


def _is_kubepods(component: str) -> bool:
    # kubepods.slice, kubepods-burstable.slice, kubepods (cgroupfs), and kind's
    # kubelet-kubepods-*.slice nesting.
    return component.startswith("kubepods") or "-kubepods" in component


def classify(cgroup_path: str, cgroup_id: int = 0) -> Workload:
    """Classify a unified-hierarchy cgroup path (as in ``/proc/<pid>/cgroup``).

    The deepest component naming a container wins, so sub-cgroups a container
    makes for itself (podman's ``libpod-<id>.scope/container``) stay attributed
    to it. Pure function: no I/O.
    """
    parts = [p for p in cgroup_path.split("/") if p]
    runtime = container_id = pod_uid = service = ""
    monitor = kubepods = False
    parent = ""
    for part in parts:
        if _is_kubepods(part):
            kubepods = True
        pod = _POD.fullmatch(part) if kubepods else None
        if pod is not None:
            pod_uid = pod.group(1).replace("_", "-")
        else:
            for pattern, rt, is_monitor in _CONTAINER_PATTERNS:
                m = pattern.fullmatch(part)
                if m is not None:
                    runtime, container_id, monitor = rt, m.group(1), is_monitor
                    break
            else:
                if _BARE_ID.fullmatch(part):
                    # cgroupfs drivers: /docker/<id>, /kubepods/<qos>/pod<uid>/<id>
                    container_id, monitor = part, False
                    runtime = "docker" if parent == "docker" else ""
                elif _UNIT.fullmatch(part) and not container_id:
                    service = part
        parent = part
    if kubepods and (pod_uid or container_id):
        return Workload(
            kind="kubernetes",
            runtime=runtime,
            container_id=container_id,
            pod_uid=pod_uid,
            cgroup_path=cgroup_path,
            cgroup_id=cgroup_id,
            monitor=monitor,
        )
    if kubepods:  # a QoS-level slice, no pod
        return Workload(kind="kubernetes", cgroup_path=cgroup_path, cgroup_id=cgroup_id)
    if container_id:
        kind = runtime or "unknown"
        return Workload(
            kind=kind,
            runtime=kind,
            container_id=container_id,
            cgroup_path=cgroup_path,
            cgroup_id=cgroup_id,
            monitor=monitor,
        )
    if service:
        return Workload(
            kind="systemd",
            runtime="systemd",
            service=service,
            cgroup_path=cgroup_path,
            cgroup_id=cgroup_id,
        )
    if all(p.endswith(".slice") for p in parts):  # "/" and bare slices: the host
        return Workload(kind="host", runtime="host", cgroup_path=cgroup_path, cgroup_id=cgroup_id)
    return Workload(kind="unknown", runtime="unknown", cgroup_path=cgroup_path, cgroup_id=cgroup_id)


def as_containerd(w: Workload, task: ContainerdTask) -> Workload:
    """``w``, a cgroup containerd's task state names as ``task``'s."""
    return replace(
        w,
        kind="containerd",
        runtime="containerd",
        container_id=task.id,
        namespace=task.namespace,
        name=task.name,
        naming=False,
    )


# --- the facade -----------------------------------------------------------------

_MAX_UNRESOLVED = 4096  # bound on cached cgroup:<id> entries (a flood of bogus ids)


class Attributor:
    """Resolve cgroup ids to :class:`Workload`; the one object the tracer holds.

    ``cgroup_root`` overrides the cgroup2 mount found in ``mountinfo`` (default
    ``<proc_root>/self/mountinfo``). ``k8s`` is a :class:`~capwatch.k8s.PodCache`
    fed by its owner (a :class:`~capwatch.k8s.PodWatcher`); :meth:`close` stops
    what this object started, not ``k8s``.
    """

    def __init__(
        self,
        *,
        cgroup_root: str | None = None,
        proc_root: str = "/proc",
        mountinfo: str | None = None,
        names: bool = True,
        k8s: PodCache | None = None,
        container_names: ContainerNames | None = None,
        resolver: CgroupResolver | None = None,
        min_walk_interval: float = 0.5,
        dead_ttl: float = 300.0,
        background: bool = True,
    ) -> None:
        self.proc_root = proc_root
        self._cache: dict[int, Workload] = {}
        self._lock = threading.RLock()
        self._pending: dict[int, float] = {}  # unresolved id -> time of its first miss
        # (cgroup id, pid) pairs whose path was read (note_pid): once per pair, so that
        # a process gone or moved before its read does not stop a later one telling
        self._noted: set[tuple[int, int]] = set()
        self._owned: list[CgroupResolver | ContainerNames] = []
        if resolver is None:
            root = cgroup_root
            if root is None:
                root = find_cgroup2_mount(mountinfo or f"{proc_root}/self/mountinfo")
            resolver = CgroupResolver(
                root,
                min_walk_interval=min_walk_interval,
                dead_ttl=dead_ttl,
                background=background,
            )
            self._owned.append(resolver)
        self._resolver = resolver
        self.cgroup_root = resolver.root
        if container_names is None and names:
            container_names = ContainerNames(background=background)
            self._owned.append(container_names)
        self._names = container_names
        self._k8s = k8s
        resolver.subscribe(self._on_walk)
        if container_names is not None:
            container_names.subscribe(self._on_name)
        if k8s is not None:
            k8s.subscribe(self._on_pods)

    def resolve(self, cgroup_id: int) -> Workload:
        """Return the workload of ``cgroup_id``; never blocks on I/O, never raises."""
        w = self._cache.get(cgroup_id)
        if w is not None:
            return w
        return self._miss(cgroup_id)

    def note_pid(self, cgroup_id: int, pid: int) -> None:
        """An event of an unknown cgroup came from ``pid``: learn the cgroup's path
        from /proc/PID/cgroup now (one small read, once per id), so that a
        container that exits before the next walk is still attributed."""
        if (cgroup_id, pid) in self._noted or self.cgroup_root is None:
            return
        if len(self._noted) >= _MAX_UNRESOLVED:
            self._noted.clear()
        self._noted.add((cgroup_id, pid))
        path = cgroup_path_of_pid(pid, proc_root=self.proc_root)
        if path is None:
            return
        found = cgroup_id_of_path(self.cgroup_root, path)
        if found is not None and found != cgroup_id:
            return  # the process moved since: the path is another cgroup's
        self._resolver.learn(cgroup_id, path)
        with self._lock:
            self._pending.pop(cgroup_id, None)
            self._cache.pop(cgroup_id, None)

    def cgroup_id_of_pid(self, pid: int | str) -> int | None:
        """The cgroup id of ``pid`` under this attributor's cgroup root (None if unknown)."""
        if self.cgroup_root is None:
            return None
        return cgroup_id_of_pid(pid, cgroup_root=self.cgroup_root, proc_root=self.proc_root)

    def _miss(self, cgroup_id: int) -> Workload:
        try:
            with self._lock:
                path = self._resolver.lookup(cgroup_id)
                if path is None:
                    w = unresolved(cgroup_id)
                    if len(self._pending) < _MAX_UNRESOLVED:
                        self._pending.setdefault(cgroup_id, self._resolver.clock())
                        self._cache[cgroup_id] = w
                    return w
                w = self._enrich(classify(path, cgroup_id))
                self._cache[cgroup_id] = w
                return w
        except Exception as e:  # the event path must not die on attribution
            _log.warning("attribution_failed", cgroup_id=cgroup_id, error=repr(e))
            return unresolved(cgroup_id)

    def _enrich(self, w: Workload) -> Workload:
        if self._names is not None and w.kind == "unknown" and w.cgroup_path is not None:
            # containerd's own cgroups (ctr run: /<namespace>/<id>) carry no
            # runtime mark: its task state says whose cgroup this is.
            task = self._names.containerd_task(w.cgroup_path)
            if isinstance(task, ContainerdTask):
                return as_containerd(w, task)
            return replace(w, naming=task is not None)
        if self._names is not None and w.container_id and w.runtime in ("podman", "docker"):
            name = self._names.lookup(w.runtime, w.container_id)
            if name:
                w = replace(w, name=name)
        if self._k8s is not None and w.kind == "kubernetes" and w.pod_uid:
            pod = self._k8s.pod(w.pod_uid)
            if pod is not None:
                ref = pod.containers.get(w.container_id)
                w = replace(
                    w,
                    pod=pod.name,
                    namespace=pod.namespace,
                    container_name=ref.name if ref else "",
                    name=ref.name if ref else "",
                    runtime=w.runtime or (ref.runtime if ref else ""),
                )
        return w

    def _invalidate(self, drop: Callable[[int, Workload], bool]) -> None:
        with self._lock:
            for cid in [cid for cid, w in self._cache.items() if drop(cid, w)]:
                del self._cache[cid]

    def _on_walk(self, result: WalkResult) -> None:
        with self._lock:
            known = self._resolver.known()
            for cid, missed_at in list(self._pending.items()):
                if cid in known:
                    del self._pending[cid]
                    self._cache.pop(cid, None)
                elif missed_at < result.started or result.periodic:
                    # A walk that began after the miss did not find it: keep
                    # showing cgroup:<id> without asking for more walks; the
                    # periodic rescan retries.
                    del self._pending[cid]
            if result.periodic:
                self._invalidate(lambda cid, w: w.cgroup_path is None)
            if result.forgotten:
                self._invalidate(lambda cid, w: cid in result.forgotten)

    def _on_name(self, key: str) -> None:
        # a container id now named, or a cgroup path a runtime was asked about
        self._invalidate(lambda cid, w: key in (w.container_id, w.cgroup_path))

    def _on_pods(self, pod_uids: frozenset[str]) -> None:
        self._invalidate(lambda cid, w: w.pod_uid in pod_uids)

    def close(self) -> None:
        """Stop the threads this attributor started."""
        if self._k8s is not None:
            self._k8s.unsubscribe(self._on_pods)
        for owned in self._owned:
            owned.close()
