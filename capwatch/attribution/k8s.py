"""Kubernetes metadata for cgroups: pods on this node, by pod UID and container id.

A :class:`PodWatcher` lists the pods of this node (``fieldSelector=spec.nodeName=
$NODE_NAME``) and then watches them, on a background thread, into a
:class:`PodCache`; the tracer's lookups are dict reads. It handles ADDED,
MODIFIED, DELETED and BOOKMARK events, resumes a watch from the last
``resourceVersion``, re-lists on ``410 Gone`` (as an HTTP status or as an ERROR
event carrying a Status), and reconnects with capped exponential backoff. While
the API is unreachable, lookups simply miss and the tracer shows ids.

Why not the official ``kubernetes`` client: version 37.0.2 is a 7.5 MB wheel
(74 MB, 1,941 files unpacked) that pulls requests, urllib3, oauthlib,
websocket-client, PyYAML, pydantic and aiohttp into a DaemonSet image, for what
is here two GET requests; its ``watch.Watch`` still leaves 410 handling and
re-listing to the caller. The API is plain JSON over HTTPS, so a stdlib client
(:mod:`capwatch.attribution.k8s_http`, ~150 lines) speaks it with no dependency, reads the
rotating service-account token per request, and is tested end to end against
a loopback server replaying real-shaped responses.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import structlog

from capwatch.attribution.k8s_http import ApiClient, ApiConfig, ApiError, K8sConfigError

__all__ = [
    "ApiConfig",
    "ContainerRef",
    "K8sConfigError",
    "OwnerResolver",
    "PodCache",
    "PodInfo",
    "PodWatcher",
    "parse_container_id",
    "pod_from_object",
]

_log = structlog.get_logger(__name__)

# containerStatuses[].containerID scheme -> runtime name used in capwatch.attribution.containers
_SCHEMES = {"containerd": "containerd", "cri-o": "crio", "docker": "docker"}


@dataclass(frozen=True, slots=True)
class ContainerRef:
    """One container of a pod, as its status reports it."""

    name: str
    container_id: str
    runtime: str


@dataclass(frozen=True, slots=True)
class PodInfo:
    """The parts of a Pod that attribution needs."""

    uid: str
    namespace: str
    name: str
    node: str
    resource_version: str
    containers: Mapping[str, ContainerRef]  # by container id
    owners: tuple[Mapping[str, Any], ...] = ()  # metadata.ownerReferences
    #: container name -> securityContext
    security: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    runtime: str = ""  # the node's runtime, from the containers' ids (containerd, crio, docker)


def parse_container_id(value: str) -> tuple[str, str]:
    """Split ``containerd://<id>`` into (runtime, id); unknown schemes keep their name."""
    scheme, sep, cid = value.partition("://")
    if not sep:
        return "", value
    return _SCHEMES.get(scheme, scheme), cid


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def pod_from_object(obj: Mapping[str, Any]) -> PodInfo | None:
    """Build a :class:`PodInfo` from a v1 Pod JSON object; None if it has no UID."""
    meta, spec = _dict(obj.get("metadata")), _dict(obj.get("spec"))
    status = _dict(obj.get("status"))
    uid = meta.get("uid")
    if not isinstance(uid, str) or not uid:
        return None
    containers: dict[str, ContainerRef] = {}
    security: dict[str, Mapping[str, Any]] = {}
    specs = spec.get("containers")
    for entry in specs if isinstance(specs, list) else []:
        c = _dict(entry)
        if isinstance(c.get("name"), str):
            security[c["name"]] = MappingProxyType(_dict(c.get("securityContext")))
    owners = tuple(
        MappingProxyType(_dict(r)) for r in meta.get("ownerReferences") or [] if isinstance(r, dict)
    )
    for key in ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses"):
        statuses = status.get(key)
        for entry in statuses if isinstance(statuses, list) else []:
            cs = _dict(entry)
            raw = cs.get("containerID")
            if isinstance(raw, str) and raw:  # absent while the container is being created
                runtime, cid = parse_container_id(raw)
                containers[cid] = ContainerRef(str(cs.get("name", "")), cid, runtime)
    return PodInfo(
        uid=uid,
        namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")),
        node=str(spec.get("nodeName", "")),
        resource_version=str(meta.get("resourceVersion", "")),
        containers=MappingProxyType(containers),
        owners=owners,
        security=MappingProxyType(security),
        runtime=next((c.runtime for c in containers.values() if c.runtime), ""),
    )


PodListener = Callable[[frozenset[str]], None]


