"""Never-decreasing totals over kernel maps whose entries an LRU may evict.

The count and held maps are LRU hashes (bpf/capwatch.bpf.c): when full, an
insert evicts the least recently used entry instead of refusing new
workloads. An evicted entry's count would vanish, and a Prometheus counter
must never go down, so this keeps, per key, what was last read and adds it to
a base when the entry disappears (or comes back smaller: evicted and made
anew between two reads). What an entry gained between the last read and its
eviction is not known here; the kernel counts evictions (CW_STAT_*_NEW) and
the exporter publishes them, so such a gap is always visible.

A read the kernel reader marked inconsistent (``consistent=False``) can be
short, never long (capwatch/_bpf.py read_counts): a smaller value then is not
taken as an eviction, and the total stays where it was.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from typing import Generic, TypeVar

__all__ = ["Tally"]

K = TypeVar("K", bound=Hashable)


class Tally(Generic[K]):
    """Per-key totals that never decrease across evictions and short reads."""

    def __init__(self) -> None:
        self._last: dict[K, int] = {}  # the kernel's value at the last read taken
        self._base: dict[K, int] = {}  # what evicted incarnations of the key had
        self.evictions_seen = 0  # entries seen to vanish or restart between reads

    def update(self, current: Mapping[K, int], *, consistent: bool = True) -> dict[K, int]:
        """Take one read of the map; return the totals of every known key."""
        last, base = self._last, self._base
        for k, v in current.items():
            before = last.get(k)
            if before is None or v >= before:
                last[k] = v
            elif consistent:  # smaller in an exact read: evicted, then made anew
                base[k] = base.get(k, 0) + before
                last[k] = v
                self.evictions_seen += 1
        if consistent:
            for k in [k for k in last if k not in current]:
                base[k] = base.get(k, 0) + last.pop(k)
                self.evictions_seen += 1
        out = dict(base)
        for k, v in last.items():
            out[k] = out.get(k, 0) + v
        return out

    def forget(self, keys: Iterable[K]) -> None:
        """Keys whose entries user space deleted (a cgroup that is gone)."""
        for k in keys:
            self._last.pop(k, None)
            self._base.pop(k, None)
