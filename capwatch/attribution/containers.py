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
  :class:`~capwatch.attribution.cgroups.CgroupResolver` knows, adds names from the name
  sources and the Kubernetes :class:`~capwatch.attribution.k8s.PodCache`, and caches the
  result. Name sources and walks report back from their own threads and the
  affected entries are rebuilt on their next lookup.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import structlog

from capwatch.attribution.cgroups import (
    CgroupResolver,
    WalkResult,
    cgroup_id_of_path,
    cgroup_id_of_pid,
    cgroup_owners,
    cgroup_path_of_pid,
    find_cgroup2_mount,
)
from capwatch.attribution.names import ContainerNames
from capwatch.attribution.runtime_api import ContainerdTask

if TYPE_CHECKING:
    from capwatch.attribution.k8s import PodCache

__all__ = [
    "CONTAINER_KINDS",
    "KINDS",
    "Attributor",
    "ContainerNames",
    "Workload",
    "as_containerd",
    "classify",
    "unresolved",
]

_log = structlog.get_logger(__name__)

#: Kinds of workload that are containers (a runtime made the cgroup).
CONTAINER_KINDS = frozenset({"docker", "containerd", "crio", "podman", "kubernetes"})
KINDS = CONTAINER_KINDS | {"systemd", "host", "user-delegated", "unknown"}
SHORT_ID = 12


@dataclass(frozen=True, slots=True)
class Workload:
    """Who a cgroup belongs to. ``label`` is the short form for a table column.

    ``kind`` is one of :data:`KINDS`; ``runtime`` is the container engine
    (docker, containerd, crio, podman) when known, else the kind. ``monitor`` marks
    a runtime's monitor process (conmon), which runs beside the container, not in it.
    ``uid`` is the user a ``user-delegated`` cgroup belongs to (-1 otherwise).
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
    uid: int = -1
    naming: bool = False  # a runtime is being asked who this is (not final yet)
    label: str = field(init=False, default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "label", self._make_label())

    def _make_label(self) -> str:
        short = self.container_id[:SHORT_ID]
        if self.cgroup_path is None:
            return f"cgroup:{self.cgroup_id}"
        if self.kind == "user-delegated":
            return f"user-{self.uid}:{self.service or self.cgroup_path}"
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
        if self.uid >= 0:
            out["uid"] = self.uid
        return out


def unresolved(cgroup_id: int) -> Workload:
    """The workload shown for an id whose cgroup path is not known (``cgroup:<id>``)."""
    return Workload(kind="unknown", runtime="unknown", cgroup_id=cgroup_id)


# --- classification -------------------------------------------------------------
#
# Trust comes from *where* a cgroup sits, not from its name: any user with a
# delegated subtree (systemd's user@UID.service, a Delegate=yes unit, a
# directory chowned to them) can name cgroups as they like. So container and
# pod patterns are recognised only at the places runtimes and the kubelet put
# them, under the roots only root can create, and never at or below the first
# user-delegated component (``user@UID.service``, or a directory not owned by
# root: the caller passes the owners in, see cgroups.cgroup_owners). The
# outermost container component wins: what a container creates inside its own
# cgroup (podman's ``libpod-<id>.scope/container``, a nested runtime) stays
# attributed to it and cannot claim another container's identity.

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
_USER_MANAGER = re.compile(r"user@(\d+)\.service")
# Kubernetes QoS levels between the kubepods root and a pod.
_QOS = re.compile(r"(?:.*-)?(?:burstable|besteffort)(?:\.slice)?")
# Runtimes that really run rootless, inside a user's delegated tree.
_ROOTLESS_RUNTIMES = frozenset({"podman", "docker"})


def _match_container(part: str) -> tuple[str, str, bool] | None:
    """(runtime, id, monitor) if ``part`` is a runtime's container cgroup name."""
    for pattern, rt, is_monitor in _CONTAINER_PATTERNS:
        m = pattern.fullmatch(part)
        if m is not None:
            return rt, m.group(1), is_monitor
    return None


def _kubepods_depth(parts: list[str]) -> int:
    """How many leading components form the kubepods root (0: not Kubernetes).

    cgroupfs driver ``/kubepods``, systemd driver ``/kubepods.slice``, and kind's
    ``/kubelet.slice/kubelet-kubepods.slice``."""
    if parts and parts[0] in ("kubepods", "kubepods.slice"):
        return 1
    if len(parts) > 1 and parts[0] == "kubelet.slice" and parts[1] == "kubelet-kubepods.slice":
        return 2
    return 0


def _delegation(parts: list[str], owners: Sequence[int | None] | None) -> tuple[int, int]:
    """(index of the first user-delegated component, its user), or (len(parts), -1).

    A component is delegated if it is a user's manager (``user@UID.service``) or
    its parent directory is owned by another user than root: whoever owns the
    parent could have created it. A runtime may chown a container's own
    directory to the container's root (user namespaces); its children are then
    delegated, the container itself is not."""
    for i, part in enumerate(parts):
        m = _USER_MANAGER.fullmatch(part)
        if m is not None:
            return i, int(m.group(1))
        parent = owners[i - 1] if owners is not None and 0 < i <= len(owners) else None
        if parent is not None and parent != 0:
            return i, parent
    return len(parts), -1


