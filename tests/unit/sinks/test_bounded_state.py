"""Issue 12, findings 1, 4 and 7 in user space: held denials classified by their own
syscall, totals that survive LRU evictions and short reads, pods ahead of host cgroups
at the series cap, a cap on every labelled family, /healthz facts for map reads."""

from __future__ import annotations

from dataclasses import replace

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from capwatch.attribution.containers import Workload, classify
from capwatch.decode.syscalls import syscall_table
from capwatch.diagnose.held import EXPECTED, UNCLASSIFIED, UNEXPECTED, classify_held
from capwatch.diagnose.policy import NEEDS_COMM, Policy
from capwatch.errors import CapwatchError
from capwatch.sinks.admission import Admission
from capwatch.sinks.exporter import CapwatchCollector, ExporterState
from capwatch.sinks.tally import Tally

CAP_SYS_ADMIN, CAP_SYS_TIME = 21, 25
_NR = {name: nr for nr, name in syscall_table().items()}
MMAP, MOUNT, SETNS = _NR["mmap"], _NR["mount"], _NR["setns"]
POLICY = Policy.load()  # the shipped default: mmap's CAP_SYS_ADMIN probe is expected
COMM_POLICY = Policy.from_text(
    """
version: 1
rules:
  - name: only-for-sshd
    why: test
    capability: CAP_SYS_ADMIN
    syscall: mount
    comm: sshd
  - name: any-setns
    why: test
    capability: CAP_SYS_ADMIN
    syscall: setns
"""
)


class Source:
    """The kernel maps' shape: counts by (cgroup, cap, denied), held by (cgroup, cap, nr)."""

    mode = "raw_tracepoint"

    def __init__(self) -> None:
        self.counts: dict[tuple[int, int, bool], int] = {}
        self.held: dict[tuple[int, int, int], int] = {}
        self.last_read_consistent = True
        self.fail: str | None = None

    def read_counts(self) -> dict[tuple[int, int, bool], int]:
        if self.fail:
            raise OSError(12, self.fail)
        return dict(self.counts)

    def read_stats(self) -> dict[str, int]:
        return {"held_fail": 2, "count_evicted": 3, "held_evicted": 1, "inconsistent_reads": 4}

    def delete_counts(self, keys: list[tuple[int, int, bool]]) -> None:
        for k in keys:
            self.counts.pop(k, None)

    def read_held(self) -> dict[tuple[int, int, int], int]:
        return dict(self.held)

    def delete_held(self, keys: list[tuple[int, int, int]]) -> None:
        for k in keys:
            self.held.pop(k, None)


def resolver(pods: dict[int, str]) -> object:
    """Host services by default; cgroups in ``pods`` are Kubernetes pods of that name."""

    def resolve(cg: int) -> Workload:
        if cg in pods:
            w = classify(
                f"/kubepods.slice/kubepods-pod{cg:08x}_0000_0000_0000_000000000000.slice/"
                f"cri-containerd-{cg:064x}.scope",
                cg,
            )
            return replace(w, pod=pods[cg], namespace="prod", container_name="app")
        return classify(f"/system.slice/s{cg}.service", cg)

    return resolve


def scrape(state: ExporterState) -> dict[str, float]:
    reg = CollectorRegistry()
    reg.register(CapwatchCollector(state))
    out = {}
    for line in generate_latest(reg).decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def state(src: Source, policy: Policy = POLICY, **kw: object) -> ExporterState:
    return ExporterState(src, resolver({}), policy=policy, held=src, **kw)  # type: ignore[arg-type]


def denial(cap: str, service: str, expected: str) -> str:
    return (
        f'capwatch_denials_total{{capability="{cap}",container="{service}",expected="{expected}",'
        f'namespace="",pod="",runtime="systemd"}}'
    )


