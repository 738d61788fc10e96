"""RingReader on synthetic rings laid out exactly like the kernel's.

A memfd holds what mmap(2) of a BPF_MAP_TYPE_RINGBUF map shows: the consumer
page, the producer page, then the data area twice in a row (the kernel maps the
same pages twice; here every write lands in both copies). The reader maps it
with the same calls it uses on a real map fd.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capwatch.decode.events import EVENT_DTYPE, EVENT_SIZE
from capwatch.kernel.ringbuf import (
    BUSY_BIT,
    DISCARD_BIT,
    HDR_SIZE,
    RECORD_STRIDE,
    RingBufferError,
    RingReader,
    ringbuf_data_size,
)

PAGE = mmap.PAGESIZE
DATA_SIZE = 4 * PAGE


def _round8(n: int) -> int:
    return (n + 7) & ~7


class SynthRing:
    """A producer writing records the way kernel/bpf/ringbuf.c lays them out."""

    def __init__(self, data_size: int = DATA_SIZE, start: int = 0) -> None:
        self.data_size = data_size
        self.fd = os.memfd_create("capwatch-test-ring")
        os.ftruncate(self.fd, 2 * PAGE + 2 * data_size)
        self.data = bytearray(data_size)
        self.prod = start
        self.set_consumer(start)
        self._flush()

    def close(self) -> None:
        os.close(self.fd)

    def consumer_pos(self) -> int:
        return int(struct.unpack("<Q", os.pread(self.fd, 8, 0))[0])

    def set_consumer(self, pos: int) -> None:
        os.pwrite(self.fd, struct.pack("<Q", pos), 0)

    def room(self) -> int:
        return self.data_size - (self.prod - self.consumer_pos())

    def put(
        self,
        payload: bytes,
        *,
        busy: bool = False,
        discard: bool = False,
    ) -> int:
        """Append one record; return its position."""
        stride = _round8(len(payload) + HDR_SIZE)
        assert self.prod + stride - self.consumer_pos() <= self.data_size, "ring full"
        word = len(payload) | (BUSY_BIT if busy else 0) | (DISCARD_BIT if discard else 0)
        record = struct.pack("<II", word, 0xABCD) + payload
        record += b"\xee" * (stride - len(record))  # padding the reader must skip
        pos = self.prod
        self._write(pos, record)
        self.prod += stride
        self._flush()
        return pos

    def commit(self, pos: int) -> None:
        """Clear the busy bit of the record at ``pos`` (bpf_ringbuf_submit)."""
        off = pos % self.data_size
        (word,) = struct.unpack_from("<I", self.data, off)
        self._write(pos, struct.pack("<I", word & ~BUSY_BIT))
        self._flush()

    def _write(self, pos: int, blob: bytes) -> None:
        for i, b in enumerate(blob):
            self.data[(pos + i) % self.data_size] = b

    def _flush(self) -> None:
        os.pwrite(self.fd, struct.pack("<Q", self.prod), PAGE)
        os.pwrite(self.fd, bytes(self.data) * 2, 2 * PAGE)


def event_bytes(i: int, pid: int = 4242) -> bytes:
    ev = np.zeros(1, EVENT_DTYPE)
    ev["ts_ns"] = 1_000_000 + i
    ev["cgroup_id"] = 77 + i
    ev["pid"] = pid
    ev["tid"] = pid + i
    ev["uid"] = 0
    ev["cap"] = i % 41
    ev["syscall_nr"] = 164
    ev["ret"] = -1 if i % 3 == 0 else 0
    ev["flags"] = i & 0x3F
    ev["suppressed"] = i // 7
    ev["comm"] = f"proc{i}".encode()
    return ev.tobytes()


def as_events(payloads: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(payloads), EVENT_DTYPE)


@pytest.fixture
def ring() -> Iterator[SynthRing]:
    r = SynthRing()
    yield r
    r.close()


@pytest.fixture
def reader(ring: SynthRing) -> Iterator[RingReader]:
    with RingReader(ring.fd, ring.data_size) as rd:
        yield rd


class TestRingReaderBatch:
    def test_empty_ring_gives_empty_batch(self, ring: SynthRing, reader: RingReader) -> None:
        """An empty ring yields a zero-length EVENT_DTYPE array and moves nothing."""
        batch = reader.read_batch()
        assert (0, EVENT_DTYPE) == (len(batch), batch.dtype)
        assert 0 == ring.consumer_pos()
        assert (0, 0, 0) == (reader.records_read, reader.bytes_read, reader.batches)

    def test_one_record(self, ring: SynthRing, reader: RingReader) -> None:
        """One committed event comes back field for field."""
        payload = event_bytes(5)
        ring.put(payload)
        batch = reader.read_batch()
        assert as_events([payload]).tobytes() == batch.tobytes()
        assert 4242 == int(batch["pid"][0])
        assert b"proc5" == batch["comm"][0]
        assert RECORD_STRIDE == ring.consumer_pos()

    def test_many_records(self, ring: SynthRing, reader: RingReader) -> None:
        """A full ring of events is read in one batch, in order."""
        payloads = [event_bytes(i) for i in range(DATA_SIZE // RECORD_STRIDE)]
        for p in payloads:
            ring.put(p)
        batch = reader.read_batch()
        assert as_events(payloads).tobytes() == batch.tobytes()
        assert ring.prod == ring.consumer_pos()
        assert (len(payloads), ring.prod, 1) == (
            reader.records_read,
            reader.bytes_read,
            reader.batches,
        )

    def test_discarded_record_is_skipped(self, ring: SynthRing, reader: RingReader) -> None:
        """A discarded record is consumed, counted, and not returned."""
        ring.put(event_bytes(0))
        ring.put(event_bytes(1), discard=True)
        ring.put(event_bytes(2))
        batch = reader.read_batch()
        assert as_events([event_bytes(0), event_bytes(2)]).tobytes() == batch.tobytes()
        assert (1, 0) == (reader.discarded, reader.decode_errors)
        assert ring.prod == ring.consumer_pos()

    def test_discarded_record_of_other_length_is_skipped(
        self, ring: SynthRing, reader: RingReader
    ) -> None:
        """A discarded record of any length is stepped over by its own length."""
        ring.put(event_bytes(0))
        ring.put(b"x" * 13, discard=True)
        ring.put(event_bytes(2))
        batch = reader.read_batch()
        assert as_events([event_bytes(0), event_bytes(2)]).tobytes() == batch.tobytes()
        assert (1, 0) == (reader.discarded, reader.decode_errors)

    def test_busy_record_stops_the_batch(self, ring: SynthRing, reader: RingReader) -> None:
        """Records after one still being written wait until it is committed."""
        ring.put(event_bytes(0))
        busy_pos = ring.put(event_bytes(1), busy=True)
        ring.put(event_bytes(2))
        first = reader.read_batch()
        assert as_events([event_bytes(0)]).tobytes() == first.tobytes()
        assert busy_pos == ring.consumer_pos()
        assert 0 == len(reader.read_batch())
        ring.commit(busy_pos)
        second = reader.read_batch()
        assert as_events([event_bytes(1), event_bytes(2)]).tobytes() == second.tobytes()
        assert ring.prod == ring.consumer_pos()

    def test_busy_first_record_reads_nothing(self, ring: SynthRing, reader: RingReader) -> None:
        """A busy record at the consumer position yields nothing and moves nothing."""
        ring.put(event_bytes(0), busy=True)
        assert 0 == len(reader.read_batch())
        assert (0, 0) == (ring.consumer_pos(), reader.batches)

    @pytest.mark.parametrize(
        "start",
        [
            DATA_SIZE - RECORD_STRIDE,  # the first record ends exactly at the end
            DATA_SIZE - 8,  # only the header fits before the end
            DATA_SIZE - 40,  # the payload is split across the end
            5 * DATA_SIZE - 16,  # positions far past one lap
        ],
    )
    def test_records_wrapping_past_the_end(self, start: int) -> None:
        """Records that run past the end of the data area are read whole."""
        ring = SynthRing(start=start)
        try:
            payloads = [event_bytes(i) for i in range(10)]
            for p in payloads:
                ring.put(p)
            with RingReader(ring.fd, ring.data_size) as reader:
                batch = reader.read_batch()
            assert as_events(payloads).tobytes() == batch.tobytes()
            assert start + 10 * RECORD_STRIDE == ring.consumer_pos()
        finally:
            ring.close()

    @pytest.mark.parametrize("bad_len", [0, 1, 60, 63, 65, 72, 200])
    def test_wrong_length_is_a_counted_decode_error(
        self, ring: SynthRing, reader: RingReader, bad_len: int
    ) -> None:
        """A record that is not one event long is skipped and counted; the rest is read."""
        ring.put(event_bytes(0))
        ring.put(b"\x01" * bad_len)
        ring.put(event_bytes(2))
        ring.put(event_bytes(3))
        batch = reader.read_batch()
        expected = [event_bytes(0), event_bytes(2), event_bytes(3)]
        assert as_events(expected).tobytes() == batch.tobytes()
        assert (1, 0) == (reader.decode_errors, reader.discarded)
        assert ring.prod == ring.consumer_pos()

    @pytest.mark.parametrize(("max_records", "first"), [(0, 0), (1, 1), (3, 3), (7, 7), (100, 7)])
    def test_max_records_respected(
        self, ring: SynthRing, reader: RingReader, max_records: int, first: int
    ) -> None:
        """No more than max_records events come back; the rest stay for the next call."""
        payloads = [event_bytes(i) for i in range(7)]
        for p in payloads:
            ring.put(p)
        batch = reader.read_batch(max_records)
        assert as_events(payloads[:first]).tobytes() == batch.tobytes()
        assert first * RECORD_STRIDE == ring.consumer_pos()
        rest = reader.read_batch()
        assert as_events(payloads[first:]).tobytes() == rest.tobytes()

    @pytest.mark.parametrize("n", [1, 2, 50])
    def test_batches_are_private_writable_copies(
        self, ring: SynthRing, reader: RingReader, n: int
    ) -> None:
        """A batch is a writable copy: changing it leaves the ring untouched."""
        payloads = [event_bytes(i) for i in range(n)]
        for p in payloads:
            ring.put(p)
        batch = reader.read_batch()
        batch["pid"] = 1
        ring.set_consumer(0)
        again = reader.read_batch()
        assert as_events(payloads).tobytes() == again.tobytes()

    def test_consumer_position_advanced_exactly(self, ring: SynthRing, reader: RingReader) -> None:
        """The consumer position ends exactly at the producer position, padding included."""
        ring.put(event_bytes(0))
        ring.put(b"abc")  # 3 bytes: stride 16
        ring.put(event_bytes(1), discard=True)
        ring.put(event_bytes(2))
        reader.read_batch()
        assert 72 + 16 + 72 + 72 == ring.consumer_pos() == reader.bytes_read

    def test_reader_resumes_from_the_kernel_consumer_position(self, ring: SynthRing) -> None:
        """A new reader starts where the previous consumer left off."""
        for i in range(4):
            ring.put(event_bytes(i))
        ring.set_consumer(2 * RECORD_STRIDE)
        with RingReader(ring.fd, ring.data_size) as reader:
            batch = reader.read_batch()
        assert as_events([event_bytes(2), event_bytes(3)]).tobytes() == batch.tobytes()

    def test_batches_interleaved_with_production(self, ring: SynthRing, reader: RingReader) -> None:
        """Laps of write-then-read around the ring lose and repeat nothing."""
        seen: list[bytes] = []
        sent: list[bytes] = []
        for lap in range(12):
            for i in range(37):
                p = event_bytes(lap * 100 + i)
                ring.put(p)
                sent.append(p)
            seen.append(reader.read_batch().tobytes())
        assert b"".join(sent) == b"".join(seen)
        assert (12 * 37, 12) == (reader.records_read, reader.batches)


class TestRingReaderLifetime:
    def test_data_size_must_be_power_of_two_pages(self, ring: SynthRing) -> None:
        """A data size that is not a power-of-two multiple of the page is refused."""
        for bad in (0, 3 * PAGE, PAGE + 8, PAGE // 2):
            with pytest.raises(RingBufferError):
                RingReader(ring.fd, bad)

    def test_size_query_refuses_non_bpf_fd(self, ring: SynthRing) -> None:
        """Asking the kernel for a ring size on a non-BPF fd is a RingBufferError."""
        with pytest.raises(RingBufferError, match="not a BPF map"):
            ringbuf_data_size(ring.fd)

    def test_wait_on_unpollable_fd_is_a_ring_buffer_error(
        self, ring: SynthRing, reader: RingReader
    ) -> None:
        """wait() on an fd epoll refuses (a memfd here) raises RingBufferError, and
        fileno() is the map fd the reader was given."""
        ring.put(event_bytes(0))
        with pytest.raises(RingBufferError, match="cannot poll"):
            reader.wait(0)
        assert ring.fd == reader.fileno()

    def test_close_is_idempotent_and_batches_outlive_it(self, ring: SynthRing) -> None:
        """Batches are copies: they stay valid after close(); close() twice is fine."""
        ring.put(event_bytes(9))
        reader = RingReader(ring.fd, ring.data_size)
        batch = reader.read_batch()
        reader.close()
        reader.close()
        assert as_events([event_bytes(9)]).tobytes() == batch.tobytes()


_record = st.one_of(
    st.tuples(st.just("event"), st.integers(0, 10_000)),
    st.tuples(st.just("discard"), st.integers(0, 100)),
    st.tuples(st.just("bad"), st.integers(0, 100).filter(lambda n: n != EVENT_SIZE)),
)


class TestRingReaderRoundTrip:
    @settings(max_examples=60, deadline=None)
    @given(
        start=st.integers(0, 4 * DATA_SIZE).map(lambda n: n & ~7),
        laps=st.lists(
            st.tuples(st.lists(_record, max_size=40), st.one_of(st.none(), st.integers(1, 50))),
            max_size=6,
        ),
    )
    def test_random_sequences_round_trip(
        self, start: int, laps: list[tuple[list[tuple[str, int]], int | None]]
    ) -> None:
        """Any sequence of events, discards and bad records, read in batches of any
        size from any start position, gives back exactly the events, in order."""
        ring = SynthRing(start=start)
        try:
            reader = RingReader(ring.fd, ring.data_size)
            sent: list[bytes] = []
            got: list[bytes] = []
            n_discard = n_bad = 0
            for records, max_records in laps:
                for kind, n in records:
                    if ring.room() < 2 * RECORD_STRIDE:  # full: the consumer catches up
                        got.append(reader.read_batch().tobytes())
                    if kind == "event":
                        sent.append(event_bytes(n))
                        ring.put(sent[-1])
                    elif kind == "discard":
                        n_discard += 1
                        ring.put(b"d" * (n if n % 2 else EVENT_SIZE), discard=True)
                    else:
                        n_bad += 1
                        ring.put(b"b" * n)
                batch = reader.read_batch(max_records)
                assert max_records is None or len(batch) <= max_records
                got.append(batch.tobytes())
            got.append(reader.read_batch().tobytes())
            assert b"".join(sent) == b"".join(got)
            assert (n_discard, n_bad, len(sent)) == (
                reader.discarded,
                reader.decode_errors,
                reader.records_read,
            )
            assert ring.prod == ring.consumer_pos()
            reader.close()
        finally:
            ring.close()


class TestMemoryOrder:
    @pytest.mark.parametrize("machine", ["aarch64", "ppc64le", "riscv64", "armv7l"])
    def test_weakly_ordered_machines_are_refused(self, machine: str) -> None:
        """Where loads may be reordered the reader refuses with one line, rather
        than decode half-written records as events."""
        from capwatch.errors import RingBufferError
        from capwatch.kernel.ringbuf import check_memory_order

        with pytest.raises(RingBufferError, match=f"only safe on x86.*this is {machine}"):
            check_memory_order(machine)

    def test_x86_64_is_accepted(self) -> None:
        from capwatch.kernel.ringbuf import check_memory_order

        check_memory_order("x86_64")
