"""Following the containers that a watched command starts, and waiting for one.

`explain -- podman run ...` runs podman in a cgroup of its own, but the
container runs in the cgroup its runtime makes for it, not under the
command's: the one denial the user cares about happens there. And
`explain --container NAME` may be started before the container is. These
are the decisions, pure (fed cgroup walks and names), for the wiring in
observe.py to use:

- :func:`started_runtime` / :func:`requested_name`: does the command start a
  container, with which runtime, under which name;
- :class:`ContainerFollower`: which new cgroups belong to it;
- :func:`tolerate_runtime`: the runtime's own refusals, tolerated when the
  command succeeded, are not causes;
- :func:`match_container` / :func:`wait_for`: find a container by name or id
  prefix, polling until it appears (``--wait``).
"""

from __future__ import annotations

import fnmatch
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from capwatch.attribution.containers import Workload
from capwatch.diagnose.explain import Explanation
from capwatch.diagnose.refusals import RUNTIME_SETUP_COMMS

__all__ = [
    "RUNTIME_SETUP_COMMS",
    "ContainerFollower",
    "Match",
    "match_container",
    "requested_name",
    "started_runtime",
    "tolerate_runtime",
    "wait_for",
]

_ENGINES = {"podman": "podman", "docker": "docker", "nerdctl": "containerd"}
_STARTS = frozenset({"run", "start", "create", "exec", "restart"})
_WRAPPERS = frozenset({"sudo", "env", "nice", "ionice", "setpriv", "timeout", "time"})
# options of `podman run`/`docker run` that take a separate value (the rest are flags
# or --opt=value); enough to find the subcommand and --name without a full parser
_TAKES_VALUE = frozenset(
    {
        "--runtime",
        "--root",
        "--runroot",
        "--log-level",
        "--cgroup-manager",
        "-H",
        "--host",
        "--context",
        "--config",
        "--namespace",
        "-n",
    }
)


def _strip_wrappers(argv: Sequence[str]) -> list[str]:
    args = list(argv)
    while args and (os.path.basename(args[0]) in _WRAPPERS or "=" in args[0]):
        args.pop(0)
        while args and args[0].startswith("-"):  # the wrapper's own options
            args.pop(0)
    return args


def started_runtime(argv: Sequence[str]) -> str | None:
    """'podman', 'docker' or 'containerd' when ``argv`` starts a container, else None."""
    args = _strip_wrappers(argv)
    if not args:
        return None
    engine = _ENGINES.get(os.path.basename(args[0]))
    if engine is None:
        return None
    i = 1
    while i < len(args):
        a = args[i]
        if a in _TAKES_VALUE:
            i += 2
            continue
        if a.startswith("-"):
            i += 1
            continue
        if a == "container" and i + 1 < len(args):  # docker container run ...
            i += 1
            continue
        return engine if a in _STARTS else None
    return None


def requested_name(argv: Sequence[str]) -> str | None:
    """The container name the command asks for (--name X / --name=X), if any."""
    args = list(argv)
    for i, a in enumerate(args):
        if a == "--name" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--name="):
            return a.split("=", 1)[1]
        if a == "--":
            break
    return None


@dataclass
class ContainerFollower:
    """Which new cgroups belong to the container(s) a command starts.

    ``known`` holds the cgroups that existed before the command ran: a container
    already running is not the command's. A new cgroup is followed when it is a
    container's (not its monitor's) of the command's runtime and, if the command
    named its container, of that name. ``names`` maps a container id to its name
    (the runtime's, looked up by the caller) and may return "" when not known yet:
    the decision is then deferred (:meth:`decide` returns None).
    """

    runtime: str
    name: str | None
    known: set[int] = field(default_factory=set)
    followed: dict[int, Workload] = field(default_factory=dict)
    rejected: set[int] = field(default_factory=set)

    def decide(self, cgroup_id: int, w: Workload, names: Callable[[str], str]) -> bool | None:
        if cgroup_id in self.followed:
            return True
        if cgroup_id in self.known or cgroup_id in self.rejected:
            return False
        if not w.container_id or w.monitor or w.runtime != self.runtime:
            self.rejected.add(cgroup_id)
            return False
        if self.name is not None:
            name = names(w.container_id)
            if not name:
                return None  # ask again when the name is known
            if name != self.name:
                self.rejected.add(cgroup_id)
                return False
        self.followed[cgroup_id] = w
        return True

    def scan(self, tree: Mapping[int, Workload], names: Callable[[str], str]) -> list[int]:
        """The cgroups of ``tree`` newly followed."""
        return [
            cg for cg, w in tree.items() if cg not in self.followed and self.decide(cg, w, names)
        ]


