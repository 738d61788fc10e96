"""A token bucket: at most ``rate`` operations a second, ``burst`` at once.

Used where one event could otherwise cost an expensive action (a container
name look-up per unknown container id): the caller takes a token first and
waits, or gives up, when there is none.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["TokenBucket"]


class TokenBucket:
    """Thread-safe token bucket on a monotonic ``clock`` (injectable for tests)."""

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate < 0 or burst < 1:
            raise ValueError("rate must be >= 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._tokens = float(burst)
        self._last = clock()
        self._lock = threading.Lock()

    def _refill(self) -> None:
        now = self.clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
        self._last = now

    def try_take(self) -> bool:
        """Take a token if one is there; never waits."""
        with self._lock:
            self._refill()
            if self._tokens >= 1:
                self._tokens -= 1
                return True
            return False

    def wait_time(self) -> float:
        """Seconds until the next token (0 if one is there; inf if the rate is 0)."""
        with self._lock:
            self._refill()
            if self._tokens >= 1:
                return 0.0
            return float("inf") if self.rate == 0 else (1 - self._tokens) / self.rate

    def take(self, stop: threading.Event) -> bool:
        """Wait for a token; False if ``stop`` was set first."""
        while not stop.is_set():
            if self.try_take():
                return True
            stop.wait(min(self.wait_time(), 1.0))
        return False
