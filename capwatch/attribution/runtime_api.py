"""Container names from the runtimes' own APIs and state, without executing anything.

* docker: the Engine API on its unix socket (``DOCKER_HOST=unix://...`` or
  ``/var/run/docker.sock``): ``GET /containers/json`` names every running
  container in one request; ``GET /containers/{id}/json`` the rest (a container
  that already exited).
* containerd: the OCI bundle of each running task,
  ``<state>/io.containerd.runtime.v2.task/<namespace>/<id>/config.json``, the
  file runc itself reads. Its ``linux.cgroupsPath`` is the container's cgroup,
  so a cgroup path such as ``/<namespace>/<id>`` (``ctr run`` with the cgroupfs
  driver) maps to the namespace and id that containerd reports; nerdctl's and
  the CRI plugin's name annotations give a name when there is one. State dirs:
  ``CAPWATCH_CONTAINERD_STATE`` (colon-separated) or the usual ones.

:class:`RuntimeNames` does this on its own thread: :meth:`~RuntimeNames.docker_name`
and :meth:`~RuntimeNames.containerd_task` are dict reads that queue a look-up on
a miss. Look-ups are rate-limited (one container list per ``min_interval``),
bounded (at most ``max_entries`` names and ``max_pending`` ids waiting), and a
runtime that is down or slow only delays names: ids that could not be named
are retried with a backoff, so names come back when the daemon does.
Why not containerd's gRPC API, its bolt DB or ``ctr``: docs/design.md.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import quote

import structlog

__all__ = [
    "CONTAINERD_STATE_DIRS",
    "PENDING",
    "ContainerdTask",
    "DockerEngine",
    "Pending",
    "RuntimeDown",
    "RuntimeNames",
    "containerd_state_dirs",
    "daemon_run",
    "docker_socket",
    "parse_container_list",
    "parse_inspect",
    "parse_task_config",
    "scan_containerd",
]

_log = structlog.get_logger(__name__)

CONTAINERD_STATE_DIRS = (
    "/run/containerd",  # containerd's default --state
    "/run/k3s/containerd",  # k3s
    "/var/run/docker/containerd/daemon",  # the containerd dockerd starts itself
)
_TASKS = "io.containerd.runtime.v2.task"
#: Annotations that name a containerd container (nerdctl; Kubernetes' CRI plugin).
_NAME_ANNOTATIONS = ("nerdctl/name", "io.kubernetes.cri.container-name")


class RuntimeDown(Exception):
    """The runtime's socket refused, timed out or answered garbage."""


class Pending:
    """The type of :data:`PENDING`."""

    def __repr__(self) -> str:
        return "PENDING"


#: Returned by :meth:`RuntimeNames.containerd_task` while the answer is not known yet.
PENDING = Pending()


@dataclass(frozen=True, slots=True)
class ContainerdTask:
    namespace: str
    id: str
    name: str  # a name annotation if present, else the id


def docker_socket(env: dict[str, str] | None = None) -> str:
    """The docker socket: ``DOCKER_HOST`` when it is ``unix://PATH``, else the default."""
    env = dict(os.environ) if env is None else env
    host = env.get("DOCKER_HOST", "")
    if host.startswith("unix://") and len(host) > len("unix://"):
        return host[len("unix://") :]
    return "/var/run/docker.sock"


def containerd_state_dirs(env: dict[str, str] | None = None) -> tuple[str, ...]:
    env = dict(os.environ) if env is None else env
    given = env.get("CAPWATCH_CONTAINERD_STATE", "")
    if given:
        return tuple(p for p in given.split(":") if p)
    return CONTAINERD_STATE_DIRS


def daemon_run(argv: list[str]) -> str | None:
    """The daemon that would run the container of a ``docker run`` / ``ctr run`` /
    ``nerdctl run`` command line (its processes are the daemon's children, not the
    command's), or None for any other command. podman runs its containers itself."""
    if not argv:
        return None
    daemons = {"docker": "dockerd", "ctr": "containerd", "nerdctl": "containerd"}
    daemon = daemons.get(os.path.basename(argv[0]))
    words = [a for a in argv[1:] if not a.startswith("-")]
    if daemon and "run" in words[:3]:  # run, container run, -n NS run
        return daemon
    return None


