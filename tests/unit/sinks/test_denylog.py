"""capwatch.sinks.denylog: bounded denial log lines with exact counts."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capwatch.decode.caps import parse_cap
from capwatch.decode.syscalls import syscall_table
from capwatch.pipeline import Check
from capwatch.sinks.denylog import DenialLog
from tests.helpers import a_denial

T0 = 1_700_000_040.0  # 2023-11-14T22:14:00Z, aligned to a minute


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class TtyBuffer(io.StringIO):
    def isatty(self) -> bool:
        return True


_NR = {name: nr for nr, name in syscall_table().items()}


def denial(**kw: Any) -> Check:
    """A denial record as the pipeline makes it, named the way the log shows it:
    capability and syscall by name, ``expected`` as the rule that made it so."""
    capability = kw.pop("capability", "CAP_SYS_TIME")
    syscall = kw.pop("syscall", "clock_settime")
    expected = kw.pop("expected", False)
    rule = kw.pop("rule", "r" if expected else None)
    if "other" in (capability, syscall):  # another key: any other real name
        capability = "CAP_SYS_ADMIN" if capability == "other" else capability
        syscall = "mount" if syscall == "other" else syscall
    base = a_denial(
        time=T0,
        pid=4242,
        tid=4242,
        uid=1000,
        cgroup_id=77,
        container="web",
        kind="kubernetes",
        runtime="containerd",
        container_id="c0ffee",
        container_name="web",
        pod="web-7d9f",
        namespace="shop",
        cap=parse_cap(capability),
        syscall_nr=_NR[syscall],
        joined=False,
        rule=rule,
    )
    return replace(base, **kw)


def make(**kw: Any) -> tuple[DenialLog, io.StringIO, FakeClock]:
    out = io.StringIO()
    clock = FakeClock()
    kw.setdefault("fmt", "json")
    kw.setdefault("node", "node-1")
    return DenialLog(out, clock=clock, **kw), out, clock


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def events(out: io.StringIO) -> list[str]:
    return [rec["event"] for rec in lines(out)]


class TestDetailLine:
    def test_first_denial_writes_one_json_line_with_all_fields(self) -> None:
        """The first denial of a key is logged at once, with every field."""
        log, out, _ = make()
        log.write(denial(rule=None))
        assert [
            {
                "time": "2023-11-14T22:14:00.000Z",
                "level": "warning",
                "event": "denial",
                "node": "node-1",
                "namespace": "shop",
                "pod": "web-7d9f",
                "container": "web",
                "runtime": "containerd",
                "comm": "date",
                "pid": 4242,
                "uid": 1000,
                "capability": "CAP_SYS_TIME",
                "syscall": "clock_settime",
                "verdict": "denied",
                "expected": False,
                "rule": None,
            }
        ] == lines(out)

    def test_expected_denials_log_at_info_with_their_rule(self) -> None:
        """A denial the policy expects is logged at info, naming the rule."""
        log, out, _ = make()
        log.write(denial(expected=True, rule="dev-load-module-probe", suppressed=2))
        rec = lines(out)[0]
        assert ("info", True, "dev-load-module-probe", 2) == (
            rec["level"],
            rec["expected"],
            rec["rule"],
            rec["suppressed"],
        )

    def test_log_expected_false_skips_expected_denials(self) -> None:
        """With log_expected=False only unexpected denials are written."""
        log, out, clock = make(log_expected=False)
        log.write(denial(expected=True, rule="r"))
        log.write(denial(comm="other"))
        clock.now += 60
        log.tick()
        assert [("denial", "other"), ("denial summary", "other")] == [
            (r["event"], r["comm"]) for r in lines(out)
        ]

    @pytest.mark.parametrize(
        "field",
        ["namespace", "pod", "container", "comm", "capability", "syscall", "expected"],
    )
    def test_each_key_field_makes_a_new_key(self, field: str) -> None:
        """Denials differing in any key field are logged separately."""
        log, out, _ = make()
        log.write(denial())
        log.write(denial(**{field: True if field == "expected" else "other"}))
        assert ["denial", "denial"] == events(out)

    @pytest.mark.parametrize(("field", "value"), [("pid", 1), ("uid", 0), ("time", T0 + 1)])
    def test_non_key_fields_do_not_make_a_new_key(self, field: str, value: object) -> None:
        """Another pid, uid or time of the same key is counted, not logged."""
        log, out, _ = make()
        log.write(denial())
        log.write(denial(**{field: value}))
        assert ["denial"] == events(out)


class TestSummaries:
    def test_flood_of_one_denial_gives_two_lines_per_interval_with_exact_counts(self) -> None:
        """825,000 denials (events plus kernel-suppressed) make 2 lines a minute."""
        log, out, clock = make()
        total = 0
        for minute in range(3):
            clock.now = T0 + 60 * minute
            for i in range(50_000):
                suppressed = 9 if i % 2 else 0
                log.write(denial(pid=i, suppressed=suppressed, time=clock.now + i / 1e5))
                total += 1 + suppressed
            clock.now += 30
        clock.now = T0 + 180
        log.tick()
        summaries = [r for r in lines(out) if r["event"] == "denial summary"]
        assert (6, [275_000] * 3, [50_000] * 3, [225_000] * 3, 825_000) == (
            len(lines(out)),
            [s["count"] for s in summaries],
            [s["events"] for s in summaries],
            [s["suppressed"] for s in summaries],
            total,
        )

    def test_summary_fields(self) -> None:
        """A summary carries the key, counts, first/last seen and the interval."""
        log, out, clock = make()
        log.write(denial(time=T0 + 1, pid=1))
        log.write(denial(time=T0 + 5, pid=2, suppressed=3))
        clock.now = T0 + 61
        log.tick()
        summary = lines(out)[1]
        assert {
            "time": "2023-11-14T22:15:00.000Z",
            "level": "warning",
            "event": "denial summary",
            "node": "node-1",
            "namespace": "shop",
            "pod": "web-7d9f",
            "container": "web",
            "runtime": "containerd",
            "comm": "date",
            "capability": "CAP_SYS_TIME",
            "syscall": "clock_settime",
            "expected": False,
            "rule": None,
            "count": 5,
            "events": 2,
            "suppressed": 3,
            "first_seen": "2023-11-14T22:14:01.000Z",
            "last_seen": "2023-11-14T22:14:05.000Z",
            "last_pid": 2,
            "interval_start": "2023-11-14T22:14:00.000Z",
            "interval_end": "2023-11-14T22:15:00.000Z",
        } == summary

    def test_tick_before_the_interval_ends_writes_nothing(self) -> None:
        """tick() inside the interval is a no-op."""
        log, out, clock = make()
        log.write(denial())
        clock.now = T0 + 59.9
        log.tick()
        assert ["denial"] == events(out)

    def test_next_interval_logs_the_key_again(self) -> None:
        """After an interval ends, the same key gets a fresh detail line."""
        log, out, clock = make(interval=10)
        log.write(denial())
        clock.now = T0 + 10
        log.write(denial())
        assert ["denial", "denial summary", "denial"] == events(out)

    def test_close_writes_the_current_interval(self) -> None:
        """close() flushes summaries early, ending the interval at the clock."""
        log, out, clock = make()
        log.write(denial())
        clock.now = T0 + 12.5
        log.close()
        log.close()  # a second close has nothing left to write
        assert (["denial", "denial summary"], "2023-11-14T22:14:12.500Z") == (
            events(out),
            lines(out)[1]["interval_end"],
        )

    def test_nothing_recorded_writes_nothing(self) -> None:
        """An idle log stays silent on tick and close."""
        log, out, clock = make()
        clock.now += 600
        log.tick()
        log.close()
        assert "" == out.getvalue()


class TestKeyCaps:
    def test_per_workload_cap_folds_extra_keys_into_one_line(self) -> None:
        """One container cannot write more than its cap of keys per interval."""
        log, out, clock = make(max_keys_per_workload=3)
        for i in range(10):
            log.write(denial(comm=f"c{i}", suppressed=1))
        log.write(denial(comm="c9"))  # a repeat of a folded key
        clock.now += 60
        log.tick()
        over = [r for r in lines(out) if r["event"] == "denials over key cap"]
        assert (3, 3, 1) == (
            events(out).count("denial"),
            events(out).count("denial summary"),
            len(over),
        )
        assert {
            "time": "2023-11-14T22:15:00.000Z",
            "level": "warning",
            "event": "denials over key cap",
            "namespace": "shop",
            "pod": "web-7d9f",
            "container": "web",
            "expected": False,
            "more_keys": 7,
            "more_keys_exact": True,
            "count": 15,
            "events": 8,
            "by_capability": {"CAP_SYS_TIME": 15},
            "message": "and 7 more denial keys over the per-workload cap of 3",
            "interval_start": "2023-11-14T22:14:00.000Z",
            "interval_end": "2023-11-14T22:15:00.000Z",
        } == over[0]

    def test_other_workloads_still_log_when_one_hits_its_cap(self) -> None:
        """A noisy container does not silence a quiet one."""
        log, out, _ = make(max_keys_per_workload=2)
        for i in range(100):
            log.write(denial(comm=f"c{i}"))
        log.write(denial(container="quiet", capability="CAP_SYS_ADMIN"))
        assert "quiet" == lines(out)[-1]["container"]

    def test_global_cap_folds_into_one_overall_line(self) -> None:
        """Past max_keys in all, keys are counted in one line without a workload."""
        log, out, clock = make(max_keys=4, max_keys_per_workload=100)
        for i in range(10):
            log.write(denial(container=f"c{i}"))
        clock.now += 60
        log.tick()
        over = [r for r in lines(out) if r["event"] == "denials over key cap"]
        assert (4, 1, 6, 6, "container" in over[0]) == (
            events(out).count("denial"),
            len(over),
            over[0]["more_keys"],
            over[0]["count"],
            False,
        )

    def test_expected_flood_does_not_push_out_unexpected(self) -> None:
        """Expected and unexpected denials have separate key budgets."""
        log, out, _ = make(max_keys=5, max_keys_per_workload=100)
        for i in range(50):
            log.write(denial(expected=True, rule="r", container=f"c{i}"))
        log.write(denial(container="victim"))
        assert ("victim", "warning") == (lines(out)[-1]["container"], lines(out)[-1]["level"])

    @settings(max_examples=50, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.integers(0, 3),  # container
                st.integers(0, 3),  # comm
                st.booleans(),  # expected
                st.integers(0, 5),  # suppressed
                st.integers(0, 150),  # seconds after T0
            ),
            max_size=200,
        )
    )
    def test_counts_are_exact_and_lines_bounded(
        self, evs: list[tuple[int, int, bool, int, int]]
    ) -> None:
        """Summed counts equal the denials recorded; lines per interval stay bounded."""
        log, out, clock = make(max_keys=3, max_keys_per_workload=2)
        for container, comm, expected, suppressed, dt in sorted(evs, key=lambda e: e[4]):
            clock.now = T0 + dt
            log.write(
                denial(
                    container=f"c{container}",
                    comm=f"p{comm}",
                    expected=expected,
                    suppressed=suppressed,
                )
            )
        log.close()
        recs = lines(out)
        counted = sum(r["count"] for r in recs if r["event"] != "denial")
        intervals = {r["interval_start"] for r in recs if "interval_start" in r}
        # per interval and class: <= max_keys details + summaries, <= 4 workload lines + 1
        bound = len(intervals) * 2 * (2 * 3 + 4 + 1)
        assert (sum(1 + e[3] for e in evs), True) == (counted, len(recs) <= bound)


class TestRendering:
    def test_auto_uses_console_renderer_on_a_terminal(self) -> None:
        """On a terminal the line is human text, not JSON."""
        out = TtyBuffer()
        log = DenialLog(out, clock=FakeClock())
        log.write(denial())
        text = out.getvalue()
        assert (False, True, True) == (
            text.startswith("{"),
            "CAP_SYS_TIME" in text,
            "denial" in text,
        )

    def test_auto_uses_json_when_not_a_terminal(self) -> None:
        """Piped output gets JSON lines."""
        out = io.StringIO()
        DenialLog(out, clock=FakeClock()).write(denial())
        assert "denial" == json.loads(out.getvalue())["event"]

    def test_loggers_are_isolated(self) -> None:
        """Two logs write to their own streams; nothing is configured globally."""
        a, out_a, _ = make()
        b, out_b, _ = make()
        a.write(denial(comm="a"))
        b.write(denial(comm="b"))
        assert (["a"], ["b"]) == (
            [r["comm"] for r in lines(out_a)],
            [r["comm"] for r in lines(out_b)],
        )

    def test_non_ascii_comm_is_kept(self) -> None:
        """Names are written as UTF-8 text, not escaped."""
        log, out, _ = make()
        log.write(denial(comm="sérvice"))
        assert ("sérvice", True) == (lines(out)[0]["comm"], "sérvice" in out.getvalue())

    @pytest.mark.parametrize("kw", [{"interval": 0}, {"max_keys": 0}, {"max_keys_per_workload": 0}])
    def test_bad_settings_are_refused(self, kw: dict[str, float]) -> None:
        """Nonsense limits fail at construction, not on the event path."""
        with pytest.raises(ValueError, match="must"):
            DenialLog(io.StringIO(), **kw)  # type: ignore[arg-type]
