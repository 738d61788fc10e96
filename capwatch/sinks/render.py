"""Checks as users read them: JSON lines, or a ≤100-column table on a terminal.

With ``verdicts`` (trace --outcome with one target) each refused syscall also
carries what refused it, in explain's words: the record's ``refusal`` object,
or the lines under its row (verdict, evidence, fix).
"""

from __future__ import annotations

import json
import textwrap
from typing import TextIO

from capwatch.pipeline import Check, finding_fields
from capwatch.text import visible, visible_all

__all__ = ["TABLE_HEADER", "JsonWriter", "TableWriter", "finding_lines"]


class JsonWriter:
    """One JSON object a line (:meth:`capwatch.pipeline.Check.to_dict`)."""

    def __init__(self, out: TextIO, *, verdicts: bool = False) -> None:
        self.out = out
        self.verdicts = verdicts

    def write(self, check: Check) -> None:
        # comm and workload names are any bytes: valid UTF-8, no controls (capwatch.text).
        # ASCII JSON writes every control and non-ASCII character as a backslash
        # escape (DEL aside), so a line with neither needs no second pass (the
        # common case).
        rec = check.to_dict()
        if self.verdicts and "refusal" not in rec and (found := check.finding()) is not None:
            rec["refusal"] = finding_fields(found)
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

    def __init__(self, out: TextIO, *, verdicts: bool = False) -> None:
        self.out = out
        self.verdicts = verdicts
        self.out.write(TABLE_HEADER.rstrip() + "\n")

    def write(self, check: Check) -> None:
        t = check.iso_time()[11:19]
        line = (
            f"{t:<8} {check.pid:>7} {visible(check.comm)[:15]:<15} "
            f"{visible(check.container)[:12]:<12} "
            f"{(check.capability or '-')[:20]:<20} {check.verdict:<7} {check.syscall[:14]:<14}"
        )
        if check.suppressed:
            line += f" +{check.suppressed}"
        lines = [line[:100].rstrip()]
        found = check.finding() if self.verdicts else None
        if found is not None:
            lines += finding_lines(found.verdict, found.summary, found.details, found.fixes)
        self.out.write("\n".join(lines) + "\n")
        self.out.flush()

    def tick(self) -> None:
        pass

    def close(self) -> None:
        pass


def finding_lines(
    verdict: str, summary: str, details: list[str], fixes: list[dict[str, str]]
) -> list[str]:
    """The lines under a refused syscall's row: the verdict and summary, the
    evidence, the fixes; wrapped to 100 columns, each escaped (capwatch.text)."""
    out = [f"{verdict}: {summary}", *details]
    out += [f"fix: {f.get('context', '?')}: {f.get('fix', '')}" for f in fixes]
    wrapped: list[str] = []
    for text in out:
        wrapped += textwrap.wrap(
            visible(text), width=100, initial_indent="  ", subsequent_indent="      "
        )
    return wrapped
