"""Which label sets of a metric family get a series of their own.

Every labelled family has a cap on its series; past it, new label sets fold
into one overflow label set and are counted. First come is not first served:
a label set with priority (a Kubernetes pod's) takes the slot of one without
(a host or user cgroup's), never the reverse, so a tenant that makes many
cgroups on the node cannot push real pods into the overflow.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Mapping
from typing import Generic, TypeVar

__all__ = ["Admission"]

K = TypeVar("K", bound=Hashable)


class Admission(Generic[K]):
    """At most ``limit`` admitted label sets; the rest fold with ``fold``."""

    def __init__(self, limit: int, fold: Callable[[K], K], priority: Callable[[K], bool]) -> None:
        self.limit = limit
        self.fold = fold
        self.priority = priority
        self.admitted: set[K] = set()
        self._low: dict[K, None] = {}  # admitted without priority, oldest first
        self._folded: set[K] = set()
        self.folded_total = 0  # distinct label sets ever folded (or evicted)

    def _fold_once(self, key: K) -> None:
        if key not in self._folded:
            self._folded.add(key)
            self.folded_total += 1

    def _admit(self, key: K) -> None:
        self.admitted.add(key)
        if not self.priority(key):
            self._low[key] = None

    def apply(self, counts: Mapping[K, int]) -> dict[K, int]:
        """``counts`` with every label set not admitted folded into its overflow."""
        gone = self.admitted - counts.keys()  # label sets with no live series free their slot
        self.admitted -= gone
        for key in gone:
            self._low.pop(key, None)
        new = [k for k in counts if k not in self.admitted]
        new.sort(key=lambda k: not self.priority(k))  # priority first, else stable
        for key in new:
            if len(self.admitted) < self.limit:
                self._admit(key)
            elif self.priority(key) and self._low:
                victim = next(iter(self._low))  # the oldest low-priority series
                del self._low[victim]
                self.admitted.discard(victim)
                self._fold_once(victim)
                self._admit(key)
            else:
                self._fold_once(key)
        out: Counter[K] = Counter()
        for key, n in counts.items():
            out[key if key in self.admitted else self.fold(key)] += n
        return dict(out)
