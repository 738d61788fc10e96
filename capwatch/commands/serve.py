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
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TextIO

import structlog

from capwatch.attribution.containers import Attributor, Workload
from capwatch.diagnose.policy import Policy
from capwatch.kernel import bpf as _bpf
from capwatch.kernel.session import Session, stop_on_signals
from capwatch.logs import configure as configure_logging
from capwatch.pipeline import Pipeline, Sink, fd_kind_of, status_of
from capwatch.sinks.denylog import DenialLog
from capwatch.sinks.exporter import CapwatchCollector, DenialCounter, ExporterState
from capwatch.sinks.recent import RecentDenials
from capwatch.sinks.server import MetricsServer

if TYPE_CHECKING:
    from capwatch.sinks.profiles import ProfileSink

__all__ = ["health_of", "run_serve", "serve_pipeline"]

STALL_SECONDS = 10.0


def serve_pipeline(
    resolve: Callable[[int], Workload],
    sinks: Sequence[Sink],
    *,
    policy: Policy,
    outcome: bool,
    k8s: bool = False,
    proc_root: str = "/proc",
    note_pid: Callable[[int, int], None] | None = None,
    profiles: bool = False,
) -> Pipeline:
    """serve's configuration: denials only (and, with profiles, each distinct
    allowed check, classified like denials), held for names (Kubernetes ones
    too), each denying process's sets read on arrival."""
    return Pipeline(
        resolve,
        sinks,
        policy=policy,
        outcome=outcome,
        rings=("denials", "checks") if profiles else ("denials",),
        classify_allowed=profiles,
        snapshot=status_of(proc_root),
        fd_kind=fd_kind_of(proc_root),
        note_pid=note_pid,
        k8s=k8s,
    )


def _every(
    period: float, action: Callable[[], object], *, then: Callable[[], None]
) -> Callable[[], None]:
    """A tick that also runs ``action`` once every ``period`` seconds."""
    import time

    due = [time.monotonic() + period]

    def tick() -> None:
        now = time.monotonic()
        if now >= due[0]:
            due[0] = now + period
            action()
        then()

    return tick


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
    from capwatch.attribution.k8s import K8sConfigError, OwnerResolver, PodWatcher
    from capwatch.kernel import privs as _privs
    from capwatch.sinks.profiles import ProfileSink

    configure_logging(out, "json")  # the DaemonSet's log: JSON lines, every module
    log = structlog.get_logger("capwatch.commands.serve")
    policy = Policy.load(args.policy)
    listen = args.listen
    node = args.node or os.environ.get("NODE_NAME") or platform.node()
    stop = threading.Event()
    stop_on_signals(stop)

    session: Session | None = None
    holder: dict[str, Any] = {}

    def health() -> tuple[bool, str]:
        ok, why = health_of(holder.get("session"))
        if ok and collector:
            maps_ok, maps_why = collector[0].state.healthy()  # kernel map reads failing
            if not maps_ok:
                return False, maps_why
        return ok, why

    collector: list[CapwatchCollector] = []
    extra: list[ProfileSink] = []

    def render() -> bytes:
        if not collector:
            return b""
        return collector[0].exposition() + b"".join(p.exposition() for p in extra)

    server = MetricsServer(render, health, listen)  # binds now: fail before loading BPF
    watcher = None
    attributor = None
    try:
        # --profiles: each distinct allowed check crosses once (per refresh period)
        config = _bpf.ProgramConfig(outcome=args.outcome, unique=args.profiles)
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
            profiles=args.profiles,
        )
        if args.drop_privileges:  # fatal on failure (CapwatchError): --no-drop-privileges
            dropped = _privs.drop_privileges(_privs.KEEP_AFTER_ATTACH)
            log.info(
                "capabilities_dropped",
                kept=dropped.kept,
                bounding_reduced=dropped.bounding_reduced,
                no_new_privs=True,
            )
        try:
            if args.kube_api:  # out of cluster: kubectl proxy, or a test's API server
                from capwatch.attribution.k8s_http import ApiConfig

                watcher = PodWatcher(ApiConfig(base_url=args.kube_api), node)
            else:
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
            policy=policy,
            held=session.program,
        )
        collector.append(CapwatchCollector(state))
        sinks: list[Sink] = [
            DenialCounter(state),
            DenialLog(out, interval=args.log_interval, node=node, fmt="json"),
            RecentDenials(args.state_file),
        ]
        if args.profiles:
            profile = ProfileSink(
                node=node,
                pods=watcher.cache if watcher is not None else None,
                owners=OwnerResolver(watcher.api) if watcher is not None else None,
            )
            extra.append(profile)
            sinks.append(profile)
        pipeline = serve_pipeline(
            attributor.resolve,
            sinks,
            policy=policy,
            outcome=args.outcome,
            k8s=watcher is not None,
            proc_root=args.proc_root,
            note_pid=attributor.note_pid,
            profiles=args.profiles,
        )
        tick = pipeline.tick
        if args.profiles:
            tick = _every(args.profile_refresh, session.program.reset_unique, then=pipeline.tick)
        server.start()
        log.info(
            "serving",
            listen=str(listen._replace(port=server.port)),
            endpoints=["/metrics", "/healthz"],
        )
        try:
            session.run(stop, pipeline.on_batch, on_tick=tick)
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
