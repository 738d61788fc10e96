"""bcc's reading of the count maps: the ctypes types bcc builds from the BPF
source (what LoadedProgram.read_counts reads through) match the C layout.

bcc derives them from clang's view of the program, and has got array sizes in
map values wrong before (0.26 halves 2-D arrays: why cw_cache.n is flat)."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from capwatch.kernel.bpf import COUNT_KEY_DTYPE, ProgramConfig, bpf_source_dir, build_cflags
from capwatch.kernel.headers import find_headers
from tests.helpers import c_header_values, require_root

pytestmark = [pytest.mark.kernel]


@pytest.fixture(scope="module")
def bpf() -> Iterator[Any]:
    """The program compiled and its maps created by bcc, nothing attached."""
    require_root()
    bcc = pytest.importorskip("bcc")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in find_headers().env.items():
            mp.setenv(k, v)
        cflags = build_cflags(ProgramConfig(), "raw_tracepoint", no_autoattach=True)
        b = bcc.BPF(src_file=str(bpf_source_dir() / "capwatch.bpf.c").encode(), cflags=cflags)
    try:
        yield b
    finally:
        b.cleanup()


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    exprs = {
        "key.size": "sizeof(struct cw_count_key)",
        "cache.size": "sizeof(struct cw_cache)",
        "cache.n.count": "sizeof(c.n) / sizeof(c.n[0])",
    }
    for f in ("cgroup_id", "cap", "denied"):
        exprs[f"key.{f}"] = f"offsetof(struct cw_count_key, {f})"
    for f in ("seq_head", "cgroup_id", "n", "seq_tail"):
        exprs[f"cache.{f}"] = f"offsetof(struct cw_cache, {f})"
    tmp: Path = tmp_path_factory.mktemp("layout")
    return c_header_values(tmp, exprs, decls="struct cw_cache c; (void)c;")


def _offsets(t: Any, fields: tuple[str, ...]) -> dict[str, int]:
    return {f: getattr(t, f).offset for f in fields}


def test_count_key_as_bcc_reads_it(bpf: Any, c_layout: dict[str, int]) -> None:
    """The count map's key type: C's size and offsets, the numpy mirror's too."""
    key = bpf[b"counts"].Key
    fields = ("cgroup_id", "cap", "denied")
    assert c_layout["key.size"] == ctypes.sizeof(key) == COUNT_KEY_DTYPE.itemsize
    assert {f: c_layout[f"key.{f}"] for f in fields} == _offsets(key, fields)
    assert _offsets(key, fields) == {f: COUNT_KEY_DTYPE.fields[f][1] for f in fields}


def test_count_cache_as_bcc_reads_it(bpf: Any, c_layout: dict[str, int]) -> None:
    """The per-CPU cache's value type, as read_counts gets it (one value per CPU):
    C's size, offsets and number of counters."""
    leaf = type(bpf[b"count_cache"][ctypes.c_int(0)][0])
    fields = ("seq_head", "cgroup_id", "n", "seq_tail")
    assert c_layout["cache.size"] == ctypes.sizeof(leaf)
    assert {f: c_layout[f"cache.{f}"] for f in fields} == _offsets(leaf, fields)
    assert c_layout["cache.n.count"] == len(leaf().n)