class TestClassifyWithoutComm:
    def test_first_rule_without_comm_decides(self) -> None:
        """mmap's CAP_SYS_ADMIN is expected by the default policy whatever the comm."""
        rule = POLICY.classify_without_comm(
            cap=CAP_SYS_ADMIN, syscall="mmap", container="", pod="", namespace=""
        )
        assert rule is not None
        assert rule is not NEEDS_COMM
        assert "vm-enough-memory-probe" == rule.name  # type: ignore[union-attr]

    def test_no_rule_whatever_the_comm_is_unexpected(self) -> None:
        """mount's CAP_SYS_ADMIN matches no rule on any field: unexpected (None)."""
        assert None is POLICY.classify_without_comm(
            cap=CAP_SYS_ADMIN, syscall="mount", container="", pod="", namespace=""
        )

    def test_first_matching_rule_with_comm_needs_comm(self) -> None:
        """A rule that needs comm comes first: not classifiable, and a later rule is not used."""
        assert NEEDS_COMM is COMM_POLICY.classify_without_comm(
            cap=CAP_SYS_ADMIN, syscall="mount", container="", pod="", namespace=""
        )
        rule = COMM_POLICY.classify_without_comm(
            cap=CAP_SYS_ADMIN, syscall="setns", container="", pod="", namespace=""
        )
        assert "any-setns" == rule.name  # type: ignore[union-attr]


class TestClassifyHeld:
    def test_each_held_count_gets_its_own_syscalls_verdict(self) -> None:
        """One cgroup's held mmap flood is expected; its held mount and setns denials are not."""
        held = {
            (5, CAP_SYS_ADMIN, MMAP): 5000,
            (5, CAP_SYS_ADMIN, MOUNT): 7,
            (5, CAP_SYS_ADMIN, SETNS): 2,
        }
        got = classify_held(held, lambda cg: ("", "", "x", "systemd"), POLICY)
        assert {
            (5, CAP_SYS_ADMIN, EXPECTED): 5000,
            (5, CAP_SYS_ADMIN, UNEXPECTED): 9,
        } == dict(got)

    def test_rule_needing_comm_makes_held_counts_unclassified(self) -> None:
        """Never expected by a comm rule it cannot check."""
        held = {(5, CAP_SYS_ADMIN, MOUNT): 4, (5, CAP_SYS_ADMIN, SETNS): 1}
        got = classify_held(held, lambda cg: ("", "", "x", "systemd"), COMM_POLICY)
        assert {(5, CAP_SYS_ADMIN, UNCLASSIFIED): 4, (5, CAP_SYS_ADMIN, EXPECTED): 1} == dict(got)


class TestExporterHeld:
    def test_held_denials_counted_by_their_own_syscall(self) -> None:
        """Streamed mmap denials (expected) plus held mmap and mount denials: the mount ones are
        unexpected, none borrows the streamed denials' class."""
        src = Source()
        src.held = {(5, CAP_SYS_ADMIN, MMAP): 800, (5, CAP_SYS_ADMIN, MOUNT): 3}
        st = state(src)
        st.count_denial(5, CAP_SYS_ADMIN, expected=True, n=200)
        m = scrape(st)
        assert 1000 == m[denial("CAP_SYS_ADMIN", "s5.service", "true")]
        assert 3 == m[denial("CAP_SYS_ADMIN", "s5.service", "false")]

    def test_unclassified_series(self) -> None:
        """Held denials whose rule needs comm: their own counter, labelled by workload."""
        src = Source()
        src.held = {(5, CAP_SYS_ADMIN, MOUNT): 4}
        m = scrape(state(src, COMM_POLICY))
        assert (
            4
            == m[
                'capwatch_denials_unclassified_total{capability="CAP_SYS_ADMIN",container="s5.service",'
                'namespace="",pod="",runtime="systemd"}'
            ]
        )
        assert not any(k.startswith("capwatch_denials_total{") for k in m)

    def test_kernel_losses_are_published(self) -> None:
        """Evictions, uncounted held denials and partial reads from the source's stats."""
        m = scrape(state(Source()))
        assert 3 == m['capwatch_map_evictions_total{map="counts"}']
        assert 1 == m['capwatch_map_evictions_total{map="held"}']
        assert 2 == m["capwatch_denials_uncounted_total"]
        assert 4 == m["capwatch_count_reads_partial_total"]

    def test_held_counts_survive_an_eviction(self) -> None:
        """A held entry the LRU evicted (gone from the map): its total stays."""
        src = Source()
        src.held = {(5, CAP_SYS_TIME, 164): 10}
        st = state(src)
        assert 10 == scrape(st)[denial("CAP_SYS_TIME", "s5.service", "false")]
        src.held = {(6, CAP_SYS_TIME, 164): 1}  # 5's entry evicted to make room
        assert 10 == scrape(st)[denial("CAP_SYS_TIME", "s5.service", "false")]


