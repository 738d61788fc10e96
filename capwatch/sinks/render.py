"""Checks as users read them: JSON lines, or a ≤100-column table on a terminal."""

from __future__ import annotations

import json
from typing import TextIO

from capwatch.pipeline import Check
from capwatch.text import visible, visible_all

__all__ = ["TABLE_HEADER", "JsonWriter", "TableWriter"]


class JsonWriter:
    """One JSON object a line (:meth:`capwatch.pipeline.Check.to_dict`)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def write(self, check: Check) -> None:
        # comm and workload names are any bytes: valid UTF-8, no controls (capwatch.text).
        # ASCII JSON writes every control and non-ASCII character as a backslash
        # escape (DEL aside), so a line with neither needs no second pass (the
        # common case).
        rec = check.to_dict()
        line = json.dumps(rec, separators=(",", ":"))
        if "\\" in line or "\x7f" in line:
            line = json.dumps(visible_all(rec), separators=(",", ":"))
        self.out.write(line + "\n")
        self.out.flush()

    def tick(self) -> None:
        pass

    def close(self) -> None:
        pass


TABLE_HEADER = (
    f"{'TIME':<8} {'PID':>7} {'COMM':<15} {'CONTAINER':<12} "
    f"{'CAPABILITY':<20} {'VERDICT':<7} {'SYSCALL':<14}"
)


class TableWriter:
    """Fixed columns, at most 100 characters a line."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.out.write(TABLE_HEADER.rstrip() + "\n")

    def write(self, check: Check) -> None:
        t = check.iso_time()[11:19]
        line = (
            f"{t:<8} {check.pid:>7} {visible(check.comm)[:15]:<15} "
            f"{visible(check.container)[:12]:<12} "
            f"{check.capability[:20]:<20} {check.verdict:<7} {check.syscall[:14]:<14}"
        )
        if check.suppressed:
            line += f" +{check.suppressed}"
        self.out.write(line[:100].rstrip() + "\n")
        self.out.flush()

    def tick(self) -> None:
        pass

    def close(self) -> None:
        pass
