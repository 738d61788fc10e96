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
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from capwatch import _bpf, procfs
from capwatch.advise import Observation, advise
from capwatch.cgroups import find_cgroup2_mount, walk_cgroup_tree
from capwatch.containers import Attributor, ContainerNames, Workload, classify
from capwatch.errors import CapwatchError, UsageError
from capwatch.events import Batch, Event, events_from_batch
from capwatch.explain import DenialFacts, Explanation, explain, fold
from capwatch.follow import (
    ContainerFollower,
    Match,
    match_container,
    requested_name,
    started_runtime,
    tolerate_runtime,
    wait_for,
)
from capwatch.oci import config_sets, sets_status
from capwatch.outcome import Joined, OutcomeJoiner
from capwatch.policy import Policy
from capwatch.refusals import Refusal, gather, judge, tolerated_runtime, with_stand_in
from capwatch.session import Session, stop_on_signals
from capwatch.syscalls import syscall_name

__all__ = ["Target", "run_advise", "run_explain"]


@dataclass
class Target:
    label: str
    config: _bpf.ProgramConfig
    argv: list[str] | None = None
    cgroup_dir: str | None = None  # made for a command; removed after
    cgroup_ids: set[int] = field(default_factory=set)
    name: str = ""  # the container's name, when the user gave it (--container NAME)
    # explain -- podman/docker run ...: the containers the command starts are followed
    follower: ContainerFollower | None = None


def _unified(args: argparse.Namespace) -> str:
    root = args.cgroup_root or find_cgroup2_mount(f"{args.proc_root}/self/mountinfo")
    if root is None:
        raise CapwatchError("no cgroup v2 hierarchy mounted: cannot isolate the target")
    return str(root)


def _container_cgroups(
    args: argparse.Namespace, text: str, err: TextIO | None = None
) -> tuple[str, set[int]]:
    root = _unified(args)
    names = ContainerNames(background=False)
    wait = float(getattr(args, "wait", 0.0) or 0.0)

    def poll() -> Match | None:
        tree = {cid: classify(path, cid) for cid, path in walk_cgroup_tree(root).items()}
        try:
            return match_container(tree, text, lambda rt, cid: names.fetch(rt, cid) or "")
        except ValueError as exc:
            raise UsageError(str(exc)) from None

    try:
        if wait and err is not None:
            err.write(f"capwatch: waiting up to {wait:.0f}s for container {text} to start\n")
            err.flush()
        found = wait_for(poll, wait) if wait else poll()
    finally:
        names.close()
    if found is None:
        raise CapwatchError(
            f"no running container matches {text!r} (a name or an id prefix)"
            + (f" after waiting {wait:.0f}s" if wait else "; --wait DURATION waits for it")
        )
    return found.short_id, set(found.cgroups)


def make_target(args: argparse.Namespace, *, unique: bool, err: TextIO | None = None) -> Target:
    base: dict[str, Any] = {
        "outcome": True,
        "emit_all": not unique and args.command == "advise",
        "unique": unique,
    }
    if args.command == "explain":
        base["refusals"] = True  # only with a cgroup or pid filter (below)
    if args.cmd:
        root = _unified(args)
        d = os.path.join(root, f"capwatch-run-{uuid.uuid4().hex[:8]}")
        try:
            os.mkdir(d)
        except OSError as exc:
            raise CapwatchError(
                f"cannot make a cgroup for the command in {root}: {exc.strerror}"
            ) from None
        cg = os.stat(d).st_ino
        runtime = started_runtime(args.cmd) if args.command == "explain" else None
        if runtime is not None:
            # the container runs in a cgroup its runtime makes, not under the command's:
            # no kernel filter; user space keeps the command's cgroup and the new
            # container cgroups that ContainerFollower accepts
            follower = ContainerFollower(
                runtime, requested_name(args.cmd), known=set(walk_cgroup_tree(root))
            )
            cfg = _bpf.ProgramConfig(**{**base, "refusals": False})
            return Target(
                " ".join(args.cmd),
                cfg,
                args.cmd,
                d,
                {cg},
                name=follower.name or "",
                follower=follower,
            )
        return Target(
            " ".join(args.cmd), _bpf.ProgramConfig(filter_cgroup=cg, **base), args.cmd, d, {cg}
        )
    if getattr(args, "pid", None):
        procfs.read_status(args.pid, proc_root=args.proc_root)  # a missing pid fails here
        return Target(f"pid {args.pid}", _bpf.ProgramConfig(filter_pid=args.pid, **base))
    if args.container:
        short, cgs = _container_cgroups(args, args.container, err)
        if len(cgs) != 1:
            base["refusals"] = False  # no single cgroup to filter on in the kernel
        cfg = _bpf.ProgramConfig(filter_cgroup=next(iter(cgs)) if len(cgs) == 1 else None, **base)
        is_id = short.startswith(args.container) or args.container.startswith(short)
        named = "" if is_id else args.container
        return Target(f"container {args.container} ({short})", cfg, cgroup_ids=cgs, name=named)
    raise UsageError("say what to watch: PID, --container NAME|ID, or -- COMMAND ARGS")


