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

from capwatch.diagnose.explain import Explanation, explain
from capwatch.pipeline import Check, facts_of

__all__ = ["DEFAULT_STATE_FILE", "RecentDenials", "read_recent"]

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
        return (rec.get("container"), rec.get("comm"), rec.get("cap"), rec.get("syscall"))

    # -- the pipeline sink ---------------------------------------------------

    def write(self, check: Check) -> None:
        if check.denied:
            self.add(check.to_dict(with_caps=True), check.count)

    def tick(self) -> None:
        self.flush()

    def close(self) -> None:
        self.flush(force=True)

    def add(self, rec: dict[str, Any], n: int = 1) -> None:
        key = self.key(rec)
        old = self._items.pop(key, None)
        if old is None:
            rec = {**rec, "count": n}
        else:
            # keep what the first sighting knew (the process's sets, read while it lived)
            rec = {**old, **{k: v for k, v in rec.items() if v is not None}}
            rec["count"] = old.get("count", 1) + n
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
            check = Check.from_dict(rec)
            count = int(rec.get("count", 1))
        except ValueError:
            continue  # a record from another version: skip it
        out.append(explain(facts_of(check, count=count)))
    return out
