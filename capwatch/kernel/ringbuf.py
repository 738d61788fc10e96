"""Read a BPF ring buffer directly: mmap it, walk the record headers, decode a
whole batch with numpy, then move the consumer position once.

bcc's ``open_ring_buffer`` calls back into Python through ctypes once per record
(about 1.3 us an event here); this reader pays Python's overhead once per batch.

Layout of a BPF_MAP_TYPE_RINGBUF map as mmap(2) exposes it (kernel/bpf/ringbuf.c,
Linux 5.8, commit 457f44363a88; unchanged through 6.18):

* offset 0, one page, read-write: ``consumer_pos`` (u64 at offset 0);
* offset page_size, read-only: one page holding ``producer_pos`` (u64 at offset 0),
  then the data area of ``data_size`` bytes (the map's max_entries, a power of
  two and a multiple of the page size) mapped twice in a row, so a record that
  runs past the end of the area is still contiguous in memory.

Both positions count bytes from the ring's creation and never wrap; a record's
header sits at ``pos & (data_size - 1)``. The header is 8 bytes: u32 ``len``
(payload length, with BUSY_BIT while the producer still writes it and
DISCARD_BIT when it gave it up) and u32 ``pg_off`` (for the kernel only). Each
record takes ``round_up(len + 8, 8)`` bytes.

Memory ordering: the kernel publishes ``producer_pos`` with a store-release
after writing the header, and clears BUSY_BIT with an xchg after writing the
payload; a consumer must load ``producer_pos``, then headers, then payloads, in
that order, and store ``consumer_pos`` only after it has copied the payloads.
On x86_64 (TSO: loads are not reordered with older loads, stores not with older
loads) the plain loads and store below, made in program order, are enough. On
arm64 and other weakly ordered architectures they are not: there the reads need
acquire semantics (``ldar``) and the final store a release, which numpy cannot
express; use libbpf's ring_buffer (through bcc) there until this grows a small C
helper.

Waking up (kernel/bpf/ringbuf.c, bpf_ringbuf_commit, Linux 5.8 to 6.18): the
kernel wakes the map fd's pollers when a record is submitted and the consumer
had caught up to it, or always with BPF_RB_FORCE_WAKEUP, never with
BPF_RB_NO_WAKEUP. Its poll reports EPOLLIN whenever any byte is pending, so a
level-triggered epoll returns at once while the producer runs, and a consumer
that also loops read_batch() until it comes back empty chases the producer in
batches of ~14 records (bench/bench_ringbuf.py: 0.71 us of consumer CPU an
event at 1.3 M events/s). :meth:`RingReader.wait` therefore registers
edge-triggered (EPOLLET) and returns on the kernel's wake-ups only.

capwatch submits allowed checks with BPF_RB_NO_WAKEUP and forces a wake-up
every CW_WAKE_EVERY (2048) records; denials use the default policy. So the
contract for callers is: ``wait(timeout_ms)`` with a short timeout (say 50 ms),
then one ``read_batch()`` *whether or not wait returned True*: up to 255
allowed checks can sit in the ring without a wake-up, and a record committed
between a drain's load of producer_pos and its store of consumer_pos wakes no
one, so an event waits at most the timeout. Measured at 1.24 M events/s (same
script): wait(50) + one read_batch() takes ~280 records a batch, 0.12 us an
event; sleeping 2 ms then one read_batch() takes ~2700, 0.04 us an event.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import select
import sys
from types import TracebackType

import numpy as np
import numpy.typing as npt

from capwatch.decode.events import EVENT_DTYPE, EVENT_SIZE
from capwatch.errors import RingBufferError

__all__ = [
    "BUSY_BIT",
    "DISCARD_BIT",
    "HDR_SIZE",
    "RECORD_STRIDE",
    "TSO_MACHINES",
    "RingBufferError",
    "RingReader",
    "check_memory_order",
    "ringbuf_data_size",
]

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HDR_SIZE = 8
#: Bytes one capwatch event takes in the ring: header + 64-byte payload, 8-aligned.
RECORD_STRIDE = (HDR_SIZE + EVENT_SIZE + 7) & ~7

assert RECORD_STRIDE == 72
_U32 = np.dtype("<u4")  # the header word (native order; capwatch runs little-endian only)
_GOOD_LEN = EVENT_SIZE  # header word of a committed, kept event record
_DISCARDED_LEN = EVENT_SIZE | DISCARD_BIT

_BPF_OBJ_GET_INFO_BY_FD = 15
_BPF_MAP_TYPE_RINGBUF = 27
_SYS_BPF = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "s390x": 351, "riscv64": 280}


def _as_events(payloads: npt.NDArray[np.uint8]) -> npt.NDArray[np.void]:
    """(n, EVENT_SIZE) bytes, already a private C-contiguous copy -> n events."""
    return payloads.view(EVENT_DTYPE).reshape(len(payloads))


class _InfoAttr(ctypes.Structure):
    # union bpf_attr, BPF_OBJ_GET_INFO_BY_FD member (include/uapi/linux/bpf.h)
    _fields_ = (
        ("bpf_fd", ctypes.c_uint32),
        ("info_len", ctypes.c_uint32),
        ("info", ctypes.c_uint64),
    )


class _MapInfo(ctypes.Structure):
    # The leading fields of struct bpf_map_info; the kernel fills min(info_len, its size).
    _fields_ = (
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    )


def ringbuf_data_size(map_fd: int) -> int:
    """The data-area size (max_entries) of the ring-buffer map behind ``map_fd``,
    asked of the kernel with bpf(BPF_OBJ_GET_INFO_BY_FD)."""
    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        raise RingBufferError(
            f"bpf(2) syscall number unknown on {platform.machine()}: pass data_size"
        )
    info = _MapInfo()
    attr = _InfoAttr(map_fd, ctypes.sizeof(info), ctypes.addressof(info))
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.syscall(
        ctypes.c_long(nr),
        ctypes.c_long(_BPF_OBJ_GET_INFO_BY_FD),
        ctypes.byref(attr),
        ctypes.c_uint(ctypes.sizeof(attr)),
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise RingBufferError(f"fd {map_fd} is not a BPF map: {os.strerror(err)}")
    if info.type != _BPF_MAP_TYPE_RINGBUF:
        raise RingBufferError(f"fd {map_fd} is BPF map type {info.type}, not a ring buffer (27)")
    return int(info.max_entries)


#: Machines whose memory model (TSO) makes the plain loads and store above safe.
TSO_MACHINES = frozenset({"x86_64", "amd64", "i686", "i386"})


def check_memory_order(machine: str | None = None) -> None:
    """Refuse to read a ring where plain loads may be reordered (arm64, ppc64le,
    riscv64, s390x is TSO-like but untested): a wrong read there would decode a
    half-written record as an event, silently. Raises RingBufferError."""
    m = platform.machine() if machine is None else machine
    if m not in TSO_MACHINES:
        raise RingBufferError(
            f"the batch ring reader is only safe on x86 (total store order); this is {m}:"
            " its loads need acquire/release barriers that this reader does not make yet"
        )


class RingReader:
    """Consumer of one BPF_MAP_TYPE_RINGBUF map whose records are capwatch events.

    ``map_fd`` stays owned by the caller (bcc's table): close() unmaps but does
    not close it. ``data_size`` is the map's max_entries (bcc: ``table.max_entries``);
    when None it is asked of the kernel. Not thread-safe: one consumer per ring.
    """

    def __init__(
        self, map_fd: int, data_size: int | None = None, *, page_size: int | None = None
    ) -> None:
        check_memory_order()
        self.records_read = 0  # events returned
        self.bytes_read = 0  # ring bytes consumed: headers, discarded and bad records included
        self.batches = 0  # read_batch calls that consumed anything
        self.decode_errors = 0  # records of an unexpected length, skipped
        self.discarded = 0  # records the producer discarded, skipped
        self._fd = map_fd
        self._page = page_size or mmap.PAGESIZE
        size = ringbuf_data_size(map_fd) if data_size is None else data_size
        if size <= 0 or size & (size - 1) or size % self._page:
            raise RingBufferError(
                f"ring data size {size} is not a power-of-two multiple of page ({self._page})"
            )
        self.data_size = size
        self._mask = size - 1
        self._epoll: select.epoll | None = None
        try:
            self._cons_map = mmap.mmap(
                map_fd, self._page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0
            )
        except OSError as e:
            raise RingBufferError(f"cannot map the ring's consumer page: {e.strerror}") from e
        try:
            self._prod_map = mmap.mmap(
                map_fd, self._page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=self._page
            )
        except OSError as e:
            self._cons_map.close()
            raise RingBufferError(f"cannot map the ring's data area: {e.strerror}") from e
        self._cons = memoryview(self._cons_map).cast("Q")
        self._prod_q = memoryview(self._prod_map).cast("Q")
        self._prod_l = memoryview(self._prod_map).cast("I")
        self._closed = False

    # -- positions ---------------------------------------------------------

    @property
    def consumer_pos(self) -> int:
        return int(self._cons[0])

    @property
    def producer_pos(self) -> int:
        return int(self._prod_q[0])

    def available(self) -> int:
        """Bytes submitted (or reserved) and not consumed yet."""
        return int(self._prod_q[0]) - int(self._cons[0])

    # -- reading -----------------------------------------------------------

    def read_batch(self, max_records: int | None = None) -> npt.NDArray[np.void]:
        """Every event committed since the last call (at most ``max_records``),
        as one EVENT_DTYPE array; then the consumer position moves past them.

        Stops at the first record still being written (busy); skips discarded
        records and, counting them in ``decode_errors``, records that are not
        one event long. Never raises on ring contents.
        """
        cons = int(self._cons[0])
        prod = int(self._prod_q[0])  # loaded before any header (see module doc)
        limit = sys.maxsize if max_records is None else max_records
        base = self._page  # the data area's offset in the producer mapping
        max_run = self.data_size // RECORD_STRIDE  # a run never leaves the double mapping
        chunks: list[npt.NDArray[np.void]] = []
        got = 0
        pos = cons
        while pos < prod and got < limit:
            off = pos & self._mask
            n = min((prod - pos) // RECORD_STRIDE, limit - got, max_run)
            if n:
                # Fast path: a run of event records, verified and copied in bulk.
                # Records as rows of bytes, and their header words (one a row).
                rows: npt.NDArray[np.uint8] = np.ndarray(
                    (n, RECORD_STRIDE), np.uint8, self._prod_map, base + off
                )
                lens: npt.NDArray[np.uint32] = np.ndarray(
                    (n,), _U32, self._prod_map, base + off, (RECORD_STRIDE,)
                )
                good = lens == _GOOD_LEN
                if good.all():
                    # A 2-D uint8 copy is ~4x faster than copying a strided
                    # structured field; then reinterpret the rows as events.
                    chunks.append(_as_events(rows[:, HDR_SIZE:].copy()))
                    got += n
                    pos += n * RECORD_STRIDE
                    continue
                # Discarded events keep the stride: take them in the run too.
                same_stride = good | (lens == _DISCARDED_LEN)
                k = n if same_stride.all() else int(same_stride.argmin())
                if k:
                    kept = good[:k]
                    nkept = int(np.count_nonzero(kept))
                    if nkept:
                        chunks.append(_as_events(rows[:k][kept, HDR_SIZE:]))
                    self.discarded += k - nkept
                    got += nkept
                    pos += k * RECORD_STRIDE
                    continue
            # Slow path: one record that is busy, or not one event long.
            word = int(self._prod_l[(base + off) >> 2])
            if word & BUSY_BIT:
                break
            length = word & ~(BUSY_BIT | DISCARD_BIT)
            stride = (length + HDR_SIZE + 7) & ~7
            if pos + stride > prod:
                break  # cannot happen with a sane producer: wait rather than skip blindly
            if word & DISCARD_BIT:
                self.discarded += 1
            elif length != EVENT_SIZE:
                self.decode_errors += 1
            else:  # an event record cut off by max_run or the producer position
                chunks.append(
                    np.ndarray((1,), EVENT_DTYPE, self._prod_map, base + off + HDR_SIZE).copy()
                )
                got += 1
            pos += stride
        if pos == cons:
            return np.empty(0, EVENT_DTYPE)
        self._cons[0] = pos  # after the copies: the producer may now reuse the space
        self.bytes_read += pos - cons
        self.records_read += got
        self.batches += 1
        if len(chunks) == 1:
            return chunks[0]
        return np.concatenate(chunks) if chunks else np.empty(0, EVENT_DTYPE)

    # -- waiting -----------------------------------------------------------

    def fileno(self) -> int:
        """The map fd, for the caller's own epoll (EPOLLIN while data is pending)."""
        return self._fd

    def wait(self, timeout_ms: float | None) -> bool:
        """Block until the kernel wakes this ring's consumer, or ``timeout_ms``
        passes (None: forever); return whether data is available.

        Edge-triggered (EPOLLET): it returns on the kernel's wake-ups, not
        whenever one record is pending, so under load each batch holds at least
        the records between two forced wake-ups (see the module doc). On
        timeout the caller must drain anyway: records submitted with
        BPF_RB_NO_WAKEUP wait for it.
        """
        if self._epoll is None:
            ep = select.epoll()
            try:
                ep.register(self._fd, select.EPOLLIN | select.EPOLLET)
            except OSError as e:
                ep.close()
                raise RingBufferError(f"cannot poll ring fd {self._fd}: {e.strerror}") from e
            self._epoll = ep
        self._epoll.poll(-1 if timeout_ms is None else timeout_ms / 1000)
        return self.available() > 0

    # -- lifetime ----------------------------------------------------------

    def close(self) -> None:
        """Unmap the ring (the map fd is left to its owner). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        for view in (self._cons, self._prod_q, self._prod_l):
            view.release()
        self._cons_map.close()
        self._prod_map.close()

    def __enter__(self) -> RingReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
