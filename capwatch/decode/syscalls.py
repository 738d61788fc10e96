"""Syscall number -> name, for the architecture the events came from.

Unknown numbers decode as ``syscall:N``; -1 (not in a syscall, e.g. a kernel
thread) as ``-``.
"""

from __future__ import annotations

import platform

from capwatch.decode._syscall_tables import ARM64, X86_64

__all__ = ["syscall_name", "syscall_table"]

_TABLES = {"x86_64": X86_64, "aarch64": ARM64, "arm64": ARM64}


def syscall_table(machine: str | None = None) -> dict[int, str]:
    """The table for ``machine`` (uname -m); the host's by default; empty if unknown."""
    return _TABLES.get(machine or platform.machine(), {})


_HOST = syscall_table()


def syscall_name(nr: int, table: dict[int, str] | None = None) -> str:
    if nr < 0:
        return "-"
    name = (table if table is not None else _HOST).get(nr)
    return name if name is not None else f"syscall:{nr}"
