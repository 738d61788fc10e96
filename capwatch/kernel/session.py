"""A tracing session: the program attached, its rings read in batches.

What `capwatch trace`, `capwatch serve` and the benchmark share: load and
attach (capwatch.kernel.bpf), one RingReader per ring (capwatch.kernel.ringbuf), the drain
loop (capwatch.kernel.tracer), and the health figures the exporter publishes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from capwatch.decode.events import Batch
from capwatch.kernel import bpf as _bpf
from capwatch.kernel.ringbuf import RingReader
from capwatch.kernel.tracer import BatchSource

__all__ = ["Session", "stop_on_signals"]


def stop_on_signals(stop: threading.Event) -> None:
    """SIGINT and SIGTERM set ``stop``: the loop drains, detaches and exits cleanly."""
    import signal

    def handler(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


class Session:
    def __init__(
        self,
        config: _bpf.ProgramConfig,
        mode: str = "auto",
        *,
        kernel_headers: str | None = None,
    ) -> None:
        t0 = time.monotonic()
        self.program = _bpf.load(config, mode, kernel_headers=kernel_headers)
        try:
            self._readers: dict[str, RingReader] = {}

            def reader(r: _bpf.RingSpec) -> RingReader:
                rr = RingReader(r.fd, r.data_size)
                self._readers[r.name] = rr
                return rr

            self.source = BatchSource(self.program.rings(), reader)
        except BaseException:
            self.program.close()
            raise
        self.attach_seconds = time.monotonic() - t0
        self.last_drain = time.monotonic()
        self.running = False

    @property
    def mode(self) -> str:
        return self.program.mode

    def run(
        self,
        stop: threading.Event,
        on_batch: Callable[[str, Batch], None],
        *,
        on_tick: Callable[[], None] | None = None,
        drain_interval_s: float = 0.05,
    ) -> None:
        """Consume until ``stop`` is set; ``on_batch`` gets every batch, ``on_tick``
        is called after every drain (at least every ``drain_interval_s``)."""
        self.running = True
        try:
            while not stop.is_set():
                self.source.wait(drain_interval_s)
                for ring, batch in self.source.drain():
                    on_batch(ring, batch)
                self.last_drain = time.monotonic()
                if on_tick is not None:
                    on_tick()
            for ring, batch in self.source.drain():
                on_batch(ring, batch)
            self.last_drain = time.monotonic()
        finally:
            self.running = False

    def consumer_lag_s(self) -> float:
        """How long unread data has waited: 0 when the rings are drained."""
        if any(r.available() for r in self._readers.values()):
            return max(0.0, time.monotonic() - self.last_drain)
        return 0.0

    def decode_errors(self) -> int:
        return sum(r.decode_errors for r in self._readers.values())

    def records_read(self) -> int:
        return sum(r.records_read for r in self._readers.values())

    def close(self) -> None:
        self.source.close()
        self.program.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
