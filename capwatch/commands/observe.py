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
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TextIO

from capwatch.attribution.cgroups import (
    cgroup_owners,
    find_cgroup2_mount,
    live_member,
    walk_cgroup_tree,
)
from capwatch.attribution.containers import (
    Attributor,
    ContainerNames,
    Workload,
    as_containerd,
    classify,
)
from capwatch.attribution.oci import config_sets, sets_status
from capwatch.attribution.runtime_api import ContainerdTask, daemon_run
from capwatch.commands import runcmd
from capwatch.commands.trace import refusal_evidence
from capwatch.decode import procfs
from capwatch.decode.events import Event
from capwatch.diagnose.advise import Advice, Observation, advise
from capwatch.diagnose.explain import Explanation, explain, fold
from capwatch.diagnose.follow import (
    ContainerFollower,
    Match,
    match_container,
    requested_name,
    started_runtime,
    tolerate_runtime,
    wait_for,
)
from capwatch.diagnose.outcome import reply_text
from capwatch.diagnose.policy import Policy
from capwatch.diagnose.refusals import (
    Refusal,
    judge,
)
from capwatch.errors import CapwatchError, UsageError
from capwatch.kernel import bpf as _bpf
from capwatch.kernel.session import Session, stop_on_signals
from capwatch.pipeline import Check, Pipeline, facts_of, fd_kind_of, status_of

__all__ = ["Findings", "Observed", "Target", "advice_of", "run_advise", "run_explain"]


@dataclass
class Target:
    label: str
    config: _bpf.ProgramConfig
    argv: list[str] | None = None
    cgroup_dir: runcmd.CommandCgroup | None = None  # made for a command; removed after
    cgroup_ids: set[int] = field(default_factory=set)
    name: str = ""  # the container's name, when the user gave it (--container NAME)
    # explain -- podman/docker run ...: the containers the command starts are followed
    follower: ContainerFollower | None = None


def _unified(args: argparse.Namespace) -> str:
    root = args.cgroup_root or find_cgroup2_mount(f"{args.proc_root}/self/mountinfo")
    if root is None:
        raise CapwatchError("no cgroup v2 hierarchy mounted: cannot isolate the target")
    return str(root)


def _tree(root: str, names: ContainerNames) -> dict[int, Workload]:
    """Every cgroup as attribution sees it (owners checked; ctr's containers named)."""
    out: dict[int, Workload] = {}
    for cid, path in walk_cgroup_tree(root).items():
        w = classify(path, cid, owners=cgroup_owners(root, path))
        if w.kind == "unknown" and isinstance(task := names.containerd_task(path), ContainerdTask):
            w = as_containerd(w, task)  # ctr run: /<namespace>/<id>
        out[cid] = w
    return out


