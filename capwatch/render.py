"""Events to what users read: records with names, a ≤100-column table, JSON lines."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO

from capwatch.caps import cap_name
from capwatch.events import Event
from capwatch.syscalls import syscall_name
from capwatch.text import visible, visible_all

__all__ = ["TABLE_HEADER", "Clock", "Identity", "JsonWriter", "TableWriter", "to_record"]

#: Workload identity of a cgroup: container, runtime, container_id,
#: container_name, pod, namespace (strings, "" when not applicable).
Identity = dict[str, str]


class Clock:
    """Turns bpf_ktime_get_ns() (CLOCK_MONOTONIC) into wall-clock time."""

    def __init__(self) -> None:
        self.offset_ns = time.time_ns() - time.monotonic_ns()

    def wall(self, ts_ns: int) -> datetime:
        return datetime.fromtimestamp((ts_ns + self.offset_ns) / 1e9, tz=UTC)


def to_record(ev: Event, clock: Clock, identity: Callable[[int], Identity]) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "time": clock.wall(ev.ts_ns).isoformat(timespec="microseconds"),
        "pid": ev.pid,
        "tid": ev.tid,
        "uid": ev.uid,
        "comm": ev.comm,
        "cgroup_id": ev.cgroup_id,
    }
    rec.update(identity(ev.cgroup_id))
    rec.update(
        {
            "capability": cap_name(ev.cap),
            "cap": ev.cap,
            "verdict": "denied" if ev.denied else "allowed",
            "syscall": syscall_name(ev.syscall_nr),
            "syscall_nr": ev.syscall_nr,
            "audit": None if ev.noaudit is None else not ev.noaudit,
            "insetid": ev.insetid,
            "userns": ev.in_userns,
            "suppressed": ev.suppressed,
        }
    )
    return rec


class JsonWriter:
    def __init__(self, out: TextIO) -> None:
        self.out = out

    def write(self, rec: dict[str, Any]) -> None:
        # comm and workload names are any bytes: valid UTF-8, no controls (capwatch.text).
        # ASCII JSON writes every control and non-ASCII character as a backslash
        # escape (DEL aside), so a line with neither needs no second pass (the
        # common case).
        line = json.dumps(rec, separators=(",", ":"))
        if "\\" in line or "\x7f" in line:
            line = json.dumps(visible_all(rec), separators=(",", ":"))
        self.out.write(line + "\n")
        self.out.flush()


TABLE_HEADER = (
    f"{'TIME':<8} {'PID':>7} {'COMM':<15} {'CONTAINER':<12} "
    f"{'CAPABILITY':<20} {'VERDICT':<7} {'SYSCALL':<14}"
)


class TableWriter:
    """Fixed columns, at most 100 characters a line."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.out.write(TABLE_HEADER.rstrip() + "\n")

    def write(self, rec: dict[str, Any]) -> None:
        t = rec["time"][11:19]
        line = (
            f"{t:<8} {rec['pid']:>7} {visible(rec['comm'])[:15]:<15} "
            f"{visible(rec['container'])[:12]:<12} "
            f"{rec['capability'][:20]:<20} {rec['verdict']:<7} {rec['syscall'][:14]:<14}"
        )
        if rec.get("suppressed"):
            line += f" +{rec['suppressed']}"
        self.out.write(line[:100].rstrip() + "\n")
        self.out.flush()
