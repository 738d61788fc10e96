"""Prometheus metrics, read from the kernel at scrape time.

The count map in the kernel is exact at any rate; this Collector reads it
when Prometheus scrapes (one batch lookup), attributes each cgroup to its
workload, and yields fresh metric families. Nothing here runs per event
except :meth:`ExporterState.count_denial` (a dict add, for denials only,
which the kernel rate-limits).

Cardinality is bounded: labels are capability, verdict and workload
(namespace, pod, container, runtime), never pid or raw cgroup id; past
``max_series`` new label sets fold into container="_overflow" and are
counted. Series of cgroups that are gone and idle for ``series_ttl`` are
dropped, and their entries deleted from the kernel map.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from capwatch import __version__
from capwatch.caps import cap_name
from capwatch.containers import Workload
from capwatch.workloads import identity_of, is_settled

__all__ = ["METRIC_NAMES", "CapwatchCollector", "ExporterState"]

#: Every metric name this exporter can publish (dashboards and rules may use only these).
METRIC_NAMES = (
    "capwatch_checks_total",
    "capwatch_denials_total",
    "capwatch_events_lost_total",
    "capwatch_denials_suppressed_total",
    "capwatch_series_folded_total",
    "capwatch_decode_errors_total",
    "capwatch_checks_uncounted_total",
    "capwatch_attached",
    "capwatch_attach_info",
    "capwatch_build_info",
    "capwatch_ringbuf_consumer_lag_seconds",
    "capwatch_scrape_duration_seconds",
    "capwatch_series",
)
OVERFLOW = "_overflow"
_CAP_NAMES = {n: cap_name(n) for n in range(64)}
_VERDICT = {False: "allowed", True: "denied"}
_WL = ("namespace", "pod", "container", "runtime")
CountKey = tuple[int, int, bool]
LabelKey = tuple[
    str, str, str, str, str, str
]  # capability, verdict, namespace, pod, container, runtime


class CountSource(Protocol):
    mode: str

    def read_counts(self) -> dict[CountKey, int]: ...
    def read_stats(self) -> dict[str, int]: ...
    def delete_counts(self, keys: list[CountKey]) -> None: ...


@dataclass
class _Cgroup:
    workload: Workload
    total: int
    changed: float  # monotonic time the cgroup's counts last changed


def workload_labels(w: Workload) -> tuple[str, str, str, str]:
    ident = identity_of(w)
    if w.kind == "host":
        return ("", "", "host", "host")
    return (ident["namespace"], ident["pod"], ident["container"], ident["runtime"])


class ExporterState:
    """What the Collector publishes, shared with the consumer thread."""

    def __init__(
        self,
        source: CountSource,
        resolve: Callable[[int], Workload],
        *,
        cgroup_root: str | None = None,
        max_series: int = 5000,
        series_ttl: float = 600.0,
        health: Callable[[], tuple[bool, float, int]] | None = None,
        k8s: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.k8s = k8s  # Kubernetes names expected: a pod's labels wait for them
        self.resolve = resolve
        self.cgroup_root = cgroup_root
        self.max_series = max_series
        self.series_ttl = series_ttl
        self.health = health or (lambda: (True, 0.0, 0))  # attached, lag seconds, decode errors
        self.clock = clock
        self._lock = threading.Lock()
        self._denials: Counter[tuple[int, int, bool]] = Counter()  # cgroup, cap, expected
        self._cgroups: dict[int, _Cgroup] = {}
        self._admitted: set[LabelKey] = set()
        self._folded: set[LabelKey] = set()
        self.folded_total = 0
        self.last_scrape_s = 0.0
        self._labels: dict[int, tuple[str, str, str, str]] = {}  # settled cgroups only
        self.series_count = 0
        # Counts of expired cgroups, by label set: kept while another live cgroup
        # has the same labels (a container re-created under its name, a restarted
        # service), so that the label set's counter never goes down.
        self._retired: Counter[LabelKey] = Counter()
        self._retired_denials: Counter[tuple[str, str, str, str, str, str]] = Counter()

    # -- the consumer thread ------------------------------------------------

    def count_denial(self, cgroup_id: int, cap: int, *, expected: bool, n: int = 1) -> None:
        """A dict add per denial; labels are attached at scrape time, like the checks'."""
        with self._lock:
            self._denials[(cgroup_id, cap, expected)] += n

    # -- scrape time ----------------------------------------------------------

    def _workload(self, cgroup_id: int, now: float) -> Workload:
        """Sticky per cgroup once settled: a cgroup that dies keeps its labels."""
        known = self._cgroups.get(cgroup_id)
        if known is not None and is_settled(known.workload, k8s=self.k8s):
            return known.workload
        return self.resolve(cgroup_id)

    def _expire(self, now: float) -> None:
        gone: list[int] = []
        for cg, st in self._cgroups.items():
            if now - st.changed < self.series_ttl or st.workload.kind == "host":
                continue
            path = st.workload.cgroup_path
            root = self.cgroup_root
            if path is not None and root and os.path.isdir(os.path.join(root, path.lstrip("/"))):
                continue  # alive, only idle: keep its series
            gone.append(cg)
        if not gone:
            return
        counts = self.source.read_counts()
        dead = set(gone)
        for (cg, cap, denied), n in counts.items():
            if cg in dead:
                wl = workload_labels(self._cgroups[cg].workload)
                self._retired[(cap_name(cap), _VERDICT[denied], *wl)] += n
        self.source.delete_counts([k for k in counts if k[0] in dead])
        with self._lock:
            for key in [k for k in self._denials if k[0] in dead]:
                cg, cap, expected = key
                wl = workload_labels(self._cgroups[cg].workload)
                self._retired_denials[(cap_name(cap), *wl, "true" if expected else "false")] += (
                    self._denials.pop(key)
                )
        for cg in gone:
            del self._cgroups[cg]
            self._labels.pop(cg, None)

    def series(self) -> dict[LabelKey, int]:
        """Aggregate the kernel's counts into label sets (the cap on series applied)."""
        now = self.clock()
        self._expire(now)
        counts = self.source.read_counts()
        per_cg: Counter[int] = Counter()
        pre: Counter[LabelKey] = Counter()  # by label set, before the cap on series
        for (cg, cap, denied), n in counts.items():
            per_cg[cg] += n
            wl = self._labels.get(cg)
            if wl is None:
                w = self._workload(cg, now)
                wl = workload_labels(w)
                if is_settled(w, k8s=self.k8s):
                    self._labels[cg] = wl
            pre[(_CAP_NAMES.get(cap) or cap_name(cap), _VERDICT[denied], *wl)] += n
        for key in list(self._retired):
            if key in pre:
                pre[key] += self._retired[key]
            else:
                del self._retired[key]  # no live cgroup has these labels: the series ends
        out: Counter[LabelKey] = Counter()
        for key, n in pre.items():
            target = key
            if key not in self._admitted:
                if len(self._admitted) < self.max_series:
                    self._admitted.add(key)
                else:
                    if key not in self._folded:
                        self._folded.add(key)
                        self.folded_total += 1
                    target = (key[0], key[1], "", "", OVERFLOW, "")
            out[target] += n
        for cg, total in per_cg.items():
            st = self._cgroups.get(cg)
            if st is None:
                self._cgroups[cg] = _Cgroup(self._workload(cg, now), total, now)
            else:
                if total != st.total:
                    st.total, st.changed = total, now
                if not is_settled(st.workload, k8s=self.k8s):
                    st.workload = self.resolve(cg)
        self.series_count = len(out)
        self._admitted &= set(pre)  # label sets with no live series free their slot
        return dict(out)

    def denials(self) -> dict[tuple[str, str, str, str, str, str], int]:
        with self._lock:
            raw = dict(self._denials)
        now = self.clock()
        out: Counter[tuple[str, str, str, str, str, str]] = Counter()
        for (cg, cap, expected), n in raw.items():
            labels = workload_labels(self._workload(cg, now))
            out[(cap_name(cap), *labels, "true" if expected else "false")] += n
        with self._lock:
            for key in list(self._retired_denials):
                if key in out:
                    out[key] += self._retired_denials[key]
                else:
                    del self._retired_denials[key]
        return dict(out)


