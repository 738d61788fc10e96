"""`capwatch serve`: the DaemonSet mode. Attach, count, log denials, serve metrics.

Order matters: the policy is read and the HTTP socket bound before the BPF
program is loaded (bad input fails before any kernel work); capabilities
are dropped right after attaching, before any thread starts (capabilities
are per thread), so the walker, the Kubernetes watcher and the HTTP server
run with CAP_BPF only.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from typing import Any, TextIO

import structlog

from capwatch import _bpf
from capwatch.caps import cap_name
from capwatch.containers import Attributor, Workload
from capwatch.denylog import Denial, DenialLog
from capwatch.events import Batch, Event, events_from_batch
from capwatch.exporter import CapwatchCollector, ExporterState, workload_labels
from capwatch.outcome import Joined, OutcomeJoiner
from capwatch.policy import Policy
from capwatch.recent import RecentDenials, with_caps
from capwatch.render import Clock, to_record
from capwatch.server import MetricsServer, parse_listen
from capwatch.session import Session, stop_on_signals
from capwatch.syscalls import syscall_name
from capwatch.workloads import HoldQueue, identity_of

__all__ = ["DenialPipeline", "health_of", "run_serve"]

STALL_SECONDS = 10.0


class DenialPipeline:
    """Each denial: joined with its outcome (opt-in), attributed, classified,
    counted for the exporter, and given to the rate-limited log."""

    def __init__(
        self,
        resolve: Any,
        policy: Policy,
        state: ExporterState,
        log: DenialLog,
        *,
        node: str,
        outcome: bool,
        note_pid: Any = None,
        k8s: bool = False,
        recent: RecentDenials | None = None,
        proc_root: str = "/proc",
        clock: Clock | None = None,
    ) -> None:
        self.resolve = resolve
        self.recent = recent
        self.proc_root = proc_root
        self.policy = policy
        self.state = state
        self.log = log
        self.node = node
        self.clock = clock or Clock()
        # The log waits (at most 1 s, in order) for a new workload's name.
        self.hold = HoldQueue(resolve, self._feed, note_pid=note_pid, k8s=k8s)
        self.joiner = OutcomeJoiner(self._denial) if outcome else None

    def on_batch(self, ring: str, batch: Batch) -> None:
        if ring != "denials":
            return
        for ev in events_from_batch(batch):
            self.hold.push(ev)

    def _feed(self, ev: Event) -> None:
        if self.joiner is not None:
            self.joiner.feed(ev)
        elif ev.denied:
            self._denial(Joined(ev, None))

    def tick(self) -> None:
        self.hold.flush()
        if self.joiner is not None:
            self.joiner.expire(time.monotonic_ns())
        self.log.tick()
        if self.recent is not None:
            self.recent.flush()

    def close(self) -> None:
        self.hold.flush(force=True)
        if self.joiner is not None:
            self.joiner.flush()
        self.log.close()
        if self.recent is not None:
            self.recent.flush(force=True)

    def _denial(self, j: Joined) -> None:
        ev = j.event
        if not ev.denied:
            return
        w: Workload = self.resolve(ev.cgroup_id)
        ns, pod, container, runtime = workload_labels(w)
        syscall = syscall_name(ev.syscall_nr)
        rule = self.policy.classify(
            cap=ev.cap, syscall=syscall, comm=ev.comm, container=container, pod=pod, namespace=ns
        )
        rule_name = rule.name if rule is not None else None
        expected = rule is not None
        if not expected and j.role == "probe":
            expected, rule_name = True, f"outcome:{j.outcome}"
        self.state.count_denial(ev.cgroup_id, ev.cap, expected=expected, n=1 + ev.suppressed)
        self.log.record(
            Denial(
                time=self.clock.wall(ev.ts_ns).timestamp(),
                node=self.node,
                namespace=ns,
                pod=pod,
                container=container,
                runtime=runtime,
                comm=ev.comm,
                pid=ev.pid,
                uid=ev.uid,
                capability=cap_name(ev.cap),
                syscall=syscall,
                expected=expected,
                rule=rule_name,
                suppressed=ev.suppressed,
            )
        )
        if self.recent is not None:
            # the same record trace keeps (render.to_record), plus what serve knows
            rec = to_record(ev, self.clock, lambda _cg: identity_of(w))
            rec["rule"] = rule_name if expected else None
            rec.update(j.fields())
            self.recent.add(rec if rec in self.recent else with_caps(rec, self.proc_root))


def health_of(s: Session | None, stall_seconds: float = STALL_SECONDS) -> tuple[bool, str]:
    """/healthz: fails while starting, when the consumer loop is not running, and
    when ring data has waited longer than ``stall_seconds`` (a stuck consumer)."""
    if s is None:
        return False, "starting"
    if not s.running:
        return False, "consumer not running"
    lag = s.consumer_lag_s()
    if lag > stall_seconds:
        return False, f"consumer stalled for {lag:.0f}s"
    return True, f"ok: attached via {s.mode}"


def run_serve(args: Any, out: TextIO) -> int:
    from capwatch import _privs
    from capwatch.k8s import K8sConfigError, PodWatcher

    log = structlog.wrap_logger(
        structlog.PrintLogger(out),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
    )
    policy = Policy.load(args.policy)
    host, port = parse_listen(args.listen)
    node = args.node or os.environ.get("NODE_NAME") or platform.node()
    stop = threading.Event()
    stop_on_signals(stop)

    session: Session | None = None
    holder: dict[str, Any] = {}

    def health() -> tuple[bool, str]:
        return health_of(holder.get("session"))

    collector: list[CapwatchCollector] = []

    def render() -> bytes:
        return collector[0].exposition() if collector else b""

    server = MetricsServer(render, health, host, port)  # binds now: fail before loading BPF
    watcher = None
    attributor = None
    try:
        config = _bpf.ProgramConfig(outcome=args.outcome)
        session = Session(config, args.attach, kernel_headers=args.kernel_headers)
        holder["session"] = session
        for a in session.program.attempts:
            if a.error is not None:
                log.warning("attach_mode_unavailable", mode=a.mode, reason=a.error)
        headers = session.program.headers
        log.info("kernel_headers", source=headers.source, path=headers.path)
        log.info(
            "attached",
            mode=session.mode,
            seconds=round(session.attach_seconds, 3),
            hooks=session.program.hooks(),
            node=node,
            policy=policy.source,
            outcome=args.outcome,
        )
        if args.drop_privileges:
            try:
                kept = _privs.drop_capabilities(_privs.KEEP_AFTER_ATTACH)
                log.info("capabilities_dropped", kept=kept)
            except OSError as exc:
                log.warning("capabilities_not_dropped", error=str(exc))
        try:
            watcher = PodWatcher.from_environment()
            log.info(
                "kubernetes_metadata",
                node=watcher.node_name if hasattr(watcher, "node_name") else node,
            )
        except K8sConfigError as exc:
            log.info("kubernetes_metadata_off", reason=str(exc))
        attributor = Attributor(
            cgroup_root=args.cgroup_root,
            proc_root=args.proc_root,
            k8s=watcher.cache if watcher is not None else None,
        )
        sess = session
        state = ExporterState(
            session.program,
            attributor.resolve,
            cgroup_root=attributor.cgroup_root,
            max_series=args.max_series,
            series_ttl=args.series_ttl,
            health=lambda: (sess.running, sess.consumer_lag_s(), sess.decode_errors()),
            k8s=watcher is not None,
        )
        collector.append(CapwatchCollector(state))
        denylog = DenialLog(out, interval=args.log_interval)
        pipeline = DenialPipeline(
            attributor.resolve,
            policy,
            state,
            denylog,
            node=node,
            outcome=args.outcome,
            note_pid=attributor.note_pid,
            k8s=watcher is not None,
            recent=RecentDenials(args.state_file),
            proc_root=args.proc_root,
        )
        server.start()
        log.info("serving", listen=f"{host}:{server.port}", endpoints=["/metrics", "/healthz"])
        try:
            session.run(stop, pipeline.on_batch, on_tick=pipeline.tick)
        finally:
            pipeline.close()
            stats = session.program.read_stats()
            log.info("stopped", **stats)
    finally:
        server.close()
        if attributor is not None:
            attributor.close()
        if watcher is not None:
            watcher.close()
        if session is not None:
            session.close()
    return 0