def _kubernetes(parts: list[str], depth: int, path: str, cgroup_id: int) -> Workload:
    """A path under the kubepods root: [QoS] pod<uid> [container]."""
    i = depth
    if i < len(parts) and _POD.fullmatch(parts[i]) is None and _QOS.fullmatch(parts[i]):
        i += 1
    pod = _POD.fullmatch(parts[i]) if i < len(parts) else None
    if pod is None:  # the root or a QoS-level slice, no pod
        return Workload(kind="kubernetes", cgroup_path=path, cgroup_id=cgroup_id)
    pod_uid = pod.group(1).replace("_", "-")
    runtime = container_id = ""
    monitor = False
    if i + 1 < len(parts):
        part = parts[i + 1]
        found = _match_container(part)
        if found is not None:
            runtime, container_id, monitor = found
        elif _BARE_ID.fullmatch(part):  # cgroupfs driver: pod<uid>/<id>
            container_id = part
    return Workload(
        kind="kubernetes",
        runtime=runtime,
        container_id=container_id,
        pod_uid=pod_uid,
        cgroup_path=path,
        cgroup_id=cgroup_id,
        monitor=monitor,
    )


def _runtime_container(parts: list[str]) -> tuple[str, str, bool] | None:
    """(runtime, id, monitor) for a container where a runtime outside Kubernetes
    puts it, else None. The places (first components):

    * systemd drivers: ``/system.slice/docker-<id>.scope`` (docker),
      ``/system.slice/nerdctl-<id>.scope`` and ``cri-containerd-``,
      ``/system.slice/crio-<id>.scope``, ``/machine.slice/libpod-<id>.scope``
      (podman; ``machine-libpod_pod_<pod>.slice/`` in between for a pod);
    * cgroupfs drivers: ``/docker/<id>``, ``/libpod_parent/libpod-<id>`` (podman,
      as on this machine; ``<pod>/`` in between for a pod), containerd's
      ``/<namespace>/<id>`` (``ctr``; runtime not named by the path).
    """
    if len(parts) < 2:
        return None
    top = parts[0]
    if top in ("system.slice", "machine.slice", "libpod_parent"):
        candidates = [parts[1]]
        if len(parts) > 2 and (
            (top == "machine.slice" and parts[1].startswith("machine-libpod_pod_"))
            or (top == "libpod_parent" and _match_container(parts[1]) is None)
        ):
            candidates.append(parts[2])
        for part in candidates:
            found = _match_container(part)
            if found is not None:
                allowed = {
                    "system.slice": ("docker", "containerd", "crio"),
                    "machine.slice": ("podman",),
                    "libpod_parent": ("podman",),
                }[top]
                return found if found[0] in allowed else None
        return None
    if _BARE_ID.fullmatch(parts[1]) and not top.endswith(".slice"):
        return ("docker" if top == "docker" else ""), parts[1], False
    return None


def _delegated(parts: list[str], at: int, uid: int, path: str, cgroup_id: int) -> Workload:
    """A cgroup in a user's delegated subtree: never a root container or a pod.

    Rootless podman and docker put their containers there as units of the
    user's manager (``libpod-<id>.scope``); they are named as that unit, with
    the runtime, never with a container id (which a user can pick freely, and
    which would then pull in a root container's name)."""
    runtime = service = ""
    for part in parts[at:]:
        if _USER_MANAGER.fullmatch(part):
            continue
        found = _match_container(part)
        if found is not None:
            runtime = found[0] if found[0] in _ROOTLESS_RUNTIMES else ""
            service = part
            break
        if _UNIT.fullmatch(part):
            service = part
    return Workload(
        kind="user-delegated",
        runtime=runtime or "user-delegated",
        service=service,
        uid=uid,
        cgroup_path=path,
        cgroup_id=cgroup_id,
    )


def classify(
    cgroup_path: str, cgroup_id: int = 0, *, owners: Sequence[int | None] | None = None
) -> Workload:
    """Classify a unified-hierarchy cgroup path (as in ``/proc/<pid>/cgroup``).

    ``owners[i]`` is the uid owning the directory of the first ``i + 1``
    components (None: unknown), as :func:`capwatch.attribution.cgroups.cgroup_owners`
    reads them; the first component owned by another user than root starts a
    delegated subtree. Without ``owners``, only the path is judged. Pure
    function: no I/O. See the comment above for the rules.
    """
    parts = [p for p in cgroup_path.split("/") if p]
    at, uid = _delegation(parts, owners)
    trusted = parts[:at]
    k8s = _kubepods_depth(trusted)
    if k8s:
        w = _kubernetes(trusted, k8s, cgroup_path, cgroup_id)
        if at == len(parts) or w.pod_uid:
            return w
        return _delegated(parts, at, uid, cgroup_path, cgroup_id)
    found = _runtime_container(trusted)
    if found is not None:
        runtime, container_id, monitor = found
        kind = runtime or "unknown"
        return Workload(
            kind=kind,
            runtime=kind,
            container_id=container_id,
            cgroup_path=cgroup_path,
            cgroup_id=cgroup_id,
            monitor=monitor,
        )
    if at < len(parts):
        return _delegated(parts, at, uid, cgroup_path, cgroup_id)
    service = next((p for p in reversed(parts) if _UNIT.fullmatch(p)), "")
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
    ``<proc_root>/self/mountinfo``). ``k8s`` is a :class:`~capwatch.attribution.k8s.PodCache`
    fed by its owner (a :class:`~capwatch.attribution.k8s.PodWatcher`); :meth:`close` stops
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
                owners = cgroup_owners(self.cgroup_root, path) if self.cgroup_root else None
                w = self._enrich(classify(path, cgroup_id, owners=owners))
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
