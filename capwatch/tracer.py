"""The consumer loop: wait on the ring buffers, drain them in batches.

Kernel-facing pieces come in as objects (a LoadedProgram's ring specs and a
reader class), so this loop is the same for the CLI, the exporter and tests.
"""

from __future__ import annotations

import select
import threading
from collections.abc import Callable, Iterator
from typing import Protocol

from capwatch._bpf import RingSpec
from capwatch.events import Batch

__all__ = ["BatchSource", "Reader", "drain_loop"]


class Reader(Protocol):
    def read_batch(self, max_records: int | None = None) -> Batch: ...
    def fileno(self) -> int: ...
    def close(self) -> None: ...


class BatchSource:
    """Readers for every ring of a program, drained together."""

    def __init__(self, rings: list[RingSpec], reader: Callable[[RingSpec], Reader]) -> None:
        self.readers: dict[str, Reader] = {r.name: reader(r) for r in rings}
        self._epoll = select.epoll()
        for r in self.readers.values():
            self._epoll.register(r.fileno(), select.EPOLLIN)

    def wait(self, timeout_s: float) -> None:
        self._epoll.poll(timeout_s)

    def drain(self) -> Iterator[tuple[str, Batch]]:
        # Denials first: they are what users wait for.
        for name, reader in self.readers.items():
            while True:
                batch = reader.read_batch()
                if len(batch) == 0:
                    break
                yield name, batch

    def close(self) -> None:
        self._epoll.close()
        for r in self.readers.values():
            r.close()


def drain_loop(
    source: BatchSource,
    stop: threading.Event,
    *,
    drain_interval_s: float = 0.05,
) -> Iterator[tuple[str, Batch]]:
    """Yield (ring name, batch) until ``stop`` is set, then drain what is left.

    The kernel wakes us when a ring was drained and gets a record (denials),
    or every CW_WAKE_EVERY records on the checks ring; the short poll timeout
    drains the rest, so an event waits at most ``drain_interval_s``.
    """
    while not stop.is_set():
        source.wait(drain_interval_s)
        yield from source.drain()
    yield from source.drain()