# --- docker -----------------------------------------------------------------------


def parse_container_list(data: object) -> dict[str, str]:
    """``GET /containers/json`` -> {full id: name} (the first name, without its '/')."""
    out: dict[str, str] = {}
    for item in data if isinstance(data, list) else []:
        if not isinstance(item, dict):
            continue
        cid, names = item.get("Id"), item.get("Names")
        if isinstance(cid, str) and isinstance(names, list) and names and isinstance(names[0], str):
            name = names[0].lstrip("/")
            if name:
                out[cid] = name
    return out


def parse_inspect(data: object) -> tuple[str, str] | None:
    """``GET /containers/{id}/json`` -> (full id, name), or None if it is not that shape."""
    if not isinstance(data, dict):
        return None
    cid, name = data.get("Id"), data.get("Name")
    if isinstance(cid, str) and isinstance(name, str) and name.lstrip("/"):
        return cid, name.lstrip("/")
    return None


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self._path)
        except OSError:
            s.close()
            raise
        self.sock = s


class DockerEngine:
    """A minimal Engine API client: GET with a timeout, one connection per request."""

    MAX_BODY = 8 << 20  # a container list larger than this is not read

    def __init__(self, socket_path: str, *, timeout: float = 2.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def get(self, path: str) -> tuple[int, object]:
        """(status, decoded JSON body); raises RuntimeDown if there is no usable answer."""
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            conn.request("GET", path, headers={"Accept": "application/json"})
            resp = conn.getresponse()
            body = resp.read(self.MAX_BODY + 1)
            status = resp.status
        except (OSError, http.client.HTTPException) as e:
            raise RuntimeDown(f"docker API at {self.socket_path}: {e}") from None
        finally:
            conn.close()
        if len(body) > self.MAX_BODY:
            raise RuntimeDown(f"docker API at {self.socket_path}: reply too large")
        try:
            return status, json.loads(body) if body else None
        except ValueError:
            raise RuntimeDown(f"docker API at {self.socket_path}: not JSON") from None

    def running(self) -> dict[str, str]:
        """{id: name} of the running containers."""
        status, data = self.get("/containers/json")
        if status != 200:
            raise RuntimeDown(f"docker API: GET /containers/json answered {status}")
        return parse_container_list(data)

    def name_of(self, container_id: str) -> str | None:
        """The name of one container, None if docker does not know the id."""
        status, data = self.get(f"/containers/{quote(container_id, safe='')}/json")
        if status == 404:
            return None
        if status != 200:
            raise RuntimeDown(f"docker API: GET /containers/<id>/json answered {status}")
        found = parse_inspect(data)
        return found[1] if found is not None and found[0] == container_id else None


# --- containerd -------------------------------------------------------------------


def parse_task_config(namespace: str, task_id: str, spec: object) -> tuple[str, ContainerdTask]:
    """An OCI bundle's config.json -> (its cgroupsPath, the task); ValueError if it has none."""
    linux = spec.get("linux") if isinstance(spec, dict) else None
    path = linux.get("cgroupsPath") if isinstance(linux, dict) else None
    if not isinstance(path, str) or not path:
        raise ValueError("no linux.cgroupsPath")
    annotations = spec.get("annotations") if isinstance(spec, dict) else None
    name = task_id
    if isinstance(annotations, dict):
        for key in _NAME_ANNOTATIONS:
            value = annotations.get(key)
            if isinstance(value, str) and value:
                name = value
                break
    if ":" in path and not path.startswith("/"):
        # the systemd driver's "slice:prefix:name" form (runc's convention)
        slice_, prefix, unit = [*path.split(":"), "", ""][:3]
        path = f"/{slice_}/{prefix}-{unit}.scope" if prefix else f"/{slice_}/{unit}"
    return "/" + path.strip("/"), ContainerdTask(namespace, task_id, name)


def scan_containerd(state_dirs: Iterable[str], limit: int = 4096) -> dict[str, ContainerdTask]:
    """{cgroup path: task} of every running containerd task under ``state_dirs``."""
    out: dict[str, ContainerdTask] = {}
    for state in state_dirs:
        tasks = os.path.join(state, _TASKS)
        try:
            namespaces = os.listdir(tasks)
        except OSError:
            continue
        for ns in namespaces:
            try:
                ids = os.listdir(os.path.join(tasks, ns))
            except OSError:
                continue
            for tid in ids:
                if len(out) >= limit:
                    return out
                cfg = os.path.join(tasks, ns, tid, "config.json")
                try:
                    with open(cfg, "rb") as f:
                        spec = json.loads(f.read(1 << 20))
                    path, task = parse_task_config(ns, tid, spec)
                except (OSError, ValueError):
                    continue  # gone meanwhile, being written, or not a Linux bundle
                out[path] = task
    return out


# --- the background source --------------------------------------------------------

Listener = Callable[[str], None]


class RuntimeNames:
    """docker names by id and containerd tasks by cgroup path, learnt on one thread.

    Listeners get the container id (docker) or the cgroup path (containerd) of
    each new answer, so that the attributor rebuilds those entries.
    """

    def __init__(
        self,
        *,
        docker_socket_path: str | None = None,
        containerd_state: Iterable[str] | None = None,
        min_interval: float = 0.5,
        max_backoff: float = 5.0,
        max_entries: int = 4096,
        max_pending: int = 1024,
        negative_ttl: float = 30.0,
        background: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.docker = DockerEngine(docker_socket_path or docker_socket())
        self.containerd_state = tuple(
            containerd_state if containerd_state is not None else containerd_state_dirs()
        )
        self.min_interval = min_interval
        self.max_backoff = max_backoff
        self.max_entries = max_entries
        self.max_pending = max_pending
        self.negative_ttl = negative_ttl
        self.clock = clock
        self.requests = 0  # docker API requests made (list + inspect)
        self.scans = 0  # containerd state scans
        self.docker_up: bool | None = None  # None until first asked
        self.docker_error = ""  # why the last request failed, while docker_up is False
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._names: OrderedDict[str, str] = OrderedDict()
        self._not_docker: OrderedDict[str, float] = OrderedDict()  # id -> when docker said 404
        self._want: OrderedDict[str, None] = OrderedDict()  # docker ids to name
        self._tasks: dict[str, ContainerdTask] = {}
        self._not_task: OrderedDict[str, float] = OrderedDict()  # path -> when not found
        self._want_paths: OrderedDict[str, None] = OrderedDict()
        self._listeners: list[Listener] = []
        self._last_list = float("-inf")
        self._backoff = 0.0
        self._next_try = float("-inf")
        self._last_scan = float("-inf")
        self._present = False
        self._present_checked = float("-inf")
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(
                target=self._run, name="capwatch-runtime-names", daemon=True
            )
            self._thread.start()

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    # -- the consumer's side: dict reads, never I/O --

    def known_docker(self, container_id: str) -> str | None:
        """The name learnt for this docker id, without asking for it."""
        return self._names.get(container_id)

    def docker_name(self, container_id: str) -> str | None:
        """The name if known; else queue the id (bounded) and return None."""
        with self._lock:
            name = self._names.get(container_id)
            if name is not None or _recent(
                self._not_docker, container_id, self.clock(), self.negative_ttl
            ):
                return name
            if container_id not in self._want and len(self._want) < self.max_pending:
                self._want[container_id] = None
                self._wake.set()
        if self._thread is None:
            self.poll()
            return self._names.get(container_id)
        return None

    def containerd_task(self, cgroup_path: str) -> ContainerdTask | Pending | None:
        """The task whose cgroup this is, None if no containerd task has it, else PENDING."""
        with self._lock:
            task = self._tasks.get(cgroup_path)
            if task is not None:
                return task
            if not self._containerd_present() or _recent(
                self._not_task, cgroup_path, self.clock(), self.negative_ttl
            ):
                return None
            if cgroup_path not in self._want_paths:
                if len(self._want_paths) >= self.max_pending:
                    return None
                self._want_paths[cgroup_path] = None
                self._wake.set()
        if self._thread is None:  # one-shot use: look now, whatever the rate limit
            self._last_scan = float("-inf")
            self.poll()
            with self._lock:
                return self._tasks.get(cgroup_path)
        return PENDING

    def _containerd_present(self) -> bool:
        """Whether a state dir has a task directory (re-checked every 30 s at most, so
        that a host without containerd never holds an unknown cgroup's events)."""
        now = self.clock()
        if now - self._present_checked >= 30.0:
            self._present_checked = now
            self._present = any(
                os.path.isdir(os.path.join(d, _TASKS)) for d in self.containerd_state
            )
        return self._present

    # -- the look-up thread --

    def poll(self) -> None:
        """One round: answer what is wanted, as far as the rate limits allow."""
        now = self.clock()
        self._poll_containerd(now)
        self._poll_docker(now)

    def _poll_containerd(self, now: float) -> None:
        with self._lock:
            wanted = list(self._want_paths)
        if not wanted or now - self._last_scan < self.min_interval:
            return
        self._last_scan = now
        self.scans += 1
        found = scan_containerd(self.containerd_state, limit=self.max_entries)
        with self._lock:
            self._tasks = found
            for path in wanted:
                self._want_paths.pop(path, None)
                if path not in found:
                    _bounded_add(self._not_task, path, now, self.max_entries)
        self._tell(wanted)  # found or not: the entries waiting on them are rebuilt

    def _poll_docker(self, now: float) -> None:
        with self._lock:
            wanted = [cid for cid in self._want if cid not in self._names]
        if not wanted or now < self._next_try:
            return
        try:
            learnt: dict[str, str] = {}
            gone: list[str] = []
            if now - self._last_list >= self.min_interval:
                self._last_list = now
                self.requests += 1
                learnt.update(self.docker.running())
            for cid in wanted[:16]:  # exited containers: one request each, a few a round
                if cid in learnt:
                    continue
                self.requests += 1
                name = self.docker.name_of(cid)
                if name is None:
                    gone.append(cid)
                else:
                    learnt[cid] = name
        except RuntimeDown as e:
            # Not logged: until the commands configure logging (issue 11) structlog
            # prints to stdout, into trace's and explain's JSON. The state is kept.
            self.docker_error = str(e)
            self.docker_up = False
            self._backoff = min(self.max_backoff, max(self.min_interval, self._backoff * 2))
            self._next_try = now + self._backoff
            return
        self.docker_error = ""
        self.docker_up = True
        self._backoff = 0.0
        self._next_try = now
        with self._lock:
            for cid, name in learnt.items():
                self._names[cid] = name
                self._names.move_to_end(cid)
                self._want.pop(cid, None)
            while len(self._names) > self.max_entries:
                self._names.popitem(last=False)
            for cid in gone:
                self._want.pop(cid, None)
                _bounded_add(self._not_docker, cid, now, self.max_entries)
        self._tell([cid for cid in wanted if cid in learnt])

    def _tell(self, keys: Iterable[str]) -> None:
        for key in keys:
            for listener in list(self._listeners):
                try:
                    listener(key)
                except Exception as e:
                    _log.warning("runtime_name_listener_failed", error=repr(e))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=self.min_interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.poll()
            except Exception as e:  # never let the thread die
                _log.warning("runtime_names_failed", error=repr(e))
            with self._lock:
                busy = bool(self._want or self._want_paths)
            if busy:  # rate limit: at most one round per min_interval while work waits
                self._stop.wait(self.min_interval)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            with contextlib.suppress(RuntimeError):
                self._thread.join(timeout=5)
            self._thread = None


def _bounded_add(d: OrderedDict[str, float], key: str, now: float, cap: int) -> None:
    d[key] = now
    d.move_to_end(key)
    while len(d) > cap:
        d.popitem(last=False)


def _recent(d: OrderedDict[str, float], key: str, now: float, ttl: float) -> bool:
    """Whether ``key`` was added less than ``ttl`` ago (an older entry is dropped)."""
    t = d.get(key)
    if t is None:
        return False
    if now - t < ttl:
        return True
    del d[key]
    return False