class PodCache:
    """Pods by UID and containers by id. Reads are lock-free dict reads.

    Listeners get the set of pod UIDs that changed (added, modified, deleted),
    on the writer's thread.
    """

    def __init__(self) -> None:
        self._pods: dict[str, PodInfo] = {}
        self._containers: dict[str, PodInfo] = {}
        self._lock = threading.Lock()
        self._listeners: list[PodListener] = []

    def __len__(self) -> int:
        return len(self._pods)

    def pod(self, uid: str) -> PodInfo | None:
        """The pod with this UID, or None."""
        return self._pods.get(uid)

    def container(self, container_id: str) -> tuple[PodInfo, ContainerRef] | None:
        """The pod and container owning ``container_id``, or None."""
        pod = self._containers.get(container_id)
        if pod is None:
            return None
        ref = pod.containers.get(container_id)
        return None if ref is None else (pod, ref)

    def pods(self) -> list[PodInfo]:
        """Every pod known now (a snapshot)."""
        return list(self._pods.values())

    def subscribe(self, listener: PodListener) -> None:
        """Call ``listener(changed_uids)`` after every change."""
        self._listeners.append(listener)

    def unsubscribe(self, listener: PodListener) -> None:
        """Stop calling ``listener``."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _put(self, pod: PodInfo) -> None:
        self._drop(pod.uid)
        self._pods[pod.uid] = pod
        for cid in pod.containers:
            self._containers[cid] = pod

    def _drop(self, uid: str) -> None:
        old = self._pods.pop(uid, None)
        if old is not None:
            for cid in old.containers:
                if self._containers.get(cid) is old:
                    del self._containers[cid]

    def apply(self, event_type: str, obj: Mapping[str, Any]) -> None:
        """Apply one watch event (ADDED, MODIFIED, DELETED) carrying a Pod object."""
        pod = pod_from_object(obj)
        if pod is None:
            return
        with self._lock:
            if event_type == "DELETED":
                self._drop(pod.uid)
            elif event_type in ("ADDED", "MODIFIED"):
                self._put(pod)
            else:
                return
        self._notify(frozenset({pod.uid}))

    def replace_all(self, pods: Iterable[PodInfo]) -> None:
        """Replace the whole cache with a fresh list (after a LIST)."""
        fresh = {p.uid: p for p in pods}
        with self._lock:
            changed = set(self._pods) | set(fresh)
            for uid in list(self._pods):
                if uid not in fresh:
                    self._drop(uid)
            for pod in fresh.values():
                self._put(pod)
        self._notify(frozenset(changed))

    def _notify(self, uids: frozenset[str]) -> None:
        for listener in list(self._listeners):
            try:
                listener(uids)
            except Exception as e:
                _log.warning("pod_cache_listener_failed", error=repr(e))


class PodWatcher:
    """List + watch the pods of one node into a :class:`PodCache`, on a background thread."""

    PODS_PATH = "/api/v1/pods"

    def __init__(
        self,
        api: ApiConfig,
        node_name: str | None,
        cache: PodCache | None = None,
        *,
        watch_timeout: int = 300,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        start: bool = True,
    ) -> None:
        self.cache = cache if cache is not None else PodCache()
        self.api = api
        self.node_name = node_name
        self._client = ApiClient(api)
        self._watch_timeout = watch_timeout
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._stop = threading.Event()
        self.ready = threading.Event()  # set after the first successful LIST
        self.resource_version: str | None = None
        self.lists = 0
        self.watches = 0
        self.errors = 0
        self._thread: threading.Thread | None = None
        if start:
            self.start()

    @classmethod
    def from_environment(
        cls, *, env: dict[str, str] | None = None, sa_dir: str | None = None, **kwargs: Any
    ) -> PodWatcher:
        """In-cluster config and ``NODE_NAME`` from the environment (raises K8sConfigError)."""
        env = dict(os.environ) if env is None else env
        api = (
            ApiConfig.in_cluster(env=env)
            if sa_dir is None
            else ApiConfig.in_cluster(env=env, sa_dir=sa_dir)
        )
        node = env.get("NODE_NAME")
        if not node:
            raise K8sConfigError("NODE_NAME is not set (use the downward API: spec.nodeName)")
        return cls(api, node, **kwargs)

    def _selector(self) -> dict[str, str]:
        return {"fieldSelector": f"spec.nodeName={self.node_name}"} if self.node_name else {}

    def start(self) -> None:
        """Start the background thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="capwatch-k8s-pods", daemon=True)
            self._thread.start()

    def _list(self) -> str:
        data = self._client.get_json(self.PODS_PATH, self._selector())
        self.lists += 1
        items = data.get("items")
        pods = [pod_from_object(_dict(i)) for i in (items if isinstance(items, list) else [])]
        self.cache.replace_all(p for p in pods if p is not None)
        self.ready.set()
        return str(_dict(data.get("metadata")).get("resourceVersion", ""))

    def _watch(self, rv: str) -> str | None:
        """Follow one watch stream; return the resourceVersion to resume from (None: re-list)."""
        query = {
            **self._selector(),
            "watch": "true",
            "resourceVersion": rv,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(self._watch_timeout),
        }
        self.watches += 1
        for event in self._client.stream(self.PODS_PATH, query, self._watch_timeout + 30.0):
            if self._stop.is_set():
                return rv
            kind, obj = event.get("type"), _dict(event.get("object"))
            if kind == "ERROR":
                if obj.get("code") == 410:
                    _log.info("k8s_watch_expired", resource_version=rv, message=obj.get("message"))
                    return None
                raise ApiError(int(obj.get("code") or 0), str(obj.get("message", "watch error")))
            new_rv = _dict(obj.get("metadata")).get("resourceVersion")
            if kind in ("ADDED", "MODIFIED", "DELETED"):
                self.cache.apply(kind, obj)
            if isinstance(new_rv, str) and new_rv:
                rv = new_rv
            self.resource_version = rv
        return rv

    def _run(self) -> None:
        rv: str | None = None
        delay = self._backoff_initial
        while not self._stop.is_set():
            try:
                if rv is None:
                    rv = self._list()
                    self.resource_version = rv
                began = time.monotonic()
                rv = self._watch(rv)
                if time.monotonic() - began > 1.0 or rv is None:
                    delay = self._backoff_initial
                    continue
                # A watch that ends at once, repeatedly, must not spin.
            except ApiError as e:
                if e.status == 410:
                    rv = None
                    continue
                self._failed(e, delay)
            except Exception as e:  # OSError, http.client.HTTPException, bad JSON: retry
                self._failed(e, delay)
            if self._stop.wait(delay * random.uniform(0.5, 1.0)):
                return
            delay = min(delay * 2, self._backoff_max)

    def _failed(self, error: BaseException, delay: float) -> None:
        if self._stop.is_set():
            return
        self.errors += 1
        _log.warning(
            "k8s_api_unavailable",
            url=self._client.config.base_url,
            error=str(error) or repr(error),
            retry_in_s=round(delay, 2),
            effect="pods shown by id until the API answers",
        )

    def close(self) -> None:
        """Stop watching (unblocks a watch in progress)."""
        self._stop.set()
        self._client.abort()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


