"""A recording as the pipeline's source: the rings' records in the order they
were drained, attributed from the identities recorded (not the replaying
host's), with the process sets read at the time and the recording's clock.

    rec = Recording(["capture.cwrec"])
    pipeline = Pipeline(rec.resolve, sinks, snapshot=rec.snapshot,
                        clock=rec.clock, monotonic_ns=rec.now_ns, ...)
    rec.feed(pipeline)          # every batch, a tick per drain, then close
    rec.cut                     # "FILE: the last 37 bytes ... cut" or None
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from capwatch.attribution.containers import Workload, unresolved
from capwatch.decode.events import Batch, Event
from capwatch.decode.procfs import ProcStatus
from capwatch.errors import RecordingError
from capwatch.pipeline import Clock
from capwatch.record.format import HOST, Drain, FrameReader

__all__ = ["Recording", "Target"]


class Target(Protocol):
    def on_batch(self, ring: str, batch: Batch) -> None: ...
    def tick(self) -> None: ...
    def close(self) -> None: ...


class Recording:
    """One or more recording files (a rotated set, oldest first), read once."""

    def __init__(self, paths: Sequence[str]) -> None:
        if not paths:
            raise RecordingError("no recording given")
        self.paths = list(paths)
        for p in self.paths:
            if not os.path.isfile(p):
                raise RecordingError(f"{p}: no such recording")
        self.host: dict[str, Any] = {}
        self._workloads: dict[int, Workload] = {}
        self._sets: dict[int, ProcStatus] = {}
        self._t_ns = 0
        self.first_ns: int | None = None
        self.clock = Clock()
        self.frames = 0
        self.events = 0
        self.counts: dict[tuple[int, int, bool], int] = {}
        self.stats: dict[str, int] = {}
        self.cut: str | None = None
        self._peek_host()

    def _peek_host(self) -> None:
        """Read the first file's host frame now: commands check the recorded
        configuration (--outcome, --all) before replaying."""
        path = self.paths[0]
        try:
            with open(path, "rb") as f:
                for frame in FrameReader(f, path):
                    if frame.kind != HOST:
                        break
                    self._host(frame.body, path)
                    return
        except OSError as exc:
            raise RecordingError(f"{path}: {exc.strerror}") from None
        raise RecordingError(f"{path}: no host frame: not a complete capwatch recording")

    # -- what the pipeline calls ---------------------------------------------

    def resolve(self, cgroup_id: int) -> Workload:
        return self._workloads.get(cgroup_id) or unresolved(cgroup_id)

    def snapshot(self, ev: Event) -> ProcStatus | None:
        return self._sets.get(ev.pid)

    def sets_of(self, pid: int) -> ProcStatus | None:
        """The capability sets recorded for ``pid`` so far (read at its first denial)."""
        return self._sets.get(pid)

    def now_ns(self) -> int:
        """The recording's CLOCK_MONOTONIC at the drain being replayed."""
        return self._t_ns

    @property
    def duration_s(self) -> float:
        return 0.0 if self.first_ns is None else (self._t_ns - self.first_ns) / 1e9

    @property
    def config(self) -> dict[str, Any]:
        c = self.host.get("config")
        return c if isinstance(c, dict) else {}

    # -- reading --------------------------------------------------------------

    def drains(self) -> Iterator[Drain]:
        """Every drain, in order; the attribution, sets, clock and counts are
        up to date with each when it is yielded."""
        for path in self.paths:
            try:
                f = open(path, "rb")  # noqa: SIM115 (closed below, generator)
            except OSError as exc:
                raise RecordingError(f"{path}: {exc.strerror}") from None
            with f:
                reader = FrameReader(f, path)
                for frame in reader:
                    self.frames += 1
                    if frame.kind == HOST:
                        self._host(frame.body, path)
                        continue
                    if not self.host:
                        raise RecordingError(f"{path}: no host frame before the records")
                    try:
                        d = Drain.decode(frame.body)
                    except ValueError as exc:
                        raise RecordingError(f"{path}: byte {frame.offset}: {exc}") from None
                    yield self._apply(d)
                if reader.cut:
                    self.cut = (
                        f"{path}: recording cut short: the last {reader.cut} bytes"
                        f" (a frame at byte {reader.cut_at}) are incomplete and were skipped"
                    )

    def _host(self, body: bytes, path: str) -> None:
        try:
            host = json.loads(body)
            offset = int(host["clock_offset_ns"])
        except (ValueError, KeyError, TypeError) as exc:
            raise RecordingError(f"{path}: malformed host frame: {exc}") from None
        if not isinstance(host, dict):
            raise RecordingError(f"{path}: malformed host frame")
        self.host = host
        self.clock.offset_ns = offset

    def _apply(self, d: Drain) -> Drain:
        for w in d.workloads:
            self._workloads[w.cgroup_id] = w
        for s in d.statuses:
            self._sets[s.pid] = s
        self._t_ns = d.t_ns
        if self.first_ns is None:
            self.first_ns = d.t_ns
        if d.counts is not None:
            self.counts = d.counts
        if d.stats is not None:
            self.stats = d.stats
        self.events += sum(len(b) for _, b in d.batches)
        return d

    def feed(self, target: Target, *, on_drain: Callable[[Drain], None] | None = None) -> None:
        """Replay every drain into ``target`` (a Pipeline), then close it."""
        for d in self.drains():
            for ring, batch in d.batches:
                target.on_batch(ring, batch)
            target.tick()
            if on_drain is not None:
                on_drain(d)
        target.close()