class _Collector:
    """Consumes the session's batches: joins outcomes, snapshots process status."""

    def __init__(
        self, target: Target, attributor: Attributor, policy: Policy, proc_root: str
    ) -> None:
        self.target = target
        self.attributor = attributor
        self.policy = policy
        self.proc_root = proc_root
        # by (pid, uid, comm): a setuid() or an execve changes the sets of the same pid
        self.status: dict[tuple[int, int, str], procfs.ProcStatus | None] = {}
        # where a status came from when not the process itself (same keys)
        self.caps_source: dict[tuple[int, int, str], str] = {}
        self.config_source: dict[tuple[int, int, str], str] = {}
        self.joined: list[Joined] = []
        self.allowed: dict[tuple[int, str, str], int] = {}
        self.joiner = OutcomeJoiner(self._take, on_refusal=self._refusal)
        self.refusals: dict[tuple[Any, ...], Refusal] = {}
        self.refusal_cgroup: dict[tuple[Any, ...], int] = {}
        # threads whose execve the file's capabilities refused: a CAP_SYS_ADMIN
        # denial in that execve (memory accounting) is not why it failed
        self.filecap_exec: set[int] = set()
        self.path_of: Callable[[int, int], str | None] = lambda _tid, _nr: None  # BPF map
        self.exit_code = 0  # the command's, for explain -- CMD (128+N when killed by signal N)

    def on_batch(self, _ring: str, batch: Batch) -> None:
        for ev in events_from_batch(batch):
            if (
                self.target.cgroup_ids
                and ev.cgroup_id not in self.target.cgroup_ids
                and not self._follow(ev)
            ):
                continue
            key = (ev.pid, ev.uid, ev.comm)
            if ev.denied and key not in self.status:
                self.status[key] = self._status(ev) or self._stand_in_for(ev)
                if self.status[key] is None:
                    self.status[key] = self._from_config(ev)
                st = self.status[key]
                if st is not None and st.pid != ev.pid:
                    self.caps_source[key] = (
                        f"pid {st.pid} of the same cgroup (pid {ev.pid} was gone)"
                    )
                elif st is not None and key in self.config_source:
                    self.caps_source[key] = self.config_source[key]
            self.joiner.feed(ev)

    def _follow(self, ev: Event) -> bool:
        """Whether ``ev``'s cgroup is a container that the watched command started."""
        f = self.target.follower
        if f is None or ev.cgroup_id in f.known or ev.cgroup_id in f.rejected:
            return False
        self.attributor.note_pid(ev.cgroup_id, ev.pid)
        w = self.attributor.resolve(ev.cgroup_id)
        if w.cgroup_path is None:
            return False  # not known yet: undecided, the next event asks again
        # a name not known yet is taken to be the one asked for: the cgroup is new
        name = w.container_name or w.name or f.name or ""
        if f.decide(ev.cgroup_id, w, lambda _cid: name):
            self.target.cgroup_ids.add(ev.cgroup_id)
            return True
        return False

    def _from_config(self, ev: Event) -> procfs.ProcStatus | None:
        """The process is gone and no other is left: its container's own configuration
        tells the sets it started with (capwatch.oci)."""
        w = self.attributor.resolve(ev.cgroup_id)
        if not w.container_id:
            return None
        host_root = os.path.dirname(os.path.abspath(self.proc_root).rstrip("/")) or "/"
        sets = config_sets(w.container_id, host_root=host_root)
        if sets is None or (sets.uid != ev.uid and sets.bounding >> ev.cap & 1):
            return None  # another user: only a bounding set that lacks the cap is telling
        self.config_source[ev.pid, ev.uid, ev.comm] = (
            f"the container's configuration {sets.source} (pid {ev.pid} was gone)"
        )
        return sets_status(sets, ev.pid, ev.comm, ev.uid)

    def _status(self, ev: Event) -> procfs.ProcStatus | None:
        with contextlib.suppress(CapwatchError):
            return procfs.read_status(ev.pid, proc_root=self.proc_root)
        return None

    def _take(self, j: Joined) -> None:
        ev = j.event
        if ev.denied:
            self.joined.append(j)
        else:
            key = (ev.cap, syscall_name(ev.syscall_nr), ev.comm)
            self.allowed[key] = self.allowed.get(key, 0) + 1

    def close(self) -> None:
        self.attributor.close()

    def _refusal(self, ev: Event) -> None:
        """A syscall refused without a capability denial: judged with what is seen now."""
        syscall = syscall_name(ev.syscall_nr)
        path = self.path_of(ev.tid, ev.syscall_nr)
        if tolerated_runtime(ev.comm, syscall):
            return
        w = self.attributor.resolve(ev.cgroup_id)
        facts = gather(
            syscall=syscall,
            ret=ev.ret,
            comm=ev.comm,
            pid=ev.pid,
            uid=ev.uid,
            path=path,
            proc_root=self.proc_root,
            kind=_kind(w),
            container=w.container_name or w.name or self.target.name,
            container_id=w.container_id,
            pod=w.pod,
            namespace=w.namespace,
        )
        gone = facts.seccomp is None or (facts.file is not None and not facts.file.exists)
        if gone:  # a live process of its cgroup shares the
            st = self.stand_in(ev)  # bounding set, and in a container the seccomp filter
            if st is not None:
                facts = with_stand_in(facts, st.pid, self.proc_root)
        key = (ev.comm, syscall, ev.ret, path)
        if key in self.refusals:
            self.refusals[key].count += 1
        else:
            self.refusals[key] = judge(facts)
            self.refusal_cgroup[key] = ev.cgroup_id
        if self.refusals[key].verdict == "file capabilities":
            self.filecap_exec.add(ev.tid)

    def named_refusals(self) -> list[Refusal]:
        """The refusals, with container names learnt since they arrived."""
        for key, r in self.refusals.items():
            w = self.attributor.resolve(self.refusal_cgroup[key])
            r.container = r.container or w.container_name or w.name or self.target.name
        return list(self.refusals.values())

    def _stand_in_for(self, ev: Event) -> procfs.ProcStatus | None:
        """The process is gone: a live process of its cgroup tells the bounding set,
        which a container's processes share. Used only when that set lacks the
        capability (the other sets are the dead process's own)."""
        st = self.stand_in(ev)
        return st if st is not None and not st.cap_bnd >> ev.cap & 1 else None

    def stand_in(self, ev: Event) -> procfs.ProcStatus | None:
        """A live process of the same cgroup: it shares the bounding set."""
        w = self.attributor.resolve(ev.cgroup_id)
        root = self.attributor.cgroup_root
        if w.cgroup_path is None or root is None:
            return None
        try:
            with open(os.path.join(root, w.cgroup_path.lstrip("/"), "cgroup.procs")) as f:
                pids = [int(p) for p in f.read().split()]
        except OSError:
            return None
        for pid in pids:
            if pid == ev.pid:  # the refused process itself, exiting
                continue
            with contextlib.suppress(CapwatchError):
                return procfs.read_status(pid, proc_root=self.proc_root)
        return None