def container_cgroups(
    args: argparse.Namespace, text: str, err: TextIO | None = None
) -> tuple[str, set[int]]:
    root = _unified(args)
    names = ContainerNames(background=False)
    wait = float(getattr(args, "wait", 0.0) or 0.0)

    def poll() -> Match | None:
        try:
            return match_container(
                _tree(root, names), text, lambda rt, cid: names.fetch(rt, cid) or ""
            )
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
        base["refusal_entry"] = True  # seccomp at entry known as such (a sys_enter hook)
    if args.cmd:
        root = _unified(args)
        made = runcmd.make_command_cgroup(root, proc_root=args.proc_root)
        cg = made.cgroup_id
        runtime = started_runtime(args.cmd)
        # podman runs its container itself (a child of the command), dockerd its
        # own (the command only asks): either way the container's cgroup is new and
        # of that runtime, which is what is followed. containerd's ctr runs get a
        # note instead (see _observe_in): following them is not tried or tested yet.
        if runtime in ("podman", "docker"):
            # the container runs in a cgroup its runtime makes, not under the command's:
            # no kernel filter; user space keeps the command's cgroup and the new
            # container cgroups that ContainerFollower accepts
            follower = ContainerFollower(
                runtime, requested_name(args.cmd), known=set(walk_cgroup_tree(root))
            )
            # refusals from every cgroup but those that existed before (kernel filter:
            # LoadedProgram.set_refusal_cgroups), kept for the followed ones
            cfg = _bpf.ProgramConfig(
                **base, refusal_cgroups="except" if base.get("refusals") else None
            )
            label = " ".join(args.cmd)
            return Target(label, cfg, args.cmd, made, {cg}, follower.name or "", follower)
        return Target(
            " ".join(args.cmd), _bpf.ProgramConfig(filter_cgroup=cg, **base), args.cmd, made, {cg}
        )
    if getattr(args, "pid", None):
        procfs.read_status(args.pid, proc_root=args.proc_root)  # a missing pid fails here
        return Target(f"pid {args.pid}", _bpf.ProgramConfig(filter_pid=args.pid, **base))
    if args.container:
        short, cgs = container_cgroups(args, args.container, err)
        if len(cgs) == 1:
            cfg = _bpf.ProgramConfig(filter_cgroup=next(iter(cgs)), **base)
        else:  # several cgroups (a pod's containers): refusals filtered by their set
            cfg = _bpf.ProgramConfig(
                **base, refusal_cgroups="only" if base.get("refusals") else None
            )
        is_id = short.startswith(args.container) or args.container.startswith(short)
        named = "" if is_id else args.container
        return Target(f"container {args.container} ({short})", cfg, cgroup_ids=cgs, name=named)
    raise UsageError("say what to watch: PID, --container NAME|ID, or -- COMMAND ARGS")


class Findings:
    """explain's and advise's sink: the target's denials (checks, with the sets
    read at arrival) and a count of its allowed checks."""

    def __init__(self, only: Container[int] | None = None) -> None:
        self.only = only  # the cgroups whose checks are kept; None: all that are accepted
        self.denials: list[Check] = []
        self.allowed: dict[tuple[int, str, str, str | None], int] = {}
        # where a denying process's sets came from when not the process itself
        self.caps_source: dict[tuple[int, int, str], str] = {}
        self.refusals: dict[tuple[Any, ...], Refusal] = {}
        self.refusal_cgroup: dict[tuple[Any, ...], int] = {}
        # threads whose execve the file's capabilities refused: a CAP_SYS_ADMIN
        # denial in that execve (memory accounting) is not why it failed
        self.filecap_exec: set[int] = set()
        self.exit_code = 0  # the command's, for explain -- CMD (128+N when killed by signal N)

    def write(self, check: Check) -> None:
        if self.only is not None and check.cgroup_id not in self.only:
            return
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
    attributor: Attributor, proc_root: str, col: Findings
) -> Callable[[Event], procfs.ProcStatus | None]:
    """The denying process's sets, read on arrival. A process already gone is stood
    in for by a live process of its cgroup, which shares its bounding set (used only
    when that set lacks the capability: the other sets are the dead process's own),
    else by its container's own configuration (capwatch.attribution.oci); the
    finding says which."""
    own = status_of(proc_root)

    def read(ev: Event) -> procfs.ProcStatus | None:
        st = own(ev)
        if st is not None:
            return st
        key = (ev.pid, ev.uid, ev.comm)
        other = _stand_in(attributor, proc_root, ev)
        if other is not None and not other.cap_bnd >> ev.cap & 1:
            col.caps_source[key] = f"pid {other.pid} of the same cgroup (pid {ev.pid} was gone)"
            return other
        w = attributor.resolve(ev.cgroup_id)
        if not w.container_id:
            return None
        host_root = os.path.dirname(os.path.abspath(proc_root).rstrip("/")) or "/"
        sets = config_sets(w.container_id, host_root=host_root)
        if sets is None or (sets.uid != ev.uid and sets.bounding >> ev.cap & 1):
            return None  # another user: only a bounding set that lacks the cap is telling
        col.caps_source[key] = (
            f"the container's configuration {sets.source} (pid {ev.pid} was gone)"
        )
        return sets_status(sets, ev.pid, ev.comm, ev.uid)

    return read


