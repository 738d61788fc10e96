"""The one path every capability check takes, whichever command watches.

    source (ring batches) -> decode -> accept (event filters)
      -> snapshot (a denying process's sets, read on arrival)
      -> hold (until its workload is named, at most 1 s, in order)
      -> join outcome (--outcome) -> classify (policy, outcome)
      -> Check (one immutable record) -> keep / unique -> sinks

A syscall refused with no capability denied in it (a refusal record, for a
single target only) takes the same path: its evidence is read on arrival
(``refusal_facts``), it is judged once its workload is named, and it becomes
a Check whose ``refusal`` holds the verdict, the evidence and the fix.

`trace`, `serve`, `explain` and `advise` are configurations of
:class:`Pipeline`: which filters, whether outcomes are joined, which sinks.
A sink is anything with ``write(check)``, ``tick()`` and ``close()``: the
table and JSON writers, the denial log, the exporter's denial counter, the
recent-denials store, explain's collector.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol, TypedDict

from capwatch.attribution.containers import Workload
from capwatch.attribution.workloads import HoldQueue, Identity, identity_of
from capwatch.decode.caps import cap_name
from capwatch.decode.events import Batch, Event, events_from_batch
from capwatch.decode.procfs import ProcStatus, fd_kind, read_status
from capwatch.decode.syscalls import syscall_name
from capwatch.diagnose.explain import DenialFacts, Explanation, explain
from capwatch.diagnose.outcome import (
    Joined,
    OutcomeJoiner,
    is_async_candidate,
    outcome_text,
    reply_text,
    role_of,
)
from capwatch.diagnose.policy import Policy
from capwatch.diagnose.refusals import Refusal, RefusalFacts, judge
from capwatch.errors import CapwatchError

__all__ = [
    "Check",
    "Clock",
    "Pipeline",
    "Sink",
    "StatusSnapshots",
    "facts_of",
    "finding_fields",
    "status_of",
]


class Clock:
    """Turns bpf_ktime_get_ns() (CLOCK_MONOTONIC) into wall-clock seconds."""

    def __init__(self) -> None:
        self.offset_ns = time.time_ns() - time.monotonic_ns()

    def wall(self, ts_ns: int) -> float:
        return (ts_ns + self.offset_ns) / 1e9


@dataclass(frozen=True, slots=True, kw_only=True)
class Check:
    """One capability check, attributed, joined and classified: the record every
    sink gets and every command prints (``to_dict`` is the JSON shape)."""

    time: float  # wall-clock seconds since the epoch when the kernel saw it
    pid: int
    tid: int
    uid: int
    comm: str
    cgroup_id: int
    container: str  # the short form users read: a name, a short id, host, cgroup:<id>
    kind: str
    runtime: str
    container_id: str
    container_name: str
    pod: str
    namespace: str
    service: str = ""
    cap: int
    denied: bool
    syscall_nr: int
    audit: bool | None = None  # None where the hook does not tell
    insetid: bool | None = None
    userns: bool | None = None
    suppressed: int = 0  # denials of this key the kernel rate-limited since its last event
    ret: int | None = None  # the syscall's result, when joined and known
    exit_code: int | None = None  # the process's exit status (asynchronous refusals)
    reply: int | None = None  # the netlink reply's error, 0 for an ack (asynchronous refusals)
    channel: str = ""  # what a send-family syscall wrote to: netlink | socket | file | "" unknown
    joined: bool = False  # whether outcomes were joined (--outcome)
    rule: str | None = None  # what made a denial expected (a policy rule, outcome:ENODEV)
    status: ProcStatus | None = field(default=None, compare=False)  # sets read at the denial
    # a syscall refused with no capability denied in it (cap -1): what refused, the
    # evidence and the fix (capwatch.diagnose.refusals.judge)
    refusal: Refusal | None = None

    @property
    def capability(self) -> str:
        return "" if self.refusal is not None else cap_name(self.cap)

    @property
    def verdict(self) -> str:
        if self.refusal is not None:
            return "refused"
        return "denied" if self.denied else "allowed"

    @property
    def syscall(self) -> str:
        return syscall_name(self.syscall_nr)

    @property
    def outcome(self) -> str | None:
        return outcome_text(self.ret) if self.joined else None

    @property
    def role(self) -> str | None:
        """cause | probe | unknown; a send-family denial whose syscall succeeded is
        never a probe (netlink answers in the reply): see diagnose.outcome.role_of."""
        if not self.joined:
            return None
        return role_of(self.ret, self.syscall, self.exit_code, self.reply, self.channel)

    @property
    def expected(self) -> bool | None:
        """Denials: whether the policy or the outcome explains them away."""
        return self.rule is not None if self.denied else None

    @property
    def count(self) -> int:
        """How many checks this record stands for."""
        return 1 + self.suppressed

    def finding(self) -> Refusal | Explanation | None:
        """What refused the syscall, in explain's words: the refusal's verdict, or,
        for a capability denial whose syscall failed with it (a cause), explain's."""
        if self.refusal is not None:
            return self.refusal
        if self.denied and self.joined and self.role == "cause":
            return explain(facts_of(self))
        return None

    def iso_time(self) -> str:
        return datetime.fromtimestamp(self.time, tz=UTC).isoformat(timespec="microseconds")

    def to_dict(self, *, with_caps: bool = False) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "time": self.iso_time(),
            "pid": self.pid,
            "tid": self.tid,
            "uid": self.uid,
            "comm": self.comm,
            "cgroup_id": self.cgroup_id,
            "container": self.container,
            "kind": self.kind,
            "runtime": self.runtime,
            "container_id": self.container_id,
            "container_name": self.container_name,
            "pod": self.pod,
            "namespace": self.namespace,
            "capability": self.capability,
            "cap": self.cap,
            "verdict": self.verdict,
            "syscall": self.syscall,
            "syscall_nr": self.syscall_nr,
            "audit": self.audit,
            "insetid": self.insetid,
            "userns": self.userns,
            "suppressed": self.suppressed,
        }
        if self.joined:
            rec["outcome"], rec["role"] = self.outcome, self.role
            if self.ret is not None:
                rec["syscall_ret"] = self.ret
            if self.exit_code is not None:
                rec["exit_code"] = self.exit_code
            if self.reply is not None:
                rec["reply"], rec["reply_ret"] = reply_text(self.reply), self.reply
            if self.channel:
                rec["channel"] = self.channel
        if self.denied:
            rec["expected"], rec["rule"] = self.expected, self.rule
        if self.service:
            rec["service"] = self.service
        if self.refusal is not None:
            rec["refusal"] = finding_fields(self.refusal)
        if with_caps and self.status is not None:
            st = self.status
            rec["caps"] = {k: f"{v:016x}" for k, v in st.caps().items()}
            rec["process"] = {
                "pid": st.pid,
                "name": st.name,
                "uid": st.uid,
                "euid": st.euid,
                "nspid": list(st.nspid),
                "no_new_privs": st.no_new_privs,
            }
        return rec

    @classmethod
    def from_dict(cls, rec: Mapping[str, Any]) -> Check:
        """The inverse of :meth:`to_dict` (a state file). Raises ValueError."""
        try:
            ts = datetime.fromisoformat(str(rec["time"])).timestamp()
            ret = rec.get("syscall_ret")
            check = cls(
                time=ts,
                pid=int(rec["pid"]),
                tid=int(rec.get("tid", rec["pid"])),
                uid=int(rec.get("uid", 0)),
                comm=str(rec.get("comm", "?")),
                cgroup_id=int(rec.get("cgroup_id", 0)),
                container=str(rec.get("container") or ""),
                kind=str(rec.get("kind") or "host"),
                runtime=str(rec.get("runtime") or ""),
                container_id=str(rec.get("container_id") or ""),
                container_name=str(rec.get("container_name") or ""),
                pod=str(rec.get("pod") or ""),
                namespace=str(rec.get("namespace") or ""),
                service=str(rec.get("service") or ""),
                cap=int(rec["cap"]),
                denied=rec.get("verdict", "denied") in ("denied", "refused"),
                syscall_nr=int(rec.get("syscall_nr", -1)),
                audit=_opt_bool(rec.get("audit")),
                insetid=_opt_bool(rec.get("insetid")),
                userns=_opt_bool(rec.get("userns")),
                suppressed=int(rec.get("suppressed", 0)),
                ret=None if ret is None else int(ret),
                exit_code=None if rec.get("exit_code") is None else int(rec["exit_code"]),
                reply=None if rec.get("reply_ret") is None else int(rec["reply_ret"]),
                channel=str(rec.get("channel") or ""),
                joined="outcome" in rec,
                rule=None if rec.get("rule") is None else str(rec["rule"]),
                status=_status_from(rec),
            )
            found = rec.get("refusal")
            if found is None:
                return check
            if not isinstance(found, dict):
                raise TypeError("refusal is not an object")
            return replace(check, refusal=_refusal_from(check, found))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a capwatch record: {exc}") from None