def _kind(w: Workload) -> str:
    if w.kind == "kubernetes" or w.pod_uid:
        return "kubernetes"
    return w.runtime or w.kind


def _observe(args: argparse.Namespace, target: Target, err: TextIO) -> tuple[_Collector, float]:
    """Watch ``target``; the cgroup made for a command is removed whatever happens."""
    try:  # Ctrl-C during the compile raises KeyboardInterrupt: still cleaned up
        return _observe_in(args, target, err)
    finally:
        if target.cgroup_dir:
            with contextlib.suppress(OSError):
                os.rmdir(target.cgroup_dir)


def _observe_in(args: argparse.Namespace, target: Target, err: TextIO) -> tuple[_Collector, float]:
    policy = Policy.load(getattr(args, "policy", None))
    stop = threading.Event()
    attributor = Attributor(cgroup_root=args.cgroup_root, proc_root=args.proc_root)
    col = _Collector(target, attributor, policy, args.proc_root)
    session = Session(target.config, args.attach, kernel_headers=args.kernel_headers)
    col.path_of = session.program.refusal_path
    t0 = time.monotonic()
    child: subprocess.Popen[bytes] | None = None
    try:
        if target.argv is not None:
            procs = os.path.join(str(target.cgroup_dir), "cgroup.procs")

            def enter_cgroup() -> None:
                with open(procs, "w") as f:
                    f.write("0")

            try:
                child = subprocess.Popen(target.argv, preexec_fn=enter_cgroup)  # noqa: PLW1509
            except OSError as exc:
                raise CapwatchError(f"cannot run {target.argv[0]}: {exc.strerror}") from None

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
        session.run(stop, col.on_batch, on_tick=lambda: col.joiner.expire(time.monotonic_ns()))
        col.joiner.flush()
        stats = session.program.read_stats()
        lost = stats["lost_denials"] + stats["lost_checks"] + stats["lost_outcomes"]
        if lost:
            err.write(
                f"capwatch: warning: {lost} events were lost (ring full): what follows may be"
                " incomplete\n"
            )
    except BaseException:
        attributor.close()
        raise
    finally:
        if child is not None:
            if child.poll() is None and stop.is_set() is False:
                child.terminate()
            child.wait()
        session.close()
    if child is not None and child.returncode:
        rc = child.returncode
        col.exit_code = rc if rc > 0 else 128 - rc
        err.write(
            f"capwatch: {target.argv[0] if target.argv else ''} exited with {child.returncode}\n"
        )
    return col, time.monotonic() - t0