def _stand_in(attributor: Attributor, proc_root: str, ev: Event) -> procfs.ProcStatus | None:
    """A live process of the same cgroup (not the refused one, exiting): it shares
    the bounding set, the seccomp filter and the root."""
    w = attributor.resolve(ev.cgroup_id)
    pid = live_member(attributor.cgroup_root, w.cgroup_path, ev.pid, proc_root=proc_root)
    if pid is None:
        return None
    with contextlib.suppress(CapwatchError):
        return procfs.read_status(pid, proc_root=proc_root)
    return None


def _fill_refusal_cgroups(program: Any, target: Target, err: TextIO) -> None:
    """The refusal filter's set: the target's cgroups ("only"), or every cgroup that
    existed before the command but its own ("except": the containers it starts are new)."""
    how = target.config.refusal_cgroups
    if how == "only":
        ids: set[int] = set(target.cgroup_ids)
    elif how == "except" and target.follower is not None:
        ids = set(target.follower.known) - set(target.cgroup_ids)
    else:
        return
    left = program.set_refusal_cgroups(ids)
    if left and how == "only":
        err.write(f"capwatch: note: refusals of {left} of the target's cgroups are not watched\n")
    elif left:
        err.write(
            f"capwatch: note: {left} existing cgroups did not fit the refusal filter: their"
            " refusals reach capwatch too (and are left out by it)\n"
        )


def _refusal_handler(
    col: Findings,
    attributor: Attributor,
    target: Target,
    proc_root: str,
    path_of: Callable[[int, int], str | None],
    *,
    keep: Callable[[Event], bool] | None = None,
) -> Callable[[Event], None]:
    """A syscall refused without a capability denial: judged with what is seen now.
    ``keep`` decides whose refusals are the target's when the kernel cannot (the
    containers a command starts)."""

    # the evidence as trace reads it (status, path, file, a stand-in for a gone process)
    evidence = refusal_evidence(
        attributor.resolve, path_of, proc_root=proc_root, cgroup_root=attributor.cgroup_root
    )

    def on_refusal(ev: Event) -> None:
        if keep is not None and not keep(ev):
            return
        read = evidence(ev)
        if read is None:  # a runtime's tolerated set-up, or an EPERM that means else
            return
        w = attributor.resolve(ev.cgroup_id)
        facts = replace(
            read,
            container=w.container_name or w.name or target.name,
            container_id=w.container_id,
            pod=w.pod,
            namespace=w.namespace,
        )
        syscall = facts.syscall
        path = facts.file.path if facts.file is not None else None
        key = (ev.comm, syscall, ev.ret, path)
        if key in col.refusals:
            col.refusals[key].count += 1
        else:
            col.refusals[key] = judge(facts)
            col.refusal_cgroup[key] = ev.cgroup_id
        if col.refusals[key].verdict == "file capabilities":
            col.filecap_exec.add(ev.tid)

    return on_refusal


def _follow(target: Target, attributor: Attributor) -> Callable[[Event], bool]:
    """Whether an event's cgroup is a container that the watched command started."""

    def follow(ev: Event) -> bool:
        f = target.follower
        if f is None or ev.cgroup_id in f.known or ev.cgroup_id in f.rejected:
            return False
        attributor.note_pid(ev.cgroup_id, ev.pid)
        w = attributor.resolve(ev.cgroup_id)
        if w.cgroup_path is None:
            return False  # not known yet: undecided, the next event asks again
        # a name not known yet is taken to be the one asked for: the cgroup is new
        name = w.container_name or w.name or f.name or ""
        if f.decide(ev.cgroup_id, w, lambda _cid: name):
            target.cgroup_ids.add(ev.cgroup_id)
            return True
        return False

    return follow


