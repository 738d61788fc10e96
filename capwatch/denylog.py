"""The denial log: structlog lines for capability denials, bounded per interval.

For each interval (``interval`` seconds, aligned to the clock, 60 by default):

* the first denial of each key -- (expected, namespace, pod, container, comm,
  capability, syscall) -- gets one ``denial`` line with its details;
* when the interval ends, each key seen gets one ``denial summary`` line with
  the exact number of denials (events plus the kernel's ``suppressed`` counts);
* keys beyond ``max_keys_per_workload`` for one workload, or beyond ``max_keys``
  in all, are not logged one by one: they are counted into one
  ``denials over key cap`` line ("and N more") per workload or overall.

Expected and unexpected denials have separate budgets, so a flood of known
probes cannot push an unexpected denial out of the log. A process denied a
million times writes two lines per interval; the counts stay exact.

JSON lines (stdlib ``json``: lines are few, so a faster encoder buys nothing,
see bench/bench_denylog.py), or structlog's console renderer when the output is
a terminal. The structlog pipeline is built per instance with
``structlog.wrap_logger``; nothing global is configured.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal, TextIO

import structlog

from capwatch.text import visible_fields

__all__ = ["Denial", "DenialLog"]

_MAX_OVERFLOW_KEYS: Final = 100_000  # distinct keys remembered per overflow bucket

Format = Literal["auto", "json", "console"]
_Key = tuple[bool, str, str, str, str, str, str]
_Workload = tuple[bool, str, str, str]


@dataclass(frozen=True, slots=True, kw_only=True)
class Denial:
    """One denial as the consumer decoded and attributed it."""

    time: float  # wall-clock seconds since the epoch when the kernel saw it
    node: str
    namespace: str  # "" for the host
    pod: str  # "" for the host
    container: str  # "host", a container name, or "cgroup:<id>"
    runtime: str
    comm: str
    pid: int
    uid: int
    capability: str  # CAP_SYS_TIME (capwatch.caps.cap_name)
    syscall: str
    expected: bool
    rule: str | None = None  # the policy rule that made it expected
    verdict: str = "denied"
    suppressed: int = 0  # denials of this key the kernel rate-limited since its last event

    @property
    def count(self) -> int:
        """How many denials this event stands for."""
        return 1 + self.suppressed


@dataclass(slots=True)
class _KeyStats:
    sample: Denial  # the first denial of the key in the interval
    count: int
    events: int
    suppressed: int
    last_time: float
    last_pid: int


@dataclass(slots=True)
class _Overflow:
    keys: set[_Key] = field(default_factory=set)
    keys_unremembered: int = 0  # distinct keys past _MAX_OVERFLOW_KEYS (upper bound)
    count: int = 0
    events: int = 0
    by_capability: Counter[str] = field(default_factory=Counter)


class DenialLog:
    """Receives denials with :meth:`record`; call :meth:`tick` periodically (a
    second or so) so summaries come out when denials stop, and :meth:`close`
    at exit to write the current interval's summaries."""

    def __init__(
        self,
        out: TextIO | None = None,
        *,
        interval: float = 60.0,
        max_keys: int = 1000,
        max_keys_per_workload: int = 50,
        fmt: Format = "auto",
        log_expected: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        if max_keys < 1 or max_keys_per_workload < 1:
            raise ValueError("key caps must be at least 1")
        stream = out if out is not None else sys.stdout
        if fmt == "auto":
            isatty = getattr(stream, "isatty", None)
            fmt = "console" if isatty is not None and isatty() else "json"
        self._log = _make_logger(stream, fmt)
        self.interval = interval
        self.max_keys = max_keys
        self.max_keys_per_workload = max_keys_per_workload
        self.log_expected = log_expected
        self._clock = clock
        self._window_start: float | None = None
        self._window_end = 0.0
        self._keys: dict[_Key, _KeyStats] = {}
        self._class_keys = [0, 0]  # distinct keys logged, indexed by expected
        self._per_workload: Counter[_Workload] = Counter()
        self._overflow: dict[tuple[bool, _Workload | None], _Overflow] = {}

    # -- the event path ------------------------------------------------------

    def record(self, d: Denial) -> None:
        """Account one denial; writes a line only for a key new in this interval."""
        if d.expected and not self.log_expected:
            return
        now = self._clock()
        if self._window_start is None or now >= self._window_end:
            if self._window_start is not None:
                self._close_window(self._window_end)
            self._window_start = now - now % self.interval
            self._window_end = self._window_start + self.interval
        key: _Key = (d.expected, d.namespace, d.pod, d.container, d.comm, d.capability, d.syscall)
        st = self._keys.get(key)
        if st is not None:
            st.count += 1 + d.suppressed
            st.events += 1
            st.suppressed += d.suppressed
            st.last_time = d.time
            st.last_pid = d.pid
            return
        workload: _Workload = (d.expected, d.namespace, d.pod, d.container)
        if self._per_workload[workload] >= self.max_keys_per_workload:
            self._spill((d.expected, workload), key, d)
            return
        if self._class_keys[d.expected] >= self.max_keys:
            self._spill((d.expected, None), key, d)
            return
        self._per_workload[workload] += 1
        self._class_keys[d.expected] += 1
        self._keys[key] = _KeyStats(d, 1 + d.suppressed, 1, d.suppressed, d.time, d.pid)
        self._emit(d.expected, "denial", _details(d))

    def tick(self) -> None:
        """Write the summaries of an interval that has ended (cheap when none has)."""
        if self._window_start is not None and self._clock() >= self._window_end:
            self._close_window(self._window_end)

    def close(self) -> None:
        """Write the summaries of the current interval now."""
        if self._window_start is not None:
            self._close_window(min(self._clock(), self._window_end))

    # -- machinery -----------------------------------------------------------

    def _spill(self, bucket_key: tuple[bool, _Workload | None], key: _Key, d: Denial) -> None:
        bucket = self._overflow.get(bucket_key)
        if bucket is None:
            bucket = self._overflow[bucket_key] = _Overflow()
        if key not in bucket.keys:
            if len(bucket.keys) < _MAX_OVERFLOW_KEYS:
                bucket.keys.add(key)
            else:
                bucket.keys_unremembered += 1
        bucket.count += 1 + d.suppressed
        bucket.events += 1
        bucket.by_capability[d.capability] += 1 + d.suppressed

    def _close_window(self, end: float) -> None:
        assert self._window_start is not None
        start = _iso(self._window_start)
        until = _iso(end)
        for st in self._keys.values():
            d = st.sample
            self._emit(
                d.expected,
                "denial summary",
                {
                    "time": until,
                    "node": d.node,
                    "namespace": d.namespace,
                    "pod": d.pod,
                    "container": d.container,
                    "runtime": d.runtime,
                    "comm": d.comm,
                    "capability": d.capability,
                    "syscall": d.syscall,
                    "expected": d.expected,
                    "rule": d.rule,
                    "count": st.count,
                    "events": st.events,
                    "suppressed": st.suppressed,
                    "first_seen": _iso(d.time),
                    "last_seen": _iso(st.last_time),
                    "last_pid": st.last_pid,
                    "interval_start": start,
                    "interval_end": until,
                },
            )
        for (expected, workload), bucket in self._overflow.items():
            more = len(bucket.keys) + bucket.keys_unremembered
            fields: dict[str, Any] = {"time": until}
            if workload is not None:
                fields.update(namespace=workload[1], pod=workload[2], container=workload[3])
                cap = f"per-workload cap of {self.max_keys_per_workload}"
            else:
                cap = f"cap of {self.max_keys}"
            fields.update(
                expected=expected,
                more_keys=more,
                more_keys_exact=bucket.keys_unremembered == 0,
                count=bucket.count,
                events=bucket.events,
                by_capability=dict(bucket.by_capability.most_common()),
                message=f"and {more} more denial keys over the {cap}",
                interval_start=start,
                interval_end=until,
            )
            self._emit(expected, "denials over key cap", fields)
        self._keys = {}
        self._class_keys = [0, 0]
        self._per_workload.clear()
        self._overflow = {}
        self._window_start = None

    def _emit(self, expected: bool, event: str, fields: dict[str, Any]) -> None:
        if expected:
            self._log.info(event, **fields)
        else:
            self._log.warning(event, **fields)


def _details(d: Denial) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "time": _iso(d.time),
        "node": d.node,
        "namespace": d.namespace,
        "pod": d.pod,
        "container": d.container,
        "runtime": d.runtime,
        "comm": d.comm,
        "pid": d.pid,
        "uid": d.uid,
        "capability": d.capability,
        "syscall": d.syscall,
        "verdict": d.verdict,
        "expected": d.expected,
        "rule": d.rule,
    }
    if d.suppressed:
        fields["suppressed"] = d.suppressed
    return fields


def _iso(t: float) -> str:
    """RFC 3339 UTC with milliseconds: 2025-01-02T03:04:05.678Z."""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _lead_fields(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """time, level, event first: what a reader scans for."""
    head = {k: event_dict.pop(k) for k in ("time", "level", "event") if k in event_dict}
    head.update(event_dict)
    return head


def _dumps(obj: Any, **_kw: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, default=str)


def _make_logger(stream: TextIO, fmt: Format) -> Any:
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(
            colors=bool(getattr(stream, "isatty", lambda: False)()),
            timestamp_key="time",
            sort_keys=False,
        )
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_dumps)
    return structlog.wrap_logger(
        structlog.PrintLogger(stream),
        # visible_fields: comm and names are any bytes; lines stay valid UTF-8 and
        # carry no terminal control sequence, in JSON and on a console alike
        processors=[structlog.processors.add_log_level, _lead_fields, visible_fields, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        context_class=dict,
        cache_logger_on_first_use=True,
    )