class TestTally:
    def test_evicted_entry_keeps_its_total(self) -> None:
        """An entry gone from the map (evicted) and later made anew: the total never goes down."""
        t: Tally[str] = Tally()
        assert {"a": 5, "b": 1} == t.update({"a": 5, "b": 1})
        assert {"a": 5, "b": 2} == t.update({"b": 2})
        assert {"a": 7, "b": 2} == t.update({"a": 2, "b": 2})
        assert 1 == t.evictions_seen

    def test_restarted_between_reads(self) -> None:
        """Smaller in an exact read: evicted and made anew; the old value is kept in the base."""
        t: Tally[str] = Tally()
        t.update({"a": 100})
        assert {"a": 103} == t.update({"a": 3})

    def test_short_read_is_not_an_eviction(self) -> None:
        """A partial read (short, never long): smaller or missing values leave the totals as they were,
        and the next exact read continues from the last exact one."""
        t: Tally[str] = Tally()
        t.update({"a": 100, "b": 5})
        assert {"a": 100, "b": 5} == t.update({"a": 90}, consistent=False)
        assert {"a": 120, "b": 5} == t.update({"a": 120, "b": 5})
        assert 0 == t.evictions_seen

    def test_forget(self) -> None:
        """Keys deleted by user space are dropped, not taken for evictions."""
        t: Tally[str] = Tally()
        t.update({"a": 1})
        t.forget(["a"])
        assert {} == t.update({})
        assert 0 == t.evictions_seen


def pod_first(k: tuple[str, str]) -> bool:
    return k[0] == "pod"


class TestAdmission:
    def test_pods_evict_host_series_never_the_reverse(self) -> None:
        """At the cap, a new pod takes a host series' slot; a new host series folds."""
        a: Admission[tuple[str, str]] = Admission(2, lambda k: ("overflow", ""), pod_first)
        assert {("host", "1"): 1, ("host", "2"): 1} == a.apply({("host", "1"): 1, ("host", "2"): 1})
        got = a.apply({("host", "1"): 1, ("host", "2"): 1, ("pod", "p"): 5})
        assert 5 == got[("pod", "p")]
        assert 1 == got[("overflow", "")]
        assert 1 == a.folded_total
        got = a.apply({("host", "1"): 1, ("host", "2"): 1, ("pod", "p"): 5, ("host", "3"): 1})
        assert 5 == got[("pod", "p")]
        assert 2 == got[("overflow", "")]
        assert 2 == a.folded_total

    def test_pods_never_evicted_by_host_series(self) -> None:
        """A cap full of pods: host series fold, every pod keeps its series."""
        a: Admission[tuple[str, str]] = Admission(2, lambda k: ("overflow", ""), pod_first)
        pods = {("pod", "a"): 1, ("pod", "b"): 1}
        a.apply(pods)
        got = a.apply({**pods, **{("host", str(i)): 1 for i in range(100)}})
        assert {("pod", "a"): 1, ("pod", "b"): 1, ("overflow", ""): 100} == got
        assert 100 == a.folded_total

    def test_host_flood_first_then_pods(self) -> None:
        """Series state: 5,000 host cgroups took every slot before any pod; 10 pods arrive and
        all 10 get their own series."""
        src = Source()
        src.counts = {(i, CAP_SYS_TIME, True): 1 for i in range(1000, 1050)}
        st = ExporterState(src, resolver({i: f"pod-{i}" for i in range(10)}), max_series=50)  # type: ignore[arg-type]
        scrape(st)
        src.counts.update({(i, CAP_SYS_TIME, True): 1 for i in range(10)})
        m = scrape(st)
        pods = [k for k in m if k.startswith("capwatch_checks_total{") and 'pod="pod-' in k]
        assert 10 == len(pods)
        assert 10 == m["capwatch_series_folded_total"]

    def test_denials_family_is_capped(self) -> None:
        """capwatch_denials_total has a cap too: past it, label sets fold into _overflow, counted."""
        src = Source()
        st = state(src, max_series=3)
        for cg in range(10, 20):
            st.count_denial(cg, CAP_SYS_TIME, expected=False)
        m = scrape(st)
        den = [k for k in m if k.startswith("capwatch_denials_total{")]
        assert 4 == len(den)
        assert (
            7
            == m[
                'capwatch_denials_total{capability="CAP_SYS_TIME",container="_overflow",expected="false",'
                'namespace="",pod="",runtime=""}'
            ]
        )
        assert 7 == m["capwatch_series_folded_total"]


