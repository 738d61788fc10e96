"""capwatch.attribution.runtime_api against replayed docker Engine API replies and containerd task state.

tests/fixtures/runtimes/ holds what a real dockerd 20.10 (Debian's docker.io) sent on
its unix socket, byte for byte (``docker-*.http``: headers and body, chunked where it
chunked), and the OCI bundle config.json a real containerd 1.6 wrote for a task run
with ``ctr -n cwtest run --rootfs ... t7``. A small unix-socket server replays them.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from capwatch.attribution.cgroups import CgroupResolver
from capwatch.attribution.containers import Attributor, ContainerNames
from capwatch.attribution.runtime_api import (
    PENDING,
    ContainerdTask,
    DockerEngine,
    RuntimeDown,
    RuntimeNames,
    containerd_state_dirs,
    daemon_run,
    docker_socket,
    parse_container_list,
    parse_inspect,
    parse_task_config,
    scan_containerd,
)
from capwatch.attribution.workloads import is_settled
from tests.helpers import FIXTURES

RUNTIME_FIXTURES = FIXTURES / "runtimes"


def http_body(name: str) -> bytes:
    raw = (RUNTIME_FIXTURES / name).read_bytes()
    return raw.split(b"\r\n\r\n", 1)[1]


LIST = json.loads(http_body("docker-containers-json.http"))
NAMES = {c["Id"]: c["Names"][0].lstrip("/") for c in LIST}
WEB = next(cid for cid, n in NAMES.items() if n == "capwatch-web")
DB = next(cid for cid, n in NAMES.items() if n == "capwatch-db")
GONE = "f" * 64  # an id docker does not know (answered with the recorded 404)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ReplayDocker:
    """Answers each request on a unix socket with a recorded reply, by path."""

    def __init__(self, path: Path, *, hold: threading.Event | None = None) -> None:
        self.path = str(path)
        self.requests: list[str] = []
        self.hold = hold  # when set, replies wait for it (a slow daemon)
        self.asked = threading.Event()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                line = data.split(b"\r\n", 1)[0].decode()
                path = line.split()[1] if len(line.split()) > 1 else ""
                self.requests.append(path)
                self.asked.set()
                if self.hold is not None:
                    self.hold.wait(timeout=30)
                if path.startswith("/containers/json"):
                    reply = "docker-containers-json.http"
                elif path == f"/containers/{WEB}/json":
                    reply = "docker-inspect.http"
                else:
                    reply = "docker-404.http"
                conn.sendall((RUNTIME_FIXTURES / reply).read_bytes())

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def docker(tmp_path: Path) -> Iterator[ReplayDocker]:
    d = ReplayDocker(tmp_path / "docker.sock")
    yield d
    d.close()


def task_state(root: Path, ns: str, tid: str, spec: object) -> Path:
    """A containerd state dir holding one task bundle."""
    bundle = root / "io.containerd.runtime.v2.task" / ns / tid
    bundle.mkdir(parents=True)
    (bundle / "config.json").write_text(json.dumps(spec))
    return root


REAL_SPEC = json.loads((RUNTIME_FIXTURES / "containerd-task-config.json").read_text())


class TestParsing:
    def test_container_list(self) -> None:
        """GET /containers/json: every running container's full id and name, '/' dropped."""
        assert {WEB: "capwatch-web", DB: "capwatch-db"} == parse_container_list(LIST)

    def test_container_list_odd_shapes(self) -> None:
        """Entries without an id or names are skipped; a non-list is no containers."""
        assert {} == parse_container_list({"message": "x"})
        assert {"a": "n"} == parse_container_list([{"Id": "a", "Names": ["/n"]}, {"Id": 1}, 7])

    def test_inspect(self) -> None:
        """GET /containers/{id}/json: the id and the name."""
        body = http_body("docker-inspect.http")
        # the recorded body is chunked: decode the chunks the way http.client does
        decoded, rest = b"", body
        while rest:
            size_line, rest = rest.split(b"\r\n", 1)
            size = int(size_line, 16)
            if size == 0:
                break
            decoded, rest = decoded + rest[:size], rest[size + 2 :]
        assert (WEB, "capwatch-web") == parse_inspect(json.loads(decoded))
        assert parse_inspect({"message": "No such container"}) is None

    def test_task_config(self) -> None:
        """The real bundle of `ctr -n cwtest run ... t7`: cgroup /cwtest/t7, named by its id."""
        assert ("/cwtest/t7", ContainerdTask("cwtest", "t7", "t7")) == parse_task_config(
            "cwtest", "t7", REAL_SPEC
        )

    def test_task_config_name_annotations(self) -> None:
        """nerdctl's and the CRI plugin's name annotations name the task."""
        for key in ("nerdctl/name", "io.kubernetes.cri.container-name"):
            spec = {**REAL_SPEC, "annotations": {key: "web"}}
            assert "web" == parse_task_config("default", "abc", spec)[1].name

    def test_task_config_systemd_form(self) -> None:
        """runc's systemd driver form slice:prefix:name is the path runc makes of it."""
        spec = {"linux": {"cgroupsPath": "system.slice:nerdctl:abc"}}
        assert "/system.slice/nerdctl-abc.scope" == parse_task_config("default", "abc", spec)[0]

    def test_task_config_without_cgroup(self) -> None:
        with pytest.raises(ValueError, match="cgroupsPath"):
            parse_task_config("ns", "t", {"linux": {}})

    def test_environment(self) -> None:
        """DOCKER_HOST (unix:// only) and CAPWATCH_CONTAINERD_STATE choose where to look."""
        assert "/x/d.sock" == docker_socket({"DOCKER_HOST": "unix:///x/d.sock"})
        assert "/var/run/docker.sock" == docker_socket({"DOCKER_HOST": "tcp://1.2.3.4:2375"})
        assert ("/a", "/b") == containerd_state_dirs({"CAPWATCH_CONTAINERD_STATE": "/a:/b"})
        assert "/run/containerd" in containerd_state_dirs({})


