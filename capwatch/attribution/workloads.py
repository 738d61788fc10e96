"""Glue between the tracer and container attribution: the identity of a
cgroup id as users see it (columns, JSON fields, metric labels), and the
workload filters of `trace`."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from capwatch.attribution.containers import CONTAINER_KINDS, Workload
from capwatch.decode.events import Event

__all__ = ["HoldQueue", "Identity", "WorkloadFilter", "identity_of", "is_settled"]

#: Workload identity of a cgroup as users see it: container, kind, runtime,
#: container_id, container_name, pod, namespace ("" when not applicable).
Identity = dict[str, str]


class _Named(Protocol):
    """What a workload filter reads of a record (capwatch.pipeline.Check)."""

    @property
    def kind(self) -> str: ...
    @property
    def pod(self) -> str: ...
    @property
    def namespace(self) -> str: ...
    @property
    def container(self) -> str: ...
    @property
    def container_id(self) -> str: ...
    @property
    def container_name(self) -> str: ...


def identity_of(w: Workload) -> Identity:
    container = w.label
    if w.kind == "kubernetes" and w.pod:
        container = w.container_name or w.container_id[:12] or "pod"
    return {
        "container": container,
        "kind": w.kind,
        "runtime": w.runtime or w.kind,
        "container_id": w.container_id,
        "container_name": w.container_name or w.name,
        "pod": w.pod,
        "namespace": w.namespace,
    }


class WorkloadFilter:
    """--container / --pod / --namespace / --host-only, decided once."""

    def __init__(
        self,
        *,
        container: str | None = None,
        pod: str | None = None,
        namespace: str | None = None,
        host_only: bool = False,
    ) -> None:
        self.container = container
        self.pod = pod
        self.namespace = namespace
        self.host_only = host_only
        self.active = bool(container or pod or namespace or host_only)

    def __call__(self, rec: _Named) -> bool:
        if self.host_only and rec.kind in CONTAINER_KINDS:
            return False
        if self.pod and rec.pod != self.pod:
            return False
        if self.namespace and rec.namespace != self.namespace:
            return False
        if self.container:
            c = self.container
            cid = rec.container_id
            if not (
                (cid and len(c) >= 3 and cid.startswith(c))
                or c in (rec.container, rec.container_name)
            ):
                return False
        return True


def is_settled(w: Workload, *, k8s: bool = False) -> bool:
    """Whether this workload's identity is final (no walk or name look-up pending)."""
    if w.cgroup_path is None or w.naming:
        return False
    if w.container_id and w.runtime in ("podman", "docker") and not w.name:
        return False
    if k8s and w.kind == "kubernetes" and w.pod_uid:
        # the pod's name, and the container's once its status lists the id
        return bool(w.pod) and not (w.container_id and not w.container_name)
    return True


class HoldQueue:
    """Keep output in order while a new workload's identity is being learnt.

    Attribution never blocks (a new cgroup shows ``cgroup:<id>`` until a
    background walk finds it, a new container its id until its name is read),
    so an event whose workload is not settled waits here, with everything
    behind it, for at most ``max_hold_s``; then it is shown as it is.
    ``note_pid(cgroup_id, pid)`` (Attributor.note_pid) is told of events from
    cgroups not walked yet.
    """

    def __init__(
        self,
        resolve: Callable[[int], Workload],
        emit: Callable[[Event], None],
        *,
        max_hold_s: float = 1.0,
        k8s: bool = False,
        note_pid: Callable[[int, int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._resolve = resolve
        self._note_pid = note_pid
        self._emit = emit
        self._max_hold = max_hold_s
        self._k8s = k8s
        self._clock = clock
        self._held: deque[tuple[float, Event]] = deque()
        self._gave_up: set[int] = set()  # cgroups whose identity never settled in time

    def push(self, ev: Event) -> None:
        w = self._resolve(ev.cgroup_id)
        if w.cgroup_path is None and self._note_pid is not None:
            # A cgroup not walked yet: its process tells its path now, in case
            # it is gone before the walk (a container that ran for a moment).
            self._note_pid(ev.cgroup_id, ev.pid)
            w = self._resolve(ev.cgroup_id)
        if not self._held and self._settled(ev.cgroup_id, w):
            self._emit(ev)
            return
        self._held.append((self._clock(), ev))

    def _settled(self, cgroup_id: int, w: Workload) -> bool:
        return cgroup_id in self._gave_up or is_settled(w, k8s=self._k8s)

    def flush(self, *, force: bool = False) -> None:
        now = self._clock()
        while self._held:
            t, ev = self._held[0]
            if not self._settled(ev.cgroup_id, self._resolve(ev.cgroup_id)):
                if not (force or now - t >= self._max_hold):
                    return
                # Never settles (a name no source knows): stop holding its events.
                if len(self._gave_up) >= 4096:
                    self._gave_up.clear()
                self._gave_up.add(ev.cgroup_id)
            self._held.popleft()
            self._emit(ev)

    def __len__(self) -> int:
        return len(self._held)
