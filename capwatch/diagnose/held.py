"""Denials the kernel counted but did not send, classified by their own syscall.

The kernel sends a bounded number of denials per (cgroup, capability,
syscall) and per cgroup to the ring; the rest are counted exactly in its held
map by (cgroup, capability, syscall) (bpf/capwatch.bpf.c, hold). Each held
count is classified here with the expected-denials policy from what it has:
capability, syscall and workload. It never borrows another denial's class.

comm is not in the kernel's key (one more field an attacker could churn), so
a held count whose first matching rule has a comm condition cannot be
classified: it is counted as unclassified (capwatch_denials_unclassified_total,
which an alert watches), never as expected.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping

from capwatch.decode.syscalls import syscall_name
from capwatch.diagnose.policy import NEEDS_COMM, Policy

__all__ = ["EXPECTED", "UNCLASSIFIED", "UNEXPECTED", "classify_held"]

EXPECTED, UNEXPECTED, UNCLASSIFIED = "true", "false", "unclassified"
HeldKey = tuple[int, int, int]  # cgroup id, capability, syscall nr
Labels = tuple[str, str, str, str]  # namespace, pod, container, runtime


def classify_held(
    held: Mapping[HeldKey, int],
    labels_of: Callable[[int], Labels],
    policy: Policy,
) -> Counter[tuple[int, int, str]]:
    """Totals by (cgroup id, capability, verdict), verdict one of EXPECTED,
    UNEXPECTED, UNCLASSIFIED."""
    out: Counter[tuple[int, int, str]] = Counter()
    verdicts: dict[tuple[int, int, Labels], str] = {}
    for (cg, cap, nr), n in held.items():
        if not n:
            continue
        wl = labels_of(cg)
        vkey = (cap, nr, wl)
        verdict = verdicts.get(vkey)
        if verdict is None:
            ns, pod, container, _ = wl
            rule = policy.classify_without_comm(
                cap=cap, syscall=syscall_name(nr), container=container, pod=pod, namespace=ns
            )
            if rule is NEEDS_COMM:
                verdict = UNCLASSIFIED
            else:
                verdict = EXPECTED if rule is not None else UNEXPECTED
            verdicts[vkey] = verdict
        out[(cg, cap, verdict)] += n
    return out