def finding_fields(f: Refusal | Explanation) -> dict[str, Any]:
    """A finding's own words in a record: its verdict, summary, evidence and fixes
    (and the path a refusal named); the rest is the record's."""
    out: dict[str, Any] = {
        "verdict": f.verdict,
        "summary": f.summary,
        "details": list(f.details),
        "fixes": [dict(x) for x in f.fixes],
    }
    if isinstance(f, Refusal):
        out["path"] = f.path
    return out


class _WorkloadFacts(TypedDict):
    kind: str
    container: str
    container_id: str
    pod: str
    namespace: str


def _workload_facts(c: Check) -> _WorkloadFacts:
    """The workload as explain's facts name it (the same for denials and refusals)."""
    return {
        "kind": "kubernetes" if c.kind == "kubernetes" or c.pod else (c.runtime or c.kind),
        "container": c.container_name or c.container,
        "container_id": c.container_id,
        "pod": c.pod,
        "namespace": c.namespace,
    }


def _refusal_from(c: Check, found: Mapping[str, Any]) -> Refusal:
    fixes = found.get("fixes") or []
    if not isinstance(fixes, list) or not all(isinstance(x, dict) for x in fixes):
        raise TypeError("refusal fixes are not a list of objects")
    return Refusal(
        verdict=str(found["verdict"]),
        syscall=c.syscall,
        outcome=outcome_text(c.ret),
        comm=c.comm,
        pid=c.pid,
        summary=str(found.get("summary", "")),
        details=[str(d) for d in found.get("details") or []],
        fixes=[{str(k): str(v) for k, v in x.items()} for x in fixes],
        count=c.count,
        path=str(found.get("path") or ""),
        **_workload_facts(c),
    )