class TestHealth:
    def test_map_read_failure_is_a_health_fact(self) -> None:
        """A failing kernel read fails the scrape and the health fact, counted; the next good
        read clears it."""
        src = Source()
        st = state(src)
        assert (True, "ok") == st.healthy()
        src.fail = "Cannot allocate memory"
        with pytest.raises(OSError, match="Cannot allocate memory"):
            scrape(st)
        ok, why = st.healthy()
        assert not ok
        assert "Cannot allocate memory" in why
        src.fail = None
        m = scrape(st)
        assert (True, "ok") == st.healthy()
        assert 1 == m["capwatch_map_read_errors_total"]

    def test_capwatch_errors_count_too(self) -> None:
        """capwatch's own error type from the kernel door is a failed read as well."""

        class Broken(Source):
            def read_counts(self) -> dict[tuple[int, int, bool], int]:
                raise CapwatchError("bpf_lookup_batch: EFAULT")

        st = state(Broken())
        with pytest.raises(CapwatchError):
            scrape(st)
        assert not st.healthy()[0]


class SplitSource(Source):
    """The kernel reader's shape: the LRU map's counts and the per-CPU caches' apart."""

    def __init__(self) -> None:
        super().__init__()
        self.cached: dict[tuple[int, int, bool], int] = {}

    def read_counts_split(
        self,
    ) -> tuple[dict[tuple[int, int, bool], int], dict[tuple[int, int, bool], int]]:
        return dict(self.counts), dict(self.cached)


def checks_of(m: dict[str, float]) -> float:
    return m[
        'capwatch_checks_total{capability="CAP_SETUID",container="s5.service",namespace="",'
        'pod="",runtime="systemd",verdict="allowed"}'
    ]


class TestEvictionAndPartialReads:
    def test_eviction_of_a_map_entry_keeps_the_cache_part_once(self) -> None:
        """Map 100 + CPU cache 5; the map entry is evicted while the cache grows to 8: 108,
        not 113 (the cache is never evicted, so it is not carried into the base)."""
        src = SplitSource()
        src.counts, src.cached = {(5, 7, False): 100}, {(5, 7, False): 5}
        st = state(src)
        assert 105 == checks_of(scrape(st))
        src.counts, src.cached = {}, {(5, 7, False): 8}
        assert 108 == checks_of(scrape(st))

    def test_partial_read_never_lowers_a_series(self) -> None:
        """A read marked partial leaves a CPU cache out: the series stays at 150, then
        follows the next exact read."""
        src = SplitSource()
        src.counts, src.cached = {(5, 7, False): 100}, {(5, 7, False): 50}
        st = state(src)
        assert 150 == checks_of(scrape(st))
        src.cached, src.last_read_consistent = {}, False
        assert 150 == checks_of(scrape(st))
        src.counts, src.last_read_consistent = {(5, 7, False): 160}, True
        assert 160 == checks_of(scrape(st))
