"""`capwatch record`'s tap: the rings' records as they come, with what replay
needs to attribute and explain them exactly as live did.

:class:`Recorder` stands where the pipeline would (``on_batch`` per ring batch,
``tick`` after every drain) and keeps its per-event work to copying the batch's
bytes and one ``numpy.unique`` over its cgroup ids. Per drain it writes one
frame (one compress, one write(2)): the records, the workloads of cgroups seen
for the first time or whose identity changed (a name learnt later), and the
sets of each denying process, read on its first denial by the pipeline's own
:class:`~capwatch.pipeline.StatusSnapshots`. About once a second it adds the
kernel's exact counts and stats (what `top --from` shows).

:class:`RecordingFile` appends frames and rotates by size, logrotate-style:
``FILE`` is the newest, ``FILE.1`` the one before, up to ``FILE.<keep>``. Each
file opens with the host frame and restates every workload and process set
known, so any one of them replays on its own.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from capwatch.attribution.containers import Workload
from capwatch.attribution.workloads import is_settled
from capwatch.decode.events import Batch, Event, events_from_batch
from capwatch.decode.procfs import ProcStatus
from capwatch.errors import RecordingError
from capwatch.pipeline import StatusSnapshots
from capwatch.record.format import (
    encode_drain,
    encode_file_header,
    encode_host,
    status_to_json,
    workload_to_json,
)

__all__ = ["Recorder", "RecordingFile", "rotated_names"]


def rotated_names(path: str, keep: int) -> list[str]:
    """The files of a rotated recording, oldest first (those that exist)."""
    names = [f"{path}.{i}" for i in range(keep, 0, -1)] + [path]
    return [n for n in names if os.path.exists(n)]


class RecordingFile:
    """Append-only frames to ``path``; a new file when it passes ``max_size``."""

    def __init__(
        self,
        path: str,
        host: dict[str, Any],
        preamble: Callable[[], bytes],
        *,
        max_size: int | None = None,
        keep: int = 4,
    ) -> None:
        self.path = path
        self.host = host
        self.preamble = preamble
        self.max_size = max_size
        self.keep = keep
        self.files = 0
        self.bytes = 0  # written, all files
        self.frames = 0
        self._fd = -1
        self._size = 0
        self._open()

    def _open(self) -> None:
        try:
            self._fd = os.open(
                self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600
            )
        except OSError as exc:
            raise RecordingError(f"cannot write {self.path}: {exc.strerror}") from None
        self._size = 0
        self.files += 1
        host = {**self.host, "file": self.files}
        self._write(encode_file_header() + encode_host(host))
        pre = self.preamble()
        if pre:
            self._write(pre)

    def _write(self, data: bytes) -> None:
        try:
            n = os.write(self._fd, data)
            while n < len(data):  # a short write (signal, disk nearly full)
                n += os.write(self._fd, data[n:])
        except OSError as exc:
            raise RecordingError(f"cannot write {self.path}: {exc.strerror}") from None
        self._size += len(data)
        self.bytes += len(data)

    def write_frame(self, frame: bytes) -> None:
        self._write(frame)
        self.frames += 1
        if self.max_size is not None and self._size >= self.max_size:
            self._rotate()

    def _rotate(self) -> None:
        os.close(self._fd)
        for i in range(self.keep, 0, -1):
            src = self.path if i == 1 else f"{self.path}.{i - 1}"
            if os.path.exists(src):
                os.replace(src, f"{self.path}.{i}")
        self._open()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Recorder:
    """The tap: ``on_batch`` for every ring batch, ``tick`` after each drain."""

    def __init__(
        self,
        path: str,
        host: dict[str, Any],
        resolve: Callable[[int], Workload],
        snapshot: Callable[[Event], ProcStatus | None],
        *,
        counts: Callable[[], dict[tuple[int, int, bool], int]] | None = None,
        stats: Callable[[], dict[str, int]] | None = None,
        note_pid: Callable[[int, int], None] | None = None,
        max_size: int | None = None,
        keep: int = 4,
        count_interval_s: float = 1.0,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.resolve = resolve
        self.note_pid = note_pid
        self.counts = counts
        self.stats = stats
        self.count_interval_ns = int(count_interval_s * 1e9)
        self._now = monotonic_ns
        self._read = snapshot
        self.snapshots = StatusSnapshots(self._take)
        self._known: dict[int, Workload] = {}
        self._unsettled: set[int] = set()
        self._sets: OrderedDict[int, ProcStatus] = OrderedDict()
        self._rings: list[tuple[str, bytes]] = []
        self._new_w: dict[int, Workload] = {}
        self._new_s: list[ProcStatus] = []
        self._last_counts = 0
        self.events = 0
        self.file = RecordingFile(path, host, self._preamble, max_size=max_size, keep=keep)

    def _take(self, ev: Event) -> ProcStatus | None:
        st = self._read(ev)
        if st is not None:
            self._new_s.append(st)
            self._sets[ev.pid] = st
            self._sets.move_to_end(ev.pid)
            if len(self._sets) > 4096:
                self._sets.popitem(last=False)
        return st

    def _preamble(self) -> bytes:
        """What a new file restates: every workload and process set known."""
        if not self._known and not self._sets:
            return b""
        meta = {
            "t": self._now(),
            "w": [workload_to_json(w) for w in self._known.values()],
            "s": [status_to_json(s) for s in self._sets.values()],
        }
        return encode_drain(meta, [])

    # -- the pipeline's place ----------------------------------------------

    def on_batch(self, ring: str, batch: Batch) -> None:
        self._rings.append((ring, batch.tobytes()))
        self.events += len(batch)
        cgs, first = np.unique(batch["cgroup_id"], return_index=True)
        for cg, i in zip(cgs.tolist(), first.tolist(), strict=True):
            if cg not in self._known:
                self._learn(cg, int(batch["pid"][i]))
        if ring == "denials":
            for ev in events_from_batch(batch):
                if ev.denied and not ev.is_outcome:
                    self.snapshots.take(ev)

    def _learn(self, cg: int, pid: int) -> None:
        w = self.resolve(cg)
        if w.cgroup_path is None and self.note_pid is not None:
            self.note_pid(cg, pid)  # as the pipeline's hold queue does
            w = self.resolve(cg)
        self._known[cg] = self._new_w[cg] = w
        if not is_settled(w):
            self._unsettled.add(cg)

    def tick(self) -> None:
        for cg in list(self._unsettled):
            w = self.resolve(cg)
            if w != self._known[cg]:
                self._known[cg] = self._new_w[cg] = w
            if is_settled(w):
                self._unsettled.discard(cg)
        now = self._now()
        meta: dict[str, Any] = {"t": now}
        if self._new_w:
            meta["w"] = [workload_to_json(w) for w in self._new_w.values()]
        if self._new_s:
            meta["s"] = [status_to_json(s) for s in self._new_s]
        if self.counts is not None and now - self._last_counts >= self.count_interval_ns:
            self._last_counts = now
            meta["counts"] = [[c, k, int(d), n] for (c, k, d), n in self.counts().items()]
            if self.stats is not None:
                meta["stats"] = self.stats()
        if not self._rings and len(meta) == 1:
            return
        self.file.write_frame(encode_drain(meta, self._rings))
        self._rings, self._new_w, self._new_s = [], {}, []

    def close(self) -> None:
        self._last_counts = 0  # the final counts and stats always go in
        try:
            self.tick()
        finally:
            self.file.close()
