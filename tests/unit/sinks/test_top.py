"""capwatch.sinks.top: rows, rates, sorting, filtering and the layout into W x H."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from capwatch.attribution.containers import Workload, classify
from capwatch.commands.trace import trace_pipeline
from capwatch.decode.events import EVENT_DTYPE, F_DENIED, F_OUTCOME
from capwatch.diagnose.policy import Policy
from capwatch.sinks.top import Row, Status, TopModel, layout

PODMAN_ID = "4f" * 32
PATHS = {
    7: "/machine.slice/libpod-" + PODMAN_ID + ".scope/container",
    8: "/machine.slice/libpod-" + PODMAN_ID + ".scope/container/child",
    9: "/system.slice/ntp.service",
    1: "/",
}
SYS_TIME, SETUID, NET_ADMIN = 25, 7, 12


def resolve(cg: int) -> Workload:
    return classify(PATHS.get(cg, "/"), cg)


def model_after(
    first: dict[tuple[int, int, bool], int], second: dict[tuple[int, int, bool], int], dt: float
) -> TopModel:
    m = TopModel(resolve, start_s=100.0)
    m.update(first, 101.0)
    m.update(second, 101.0 + dt)
    return m


class TestRows:
    def test_rates_are_over_the_last_interval_and_totals_since_attach(self) -> None:
        """A denial count that grew by 50 in 0.5 s is 100/s; its total is the count."""
        m = model_after({(7, SYS_TIME, True): 10}, {(7, SYS_TIME, True): 60}, 0.5)
        [row] = m.rows()
        assert (PODMAN_ID[:12], "CAP_SYS_TIME", "denied", 100.0, 60) == (
            row.workload,
            row.capability,
            row.verdict,
            row.rate,
            row.total,
        )

    def test_cgroups_of_one_workload_are_summed(self) -> None:
        """A container's nested cgroups (7, 8) make one row."""
        m = model_after({}, {(7, SYS_TIME, True): 3, (8, SYS_TIME, True): 4}, 1.0)
        assert [(PODMAN_ID[:12], 7)] == [(r.workload, r.total) for r in m.rows()]

    def test_denials_first_then_rate_then_total(self) -> None:
        """The default order puts every denied row above allowed ones, however fast."""
        m = model_after(
            {},
            {(1, SETUID, False): 5000, (7, SYS_TIME, True): 40, (9, NET_ADMIN, True): 90},
            1.0,
        )
        assert [("ntp.service", True), (PODMAN_ID[:12], True), ("host", False)] == [
            (r.workload, r.denied) for r in m.rows()
        ]
        assert ["host", "ntp.service", PODMAN_ID[:12]] == [r.workload for r in m.rows(sort="rate")]

    def test_sort_by_total_differs_from_rate(self) -> None:
        """A row with the larger total but no recent checks is first by total, last by rate."""
        m = model_after(
            {(1, SETUID, False): 1000, (9, NET_ADMIN, True): 10},
            {(1, SETUID, False): 1000, (9, NET_ADMIN, True): 20},
            1.0,
        )
        assert ["host", "ntp.service"] == [r.workload for r in m.rows(sort="total")]
        assert ["ntp.service", "host"] == [r.workload for r in m.rows(sort="rate")]

    def test_filter_matches_workload_capability_verdict_syscall(self) -> None:
        m = model_after({}, {(1, SETUID, False): 5, (7, SYS_TIME, True): 4}, 1.0)
        assert ["CAP_SYS_TIME"] == [r.capability for r in m.rows(text="sys_time")]
        assert ["CAP_SETUID"] == [r.capability for r in m.rows(text="ALLOWED")]
        assert ["CAP_SYS_TIME"] == [r.capability for r in m.rows(text=PODMAN_ID[:6])]
        assert [] == m.rows(text="nothing-like-this")

    def test_syscall_and_command_come_from_the_pipeline(self) -> None:
        """The pipeline's checks (real-shaped ring records) name the syscall most
        seen per row; the count map alone cannot."""
        m = TopModel(resolve, start_s=0.0)
        p = trace_pipeline(resolve, [m], policy=Policy.load(None), outcome=True)
        b = np.zeros(5, dtype=EVENT_DTYPE)
        rows = [
            (1, 9, 11, SYS_TIME, 227, 0, F_DENIED, b"date"),
            (2, 9, 11, 0, 227, -errno.EPERM, F_OUTCOME, b"date"),
            (3, 9, 12, SYS_TIME, 164, 0, F_DENIED, b"chronyd"),
            (4, 9, 12, 0, 164, -errno.EPERM, F_OUTCOME, b"chronyd"),
            (5, 9, 13, SYS_TIME, 164, 0, F_DENIED, b"chronyd"),
        ]
        for i, (ts, cg, pid, cap, nr, ret, flags, comm) in enumerate(rows):
            b[i] = (ts, cg, pid, pid, 0, cap, nr, ret, flags, 0, comm)
        p.on_batch("denials", b)
        p.close()
        m.update({(9, SYS_TIME, True): 3}, 1.0)
        [row] = m.rows()
        assert ("settimeofday", "chronyd") == (row.syscall, row.comm)