_CHECKS_HELP = "Capability checks seen by the kernel hook, exact."
_CHECKS_LABELS = ("capability", "verdict", *_WL)
_ORDER = sorted(range(len(_CHECKS_LABELS)), key=lambda i: _CHECKS_LABELS[i])


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class CapwatchCollector(Collector):
    """Yields capwatch's metric families. :meth:`exposition` renders the same
    text as prometheus_client's generate_latest, faster for the big family:
    label strings are formatted once per label set and kept (tested equal)."""

    def __init__(self, state: ExporterState) -> None:
        self.state = state
        self._prefix: dict[LabelKey, str] = {}
        # Scrapes arrive on the HTTP server's threads: one at a time (the state's
        # caches and the count map's read buffers are not shared safely).
        self._scrape = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        with self._scrape:
            checks = CounterMetricFamily(
                "capwatch_checks", _CHECKS_HELP, labels=list(_CHECKS_LABELS)
            )
            for key, n in self.state.series().items():
                checks.add_metric(list(key), n)
            families = [checks, *self._rest()]
        yield from families

    def exposition(self) -> bytes:
        """The whole /metrics text (text format 0.0.4)."""
        with self._scrape:
            return self._exposition()

    def _exposition(self) -> bytes:
        series = self.state.series()
        lines = [
            f"# HELP capwatch_checks_total {_CHECKS_HELP}\n",
            "# TYPE capwatch_checks_total counter\n",
        ]
        prefix = self._prefix
        if len(prefix) > 4 * max(len(series), 1000):
            prefix.clear()  # label sets churn: keep the cache bounded
        for key, n in series.items():
            p = prefix.get(key)
            if p is None:
                inner = ",".join(f'{_CHECKS_LABELS[i]}="{_escape(key[i])}"' for i in _ORDER)
                p = prefix[key] = f"capwatch_checks_total{{{inner}}} "
            lines.append(p + floatToGoString(n) + "\n")  # type: ignore[no-untyped-call]
        rest = CollectorRegistry(auto_describe=False)
        rest.register(_Rest(self))
        return "".join(lines).encode() + generate_latest(rest)

    def _rest(self) -> Iterator[Metric]:
        t0 = time.perf_counter()
        st = self.state
        den = CounterMetricFamily(
            "capwatch_denials",
            "Denials, classified by the expected-denials policy.",
            labels=["capability", *_WL, "expected"],
        )
        for dkey, n in st.denials().items():
            den.add_metric(list(dkey), n)
        yield den
        stats = st.source.read_stats()
        lost = CounterMetricFamily(
            "capwatch_events_lost",
            "Ring-buffer reservations that failed in the kernel.",
            labels=["ring"],
        )
        lost.add_metric(["denials"], stats.get("lost_denials", 0))
        lost.add_metric(["checks"], stats.get("lost_checks", 0))
        lost.add_metric(["outcomes"], stats.get("lost_outcomes", 0))
        yield lost
        yield CounterMetricFamily(
            "capwatch_denials_suppressed",
            "Denials held back by the per-(pid, capability) rate limit (still in checks_total).",
            value=stats.get("suppressed", 0),
        )
        yield CounterMetricFamily(
            "capwatch_checks_uncounted",
            "Checks not counted: the count map was full, or (kprobe mode) a return"
            " came without its entry's arguments.",
            value=stats.get("count_fail", 0) + stats.get("kprobe_unpaired", 0),
        )
        yield CounterMetricFamily(
            "capwatch_series_folded",
            'Label sets folded into container="_overflow".',
            value=st.folded_total,
        )
        attached, lag, decode_errors = st.health()
        yield CounterMetricFamily(
            "capwatch_decode_errors",
            "Ring records of an unexpected shape, skipped.",
            value=decode_errors,
        )
        yield GaugeMetricFamily(
            "capwatch_attached", "1 while the BPF program is attached.", value=1 if attached else 0
        )
        info = GaugeMetricFamily(
            "capwatch_attach_info", "How capwatch hooks cap_capable.", labels=["mode"]
        )
        info.add_metric([st.source.mode], 1)
        yield info
        build = GaugeMetricFamily("capwatch_build_info", "capwatch's version.", labels=["version"])
        build.add_metric([__version__], 1)
        yield build
        yield GaugeMetricFamily(
            "capwatch_ringbuf_consumer_lag_seconds",
            "How long unread ring data has waited (0 when drained).",
            value=lag,
        )
        yield GaugeMetricFamily(
            "capwatch_series", "Label sets of capwatch_checks_total.", value=st.series_count
        )
        st.last_scrape_s = time.perf_counter() - t0
        yield GaugeMetricFamily(
            "capwatch_scrape_duration_seconds",
            "Time to build this scrape's metrics.",
            value=st.last_scrape_s,
        )


class _Rest(Collector):
    def __init__(self, owner: CapwatchCollector) -> None:
        self.owner = owner

    def collect(self) -> Iterator[Metric]:
        return self.owner._rest()
