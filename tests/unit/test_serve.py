"""serve's health verdict, without a kernel."""

from __future__ import annotations

import pytest

from capwatch.serve import health_of


class FakeSession:
    def __init__(self, running: bool, lag: float) -> None:
        self.running = running
        self.lag = lag
        self.mode = "raw_tracepoint"

    def consumer_lag_s(self) -> float:
        return self.lag


@pytest.mark.parametrize(
    ("session", "expected"),
    [
        (None, (False, "starting")),
        (FakeSession(False, 0), (False, "consumer not running")),
        (FakeSession(True, 11.0), (False, "consumer stalled for 11s")),
        (FakeSession(True, 9.0), (True, "ok: attached via raw_tracepoint")),
        (FakeSession(True, 0.0), (True, "ok: attached via raw_tracepoint")),
    ],
)
def test_health(session: FakeSession | None, expected: tuple[bool, str]) -> None:
    """/healthz fails while starting, when the consumer stopped, or when data waited over 10 s."""
    assert expected == health_of(session)  # type: ignore[arg-type]


def test_pipeline_records_recent_denial(tmp_path: object) -> None:
    """serve's pipeline keeps each distinct denial for explain --last, with its syscall result."""
    import io
    from pathlib import Path

    from capwatch.containers import classify
    from capwatch.denylog import DenialLog
    from capwatch.events import F_DENIED, Event
    from capwatch.exporter import ExporterState
    from capwatch.outcome import Joined
    from capwatch.policy import Policy
    from capwatch.recent import RecentDenials, read_recent
    from capwatch.serve import DenialPipeline
    from tests.unit.test_exporter import FakeSource

    path = str(Path(str(tmp_path)) / "recent.json")
    recent = RecentDenials(path)
    pipe = DenialPipeline(
        lambda cg: classify("/system.slice/ntp.service", cg), Policy(),
        ExporterState(FakeSource(), lambda cg: classify("/", cg)), DenialLog(io.StringIO(), fmt="json"),
        node="n", outcome=True, recent=recent, proc_root=str(tmp_path),
    )  # fmt: skip
    pipe._denial(Joined(Event(1, 9, 42, 42, 0, 25, 227, -1, F_DENIED, 0, "ntpd"), -1))
    recent.flush(force=True)
    [ex] = read_recent(path, 5)
    assert ("CAP_SYS_TIME", "clock_settime", "ntpd", "cause") == (
        ex.capability,
        ex.syscall,
        ex.comm,
        ex.role,
    )
    assert "systemd" == ex.fixes[0]["context"]