def _opt_bool(v: object) -> bool | None:
    return None if v is None else bool(v)


def _status_from(rec: Mapping[str, Any]) -> ProcStatus | None:
    caps = rec.get("caps")
    if not isinstance(caps, dict):
        return None
    proc = rec.get("process")
    if not isinstance(proc, dict):
        proc = {}
    try:
        return ProcStatus(
            pid=int(proc.get("pid", rec["pid"])),
            name=str(proc.get("name", rec.get("comm", ""))),
            uid=int(proc.get("uid", rec.get("uid", 0))),
            euid=int(proc.get("euid", rec.get("uid", 0))),
            cap_inh=int(caps["CapInh"], 16),
            cap_prm=int(caps["CapPrm"], 16),
            cap_eff=int(caps["CapEff"], 16),
            cap_bnd=int(caps["CapBnd"], 16),
            cap_amb=int(caps["CapAmb"], 16),
            nspid=tuple(int(x) for x in proc.get("nspid", ())),
            no_new_privs=bool(proc.get("no_new_privs", False)),
        )
    except (KeyError, ValueError, TypeError):
        return None


def facts_of(c: Check, *, count: int | None = None) -> DenialFacts:
    """What explain needs from a denial record (live, recorded or replayed)."""
    w = _workload_facts(c)
    return DenialFacts(
        cap=c.cap,
        syscall=c.syscall,
        comm=c.comm,
        pid=c.pid,
        ret=c.ret,
        known_probe=c.rule if c.rule is not None and not c.rule.startswith("outcome:") else None,
        status=c.status,
        kind=w["kind"],
        container=w["container"],
        pod=c.pod,
        namespace=c.namespace,
        service=c.service,
        userns=c.userns,
        count=c.count if count is None else count,
        exit_code=c.exit_code,
        reply=c.reply,
        channel=c.channel,
        uid=c.uid,
        container_id=c.container_id,
    )


class Sink(Protocol):
    def write(self, check: Check) -> None: ...
    def tick(self) -> None: ...
    def close(self) -> None: ...


def fd_kind_of(proc_root: str) -> Callable[[int, int], str | None]:
    """Live pipelines' way to tell what a send-family syscall wrote to (procfs.fd_kind)."""
    return lambda pid, fd: fd_kind(pid, fd, proc_root=proc_root)


