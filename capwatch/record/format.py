"""The recording file: versioned, append-only, length-prefixed zlib frames. Pure.

    file   = MAGIC (6 bytes) version (u16 LE) frame*
    frame  = length (u32 LE) crc32 (u32 LE, of the payload) kind (u8) payload
    payload= zlib(body), each frame compressed on its own

A ``HOST`` frame (JSON: format, capwatch version, kernel release, attach mode,
boot time, the clock offset that turns ``ts_ns`` into wall time, the program's
configuration) opens every file. A ``DRAIN`` frame is one drain of the rings:

    body   = meta length (u32 LE) meta (JSON) records

``meta`` says how many 64-byte ``struct cw_event`` records of each ring follow
(``rings``), the workloads learnt or changed since the last frame (``w``), the
capability sets of denying processes read at their first denial (``s``), and,
about once a second, the kernel's exact counts and stats (``counts``,
``stats``). The records are the ring's bytes, unchanged: replay decodes them
with the same code as live.

A frame is written with one write(2) after it is complete, so a recording
stopped at any moment (kill -9, a full disk, a crash) is a run of whole frames
and at most one partial frame at its end: the reader replays the whole ones and
says how many bytes of the last were cut. A CRC that does not match a
complete frame is corruption, not a cut: that is an error.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any, BinaryIO

import numpy as np

from capwatch.attribution.containers import Workload
from capwatch.decode.events import EVENT_DTYPE, EVENT_SIZE, Batch
from capwatch.decode.procfs import ProcStatus
from capwatch.errors import RecordingError

__all__ = [
    "DRAIN",
    "FORMAT_VERSION",
    "HOST",
    "MAGIC",
    "Drain",
    "Frame",
    "FrameReader",
    "drain_body",
    "encode_drain",
    "encode_file_header",
    "encode_frame",
    "encode_host",
    "status_from_json",
    "status_to_json",
    "workload_from_json",
    "workload_to_json",
]

MAGIC = b"CWREC\0"
FORMAT_VERSION = 1
_FILE_HEADER = struct.Struct("<6sH")
_FRAME_HEADER = struct.Struct("<IIB")
_META_LEN = struct.Struct("<I")
HOST, DRAIN = 1, 2
_KINDS = (HOST, DRAIN)
#: No frame is larger: a drain of both rings (16 MiB + 1 MiB) fits with room.
MAX_FRAME = 64 << 20
_WORKLOAD_FIELDS = tuple(f.name for f in fields(Workload) if f.init)


def encode_file_header() -> bytes:
    return _FILE_HEADER.pack(MAGIC, FORMAT_VERSION)


def encode_frame(kind: int, body: bytes, *, level: int = 1) -> bytes:
    payload = zlib.compress(body, level)
    return _FRAME_HEADER.pack(len(payload), zlib.crc32(payload), kind) + payload


def encode_host(host: dict[str, Any]) -> bytes:
    return encode_frame(HOST, json.dumps(host, separators=(",", ":")).encode())


def drain_body(meta: dict[str, Any], rings: list[tuple[str, bytes]]) -> bytes:
    """One drain's body, before compression: ``rings`` are (ring name, that
    ring's raw records)."""
    meta = {**meta, "rings": [[name, len(data) // EVENT_SIZE] for name, data in rings]}
    mj = json.dumps(meta, separators=(",", ":")).encode()
    return b"".join([_META_LEN.pack(len(mj)), mj, *(d for _, d in rings)])


def encode_drain(meta: dict[str, Any], rings: list[tuple[str, bytes]]) -> bytes:
    """One drain as a whole frame."""
    return encode_frame(DRAIN, drain_body(meta, rings))


def workload_to_json(w: Workload) -> dict[str, Any]:
    return {k: getattr(w, k) for k in _WORKLOAD_FIELDS if getattr(w, k) not in ("", False, None)}


def workload_from_json(d: dict[str, Any]) -> Workload:
    return Workload(**{k: v for k, v in d.items() if k in _WORKLOAD_FIELDS})


def status_to_json(s: ProcStatus) -> dict[str, Any]:
    return {
        "pid": s.pid,
        "name": s.name,
        "uid": s.uid,
        "euid": s.euid,
        "caps": [s.cap_inh, s.cap_prm, s.cap_eff, s.cap_bnd, s.cap_amb],
        "nspid": list(s.nspid),
        "nnp": s.no_new_privs,
    }


def status_from_json(d: dict[str, Any]) -> ProcStatus:
    inh, prm, eff, bnd, amb = (int(x) for x in d["caps"])
    return ProcStatus(
        pid=int(d["pid"]),
        name=str(d["name"]),
        uid=int(d["uid"]),
        euid=int(d["euid"]),
        cap_inh=inh,
        cap_prm=prm,
        cap_eff=eff,
        cap_bnd=bnd,
        cap_amb=amb,
        nspid=tuple(int(x) for x in d.get("nspid", ())),
        no_new_privs=bool(d.get("nnp", False)),
    )


@dataclass(frozen=True)
class Frame:
    kind: int
    body: bytes
    offset: int  # where the frame starts in its file


@dataclass
class Drain:
    """A decoded DRAIN frame."""

    t_ns: int  # CLOCK_MONOTONIC of the recording host when the drain was written
    batches: list[tuple[str, Batch]]
    workloads: list[Workload] = field(default_factory=list)
    statuses: list[ProcStatus] = field(default_factory=list)
    counts: dict[tuple[int, int, bool], int] | None = None
    stats: dict[str, int] | None = None

    @classmethod
    def decode(cls, body: bytes) -> Drain:
        """Raises ValueError (with what is wrong) on a malformed body."""
        if len(body) < _META_LEN.size:
            raise ValueError("drain frame shorter than its meta length")
        (n,) = _META_LEN.unpack_from(body)
        try:
            meta = json.loads(body[_META_LEN.size : _META_LEN.size + n])
            pos = _META_LEN.size + n
            batches = []
            for name, count in meta["rings"]:
                size = int(count) * EVENT_SIZE
                if pos + size > len(body):
                    raise ValueError(f"ring {name!r} says {count} records, fewer follow")
                batches.append(
                    (
                        str(name),
                        np.frombuffer(body, dtype=EVENT_DTYPE, count=int(count), offset=pos),
                    )
                )
                pos += size
            if pos != len(body):
                raise ValueError(f"{len(body) - pos} bytes after the records")
            counts = meta.get("counts")
            return cls(
                t_ns=int(meta["t"]),
                batches=batches,
                workloads=[workload_from_json(w) for w in meta.get("w", ())],
                statuses=[status_from_json(s) for s in meta.get("s", ())],
                counts=None
                if counts is None
                else {(int(c), int(k), bool(d)): int(v) for c, k, d, v in counts},
                stats=None
                if meta.get("stats") is None
                else {str(k): int(v) for k, v in meta["stats"].items()},
            )
        except (KeyError, TypeError, ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"malformed drain frame: {exc}") from None


class FrameReader:
    """The frames of one file, in order. After iterating, :attr:`cut` is the
    number of bytes of a last frame that was cut short (0 if the file ends on
    a frame boundary). Anything else wrong raises RecordingError."""

    def __init__(self, f: BinaryIO, name: str) -> None:
        self.f = f
        self.name = name
        self.cut = 0
        self.cut_at = 0

    def __iter__(self) -> Iterator[Frame]:
        head = self.f.read(_FILE_HEADER.size)
        if len(head) < _FILE_HEADER.size:
            if MAGIC.startswith(head[: len(MAGIC)]) and head:
                self.cut, self.cut_at = len(head), 0
                return
            raise RecordingError(f"{self.name}: not a capwatch recording (too short)")
        magic, version = _FILE_HEADER.unpack(head)
        if magic != MAGIC:
            raise RecordingError(f"{self.name}: not a capwatch recording (bad magic)")
        if version != FORMAT_VERSION:
            raise RecordingError(
                f"{self.name}: recording format {version}; this capwatch reads {FORMAT_VERSION}"
            )
        offset = _FILE_HEADER.size
        while True:
            hdr = self.f.read(_FRAME_HEADER.size)
            if not hdr:
                return
            if len(hdr) < _FRAME_HEADER.size:
                self.cut, self.cut_at = len(hdr), offset
                return
            length, crc, kind = _FRAME_HEADER.unpack(hdr)
            if kind not in _KINDS or length > MAX_FRAME:
                raise RecordingError(f"{self.name}: corrupt frame header at byte {offset}")
            payload = self.f.read(length)
            if len(payload) < length:
                self.cut, self.cut_at = _FRAME_HEADER.size + len(payload), offset
                return
            if zlib.crc32(payload) != crc:
                raise RecordingError(f"{self.name}: corrupt frame at byte {offset} (CRC mismatch)")
            try:
                body = zlib.decompress(payload)
            except zlib.error as exc:
                raise RecordingError(
                    f"{self.name}: corrupt frame at byte {offset}: {exc}"
                ) from None
            yield Frame(kind, body, offset)
            offset += _FRAME_HEADER.size + length