def rows(n: int, *, denied: int = 0) -> list[Row]:
    return [
        Row(f"container-{i:03d}", i % 41, i < denied, float(1000 - i), 10 * (1000 - i), "clone")
        for i in range(n)
    ]


class TestLayout:
    @pytest.mark.parametrize(("w", "h"), [(80, 24), (100, 30), (200, 50), (40, 10)])
    def test_fits_the_screen(self, w: int, h: int) -> None:
        """Every line fits the width; title, status, header and key help all show."""
        screen = layout(rows(100), Status(lost_checks=3, suppressed=7), w, h)
        assert len(screen) == h
        assert all(len(text) <= w for text, _ in screen)
        styles = [s for _, s in screen]
        assert ["title", "status", "header"] == styles[:3]
        assert "help" == styles[-1]
        assert f"... {100 - (h - 5)} more rows" == screen[-2][0]

    def test_80x24_shows_the_status_counters_and_the_columns(self) -> None:
        screen = layout(
            rows(3, denied=1), Status(lost_denials=2, lost_checks=3, suppressed=7), 80, 24
        )
        text = "\n".join(t for t, _ in screen)
        assert "lost: denials 2 checks 3  rate-limited denials 7" in text
        assert screen[2][0].split() == [
            "WORKLOAD",
            "CAPABILITY",
            "VERDICT",
            "RATE/s",
            "TOTAL",
            "SYSCALL",
        ]
        assert ["denied", "allowed", "allowed"] == [s for _, s in screen[3:6]]
        assert 4 + 3 == len(screen), "no padding: three rows, four fixed lines"

    def test_a_wider_screen_uses_its_width(self) -> None:
        """Past 100 columns the command column appears and long names are not cut."""
        long = [
            Row(
                "namespace-long/pod-name-0123456789/container-name",
                SYS_TIME,
                True,
                1.0,
                1,
                "clock_settime",
                "date",
            )
        ]
        narrow = layout(long, Status(), 80, 24)[3][0]
        wide = layout(long, Status(), 160, 24)[3][0]
        assert "namespace-long/pod-name-0123456789/container-name" not in narrow
        assert "namespace-long/pod-name-0123456789/container-name" in wide
        assert wide.rstrip().endswith("date")
        assert "COMM" in layout(long, Status(), 160, 24)[2][0]

    def test_the_filter_prompt_replaces_the_help_line(self) -> None:
        screen = layout(rows(2), Status(), 80, 24, prompt="SYS_TI")
        assert screen[-1][0].startswith("filter: SYS_TI_")


class TestExpectedDenials:
    def test_known_probes_rank_below_unexpected_denials_however_fast(self) -> None:
        """A fork's CAP_SYS_ADMIN probe (the default policy expects it) at 10x the
        rate of a real CAP_SYS_TIME denial: the denial is first, the probe is
        marked expected."""
        m = TopModel(resolve, start_s=0.0)
        p = trace_pipeline(resolve, [m], policy=Policy.load(None), outcome=False)
        b = np.zeros(2, dtype=EVENT_DTYPE)
        b[0] = (1, 7, 11, 11, 0, SYS_TIME, 227, 0, F_DENIED, 0, b"date")
        b[1] = (2, 7, 11, 11, 0, 21, 56, 0, F_DENIED, 0, b"sh")  # clone: vm-enough-memory
        p.on_batch("denials", b)
        p.close()
        m.update({(7, SYS_TIME, True): 50, (7, 21, True): 500}, 1.0)
        got = [(r.capability, r.verdict) for r in m.rows()]
        assert [("CAP_SYS_TIME", "denied"), ("CAP_SYS_ADMIN", "expected")] == got
        assert ("CAP_SYS_ADMIN", "expected") == (
            m.rows(sort="rate")[0].capability,
            m.rows(sort="rate")[0].verdict,
        )
        styles = [s for _, s in layout(m.rows(), Status(), 80, 24)[3:5]]
        assert ["denied", "expected"] == styles
