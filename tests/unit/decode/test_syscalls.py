"""Syscall number decoding."""

from __future__ import annotations

import pytest

from capwatch.decode.syscalls import syscall_name, syscall_table


class TestSyscalls:
    @pytest.mark.parametrize(
        ("machine", "nr", "name"),
        [
            ("x86_64", 227, "clock_settime"),
            ("x86_64", 16, "ioctl"),
            ("x86_64", 105, "setuid"),
            ("x86_64", 164, "settimeofday"),
            ("aarch64", 112, "clock_settime"),
            ("aarch64", 29, "ioctl"),
            ("aarch64", 146, "setuid"),
            ("aarch64", 25, "fcntl"),
        ],
    )
    def test_known(self, machine: str, nr: int, name: str) -> None:
        """Numbers decode per architecture (x86_64 and arm64)."""
        assert name == syscall_name(nr, syscall_table(machine))

    def test_unknown_and_none(self) -> None:
        """Unknown numbers degrade to syscall:N; -1 (no syscall) is '-'."""
        assert "syscall:9999" == syscall_name(9999, syscall_table("x86_64"))
        assert "-" == syscall_name(-1)
        assert {} == syscall_table("sparc")