def status_of(proc_root: str) -> Callable[[Event], ProcStatus | None]:
    """The default snapshot: the process's own /proc/PID/status, if it is still there."""

    def read(ev: Event) -> ProcStatus | None:
        with contextlib.suppress(CapwatchError):
            return read_status(ev.pid, proc_root=proc_root)
        return None

    return read


class StatusSnapshots:
    """A denying process's capability sets, read once per process when its first
    denial arrives (before any hold: short-lived processes are gone soon).
    Bounded: the oldest processes are forgotten first."""

    def __init__(self, read: Callable[[Event], ProcStatus | None], *, limit: int = 4096) -> None:
        self._read = read
        self._limit = limit
        # by (pid, uid, comm): a setuid() or an execve changes the sets of one pid
        self._seen: OrderedDict[tuple[int, int, str], ProcStatus | None] = OrderedDict()

    def take(self, ev: Event) -> None:
        key = (ev.pid, ev.uid, ev.comm)
        if key in self._seen:
            self._seen.move_to_end(key)
            return
        self._seen[key] = self._read(ev)
        if len(self._seen) > self._limit:
            self._seen.popitem(last=False)

    def get(self, pid: int, uid: int, comm: str) -> ProcStatus | None:
        return self._seen.get((pid, uid, comm))


