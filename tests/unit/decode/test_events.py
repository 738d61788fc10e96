"""The event record: C header and Python mirror agree; decoding."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from capwatch.decode.events import (
    EVENT_DTYPE,
    EVENT_SIZE,
    EVENT_STRUCT,
    decode_record,
    events_from_batch,
)
from tests.helpers import REPO

FIELDS = [
    "ts_ns",
    "cgroup_id",
    "pid",
    "tid",
    "uid",
    "cap",
    "syscall_nr",
    "ret",
    "flags",
    "suppressed",
    "comm",
]


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to read the header's layout")
    d = tmp_path_factory.mktemp("layout")
    prog = d / "layout.c"
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <linux/types.h>",
        '#include "capwatch.h"',
        "int main(void) {",
        'printf("size %zu\\n", sizeof(struct cw_event));',
    ]
    lines += [f'printf("{f} %zu\\n", offsetof(struct cw_event, {f}));' for f in FIELDS]
    lines += ["return 0; }"]
    prog.write_text("\n".join(lines))
    subprocess.run([cc, f"-I{REPO / 'bpf'}", "-o", str(d / "layout"), str(prog)], check=True)
    out = subprocess.run([str(d / "layout")], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


class TestLayout:
    def test_size_matches_header(self, c_layout: dict[str, int]) -> None:
        """sizeof(struct cw_event) in C equals the numpy dtype's and struct's size."""
        assert c_layout["size"] == EVENT_DTYPE.itemsize == EVENT_SIZE == EVENT_STRUCT.size

    def test_offsets_match_header(self, c_layout: dict[str, int]) -> None:
        """Every field sits at the same offset in C and in the numpy mirror."""
        expected = {f: c_layout[f] for f in FIELDS}
        actual = {f: EVENT_DTYPE.fields[f][1] for f in FIELDS}
        assert expected == actual


def _pack(**kw: object) -> bytes:
    base: dict[str, object] = {
        "ts_ns": 1,
        "cgroup_id": 2,
        "pid": 3,
        "tid": 4,
        "uid": 0,
        "cap": 25,
        "syscall_nr": 227,
        "ret": -1,
        "flags": 1,
        "suppressed": 0,
        "comm": b"date",
    }
    base.update(kw)
    return EVENT_STRUCT.pack(*(base[f] for f in FIELDS))


class TestDecode:
    def test_decode_denial(self) -> None:
        """A packed denial decodes with its flags and comm trimmed at NUL."""
        ev = decode_record(_pack())
        assert (3, 25, 227, True, "date") == (ev.pid, ev.cap, ev.syscall_nr, ev.denied, ev.comm)
        assert ev.noaudit is None  # the raw tracepoint does not expose opts
        assert ev.in_userns is None

    def test_flags(self) -> None:
        """opts-derived flags mean something only with OPTS_KNOWN; userns only when known."""
        ev = decode_record(_pack(flags=0x08 | 0x02 | 0x10 | 0x20))
        assert (False, True, False, True) == (ev.denied, ev.noaudit, ev.insetid, ev.in_userns)

    def test_wrong_size_raises_valueerror(self) -> None:
        """A record of the wrong size is a ValueError, not a struct.error."""
        with pytest.raises(ValueError, match="expected 64"):
            decode_record(b"\0" * 63)

    def test_non_utf8_comm_degrades(self) -> None:
        """A comm with invalid UTF-8 keeps its bytes (surrogateescape) for the sinks to escape."""
        assert b"a\xff" == decode_record(_pack(comm=b"a\xff")).comm.encode(
            "utf-8", "surrogateescape"
        )

    @given(
        st.integers(0, 2**64 - 1),
        st.integers(0, 2**64 - 1),
        st.integers(0, 2**32 - 1),
        st.integers(-(2**31), 2**31 - 1),
        st.integers(0, 2**32 - 1),
        st.binary(max_size=15).filter(lambda b: b"\0" not in b),
    )
    def test_batch_equals_single(
        self, ts: int, cg: int, pid: int, cap: int, flags: int, comm: bytes
    ) -> None:
        """numpy batch decoding and single-record decoding give the same Event."""
        raw = _pack(ts_ns=ts, cgroup_id=cg, pid=pid, cap=cap, flags=flags, comm=comm)
        batch = np.frombuffer(raw * 3, dtype=EVENT_DTYPE)
        assert [decode_record(raw)] * 3 == events_from_batch(batch)


class TestConstants:
    def test_flags_and_stats_match_header(self) -> None:
        """F_* flags and the stats slot names agree with capwatch.h's #defines."""
        import re

        from capwatch.decode import events
        from capwatch.kernel.bpf import STAT_NAMES

        text = (REPO / "bpf" / "capwatch.h").read_text()
        defs = {k: int(v, 0) for k, v in re.findall(r"#define (CW_\w+)\s+(0x[0-9a-f]+|\d+)", text)}
        flags = {k[5:]: v for k, v in defs.items() if k.startswith("CW_F_")}
        assert flags == {
            name[2:]: getattr(events, name) for name in dir(events) if name.startswith("F_")
        }
        stats = {
            k[8:].lower(): v
            for k, v in defs.items()
            if k.startswith("CW_STAT_") and k != "CW_STAT_NR"
        }
        assert stats == {name: i for i, name in enumerate(STAT_NAMES)}
