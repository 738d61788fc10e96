"""`capwatch record`'s tap: the rings' records as they come, with what replay
needs to attribute and explain them exactly as live did.

:class:`Recorder` stands where the pipeline would (``on_batch`` per ring batch,
``tick`` after every drain) and keeps its per-event work to copying the batch's
bytes and one ``numpy.unique`` over its cgroup ids. Per drain it queues one
frame (compressed and written by :class:`RecordingFile`'s thread): the records, the workloads of cgroups seen
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
import queue
import threading
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
    DRAIN,
    drain_body,
    encode_file_header,
    encode_frame,
    encode_host,
    status_to_json,
    workload_to_json,
)

__all__ = ["Recorder", "RecordingFile", "rotated_names"]

_ROTATE = -1  # a queue item: start the next file with this preamble
_FILE_START = 512  # about what a file's header and host frame take


def rotated_names(path: str, keep: int) -> list[str]:
    """The files of a rotated recording, oldest first (those that exist)."""
    names = [f"{path}.{i}" for i in range(keep, 0, -1)] + [path]
    return [n for n in names if os.path.exists(n)]


class RecordingFile:
    """Append-only frames to ``path``; a new file when it passes ``max_size``.

    The consumer hands over uncompressed frame bodies (:meth:`write_frame`);
    a thread of its own compresses (zlib releases the GIL) and writes them, so
    compression never holds up the drain loop. The queue is bounded: if the
    disk cannot keep up, :meth:`write_frame` waits and the kernel's ring
    absorbs the difference (its losses are counted, as live). A write error
    is raised in the consumer at its next frame, or at :meth:`close`."""

    def __init__(
        self,
        path: str,
        host: dict[str, Any],
        preamble: Callable[[], bytes],
        *,
        max_size: int | None = None,
        keep: int = 4,
        queue_frames: int = 64,
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
        self._ratio = 0.5  # compressed / raw, as the writer last saw it
        self._est = 0  # this file's size, estimated by the consumer
        self._error: RecordingError | None = None
        self._open(preamble())
        self._q: queue.Queue[tuple[int, bytes] | None] = queue.Queue(maxsize=queue_frames)
        self._thread = threading.Thread(target=self._run, name="capwatch-record", daemon=True)
        self._thread.start()

    def _open(self, preamble: bytes) -> None:
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
        if preamble:
            self._write(encode_frame(DRAIN, preamble))

    def _write(self, data: bytes) -> None:
        try:
            n = os.write(self._fd, data)
            while n < len(data):  # a short write (signal, disk nearly full)
                n += os.write(self._fd, data[n:])
        except OSError as exc:
            raise RecordingError(f"cannot write {self.path}: {exc.strerror}") from None
        self._size += len(data)
        self.bytes += len(data)

    def write_frame(self, body: bytes) -> None:
        """Queue one drain's body (capwatch.record.format.drain_body)."""
        if self._error is not None:
            raise self._error
        self._q.put((DRAIN, body))
        # The size is estimated here, from the compression ratio the writer last
        # saw, so that the file breaks between the same frames whatever the
        # writer's lag, and the next file restates the state as of that frame.
        self._est += int(len(body) * self._ratio) + 9
        if self.max_size is not None and self._est >= self.max_size:
            pre = self.preamble()
            self._q.put((_ROTATE, pre))
            self._est = _FILE_START + int(len(pre) * self._ratio)

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            if self._error is not None:
                continue  # keep taking frames: the consumer must not block on a dead writer
            kind, body = item
            try:
                if kind == _ROTATE:
                    self._rotate(body)
                else:
                    frame = encode_frame(kind, body)
                    self._write(frame)
                    self._ratio = max(0.01, len(frame) / max(1, len(body)))
                    self.frames += 1
            except RecordingError as exc:
                self._error = exc

    def _rotate(self, preamble: bytes) -> None:
        os.close(self._fd)
        for i in range(self.keep, 0, -1):
            src = self.path if i == 1 else f"{self.path}.{i - 1}"
            if os.path.exists(src):
                os.replace(src, f"{self.path}.{i}")
        self._open(preamble)

    def close(self) -> None:
        """Write what is queued, then close; raises the writer's error, if any."""
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._error is not None:
            raise self._error


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
        return drain_body(meta, [])

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
        if w.cgroup_path is None and self.note_pid is not None and pid:
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
            counts = self.counts()
            for c, _, _ in counts:
                if c not in self._known:
                    self._learn(c, 0)  # a cgroup only the count map has seen (top --from)
            if self._new_w:
                meta["w"] = [workload_to_json(w) for w in self._new_w.values()]
            meta["counts"] = [[c, k, int(d), n] for (c, k, d), n in counts.items()]
            if self.stats is not None:
                meta["stats"] = self.stats()
        if not self._rings and len(meta) == 1:
            return
        self.file.write_frame(drain_body(meta, self._rings))
        self._rings, self._new_w, self._new_s = [], {}, []

    def close(self) -> None:
        self._last_counts = 0  # the final counts and stats always go in
        try:
            self.tick()
        finally:
            self.file.close()