class OwnerResolver:
    """A ReplicaSet's or Job's own ownerReferences (to find its Deployment or
    CronJob), fetched with GET and cached: at most ``limit`` entries, each kept
    ``ttl`` seconds; a failed GET is cached too (as unknown), so a missing RBAC
    rule costs one request per object per ``ttl``, never one per scrape.

    Calls never wait for the API server: what is not cached is fetched by a
    worker thread (queued at most ``queue_limit`` at a time, the rest dropped
    and counted in ``dropped``, asked again later) and is unknown (None) until
    it arrives. :meth:`prefetch` asks early, when a pod's first check is seen,
    so that a scrape finds the owner already there."""

    PATHS: Mapping[str, str] = MappingProxyType(
        {
            "ReplicaSet": "/apis/apps/v1/namespaces/{ns}/replicasets/{name}",
            "Job": "/apis/batch/v1/namespaces/{ns}/jobs/{name}",
        }
    )

    def __init__(
        self, api: ApiConfig, *, limit: int = 4096, ttl: float = 600.0, queue_limit: int = 256
    ) -> None:
        import queue

        self._client = ApiClient(api)
        self._limit = limit
        self._ttl = ttl
        self._cache: dict[tuple[str, str, str], tuple[float, list[Mapping[str, Any]] | None]] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[str, str, str] | None] = queue.Queue(queue_limit)
        self._inflight: set[tuple[str, str, str]] = set()
        self._thread: threading.Thread | None = None
        self.errors = 0
        self.dropped = 0

    def __call__(self, kind: str, namespace: str, name: str) -> list[Mapping[str, Any]] | None:
        """The cached ownerReferences, or None (unknown: fetching) without waiting."""
        if kind not in self.PATHS:
            return None
        key = (kind, namespace, name)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and time.monotonic() - hit[0] < self._ttl:
                return hit[1]
        self.prefetch(kind, namespace, name)
        return None

    def prefetch(self, kind: str, namespace: str, name: str) -> None:
        """Fetch in the background unless cached, already asked, or the queue is full."""
        import queue

        if kind not in self.PATHS:
            return
        key = (kind, namespace, name)
        with self._lock:
            hit = self._cache.get(key)
            if key in self._inflight or (
                hit is not None and time.monotonic() - hit[0] < self._ttl
            ):
                return
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._work, name="capwatch-k8s-owners", daemon=True
                )
                self._thread.start()
            try:
                self._queue.put_nowait(key)
            except queue.Full:
                self.dropped += 1
                return
            self._inflight.add(key)

    def _work(self) -> None:
        while True:
            key = self._queue.get()
            if key is None:
                return
            refs = self._fetch(*key)
            with self._lock:
                if len(self._cache) >= self._limit:
                    self._cache.clear()
                self._cache[key] = (time.monotonic(), refs)
                self._inflight.discard(key)

    def _fetch(self, kind: str, namespace: str, name: str) -> list[Mapping[str, Any]] | None:
        try:
            obj = self._client.get_json(self.PATHS[kind].format(ns=namespace, name=name), {})
            got = _dict(obj.get("metadata")).get("ownerReferences")
            return [r for r in got if isinstance(r, dict)] if isinstance(got, list) else []
        except (OSError, ValueError, ApiError) as e:
            self.errors += 1
            _log.warning(
                "k8s_owner_lookup_failed", kind=kind, namespace=namespace, name=name, error=str(e)
            )
            return None

    def close(self) -> None:
        """Stop the worker (a GET in progress ends by its own timeout)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._client.abort()
            with contextlib.suppress(Exception):
                self._queue.put(None, timeout=1)
            thread.join(timeout=5)
