"""Prometheus metrics, read from the kernel at scrape time.

The count map in the kernel is exact at any rate; this Collector reads it
when Prometheus scrapes (one batch lookup), attributes each cgroup to its
workload, and yields fresh metric families. Nothing here runs per event
except :meth:`ExporterState.count_denial` (a dict add, for denials only,
which the kernel rate-limits).

Cardinality is bounded: labels are capability, verdict and workload
(namespace, pod, container, runtime), never pid or raw cgroup id; past
``max_series`` (per labelled family) new label sets fold into
container="_overflow" and are counted, Kubernetes pods first
(capwatch/admission.py). Series of cgroups that are gone and idle for
``series_ttl`` are dropped, and their entries deleted from the kernel map.

Denials are counted from two disjoint sources, each with its own syscall:
those the ring delivered (:meth:`ExporterState.count_denial`, classified
with their comm), and those the kernel counted but held back
(capwatch/held.py). The kernel maps are LRU: totals never go down across an
eviction (capwatch/tally.py), and evictions are published.
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
from capwatch.attribution.containers import Workload
from capwatch.attribution.workloads import identity_of, is_settled
from capwatch.decode.caps import cap_name
from capwatch.diagnose.held import UNCLASSIFIED, classify_held
from capwatch.diagnose.policy import Policy
from capwatch.errors import CapwatchError
from capwatch.pipeline import Check
from capwatch.sinks.admission import Admission
from capwatch.sinks.tally import Tally
from capwatch.text import visible

__all__ = ["METRIC_NAMES", "CapwatchCollector", "DenialCounter", "ExporterState"]

#: Every metric name this exporter can publish (dashboards and rules may use only these).
METRIC_NAMES = (
    "capwatch_checks_total",
    "capwatch_denials_total",
    "capwatch_events_lost_total",
    "capwatch_denials_suppressed_total",
    "capwatch_series_folded_total",
    "capwatch_decode_errors_total",
    "capwatch_checks_uncounted_total",
    "capwatch_denials_unclassified_total",
    "capwatch_denials_uncounted_total",
    "capwatch_map_evictions_total",
    "capwatch_count_reads_partial_total",
    "capwatch_map_read_errors_total",
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
DenialKey = tuple[
    str, str, str, str, str, str
]  # capability, namespace, pod, container, runtime, expected
UnclassifiedKey = tuple[str, str, str, str, str]  # capability, namespace, pod, container, runtime


class CountSource(Protocol):
    mode: str

    def read_counts(self) -> dict[CountKey, int]: ...
    def read_stats(self) -> dict[str, int]: ...
    def delete_counts(self, keys: list[CountKey]) -> None: ...


HeldKey = tuple[int, int, int]  # cgroup id, capability, syscall nr


class HeldSource(Protocol):
    """A source that also counts the denials it did not send (capwatch/_bpf.py)."""

    last_read_consistent: bool

    def read_held(self) -> dict[HeldKey, int]: ...
    def delete_held(self, keys: list[HeldKey]) -> None: ...


@dataclass
class _Cgroup:
    workload: Workload
    total: int
    changed: float  # monotonic time the cgroup's counts last changed


def workload_labels(w: Workload) -> tuple[str, str, str, str]:
    ident = identity_of(w)
    if w.kind == "host":
        return ("", "", "host", "host")
    # Names come from cgroup directories and runtimes: any bytes (capwatch.text).
    return (
        visible(ident["namespace"]),
        visible(ident["pod"]),
        visible(ident["container"]),
        visible(ident["runtime"]),
    )


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
        policy: Policy | None = None,
        held: HeldSource | None = None,
    ) -> None:
        self.source = source
        self.k8s = k8s  # Kubernetes names expected: a pod's labels wait for them
        self.resolve = resolve
        self.cgroup_root = cgroup_root
        self.max_series = max_series
        self.series_ttl = series_ttl
        self.health = health or (lambda: (True, 0.0, 0))  # attached, lag seconds, decode errors
        self.clock = clock
        self.policy = policy or Policy()
        self.held = held  # held-back denials: read at scrape time, classified by syscall
        self._lock = threading.Lock()
        self._denials: Counter[tuple[int, int, bool]] = Counter()  # cgroup, cap, expected
        self._cgroups: dict[int, _Cgroup] = {}
        self._checks_admission: Admission[LabelKey] = Admission(
            max_series, lambda k: (k[0], k[1], "", "", OVERFLOW, ""), lambda k: bool(k[3])
        )
        self._denials_admission: Admission[DenialKey] = Admission(
            max_series, lambda k: (k[0], "", "", OVERFLOW, "", k[5]), lambda k: bool(k[2])
        )
        self._unclassified_admission: Admission[UnclassifiedKey] = Admission(
            max_series, lambda k: (k[0], "", "", OVERFLOW, ""), lambda k: bool(k[2])
        )
        self._counts_tally: Tally[CountKey] = Tally()
        self._counts_floor: dict[CountKey, int] = {}
        self._held_tally: Tally[HeldKey] = Tally()
        self._unclassified: dict[UnclassifiedKey, int] = {}
        self._retired_unclassified: Counter[UnclassifiedKey] = Counter()
        #: Failed reads of the kernel maps, and the last one's error while it lasts.
        self.read_errors = 0
        self.read_error: str | None = None
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

    @property
    def folded_total(self) -> int:
        """Label sets folded into the overflow, all families."""
        return (
            self._checks_admission.folded_total
            + self._denials_admission.folded_total
            + self._unclassified_admission.folded_total
        )

    def healthy(self) -> tuple[bool, str]:
        """For /healthz: false while the kernel maps cannot be read."""
        if self.read_error is not None:
            return False, f"kernel map read failed: {self.read_error}"
        return True, "ok"

    # -- scrape time ----------------------------------------------------------

    def _read_counts(self) -> dict[CountKey, int]:
        """The count map's totals (never decreasing); a failed read is recorded.

        With a source that reads the map and the per-CPU caches apart
        (read_counts_split), only the map's part goes through the tally: the
        LRU evicts map entries, never a cache, so an eviction is exact."""
        split = getattr(self.source, "read_counts_split", None)
        try:
            if split is not None:
                raw, cached = split()
            else:
                raw, cached = self.source.read_counts(), {}
        except (OSError, CapwatchError) as exc:
            self.read_errors += 1
            self.read_error = " ".join(str(exc).split()) or type(exc).__name__
            raise
        self.read_error = None
        consistent = bool(getattr(self.source, "last_read_consistent", True))
        totals = self._counts_tally.update(raw, consistent=consistent)
        for key, n in cached.items():
            totals[key] = totals.get(key, 0) + n
        # A partial read leaves some caches out (short, never long): never let a
        # series go below what an earlier scrape published.
        for key, n in self._counts_floor.items():
            if totals.get(key, 0) < n:
                totals[key] = n
        self._counts_floor = dict(totals)
        return totals

    def _read_held(self) -> dict[HeldKey, int]:
        if self.held is None:
            return {}
        try:
            raw = self.held.read_held()
        except (OSError, CapwatchError) as exc:
            self.read_errors += 1
            self.read_error = " ".join(str(exc).split()) or type(exc).__name__
            raise
        return self._held_tally.update(raw)

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
        counts = self._read_counts()
        dead = set(gone)
        for (cg, cap, denied), n in counts.items():
            if cg in dead:
                wl = workload_labels(self._cgroups[cg].workload)
                self._retired[(cap_name(cap), _VERDICT[denied], *wl)] += n
        dead_keys = [k for k in counts if k[0] in dead]
        self.source.delete_counts(dead_keys)
        self._counts_tally.forget(dead_keys)
        for key in dead_keys:
            self._counts_floor.pop(key, None)
        if self.held is not None:
            held = self._read_held()
            dead_held = [k for k in held if k[0] in dead]
            for (cg, cap, verdict), n in classify_held(
                {k: held[k] for k in dead_held},
                lambda cg: workload_labels(self._cgroups[cg].workload),
                self.policy,
            ).items():
                wl = workload_labels(self._cgroups[cg].workload)
                if verdict == UNCLASSIFIED:
                    self._retired_unclassified[(cap_name(cap), *wl)] += n
                else:
                    self._retired_denials[(cap_name(cap), *wl, verdict)] += n
            self.held.delete_held(dead_held)
            self._held_tally.forget(dead_held)
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
        counts = self._read_counts()
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
        out = self._checks_admission.apply(pre)
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
        return out

    def denials(self) -> dict[DenialKey, int]:
        """Denials by workload and verdict: those delivered (classified with
        their comm) plus those held back in the kernel (classified by their own
        syscall, capwatch/held.py). Held ones that need a comm to classify go
        to :meth:`unclassified` instead."""
        with self._lock:
            raw = dict(self._denials)
        now = self.clock()
        labels_of: dict[int, tuple[str, str, str, str]] = {}

        def labels(cg: int) -> tuple[str, str, str, str]:
            wl = labels_of.get(cg)
            if wl is None:
                wl = labels_of[cg] = workload_labels(self._workload(cg, now))
            return wl

        out: Counter[DenialKey] = Counter()
        for (cg, cap, expected), n in raw.items():
            out[(cap_name(cap), *labels(cg), "true" if expected else "false")] += n
        unclassified: Counter[UnclassifiedKey] = Counter()
        for (cg, cap, verdict), n in classify_held(self._read_held(), labels, self.policy).items():
            if verdict == UNCLASSIFIED:
                unclassified[(cap_name(cap), *labels(cg))] += n
            else:
                out[(cap_name(cap), *labels(cg), verdict)] += n
        with self._lock:
            for key in list(self._retired_denials):
                if key in out:
                    out[key] += self._retired_denials[key]
                else:
                    del self._retired_denials[key]
            for ukey in list(self._retired_unclassified):
                if ukey in unclassified:
                    unclassified[ukey] += self._retired_unclassified[ukey]
                else:
                    del self._retired_unclassified[ukey]
        self._unclassified = self._unclassified_admission.apply(unclassified)
        return self._denials_admission.apply(out)

    def unclassified(self) -> dict[UnclassifiedKey, int]:
        """Held denials no rule could classify without their comm (as of the
        last :meth:`denials`)."""
        return dict(self._unclassified)


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
            t0 = time.perf_counter()
            checks = CounterMetricFamily(
                "capwatch_checks", _CHECKS_HELP, labels=list(_CHECKS_LABELS)
            )
            for key, n in self.state.series().items():
                checks.add_metric(list(key), n)
            families = [checks, *self._rest(t0)]
        yield from families

    def exposition(self) -> bytes:
        """The whole /metrics text (text format 0.0.4)."""
        with self._scrape:
            return self._exposition()

    def _exposition(self) -> bytes:
        t0 = time.perf_counter()  # around the whole collection, the kernel read included
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
        rest.register(_Rest(self, t0))
        return "".join(lines).encode() + generate_latest(rest)

    def _rest(self, t0: float) -> Iterator[Metric]:
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
            "Denials held back by a rate limit or the cgroup budget (counted by syscall).",
            value=stats.get("suppressed", 0),
        )
        unc = CounterMetricFamily(
            "capwatch_denials_unclassified",
            "Denials held back in the kernel whose first matching rule needs their comm.",
            labels=["capability", *_WL],
        )
        for ukey, n in st.unclassified().items():
            unc.add_metric(list(ukey), n)
        yield unc
        yield CounterMetricFamily(
            "capwatch_checks_uncounted",
            "Checks not counted: the count map was full, (kprobe mode) a return"
            " came without its entry's arguments, or the kernel skipped the program"
            " because it was already running on that CPU (recursion).",
            value=stats.get("count_fail", 0)
            + stats.get("kprobe_unpaired", 0)
            + stats.get("recursion_misses", 0),
        )
        yield CounterMetricFamily(
            "capwatch_denials_uncounted",
            "Held-back denials the held map could not count by syscall (still in checks_total).",
            value=stats.get("held_fail", 0),
        )
        evicted = CounterMetricFamily(
            "capwatch_map_evictions",
            "Entries the kernel's LRU maps evicted to make room (their later counts start anew).",
            labels=["map"],
        )
        evicted.add_metric(["counts"], stats.get("count_evicted", 0))
        evicted.add_metric(["held"], stats.get("held_evicted", 0))
        yield evicted
        yield CounterMetricFamily(
            "capwatch_count_reads_partial",
            "Count-map reads that could not get a quiet read of every CPU (short, never long).",
            value=stats.get("inconsistent_reads", 0),
        )
        yield CounterMetricFamily(
            "capwatch_map_read_errors",
            "Reads of the kernel's maps that failed (the scrape failed too).",
            value=st.read_errors,
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
            "Time to build this scrape's metrics, the kernel map read included.",
            value=st.last_scrape_s,
        )


class _Rest(Collector):
    def __init__(self, owner: CapwatchCollector, t0: float) -> None:
        self.owner = owner
        self.t0 = t0

    def collect(self) -> Iterator[Metric]:
        return self.owner._rest(self.t0)


class DenialCounter:
    """The pipeline sink that feeds the exporter: each streamed denial, counted by
    its class (expected or not) for ``capwatch_denials_total``."""

    def __init__(self, state: ExporterState) -> None:
        self.state = state

    def write(self, check: Check) -> None:
        # one per streamed denial: those the kernel held back (rate limit, cgroup
        # budget, full ring) are counted there by their own syscall and classified
        # as such (diagnose/held.py), never with this event's class
        if check.denied:
            self.state.count_denial(check.cgroup_id, check.cap, expected=bool(check.expected))

    def tick(self) -> None:
        pass

    def close(self) -> None:
        pass