@dataclass
class Observed:
    collector: Findings
    seconds: float
    returncode: int | None = None  # the command's exit status, when a command was run
    # the checks of the containers the command started (followed), if it started any
    in_containers: Findings | None = None


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
    # advise -- podman run ...: what the started containers did, apart from the runtime
    inside = (
        Findings(only=target.follower.followed)
        if target.follower is not None and args.command == "advise"
        else None
    )
    cgroups = target.cgroup_ids
    follow = _follow(target, attributor)
    try:
        session = Session(target.config, args.attach, kernel_headers=args.kernel_headers)
    except BaseException:
        attributor.close()
        raise
    _fill_refusal_cgroups(session.program, target, err)
    pipeline = Pipeline(
        attributor.resolve,
        [col] if inside is None else [col, inside],
        policy=policy,
        outcome=True,
        accept=(lambda ev: ev.cgroup_id in cgroups or follow(ev)) if cgroups else None,
        classify_allowed=True,
        snapshot=_snapshot(attributor, args.proc_root, col),
        fd_kind=fd_kind_of(args.proc_root),
        on_refusal=_refusal_handler(
            col,
            attributor,
            target,
            args.proc_root,
            session.program.refusal_path,
            keep=(
                (lambda ev: ev.cgroup_id in cgroups or follow(ev))
                if target.follower is not None
                else None
            ),
        ),
        note_pid=attributor.note_pid,
    )
    t0 = time.monotonic()
    child: subprocess.Popen[bytes] | None = None
    try:
        if (
            target.argv is not None
            and target.follower is None
            and (daemon := daemon_run(target.argv))
        ):
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
        rc = child.returncode
        col.exit_code = rc if rc > 0 else 128 - rc
        err.write(
            f"capwatch: {target.argv[0] if target.argv else ''} exited with {child.returncode}\n"
        )
    return Observed(
        col, time.monotonic() - t0, child.returncode if child is not None else None, inside
    )


def _explanations(col: Findings, target: Target) -> list[Explanation]:
    seen: dict[tuple[Any, ...], Explanation] = {}
    for c in col.denials:
        key = (c.comm, c.cap, c.syscall, c.outcome, c.role)
        if key in seen:
            seen[key].count += 1
            continue
        facts = facts_of(c, count=1)
        explained_by_file = (
            c.tid in col.filecap_exec and c.syscall in ("execve", "execveat") and c.cap == 21
        )
        facts = replace(
            facts,
            ret=None if explained_by_file else facts.ret,
            known_probe=(
                "memory accounting; the exec failed for the file's capabilities"
                if explained_by_file
                else facts.known_probe
            ),
            container=c.container_name
            or (target.name if c.kind != "host" else "")
            or facts.container,
            caps_source=col.caps_source.get((c.pid, c.uid, c.comm), ""),
        )
        seen[key] = explain(facts)
    return fold(list(seen.values()))


def _named_refusals(
    col: Findings, target: Target, attributor_names: dict[int, str]
) -> list[Refusal]:
    """The refusals, with container names learnt since they arrived."""
    for key, r in col.refusals.items():
        r.container = (
            r.container or attributor_names.get(col.refusal_cgroup[key], "") or target.name
        )
    return list(col.refusals.values())


def run_explain(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if args.last:
        from capwatch.sinks.recent import read_recent

        last = read_recent(args.state_file, args.last)  # refusals with their verdicts too
        if not last:
            raise CapwatchError(
                f"no denials recorded in {args.state_file} (run capwatch trace or serve first)"
            )
        _print(args, last, out)
        return 0
    target = make_target(args, unique=False, err=err)
    seen = _observe(args, target, err)
    col = seen.collector
    started = bool(target.follower and target.follower.followed)
    exps = tolerate_runtime(_explanations(col, target), 0 if started else col.exit_code)
    names = {c.cgroup_id: c.container_name or "" for c in col.denials}
    refusals = _named_refusals(col, target, names)
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
    exps: Sequence[Explanation | Refusal],
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
    seen = _observe(args, target, err)
    col = seen.collector
    if target.follower is not None and target.follower.followed and seen.in_containers is not None:
        col = seen.in_containers  # the container's needs, not the runtime's that started it
    a = advice_of(col, seen.seconds, target.label)
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
            reply=reply_text(c.reply),
        )
        for c in col.denials
    ]
    return advise(obs, duration_s=seconds, target=label)


def _policy_rule(c: Check) -> str | None:
    """The policy rule that made a denial expected (not the outcome's verdict)."""
    return c.rule if c.rule is not None and not c.rule.startswith("outcome:") else None