class Pipeline:
    """One configuration of the data path. Feed it ring batches with
    :meth:`on_batch`; call :meth:`tick` after every drain and :meth:`close` once."""

    def __init__(
        self,
        resolve: Callable[[int], Workload],
        sinks: Sequence[Sink],
        *,
        policy: Policy | None = None,
        outcome: bool = False,
        rings: Iterable[str] | None = None,
        accept: Callable[[Event], bool] | None = None,
        keep: Callable[[Check], bool] | None = None,
        unique: bool = False,
        classify_allowed: bool = False,
        snapshot: Callable[[Event], ProcStatus | None] | None = None,
        on_refusal: Callable[[Event], None] | None = None,
        fd_kind: Callable[[int, int], str | None] | None = None,
        refusal_facts: Callable[[Event], RefusalFacts | None] | None = None,
        note_pid: Callable[[int, int], None] | None = None,
        k8s: bool = False,
        clock: Clock | None = None,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.resolve = resolve
        self.sinks = list(sinks)
        self.policy = policy
        self.rings = None if rings is None else frozenset(rings)
        self.accept = accept
        self.keep = keep
        self.unique = unique
        self.classify_allowed = classify_allowed
        self.snapshots = StatusSnapshots(snapshot) if snapshot is not None else None
        self.clock = clock or Clock()
        self._monotonic_ns = monotonic_ns
        self._seen: set[tuple[Any, ...]] = set()
        self._identity: dict[Workload, Identity] = {}
        self.written = 0
        # The hold's clock is the pipeline's: a replay's is the recording's, so an
        # identity learnt too late live is too late on replay as well.
        self.hold = HoldQueue(
            resolve,
            self._joined_or_not,
            note_pid=note_pid,
            k8s=k8s,
            clock=lambda: self._monotonic_ns() / 1e9,
        )
        # refusal records: their evidence, read on arrival (None: not shown), by (tid, ts)
        self.refusal_facts = refusal_facts
        self._evidence: OrderedDict[tuple[int, int], RefusalFacts | None] = OrderedDict()
        self._on_refusal = on_refusal
        refusals = on_refusal if refusal_facts is None else self._refused
        self.joiner = (
            OutcomeJoiner(self._emit, on_refusal=refusals, fd_kind=fd_kind) if outcome else None
        )

    # -- the event path --------------------------------------------------------

    def on_batch(self, ring: str, batch: Batch) -> None:
        if self.rings is not None and ring not in self.rings:
            return
        for ev in events_from_batch(batch):
            self.push(ev)

    def push(self, ev: Event) -> None:
        if ev.is_refusal and self.refusal_facts is not None:
            if self.accept is not None and not self.accept(ev):
                return
            # the process may be gone soon: its evidence is read now, judged later
            self._evidence[(ev.tid, ev.ts_ns)] = self.refusal_facts(ev)
            if len(self._evidence) > 4096:
                self._evidence.popitem(last=False)
        elif self.accept is not None and not ev.is_outcome and not self.accept(ev):
            return
        if self.snapshots is not None and ev.denied and not ev.is_outcome:
            self.snapshots.take(ev)
        self.hold.push(ev)

    def _joined_or_not(self, ev: Event) -> None:
        if self.joiner is not None:
            self.joiner.feed(ev)
        elif not ev.is_outcome:
            self._emit(Joined(ev, None))

    def _emit(self, j: Joined) -> None:
        self._deliver(self.check_of(j))

    def _refused(self, ev: Event) -> None:
        """A refusal record, its workload named: judged with the evidence read on arrival."""
        if self._on_refusal is not None:
            self._on_refusal(ev)
        facts = self._evidence.pop((ev.tid, ev.ts_ns), None)
        if facts is None:
            return  # tolerated (a runtime setting a container up) or not read
        check = self.check_of(Joined(ev, ev.ret))
        self._deliver(replace(check, refusal=judge(replace(facts, **_workload_facts(check)))))

    def _deliver(self, check: Check) -> None:
        if self.keep is not None and not self.keep(check):
            return
        if self.unique:
            verdict = check.refusal.verdict if check.refusal is not None else None
            key = (check.container, check.comm, check.cap, check.denied, check.syscall_nr, verdict)
            if key in self._seen:
                return
            if len(self._seen) >= 100_000:
                self._seen.clear()
            self._seen.add(key)
        self.written += 1
        for s in self.sinks:
            s.write(check)

    def check_of(self, j: Joined) -> Check:
        ev = j.event
        w = self.resolve(ev.cgroup_id)
        ident = self._identity.get(w)
        if ident is None:
            if len(self._identity) > 10_000:
                self._identity.clear()
            ident = self._identity[w] = identity_of(w)
        denied = ev.denied or ev.is_refusal  # a refusal record: no capability in it
        joined = self.joiner is not None and denied
        rule: str | None = None
        if self.policy is not None and not ev.is_refusal and (ev.denied or self.classify_allowed):
            r = self.policy.classify(
                cap=ev.cap,
                syscall=syscall_name(ev.syscall_nr),
                comm=ev.comm,
                container=ident["container"],  # "host" for the host (Workload.label)
                pod=ident["pod"],
                namespace=ident["namespace"],
            )
            rule = r.name if r is not None else None
        # Only the kernel's own word makes a denial expected: the syscall's result.
        # A send-family call that succeeded is judged by what the process read back
        # (a netlink reply) or what its fd is now, both of which the process itself
        # controls: such a "probe" is shown, never classified away (a tenant could
        # forge an ack, or dup2 a file over its netlink socket, to hide a denial).
        if (
            rule is None
            and joined
            and ev.denied
            and j.role == "probe"
            and not is_async_candidate(j.ret, syscall_name(ev.syscall_nr))
        ):
            rule = f"outcome:{j.outcome}"
        return Check(
            time=self.clock.wall(ev.ts_ns),
            pid=ev.pid,
            tid=ev.tid,
            uid=ev.uid,
            comm=ev.comm,
            cgroup_id=ev.cgroup_id,
            container=ident["container"],
            kind=ident["kind"],
            runtime=ident["runtime"],
            container_id=ident["container_id"],
            container_name=ident["container_name"],
            pod=ident["pod"],
            namespace=ident["namespace"],
            service=w.service,
            cap=ev.cap,
            denied=denied,
            syscall_nr=ev.syscall_nr,
            audit=None if ev.noaudit is None else not ev.noaudit,
            insetid=ev.insetid,
            userns=ev.in_userns,
            suppressed=ev.suppressed,
            ret=j.ret if joined else None,
            exit_code=j.exit_code if joined else None,
            reply=j.reply if joined else None,
            channel=j.channel if joined else "",
            joined=joined,
            rule=rule,
            status=(
                self.snapshots.get(ev.pid, ev.uid, ev.comm)
                if self.snapshots is not None and ev.denied
                else None
            ),
        )

    # -- time ----------------------------------------------------------------

    def tick(self) -> None:
        self.hold.flush()
        if self.joiner is not None:
            self.joiner.expire(self._monotonic_ns())
        for s in self.sinks:
            s.tick()

    def close(self) -> None:
        """Everything held or pending goes out, then the sinks close."""
        self.hold.flush(force=True)
        if self.joiner is not None:
            self.joiner.flush()
        for s in self.sinks:
            s.close()
