"""kernel/proginfo: the layout it reads, checked against the host's uapi header."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from capwatch.kernel.proginfo import INFO_SIZE, RECURSION_MISSES_OFFSET, recursion_misses
from tests.helpers import c_header_values


def test_recursion_misses_offset_matches_uapi_header(tmp_path: Path) -> None:
    if not Path("/usr/include/linux/bpf.h").exists():
        pytest.skip("no /usr/include/linux/bpf.h (linux-libc-dev)")
    got = c_header_values(
        tmp_path,
        {
            "off": "offsetof(struct bpf_prog_info, recursion_misses)",
            "size": "sizeof(((struct bpf_prog_info *)0)->recursion_misses)",
        },
        includes=("linux/bpf.h",),
    )
    assert RECURSION_MISSES_OFFSET == got["off"]
    assert INFO_SIZE == got["off"] + got["size"]


def test_not_a_bpf_program_is_unknown(tmp_path: Path) -> None:
    """An fd that is no BPF program gives None (cannot tell), never a made-up 0."""
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        assert recursion_misses(fd) is None
    finally:
        os.close(fd)
