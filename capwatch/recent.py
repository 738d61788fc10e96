"""The most recent distinct denials, kept in a small state file for
`capwatch explain --last` (written by trace and serve; read by explain).

The file holds at most ``limit`` JSON records (the newest last), replaced
atomically at most once a second, so a denial flood costs one small write a
second. Each record carries what explain needs, the process's capability
sets read when the denial arrived included.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import OrderedDict
from typing import Any

from capwatch.explain import DenialFacts, Explanation, explain, fold
from capwatch.procfs import ProcStatus

__all__ = ["DEFAULT_STATE_FILE", "RecentDenials", "read_recent", "with_caps"]

DEFAULT_STATE_FILE = "/run/capwatch/recent.json"


class RecentDenials:
    def __init__(
        self, path: str = DEFAULT_STATE_FILE, *, limit: int = 100, min_interval: float = 1.0
    ) -> None:
        self.path = path
        self.limit = limit
        self.min_interval = min_interval
        self._items: OrderedDict[tuple[Any, ...], dict[str, Any]] = OrderedDict()
        self._dirty = False
        self._last_write = 0.0
        self.disabled = False

    @staticmethod
    def key(rec: dict[str, Any]) -> tuple[Any, ...]:
        # the outcome and role are part of the key: a cause followed by a success of
        # the same (comm, cap, syscall) stays a cause, beside the probe
        return (
            rec.get("container"),
            rec.get("comm"),
            rec.get("cap"),
            rec.get("syscall"),
            rec.get("outcome"),
            rec.get("role"),
        )

    def __contains__(self, rec: dict[str, Any]) -> bool:
        return self.key(rec) in self._items

    def add(self, rec: dict[str, Any]) -> None:
        key = self.key(rec)
        old = self._items.pop(key, None)
        if old is not None:
            # keep what the first sighting knew (the process's sets, read while it lived)
            rec = {**old, **rec, "count": old.get("count", 1) + 1}
        self._items[key] = rec
        while len(self._items) > self.limit:
            self._items.popitem(last=False)
        self._dirty = True

    def flush(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if (
            self.disabled
            or not self._dirty
            or (not force and now - self._last_write < self.min_interval)
        ):
            return
        self._last_write = now
        self._dirty = False
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(list(self._items.values()), f)
            os.replace(tmp, self.path)
        except OSError:
            self.disabled = True  # read-only or no room: explain --last just has less to say


def _status(rec: dict[str, Any]) -> ProcStatus | None:
    caps = rec.get("caps")
    if not isinstance(caps, dict):
        return None
    try:
        return ProcStatus(
            pid=int(rec["pid"]),
            name=str(rec.get("comm", "")),
            uid=int(rec.get("uid", 0)),
            euid=int(rec.get("uid", 0)),
            cap_inh=int(caps["CapInh"], 16),
            cap_prm=int(caps["CapPrm"], 16),
            cap_eff=int(caps["CapEff"], 16),
            cap_bnd=int(caps["CapBnd"], 16),
            cap_amb=int(caps["CapAmb"], 16),
        )
    except (KeyError, ValueError, TypeError):
        return None


def _kind(rec: dict[str, Any]) -> str:
    """The context the fixes are written for, as explain's live watch decides it."""
    if rec.get("pod"):
        return "kubernetes"
    return str(rec.get("runtime") or rec.get("kind") or "host")


def read_recent(path: str, n: int) -> list[Explanation]:
    """Explain the ``n`` most recent distinct denials recorded in ``path``."""
    items: list[dict[str, Any]] = []
    with contextlib.suppress(OSError, ValueError):
        with open(path, encoding="utf-8") as f:
            loaded = json.load(f)
        if isinstance(loaded, list):
            items = [x for x in loaded if isinstance(x, dict)]
    out = []
    for rec in items[-n:][::-1]:
        try:
            facts = DenialFacts(
                cap=int(rec["cap"]),
                syscall=str(rec.get("syscall", "?")),
                comm=str(rec.get("comm", "?")),
                pid=int(rec.get("pid", 0)),
                ret=rec.get("syscall_ret"),
                known_probe=rec.get("rule"),
                status=_status(rec),
                kind=_kind(rec),
                container=str(rec.get("container_name") or str(rec.get("container_id") or "")[:12]),
                container_id=str(rec.get("container_id") or ""),
                pod=str(rec.get("pod") or ""),
                namespace=str(rec.get("namespace") or ""),
                userns=rec.get("userns"),
                count=int(rec.get("count", 1)),
                exit_code=rec.get("exit_code"),
                uid=rec.get("uid"),
            )
        except (KeyError, ValueError, TypeError):
            continue  # a record from another version: skip it
        out.append(explain(facts))
    return fold(out)


def with_caps(rec: dict[str, Any], proc_root: str = "/proc") -> dict[str, Any]:
    """The record plus the process's capability sets, if it is still there."""
    from capwatch.errors import CapwatchError
    from capwatch.procfs import read_status

    try:
        st = read_status(int(rec["pid"]), proc_root=proc_root)
    except (CapwatchError, KeyError, ValueError):
        return rec
    return {**rec, "caps": {k: f"{v:016x}" for k, v in st.caps().items()}}
