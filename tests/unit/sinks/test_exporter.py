"""The Collector over a hand-written count source (the kernel map's shape), no kernel."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from capwatch.attribution.containers import Workload, classify
from capwatch.sinks.exporter import METRIC_NAMES, CapwatchCollector, ExporterState
from capwatch.sinks.profiles import PROFILE_METRICS
from tests.helpers import CONTRACT_METRICS, FakeSource

CID = "340583a2a7181ca3900b47c12ac598e49d84f0a748abd3279b7ca3228a636bc1"





def workloads(path_of: dict[int, str]) -> object:
    from dataclasses import replace

    def resolve(cg: int) -> Workload:
        w = classify(path_of.get(cg, "/"), cg)
        return replace(w, name="web") if w.container_id else w

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


class TestCollector:
    def test_checks_by_workload_and_verdict(self) -> None:
        """Kernel counts become capwatch_checks_total by capability, verdict and workload."""
        src = FakeSource()
        src.counts = {(1, 7, False): 10, (5, 25, True): 3, (6, 25, True): 4}
        paths = {1: "/", 5: f"/libpod_parent/libpod-{CID}", 6: "/system.slice/cron.service"}
        m = scrape(ExporterState(src, workloads(paths)))  # type: ignore[arg-type]
        assert (
            10
            == m[
                'capwatch_checks_total{capability="CAP_SETUID",container="host",namespace="",pod="",runtime="host",verdict="allowed"}'
            ]
        )
        assert (
            3
            == m[
                'capwatch_checks_total{capability="CAP_SYS_TIME",container="web",namespace="",pod="",runtime="podman",verdict="denied"}'
            ]
        )
        assert (
            4
            == m[
                'capwatch_checks_total{capability="CAP_SYS_TIME",container="cron.service",namespace="",pod="",runtime="systemd",verdict="denied"}'
            ]
        )
        assert 2 == m['capwatch_events_lost_total{ring="checks"}']
        assert 5 == m["capwatch_denials_suppressed_total"]

    def test_uncounted_sums_full_map_unpaired_kprobe_returns_and_recursion(self) -> None:
        """A check the count map had no room for, a kprobe return without its entry's
        arguments and a run the kernel skipped (recursion) are all checks not counted."""
        src = FakeSource()
        src.stats.update(count_fail=3, kprobe_unpaired=4, recursion_misses=5)
        m = scrape(ExporterState(src, workloads({})))  # type: ignore[arg-type]
        assert 12 == m["capwatch_checks_uncounted_total"]

    def test_denials_labelled_at_scrape(self) -> None:
        """count_denial is keyed by cgroup; labels (and expected) are attached at scrape time."""
        src = FakeSource()
        st = ExporterState(src, workloads({5: f"/libpod_parent/libpod-{CID}"}))  # type: ignore[arg-type]
        st.count_denial(5, 25, expected=False, n=3)
        st.count_denial(5, 16, expected=True)
        m = scrape(st)
        assert (
            3
            == m[
                'capwatch_denials_total{capability="CAP_SYS_TIME",container="web",expected="false",namespace="",pod="",runtime="podman"}'
            ]
        )
        assert (
            1
            == m[
                'capwatch_denials_total{capability="CAP_SYS_MODULE",container="web",expected="true",namespace="",pod="",runtime="podman"}'
            ]
        )

    def test_cardinality_cap_folds_into_overflow(self) -> None:
        """Past max_series, new label sets fold into container=_overflow, counted; kept ones stay."""
        src = FakeSource()
        paths = {i: f"/system.slice/s{i}.service" for i in range(10, 20)}
        src.counts = {(i, 25, True): 1 for i in range(10, 20)}
        st = ExporterState(src, workloads(paths), max_series=4)  # type: ignore[arg-type]
        m = scrape(st)
        assert (
            6
            == m[
                'capwatch_checks_total{capability="CAP_SYS_TIME",container="_overflow",namespace="",pod="",runtime="",verdict="denied"}'
            ]
        )
        assert 6 == m["capwatch_series_folded_total"]
        assert 5 == m["capwatch_series"]
        kept_before = {k for k in m if "s1" in k and "checks_total" in k}
        m2 = scrape(st)
        assert kept_before == {k for k in m2 if "s1" in k and "checks_total" in k}
        assert 6 == m2["capwatch_series_folded_total"]  # counted once, not per scrape

    def test_dead_idle_cgroups_expire(self, tmp_path: Path) -> None:
        """A cgroup gone from the tree and idle past the TTL: its series goes, its kernel keys are deleted;
        a live idle one and the host stay."""
        (tmp_path / "live.service").mkdir()
        now = [0.0]
        src = FakeSource()
        src.counts = {(1, 7, False): 1, (2, 25, True): 2, (3, 25, True): 3}
        paths = {1: "/", 2: "/live.service", 3: "/dead.service"}
        st = ExporterState(
            src,
            workloads(paths),
            cgroup_root=str(tmp_path),
            series_ttl=60,  # type: ignore[arg-type]
            clock=lambda: now[0],
        )
        st.count_denial(3, 25, expected=False, n=3)
        first = scrape(st)
        assert 3 == len([k for k in first if k.startswith("capwatch_checks_total")])
        assert 1 == len([k for k in first if k.startswith("capwatch_denials_total")])
        now[0] = 61
        m = scrape(st)
        assert [(3, 25, True)] == src.deleted
        assert {'container="host"', 'container="live.service"'} == {
            k.split(",")[1] for k in m if k.startswith("capwatch_checks_total")
        }
        assert [] == [k for k in m if k.startswith("capwatch_denials_total")]

    def test_labels_are_sticky_once_settled(self) -> None:
        """A cgroup keeps its labels after its directory goes (no flip to cgroup:<id>)."""
        src = FakeSource()
        src.counts = {(5, 25, True): 1}
        paths = {5: f"/libpod_parent/libpod-{CID}"}
        st = ExporterState(src, workloads(paths))  # type: ignore[arg-type]
        scrape(st)
        del paths[5]  # the attributor now answers "/" (unknown) for it
        assert (
            1
            == scrape(st)[
                'capwatch_checks_total{capability="CAP_SYS_TIME",container="web",namespace="",pod="",runtime="podman",verdict="denied"}'
            ]
        )

    def test_metric_names_follow_the_contract(self) -> None:
        """Every name the exporter declares is in the alert/dashboard contract, and the other way round."""
        assert set(CONTRACT_METRICS) - {"up"} <= set(METRIC_NAMES) | set(PROFILE_METRICS)
        src = FakeSource()
        src.counts = {(1, 7, False): 1}
        names = {k.split("{")[0] for k in scrape(ExporterState(src, workloads({})))}  # type: ignore[arg-type]
        assert names <= set(METRIC_NAMES)


@pytest.mark.parametrize("n", [0, 1])
def test_empty_and_single(n: int) -> None:
    """An empty map scrapes fine; lost rings are exported at 0 from the start."""
    src = FakeSource()
    src.stats["lost_checks"] = 0
    src.counts = {(1, 7, False): 1} if n else {}
    m = scrape(ExporterState(src, workloads({})))  # type: ignore[arg-type]
    assert 0 == m['capwatch_events_lost_total{ring="denials"}']
    assert n == m["capwatch_series"]


def test_fast_exposition_equals_prometheus_client() -> None:
    """exposition() renders exactly what generate_latest renders for the same state,
    label values needing escapes included (the scrape-duration gauge aside)."""
    src = FakeSource()
    paths = {i: f'/system.slice/we"ird\\{i}.service' for i in range(10, 60)}
    src.counts = {(i, i % 41, bool(i % 2)): i * 3 for i in range(10, 60)}
    state = ExporterState(src, workloads(paths))  # type: ignore[arg-type]
    col = CapwatchCollector(state)
    reg = CollectorRegistry()
    reg.register(col)

    def strip(text: bytes) -> list[str]:
        return [ln for ln in text.decode().splitlines() if "scrape_duration" not in ln]

    assert strip(generate_latest(reg)) == strip(col.exposition())


class TestMonotonic:
    def test_recreated_container_counter_never_goes_down(self, tmp_path: Path) -> None:
        """A container re-created under the same name: when the old cgroup expires, its counts
        stay in the label set's counter (checks and denials), which never goes down."""
        now = [0.0]
        src = FakeSource()
        old_id, new_id = "a" * 64, "b" * 64
        (tmp_path / "libpod_parent" / f"libpod-{new_id}").mkdir(parents=True)
        paths = {5: f"/libpod_parent/libpod-{old_id}", 6: f"/libpod_parent/libpod-{new_id}"}
        src.counts = {(5, 25, True): 100}
        st = ExporterState(
            src,
            workloads(paths),
            cgroup_root=str(tmp_path),
            series_ttl=60,  # type: ignore[arg-type]
            clock=lambda: now[0],
        )
        st.count_denial(5, 25, expected=False, n=100)
        key = 'capwatch_checks_total{capability="CAP_SYS_TIME",container="web",namespace="",pod="",runtime="podman",verdict="denied"}'
        dkey = 'capwatch_denials_total{capability="CAP_SYS_TIME",container="web",expected="false",namespace="",pod="",runtime="podman"}'
        assert (100, 100) == (scrape(st)[key], scrape(st)[dkey])
        src.counts[(6, 25, True)] = 5  # the new "web"
        st.count_denial(6, 25, expected=False, n=5)
        now[0] = 61  # the old cgroup is gone and idle past the TTL: expired
        m = scrape(st)
        assert [(5, 25, True)] == src.deleted
        assert (105, 105) == (m[key], m[dkey])
        src.counts[(6, 25, True)] = 7
        assert 107 == scrape(st)[key]

    def test_freed_series_slot_is_reused(self, tmp_path: Path) -> None:
        """Under the cap on series, a label set that ended frees its slot for a new one."""
        now = [0.0]
        src = FakeSource()
        paths = {10: "/system.slice/a.service", 11: "/system.slice/b.service"}
        src.counts = {(10, 25, True): 1}
        st = ExporterState(
            src,
            workloads(paths),
            cgroup_root=str(tmp_path),
            series_ttl=60,  # type: ignore[arg-type]
            max_series=1,
            clock=lambda: now[0],
        )
        scrape(st)
        now[0] = 61  # a.service's cgroup is gone (not under tmp_path) and idle
        src.counts[(11, 25, True)] = 1
        scrape(st)  # expires a; b was folded this time or admitted now
        m = scrape(st)
        assert (
            1
            == m[
                'capwatch_checks_total{capability="CAP_SYS_TIME",container="b.service",namespace="",pod="",runtime="systemd",verdict="denied"}'
            ]
        )
