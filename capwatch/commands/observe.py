"""`capwatch explain` and `capwatch advise`: watch a target, then explain or advise.

A target is a command (run in a fresh cgroup of its own, so the kernel
filters exactly its process tree), a pid, or a container (its cgroup).
Denials are joined with their syscall's outcome; each denying process's
capability sets are read as soon as the denial arrives (a process that is
already gone is stood in for by a live process of the same cgroup, which
shares its bounding set).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from capwatch.attribution.cgroups import cgroup_owners, find_cgroup2_mount, walk_cgroup_tree
from capwatch.attribution.containers import (
    Attributor,
    ContainerNames,
    Workload,
    as_containerd,
    classify,
)
from capwatch.attribution.runtime_api import ContainerdTask, daemon_run
from capwatch.commands import runcmd
from capwatch.decode import procfs
from capwatch.decode.events import Event
from capwatch.diagnose.advise import Advice, Observation, advise
from capwatch.diagnose.explain import Explanation, explain
from capwatch.diagnose.policy import Policy
from capwatch.errors import CapwatchError, UsageError
from capwatch.kernel import bpf as _bpf
from capwatch.kernel.session import Session, stop_on_signals
from capwatch.pipeline import Check, Pipeline, facts_of, status_of

__all__ = ["Findings", "Observed", "Target", "advice_of", "run_advise", "run_explain"]


@dataclass
class Target:
    label: str
    config: _bpf.ProgramConfig
    argv: list[str] | None = None
    cgroup_dir: runcmd.CommandCgroup | None = None  # made for a command; removed after
    cgroup_ids: set[int] = field(default_factory=set)


def _unified(args: argparse.Namespace) -> str:
    root = args.cgroup_root or find_cgroup2_mount(f"{args.proc_root}/self/mountinfo")
    if root is None:
        raise CapwatchError("no cgroup v2 hierarchy mounted: cannot isolate the target")
    return str(root)


def _container_cgroups(args: argparse.Namespace, text: str) -> tuple[str, set[int]]:
    root = _unified(args)
    names = ContainerNames(background=False)
    found: dict[int, Workload] = {}
    for cid, path in walk_cgroup_tree(root).items():
        w = classify(path, cid, owners=cgroup_owners(root, path))
        if w.kind == "unknown" and isinstance(task := names.containerd_task(path), ContainerdTask):
            w = as_containerd(w, task)  # ctr run: /<namespace>/<id>
        if not w.container_id or w.monitor:
            continue
        if (
            (len(text) >= 3 and w.container_id.startswith(text))
            or (w.runtime == "containerd" and text in (w.name, w.container_id))
            or (
                w.runtime in ("podman", "docker")
                and names.fetch(w.runtime, w.container_id) == text
            )
        ):
            found[cid] = w
    names.close()
    if not found:
        raise CapwatchError(f"no running container matches {text!r} (a name or an id prefix)")
    ids = {w.container_id for w in found.values()}
    if len(ids) > 1:
        raise UsageError(f"{text!r} matches {len(ids)} containers; give more of the id")
    return next(iter(ids))[:12], set(found)


def make_target(args: argparse.Namespace, *, unique: bool) -> Target:
    base: dict[str, Any] = {
        "outcome": True,
        "emit_all": not unique and args.command == "advise",
        "unique": unique,
    }
    if args.cmd:
        made = runcmd.make_command_cgroup(_unified(args), proc_root=args.proc_root)
        cg = made.cgroup_id
        return Target(
            " ".join(args.cmd), _bpf.ProgramConfig(filter_cgroup=cg, **base), args.cmd, made, {cg}
        )
    if getattr(args, "pid", None):
        procfs.read_status(args.pid, proc_root=args.proc_root)  # a missing pid fails here
        return Target(f"pid {args.pid}", _bpf.ProgramConfig(filter_pid=args.pid, **base))
    if args.container:
        short, cgs = _container_cgroups(args, args.container)
        cfg = _bpf.ProgramConfig(filter_cgroup=next(iter(cgs)) if len(cgs) == 1 else None, **base)
        return Target(f"container {args.container} ({short})", cfg, cgroup_ids=cgs)
    raise UsageError("say what to watch: PID, --container NAME|ID, or -- COMMAND ARGS")


class Findings:
    """explain's and advise's sink: the target's denials (checks, with the sets
    read at arrival) and a count of its allowed checks."""

    def __init__(self) -> None:
        self.denials: list[Check] = []
        self.allowed: dict[tuple[int, str, str, str | None], int] = {}

    def write(self, check: Check) -> None:
        if check.denied:
            self.denials.append(check)
        else:
            key = (check.cap, check.syscall, check.comm, check.rule)
            self.allowed[key] = self.allowed.get(key, 0) + 1

    def tick(self) -> None:
        pass

    def close(self) -> None:
        pass


def _snapshot(
    attributor: Attributor, proc_root: str
) -> Callable[[Event], procfs.ProcStatus | None]:
    """The denying process's sets; a process already gone is stood in for by a
    live process of its cgroup, which shares its bounding set, and only when
    that set lacks the capability (the other sets are the dead process's own)."""
    own = status_of(proc_root)

    def read(ev: Event) -> procfs.ProcStatus | None:
        st = own(ev)
        if st is not None:
            return st
        other = _stand_in(attributor, proc_root, ev)
        return other if other is not None and not other.cap_bnd >> ev.cap & 1 else None

    return read


def _stand_in(attributor: Attributor, proc_root: str, ev: Event) -> procfs.ProcStatus | None:
    """A live process of the same cgroup: it shares the bounding set."""
    w = attributor.resolve(ev.cgroup_id)
    root = attributor.cgroup_root
    if w.cgroup_path is None or root is None:
        return None
    try:
        with open(os.path.join(root, w.cgroup_path.lstrip("/"), "cgroup.procs")) as f:
            pids = [int(p) for p in f.read().split()]
    except OSError:
        return None
    for pid in pids:
        with contextlib.suppress(CapwatchError):
            return procfs.read_status(pid, proc_root=proc_root)
    return None


@dataclass
class Observed:
    collector: Findings
    seconds: float
    returncode: int | None = None  # the command's exit status, when a command was run


def _observe(args: argparse.Namespace, target: Target, err: TextIO) -> Observed:
    """Watch ``target``; the cgroup made for a command is removed whatever happens."""
    try:  # Ctrl-C during the compile raises KeyboardInterrupt: still cleaned up
        return _observe_in(args, target, err)
    finally:
        if target.cgroup_dir:
            target.cgroup_dir.remove()


def _observe_in(args: argparse.Namespace, target: Target, err: TextIO) -> Observed:
    policy = Policy.load(getattr(args, "policy", None))
    stop = threading.Event()
    attributor = Attributor(cgroup_root=args.cgroup_root, proc_root=args.proc_root)
    for cg in target.cgroup_ids:  # start the runtime look-ups while the container runs
        attributor.resolve(cg)
    col = Findings()
    cgroups = target.cgroup_ids
    pipeline = Pipeline(
        attributor.resolve,
        [col],
        policy=policy,
        outcome=True,
        accept=(lambda ev: ev.cgroup_id in cgroups) if cgroups else None,
        classify_allowed=True,
        snapshot=_snapshot(attributor, args.proc_root),
        note_pid=attributor.note_pid,
    )
    try:
        session = Session(target.config, args.attach, kernel_headers=args.kernel_headers)
    except BaseException:
        attributor.close()
        raise
    t0 = time.monotonic()
    child: subprocess.Popen[bytes] | None = None
    try:
        if target.argv is not None and (daemon := daemon_run(target.argv)):
            err.write(
                f"capwatch: note: {daemon} runs this container, not the command: its"
                f" denials are not watched here; use {args.command} --container NAME\n"
            )
        if target.argv is not None and target.cgroup_dir is not None:
            if target.cgroup_dir.reason:
                err.write(
                    f"capwatch: the command's cgroup is at the {target.cgroup_dir.placement}"
                    f" level: {target.cgroup_dir.reason}\n"
                )
            child = runcmd.spawn_in_cgroup(target.argv, target.cgroup_dir)

            def wait_child() -> None:
                # Wait without reaping: a zombie's /proc/PID/status still shows
                # its capability sets, which the consumer reads on its denials.
                assert child is not None
                with contextlib.suppress(ChildProcessError):
                    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
                time.sleep(0.2)  # let the last records and outcomes drain
                stop.set()

            threading.Thread(target=wait_child, daemon=True).start()
        else:
            err.write(
                f"capwatch: watching {target.label} for {args.duration:.0f}s (Ctrl-C to stop early)\n"
            )
            timer = threading.Timer(args.duration, stop.set)
            timer.daemon = True
            timer.start()
        stop_on_signals(stop)
        session.run(stop, pipeline.on_batch, on_tick=pipeline.tick)
        pipeline.close()
        stats = session.program.read_stats()
        lost = stats["lost_denials"] + stats["lost_checks"] + stats["lost_outcomes"]
        if lost:
            err.write(
                f"capwatch: warning: {lost} events were lost (ring full): what follows may be"
                " incomplete\n"
            )
    finally:
        attributor.close()
        if child is not None:
            if child.poll() is None and stop.is_set() is False:
                child.terminate()
            child.wait()
        session.close()
    if child is not None and child.returncode:
        err.write(
            f"capwatch: {target.argv[0] if target.argv else ''} exited with {child.returncode}\n"
        )
    return Observed(col, time.monotonic() - t0, child.returncode if child is not None else None)


def _explanations(col: Findings) -> list[Explanation]:
    seen: dict[tuple[Any, ...], Explanation] = {}
    for c in col.denials:
        key = (c.comm, c.cap, c.syscall, c.outcome)
        if key in seen:
            seen[key].count += 1
            continue
        seen[key] = explain(facts_of(c, count=1))
    return list(seen.values())


def run_explain(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if args.last:
        from capwatch.sinks.recent import read_recent

        exps = read_recent(args.state_file, args.last)
        if not exps:
            raise CapwatchError(
                f"no denials recorded in {args.state_file} (run capwatch trace or serve first)"
            )
        _print(args, exps, out)
        return 0
    target = make_target(args, unique=False)
    exps = _explanations(_observe(args, target, err).collector)
    if not exps:
        out.write("" if args.json else f"no capability was denied to {target.label}\n")
        if args.json:
            out.write("[]\n")
        return 0
    exps.sort(key=lambda e: {"cause": 0, "unknown": 1, "probe": 2}[e.role])
    _print(args, exps, out)
    return 0


def _print(args: argparse.Namespace, exps: list[Explanation], out: TextIO) -> None:
    if args.json:
        out.write(json.dumps([e.to_dict() for e in exps]) + "\n")
    else:
        out.write("\n".join(e.render() for e in exps))


def run_advise(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    target = make_target(args, unique=False)
    seen = _observe(args, target, err)
    a = advice_of(seen.collector, seen.seconds, target.label)
    out.write(json.dumps(a.to_dict()) + "\n" if args.json else a.render())
    return 0


def advice_of(col: Findings, seconds: float, label: str) -> Advice:
    """What advise says of what a Findings sink collected (live or replayed)."""
    obs: list[Observation] = [
        Observation(cap, False, syscall, comm, probe_rule=rule, count=n)
        for (cap, syscall, comm, rule), n in col.allowed.items()
    ]
    obs += [
        Observation(
            c.cap,
            True,
            c.syscall,
            c.comm,
            role=c.role or "unknown",
            outcome=c.outcome or "unknown",
            probe_rule=_policy_rule(c),
        )
        for c in col.denials
    ]
    return advise(obs, duration_s=seconds, target=label)


def _policy_rule(c: Check) -> str | None:
    """The policy rule that made a denial expected (not the outcome's verdict)."""
    return c.rule if c.rule is not None and not c.rule.startswith("outcome:") else None