def _explanations(col: _Collector) -> list[Explanation]:
    seen: dict[tuple[Any, ...], Explanation] = {}
    for j in col.joined:
        ev = j.event
        syscall = syscall_name(ev.syscall_nr)
        key = (ev.comm, ev.cap, syscall, j.outcome, j.role)
        if key in seen:
            seen[key].count += 1
            continue
        w = col.attributor.resolve(ev.cgroup_id)
        status = col.status.get((ev.pid, ev.uid, ev.comm))
        rule = col.policy.classify(
            cap=ev.cap,
            syscall=syscall,
            comm=ev.comm,
            container=w.name or w.label,
            pod=w.pod,
            namespace=w.namespace,
        )
        explained_by_file = (
            ev.tid in col.filecap_exec and syscall in ("execve", "execveat") and ev.cap == 21
        )
        facts = DenialFacts(
            cap=ev.cap,
            syscall=syscall,
            comm=ev.comm,
            pid=ev.pid,
            ret=None if explained_by_file else j.ret,
            known_probe=(
                "memory accounting; the exec failed for the file's capabilities"
                if explained_by_file
                else rule.name
                if rule
                else None
            ),
            status=status,
            kind=_kind(w),
            container=w.container_name or w.name or col.target.name or w.label,
            pod=w.pod,
            namespace=w.namespace,
            service=w.service,
            userns=ev.in_userns,
            exit_code=j.exit_code,
            uid=ev.uid,
            container_id=w.container_id,
            caps_source=col.caps_source.get((ev.pid, ev.uid, ev.comm), ""),
        )
        seen[key] = explain(facts)
    return fold(list(seen.values()))


def run_explain(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if args.last:
        from capwatch.recent import read_recent

        exps = read_recent(args.state_file, args.last)
        if not exps:
            raise CapwatchError(
                f"no denials recorded in {args.state_file} (run capwatch trace or serve first)"
            )
        _print(args, exps, out)
        return 0
    target = make_target(args, unique=False, err=err)
    col, _ = _observe(args, target, err)
    try:
        started = bool(target.follower and target.follower.followed)
        exps = tolerate_runtime(_explanations(col), 0 if started else col.exit_code)
        refusals = col.named_refusals()
    finally:
        col.close()
    if not exps and not refusals:
        out.write("" if args.json else f"no capability was denied to {target.label}\n")
        if args.json:
            out.write("[]\n")
        return col.exit_code
    exps.sort(key=lambda e: {"cause": 0, "unknown": 1, "probe": 2}[e.role])
    _print(args, exps, out, refusals)
    return col.exit_code


def _print(
    args: argparse.Namespace,
    exps: list[Explanation],
    out: TextIO,
    refusals: list[Refusal] | None = None,
) -> None:
    found: list[Explanation | Refusal] = [*exps, *(refusals or [])]
    if args.json:
        out.write(json.dumps([e.to_dict() for e in found]) + "\n")
    else:
        out.write("\n".join(e.render() for e in found))


def run_advise(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    target = make_target(args, unique=False, err=err)
    col, took = _observe(args, target, err)
    col.close()
    obs: list[Observation] = []
    for (cap, syscall, comm), n in col.allowed.items():
        rule = col.policy.classify(
            cap=cap, syscall=syscall, comm=comm, container="", pod="", namespace=""
        )
        obs.append(
            Observation(cap, False, syscall, comm, probe_rule=rule.name if rule else None, count=n)
        )
    for j in col.joined:
        ev = j.event
        syscall = syscall_name(ev.syscall_nr)
        rule = col.policy.classify(
            cap=ev.cap, syscall=syscall, comm=ev.comm, container="", pod="", namespace=""
        )
        obs.append(
            Observation(
                ev.cap,
                True,
                syscall,
                ev.comm,
                role=j.role,
                outcome=j.outcome,
                probe_rule=rule.name if rule else None,
            )
        )
    a = advise(obs, duration_s=took, target=target.label)
    out.write(json.dumps(a.to_dict()) + "\n" if args.json else a.render())
    return 0