def tolerate_runtime(exps: list[Explanation], command_status: int) -> list[Explanation]:
    """Denials of the runtime's own processes, when the command succeeded (or the
    container it started ran: pass 0 then), are set-up
    refusals that it tolerated (podman raising RLIMIT_NOFILE without CAP_SYS_RESOURCE
    goes on with the limit it has): probes, nothing to grant. When the command failed
    they are *unknown*, not causes: the runtime may be why, or it failed for a reason
    of its own (an entrypoint not found) that its error message names."""
    for e in exps:
        comms = e.comm.split(",")
        if e.role == "probe" or not all(
            any(fnmatch.fnmatchcase(c, p) for p in RUNTIME_SETUP_COMMS) for c in comms
        ):
            continue
        if e.syscall in ("execve", "execveat") and e.comm.startswith("runc:"):
            continue  # runc's init exec is the workload's entrypoint
        if command_status != 0:
            e.role = "unknown"
            e.summary = (
                f"Container runtime set-up: {e.comm} was refused {e.capability} in "
                f"{e.syscall}. Runtimes usually go on without it; the command failed "
                f"(status {command_status}), which may or may not be why: its own error "
                "message says. Grant it only if that message names this refusal."
            )
            continue
        e.role = "probe"
        e.summary = (
            f"Container runtime set-up: {e.comm} was refused {e.capability} in {e.syscall} "
            "and went on without it (the command succeeded). Not the workload's; "
            "nothing to grant."
        )
        e.details = []
        e.fixes = []
        e.warning = None
    return exps


@dataclass(frozen=True)
class Match:
    short_id: str
    cgroups: frozenset[int]


def match_container(
    tree: Mapping[int, Workload], text: str, names: Callable[[str, str], str]
) -> Match | None:
    """The container named ``text`` (a name, or an id prefix of 3 or more), with all its
    cgroups; None when none matches. Raises ValueError when ``text`` matches several."""
    found: dict[int, Workload] = {}
    for cid, w in tree.items():
        if not w.container_id or w.monitor:
            continue
        if (
            (len(text) >= 3 and w.container_id.startswith(text))
            or (w.runtime == "containerd" and text in (w.name, w.container_id))
            or (w.runtime in ("podman", "docker") and names(w.runtime, w.container_id) == text)
        ):
            found[cid] = w
    if not found:
        return None
    ids = {w.container_id for w in found.values()}
    if len(ids) > 1:
        raise ValueError(f"{text!r} matches {len(ids)} containers; give more of the id")
    return Match(next(iter(ids))[:12], frozenset(found))


T = TypeVar("T")


def wait_for(
    poll: Callable[[], T | None],
    timeout_s: float,
    *,
    interval_s: float = 0.2,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    stop: Callable[[], bool] = lambda: False,
) -> T | None:
    """``poll()`` until it gives something, ``timeout_s`` passes or ``stop()``; the last
    poll happens at or after the deadline, so a container that appears in time is seen."""
    deadline = clock() + timeout_s
    while True:
        got = poll()
        if got is not None:
            return got
        if clock() >= deadline or stop():
            return None
        sleep(min(interval_s, max(0.0, deadline - clock())))
