"""serve's capability profiles (``--profiles``): what each Kubernetes container
needed and what it holds, as bounded Prometheus series that ``max by`` merges
over replicas and nodes (``capwatch advise --prometheus`` reads them back).

Families (``node`` is serve's ``--node``; workload_kind/workload come from the
pod's ownerReferences, a ReplicaSet's Deployment and a Job's CronJob):

* ``capwatch_capability_first_seen_seconds`` and ``..._last_seen_seconds``
  {namespace, workload_kind, workload, container, pod, node, capability,
  syscall, use}: ``use`` is ``needed`` (an allowed check that is not a known
  probe) or ``denied`` (refused and not expected);
* ``capwatch_capability_held`` {namespace, workload_kind, workload, container,
  pod, node, capability, source}: 1 for each capability the container's spec
  gives it (``source`` says how: privileged, the runtime's default set, add/drop);
* ``capwatch_profile_overflow_total``: profile keys not kept (the bound).

The pipeline sink stores what it sees keyed by pod name; owners are asked for
in the background as pods appear (OwnerResolver.prefetch) and read from the
cache at scrape time, so neither the consumer nor a scrape waits for the API
server (an owner not fetched yet shows as the ReplicaSet or Job itself).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from capwatch.attribution.k8s import PodCache, PodInfo
from capwatch.decode.caps import cap_name
from capwatch.diagnose.profiles import (
    ProfileBook,
    ProfileKey,
    controller_of,
    held_capabilities,
    owner_of,
    use_of,
)
from capwatch.pipeline import Check
from capwatch.text import visible

__all__ = ["PROFILE_METRICS", "ProfileSink"]

PROFILE_METRICS = (
    "capwatch_capability_first_seen_seconds",
    "capwatch_capability_last_seen_seconds",
    "capwatch_capability_held",
    "capwatch_profile_overflow_total",
)
_SEEN_LABELS = (
    "namespace", "workload_kind", "workload", "container", "pod", "node", "capability",
    "syscall", "use",
)  # fmt: skip
_HELD_LABELS = (
    "namespace", "workload_kind", "workload", "container", "pod", "node", "capability", "source",
)  # fmt: skip

OwnerLookup = Callable[[str, str, str], "list[Mapping[str, Any]] | None"]


class ProfileSink(Collector):
    """A pipeline sink (checks of Kubernetes containers) and a Prometheus collector."""

    def __init__(
        self,
        *,
        node: str,
        pods: PodCache | None = None,
        owners: OwnerLookup | None = None,
        limit: int = 20_000,
    ) -> None:
        self.node = node
        self.pods = pods
        self.owners = owners
        # keyed before owners are known: workload fields are filled at scrape time
        self.book = ProfileBook(limit)
        self._lock = threading.Lock()
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(self)
        # owners are asked for as pods appear (the watcher's thread), so that a
        # scrape finds them cached and never waits for the API server
        self._prefetch = getattr(owners, "prefetch", None)
        if pods is not None and self._prefetch is not None:
            pods.subscribe(self._on_pods)
            self._on_pods({p.uid for p in pods.pods()})

    def _on_pods(self, changed: Iterable[str]) -> None:
        if self.pods is None or self._prefetch is None:
            return
        for uid in changed:
            pod = self.pods.pod(uid)
            ctrl = controller_of(pod.owners) if pod is not None else None
            if pod is not None and ctrl is not None:
                self._prefetch(ctrl[0], pod.namespace, ctrl[1])

    # -- the pipeline sink -----------------------------------------------------

    def write(self, check: Check) -> None:
        if check.kind != "kubernetes" or not check.pod:
            return
        use = use_of(
            denied=check.denied,
            comm=check.comm,
            audit=check.audit,
            rule=check.rule,
            role=check.role,
        )
        if use is None:
            return
        key = ProfileKey(
            namespace=check.namespace,
            workload_kind="",
            workload="",
            container=check.container_name or check.container,
            pod=check.pod,
            capability=check.capability,
            syscall=check.syscall,
            use=use,
        )
        with self._lock:
            self.book.add(key, check.time)

    def tick(self) -> None:
        pass

    def close(self) -> None:
        if self.pods is not None and self._prefetch is not None:
            self.pods.unsubscribe(self._on_pods)
        close = getattr(self.owners, "close", None)
        if close is not None:
            close()

    # -- scrape time -------------------------------------------------------------

    def _by_name(self) -> dict[tuple[str, str], PodInfo]:
        if self.pods is None:
            return {}
        return {(p.namespace, p.name): p for p in self.pods.pods()}

    def _owner(self, pod: PodInfo | None, namespace: str, name: str) -> tuple[str, str]:
        if pod is None:
            return "Pod", name
        return owner_of(namespace, name, pod.owners, self.owners)

    def collect(self) -> Iterator[Metric]:
        pods = self._by_name()
        first = GaugeMetricFamily(
            "capwatch_capability_first_seen_seconds",
            "When a container was first seen to need (or be denied) a capability, per syscall",
            labels=_SEEN_LABELS,
        )
        last = GaugeMetricFamily(
            "capwatch_capability_last_seen_seconds",
            "When a container was last seen to need (or be denied) a capability, per syscall",
            labels=_SEEN_LABELS,
        )
        with self._lock:
            seen = list(self.book.seen.items())
            overflow = self.book.overflow
        owners: dict[tuple[str, str], tuple[str, str]] = {}
        for key, (t_first, t_last, _n) in seen:
            pk = (key.namespace, key.pod)
            if pk not in owners:
                owners[pk] = self._owner(pods.get(pk), key.namespace, key.pod)
            kind, workload = owners[pk]
            labels = [
                key.namespace, kind, workload, key.container, key.pod, self.node,
                key.capability, key.syscall, key.use,
            ]  # fmt: skip
            labels = [visible(v) for v in labels]  # names are a tenant's or a runtime's
            first.add_metric(labels, t_first)
            last.add_metric(labels, t_last)
        yield first
        yield last
        held = GaugeMetricFamily(
            "capwatch_capability_held",
            "1 for each capability a container's spec gives it (source: how)",
            labels=_HELD_LABELS,
        )
        for (ns, name), pod in sorted(pods.items()):
            kind, workload = owners.get((ns, name)) or self._owner(pod, ns, name)
            for container, sc in sorted(pod.security.items()):
                caps, source = held_capabilities(sc, pod.runtime)
                for c in sorted(caps):
                    values = [ns, kind, workload, container, name, self.node, cap_name(c), source]
                    held.add_metric([visible(v) for v in values], 1.0)
        yield held
        over = CounterMetricFamily(
            "capwatch_profile_overflow",
            "Profile keys not kept because the profile store was full",
        )
        over.add_metric([], float(overflow))
        yield over

    def exposition(self) -> bytes:
        return generate_latest(self._registry)