def test_daemon_run() -> None:
    """`explain -- docker run ...` cannot watch the container (dockerd's child): which
    command lines say so."""
    assert "dockerd" == daemon_run(["/usr/bin/docker", "run", "--rm", "img"])
    assert "dockerd" == daemon_run(["docker", "--debug", "container", "run", "img"])
    assert "containerd" == daemon_run(["ctr", "-n", "x", "run", "--rm", "img", "id"])
    assert daemon_run(["docker", "ps"]) is None
    assert daemon_run(["podman", "run", "img"]) is None
    assert daemon_run(["date", "-s", "run"]) is None
    assert daemon_run([]) is None


class TestDockerEngine:
    def test_running_and_name_of(self, docker: ReplayDocker) -> None:
        """The list, a chunked inspect reply and a 404, through the real HTTP client."""
        api = DockerEngine(docker.path)
        assert {WEB: "capwatch-web", DB: "capwatch-db"} == api.running()
        assert "capwatch-web" == api.name_of(WEB)
        assert api.name_of(GONE) is None

    def test_down(self, tmp_path: Path) -> None:
        """No socket, or nothing listening on it: RuntimeDown, one line."""
        with pytest.raises(RuntimeDown, match="docker API at"):
            DockerEngine(str(tmp_path / "none.sock")).running()
        dead = socket.socket(socket.AF_UNIX)
        dead.bind(str(tmp_path / "dead.sock"))  # bound, never listening: refused
        with pytest.raises(RuntimeDown):
            DockerEngine(str(tmp_path / "dead.sock")).running()
        dead.close()

    def test_garbage(self, tmp_path: Path) -> None:
        """A reply that is not HTTP/JSON is RuntimeDown, not a traceback."""
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(str(tmp_path / "g.sock"))
        srv.listen(1)

        def answer() -> None:
            conn, _ = srv.accept()
            conn.recv(4096)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n{nope")
            conn.close()

        t = threading.Thread(target=answer, daemon=True)
        t.start()
        with pytest.raises(RuntimeDown, match="not JSON"):
            DockerEngine(str(tmp_path / "g.sock")).running()
        t.join()
        srv.close()


class TestRuntimeNames:
    def make(self, sock: str, clock: FakeClock, **kw: object) -> RuntimeNames:
        return RuntimeNames(
            docker_socket_path=sock,
            containerd_state=(),
            background=False,
            clock=clock,
            **kw,  # type: ignore[arg-type]
        )

    def test_one_list_names_many(self, docker: ReplayDocker) -> None:
        """The first miss lists the running containers: the second name costs no request."""
        names = self.make(docker.path, FakeClock())
        assert "capwatch-web" == names.docker_name(WEB)
        assert "capwatch-db" == names.docker_name(DB)
        assert ["/containers/json"] == docker.requests

    def test_unknown_id_asked_once(self, docker: ReplayDocker) -> None:
        """An id docker does not know: one inspect (404), then remembered as not docker's."""
        clock = FakeClock()
        names = self.make(docker.path, clock)
        assert names.docker_name(GONE) is None
        clock.now += 1
        assert names.docker_name(GONE) is None
        assert ["/containers/json", f"/containers/{GONE}/json"] == docker.requests

    def test_down_then_back(self, tmp_path: Path) -> None:
        """docker down: ids stay unnamed, retried after a backoff; once it answers again,
        the name is learnt and listeners hear of it."""
        clock = FakeClock()
        sock = tmp_path / "docker.sock"
        names = self.make(str(sock), clock)
        heard: list[str] = []
        names.subscribe(heard.append)
        assert names.docker_name(WEB) is None
        assert names.docker_up is False
        docker = ReplayDocker(sock)
        try:
            names.poll()  # within the backoff: no request
            assert [] == docker.requests
            clock.now += 1
            names.poll()
            assert ([WEB], "capwatch-web", True) == (
                heard,
                names.known_docker(WEB),
                names.docker_up,
            )
        finally:
            docker.close()

    def test_pending_is_bounded(self, tmp_path: Path) -> None:
        """At most max_pending ids wait while docker is down; the rest are not queued."""
        clock = FakeClock()
        sock = tmp_path / "docker.sock"
        names = self.make(str(sock), clock, max_pending=2)
        unknown = [f"{i:064x}" for i in range(5)]
        for cid in unknown:
            assert names.docker_name(cid) is None
        docker = ReplayDocker(sock)
        try:
            clock.now += 10
            names.poll()
        finally:
            docker.close()
        asked = [p for p in docker.requests if p != "/containers/json"]
        assert [f"/containers/{cid}/json" for cid in unknown[:2]] == asked

    def test_cache_is_bounded(self, docker: ReplayDocker) -> None:
        """At most max_entries names are kept (oldest dropped)."""
        names = self.make(docker.path, FakeClock(), max_entries=1)
        names.docker_name(WEB)
        assert 1 == sum(names.known_docker(c) is not None for c in (WEB, DB))

    def test_slow_daemon_never_blocks(self, tmp_path: Path) -> None:
        """While docker holds the request, docker_name answers None at once; the name
        arrives when docker replies."""
        hold = threading.Event()
        docker = ReplayDocker(tmp_path / "slow.sock", hold=hold)
        names = RuntimeNames(docker_socket_path=docker.path, containerd_state=(), min_interval=0.01)
        learnt = threading.Event()
        names.subscribe(lambda cid: learnt.set())
        try:
            assert names.docker_name(WEB) is None
            assert docker.asked.wait(timeout=10)  # the request is in flight...
            assert names.docker_name(WEB) is None  # ...and the reader is not held by it
            hold.set()
            assert learnt.wait(timeout=10)
            assert "capwatch-web" == names.docker_name(WEB)
        finally:
            hold.set()
            names.close()
            docker.close()


class TestContainerd:
    def test_scan(self, tmp_path: Path) -> None:
        """Every task bundle under a state dir, keyed by cgroup path; junk is skipped."""
        state = task_state(tmp_path, "cwtest", "t7", REAL_SPEC)
        bad = state / "io.containerd.runtime.v2.task" / "cwtest" / "broken"
        bad.mkdir()
        (bad / "config.json").write_text("{half")
        assert {"/cwtest/t7": ContainerdTask("cwtest", "t7", "t7")} == scan_containerd(
            [str(state), str(tmp_path / "missing")]
        )

    def test_lookup(self, tmp_path: Path) -> None:
        """containerd_task: the task of a cgroup path, None for a path no task has."""
        state = task_state(tmp_path, "cwtest", "t7", REAL_SPEC)
        names = RuntimeNames(
            docker_socket_path=str(tmp_path / "none"),
            containerd_state=[str(state)],
            background=False,
        )
        assert ContainerdTask("cwtest", "t7", "t7") == names.containerd_task("/cwtest/t7")
        assert names.containerd_task("/user.slice/x") is None

    def test_no_containerd_no_wait(self, tmp_path: Path) -> None:
        """With no containerd state on the host, an unknown cgroup is answered None at
        once, never PENDING: nothing holds its events."""
        names = RuntimeNames(
            docker_socket_path=str(tmp_path / "none"), containerd_state=[str(tmp_path / "no")]
        )
        try:
            assert names.containerd_task("/cwtest/t7") is None
            assert 0 == names.scans
        finally:
            names.close()

    def test_pending_on_the_thread(self, tmp_path: Path) -> None:
        """With a thread, the first answer is PENDING, then the task; listeners are told."""
        state = task_state(tmp_path, "cwtest", "t7", REAL_SPEC)
        names = RuntimeNames(
            docker_socket_path=str(tmp_path / "none"),
            containerd_state=[str(state)],
            min_interval=0.01,
        )
        told = threading.Event()
        names.subscribe(lambda key: told.set() if key == "/cwtest/t7" else None)
        try:
            first = names.containerd_task("/cwtest/t7")
            assert told.wait(timeout=10)
            assert (PENDING, ContainerdTask("cwtest", "t7", "t7")) == (
                first,
                names.containerd_task("/cwtest/t7"),
            )
        finally:
            names.close()


class TestAttribution:
    def test_ctr_cgroup_is_containerd(self, tmp_path: Path) -> None:
        """A cgroupfs /<namespace>/<id> cgroup with a containerd task: containerd, its
        namespace, id and name; a look-alike path no task has stays unknown, settled."""
        root = tmp_path / "cgroup"
        (root / "cwtest" / "t7").mkdir(parents=True)
        (root / "other" / "x").mkdir(parents=True)
        state = task_state(tmp_path / "state", "cwtest", "t7", REAL_SPEC)
        runtimes = RuntimeNames(
            docker_socket_path=str(tmp_path / "none"),
            containerd_state=[str(state)],
            background=False,
        )
        names = ContainerNames(
            storage_root=str(tmp_path), inspect=False, background=False, runtimes=runtimes
        )
        a = Attributor(resolver=CgroupResolver(str(root), background=False), container_names=names)
        w = a.resolve(os.stat(root / "cwtest" / "t7").st_ino)
        assert ("containerd", "containerd", "t7", "cwtest", "t7") == (
            w.kind,
            w.runtime,
            w.container_id,
            w.namespace,
            w.label,
        )
        other = a.resolve(os.stat(root / "other" / "x").st_ino)
        assert ("unknown", True) == (other.kind, is_settled(other))
