"""serve's health verdict, without a kernel."""

from __future__ import annotations

import pytest

from capwatch.commands.serve import health_of


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
