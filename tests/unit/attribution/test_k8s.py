"""Tests for capwatch.attribution.k8s against a loopback API server replaying real-shaped responses."""

from __future__ import annotations

import copy
import json
import queue
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import structlog

from capwatch.attribution.cgroups import CgroupResolver
from capwatch.attribution.containers import Attributor
from capwatch.attribution.k8s import (
    ApiConfig,
    ContainerRef,
    K8sConfigError,
    PodCache,
    PodWatcher,
    parse_container_id,
    pod_from_object,
)
from tests.helpers import FIXTURES

K8S_FIXTURES = FIXTURES / "k8s"
PODLIST: dict[str, Any] = json.loads((K8S_FIXTURES / "podlist.json").read_text())
LIFECYCLE = (K8S_FIXTURES / "watch-pod-lifecycle.jsonl").read_bytes().splitlines(keepends=True)
EXPIRED = (K8S_FIXTURES / "watch-expired.jsonl").read_bytes()
STATUS_410 = (K8S_FIXTURES / "status-410.json").read_bytes()
STATUS_403 = (K8S_FIXTURES / "status-403.json").read_bytes()

API_UID = "5a0b9c6e-8f2d-4c1b-9e3a-7d6f5c4b3a21"
API_APP = "3f1c2b9a8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a3928170f6e5d4c"
API_INIT = "11223344556677889900aabbccddeeff00112233445566778899aabbccddeeff"
DNS_UID = "e4f1a2b3-c4d5-4e6f-8a7b-9c0d1e2f3a4b"
WORKER_UID = "2c9d8e7f-6a5b-4c3d-9e8f-7a6b5c4d3e2f"
WORKER_CID = "d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3"

Step = bytes | threading.Event


class FakeApiServer:
    """An API server on 127.0.0.1 that replays scripted LIST answers and watch streams.

    ``lists``: (status, body) answers for GET /api/v1/pods, the last one repeats.
    ``watches``: one script per watch request; a script is a list of steps (a JSON
    line to send as one chunk, or an Event to wait for), or (status, body) to fail
    the request. With no script left, a watch stays open until the server closes.
    """

    def __init__(self) -> None:
        self.lists: list[tuple[int, bytes]] = [(200, json.dumps(PODLIST).encode())]
        self.watches: queue.SimpleQueue[list[Step] | tuple[int, bytes]] = queue.SimpleQueue()
        self.requests: list[tuple[dict[str, str], dict[str, str]]] = []
        self.stopping = threading.Event()
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                api.requests.append((query, dict(self.headers.items())))
                if url.path != "/api/v1/pods":
                    self.reply(404, b'{"kind":"Status","code":404}')
                elif query.get("watch") == "true":
                    self.watch()
                else:
                    status, body = api.lists.pop(0) if len(api.lists) > 1 else api.lists[0]
                    self.reply(status, body)

            def reply(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def watch(self) -> None:
                try:
                    script = api.watches.get_nowait()
                except queue.Empty:
                    script = []
                    hold = True
                else:
                    hold = False
                if isinstance(script, tuple):
                    self.reply(*script)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    for step in script:
                        if isinstance(step, threading.Event):
                            step.wait(10)
                        else:
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(step), step))
                            self.wfile.flush()
                    if hold:
                        api.stopping.wait(30)
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def watch_queries(self) -> list[dict[str, str]]:
        return [q for q, _ in self.requests if q.get("watch") == "true"]

    def list_queries(self) -> list[dict[str, str]]:
        return [q for q, _ in self.requests if q.get("watch") != "true"]

    def close(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    server = FakeApiServer()
    yield server
    server.close()


@pytest.fixture
def token(tmp_path: Path) -> str:
    path = tmp_path / "token"
    path.write_text("eyJhbGciOiJSUzI1NiIsImtpZCI6InRlc3QifQ.payload.sig\n")
    return str(path)


def watcher_for(api: FakeApiServer, token: str | None = None, **kwargs: Any) -> PodWatcher:
    config = ApiConfig(base_url=api.url, token_path=token, timeout=2.0)
    kwargs.setdefault("backoff_initial", 0.01)
    kwargs.setdefault("backoff_max", 0.05)
    return PodWatcher(config, "node-a", **kwargs)


class TestParsing:
    @pytest.mark.parametrize(
        ("raw", "expected"),
        [
            (f"containerd://{API_APP}", ("containerd", API_APP)),
            (f"cri-o://{API_APP}", ("crio", API_APP)),
            (f"docker://{API_APP}", ("docker", API_APP)),
            (f"rkt://{API_APP}", ("rkt", API_APP)),
            (API_APP, ("", API_APP)),
        ],
    )
    def test_parse_container_id(self, raw: str, expected: tuple[str, str]) -> None:
        """containerStatuses[].containerID is <scheme>://<id>; schemes map to runtime names."""
        assert expected == parse_container_id(raw)

    def test_pod_from_list_item(self) -> None:
        """A listed pod yields uid, names, node, and its init and app containers by id."""
        pod = pod_from_object(PODLIST["items"][0])
        assert pod is not None
        assert (API_UID, "prod", "api-7d4b9c8f6-x2m4q", "node-a", "48213") == (
            pod.uid,
            pod.namespace,
            pod.name,
            pod.node,
            pod.resource_version,
        )
        assert ContainerRef("app", API_APP, "containerd") == pod.containers[API_APP]
        assert ContainerRef("migrate", API_INIT, "containerd") == pod.containers[API_INIT]
        assert 3 == len(pod.containers)

    def test_pending_pod_has_no_containers(self) -> None:
        """A ContainerCreating status has no containerID: no container entries yet."""
        pod = pod_from_object(json.loads(LIFECYCLE[0])["object"])
        assert pod is not None
        assert {} == dict(pod.containers)

    @pytest.mark.parametrize(
        "obj",
        [
            {},
            {"metadata": {}},
            {"metadata": {"uid": ""}},
            {"metadata": "x"},
            {"metadata": {"uid": 5}},
        ],
    )
    def test_objects_without_uid(self, obj: dict[str, Any]) -> None:
        """Objects without a string UID (bookmarks, garbage) are ignored."""
        assert pod_from_object(obj) is None

    def test_garbage_statuses_ignored(self) -> None:
        """Malformed status entries are skipped, not fatal."""
        obj = {"metadata": {"uid": "u"}, "status": {"containerStatuses": ["x", {"containerID": 3}]}}
        pod = pod_from_object(obj)
        assert pod is not None
        assert {} == dict(pod.containers)


class TestPodCache:
    def test_restart_replaces_container_ids(self) -> None:
        """MODIFIED with a restarted container drops the old id and maps the new one."""
        cache = PodCache()
        item = PodList_item(0)
        cache.apply("ADDED", item)
        restarted = copy.deepcopy(item)
        restarted["status"]["containerStatuses"][0]["containerID"] = "containerd://" + "e" * 64
        cache.apply("MODIFIED", restarted)
        assert cache.container(API_APP) is None
        found = cache.container("e" * 64)
        assert found is not None
        assert ("api-7d4b9c8f6-x2m4q", "app") == (found[0].name, found[1].name)

    def test_replace_all_drops_missing_and_notifies(self) -> None:
        """A re-list removes pods no longer listed; listeners get old and new UIDs."""
        cache = PodCache()
        heard: list[frozenset[str]] = []
        cache.subscribe(heard.append)
        cache.apply("ADDED", PodList_item(0))
        pods = [pod_from_object(PodList_item(1))]
        cache.replace_all(p for p in pods if p is not None)
        assert cache.pod(API_UID) is None
        assert cache.container(API_APP) is None
        assert cache.pod(DNS_UID) is not None
        assert [frozenset({API_UID}), frozenset({API_UID, DNS_UID})] == heard

    def test_unknown_event_type_ignored(self) -> None:
        """BOOKMARK/ERROR objects do not change the cache."""
        cache = PodCache()
        cache.apply("BOOKMARK", PodList_item(0))
        assert 0 == len(cache)


def PodList_item(i: int) -> dict[str, Any]:
    return copy.deepcopy(PODLIST["items"][i])


class TestPodWatcher:
    def test_list_then_watch_lifecycle(self, api: FakeApiServer, token: str) -> None:
        """LIST fills the cache; a pod appears, gets its container, is deleted and leaves."""
        gate1, gate2 = threading.Event(), threading.Event()
        api.watches.put([LIFECYCLE[0], gate1, LIFECYCLE[1], gate2, LIFECYCLE[2], LIFECYCLE[3]])
        w = watcher_for(api, token)
        cache = w.cache
        try:
            assert w.ready.wait(5)
            assert None not in (cache.pod(API_UID), cache.pod(DNS_UID))
            assert wait_until(lambda: cache.pod(WORKER_UID) is not None)
            assert cache.container(WORKER_CID) is None  # Pending: no containerID yet
            gate1.set()
            assert wait_until(lambda: cache.container(WORKER_CID) is not None)
            found = cache.container(WORKER_CID)
            assert found is not None
            assert ("batch", "worker-0", "worker") == (
                found[0].namespace,
                found[0].name,
                found[1].name,
            )
            gate2.set()
            assert wait_until(lambda: cache.pod(WORKER_UID) is None)
            assert cache.container(WORKER_CID) is None
            assert wait_until(lambda: len(api.watch_queries()) >= 2)
        finally:
            w.close()
        first, second = api.watch_queries()[:2]
        expected_first = {
            "fieldSelector": "spec.nodeName=node-a",
            "watch": "true",
            "resourceVersion": "48250",
            "allowWatchBookmarks": "true",
            "timeoutSeconds": "300",
        }
        assert expected_first == first
        assert "48301" == second["resourceVersion"]  # resumed after the stream ended
        assert [{"fieldSelector": "spec.nodeName=node-a"}] == api.list_queries()
        auth = {h.get("Authorization") for _, h in api.requests}
        assert {"Bearer eyJhbGciOiJSUzI1NiIsImtpZCI6InRlc3QifQ.payload.sig"} == auth

    def test_bookmark_advances_resource_version(self, api: FakeApiServer) -> None:
        """A BOOKMARK moves the resume point without touching the cache."""
        api.watches.put([LIFECYCLE[2]])
        w = watcher_for(api)
        try:
            assert wait_until(lambda: len(api.watch_queries()) >= 2)
        finally:
            w.close()
        assert "48290" == api.watch_queries()[1]["resourceVersion"]
        assert 2 == len(w.cache)

    def test_expired_watch_event_relists(self, api: FakeApiServer) -> None:
        """An ERROR event with a 410 Status makes the watcher LIST again (here: one pod left)."""
        second = copy.deepcopy(PODLIST)
        second["items"] = second["items"][1:]
        second["metadata"]["resourceVersion"] = "48400"
        api.lists = [(200, json.dumps(PODLIST).encode()), (200, json.dumps(second).encode())]
        api.watches.put([EXPIRED])
        with structlog.testing.capture_logs() as logs:
            w = watcher_for(api)
            try:
                assert wait_until(lambda: w.lists >= 2 and len(api.watch_queries()) >= 2)
            finally:
                w.close()
        assert w.cache.pod(API_UID) is None
        assert w.cache.pod(DNS_UID) is not None
        assert "48400" == api.watch_queries()[1]["resourceVersion"]
        assert "k8s_watch_expired" in [e["event"] for e in logs]

    def test_http_410_relists(self, api: FakeApiServer) -> None:
        """A watch answered with HTTP 410 Gone re-lists at once (no error counted)."""
        api.watches.put((410, STATUS_410))
        w = watcher_for(api)
        try:
            assert wait_until(lambda: w.lists >= 2)
        finally:
            w.close()
        assert 0 == w.errors

    def test_forbidden_warns_then_recovers(self, api: FakeApiServer) -> None:
        """An RBAC 403 is logged with the API's message; the watcher retries and recovers."""
        api.lists = [(403, STATUS_403), (200, json.dumps(PODLIST).encode())]
        with structlog.testing.capture_logs() as logs:
            w = watcher_for(api)
            try:
                assert w.ready.wait(5)
            finally:
                w.close()
        warnings = [e for e in logs if e["event"] == "k8s_api_unavailable"]
        assert 1 == len(warnings)
        assert "HTTP 403: pods is forbidden" in warnings[0]["error"]
        assert 2 == len(w.cache)

    def test_unreachable_api_degrades(self, tmp_path: Path) -> None:
        """With nothing listening, warnings are logged, lookups miss, attribution shows ids."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        config = ApiConfig(base_url=f"http://127.0.0.1:{port}", timeout=0.5)
        with structlog.testing.capture_logs() as logs:
            w = PodWatcher(config, "node-a", backoff_initial=0.01, backoff_max=0.02)
            try:
                assert wait_until(lambda: w.errors >= 3)
                path = (
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
                    f"{API_UID.replace('-', '_')}.slice/cri-containerd-{API_APP}.scope"
                )
                (tmp_path / path.lstrip("/")).mkdir(parents=True)
                cg = (tmp_path / path.lstrip("/")).stat().st_ino
                a = Attributor(
                    cgroup_root=str(tmp_path), names=False, k8s=w.cache, background=False
                )
                assert API_APP[:12] == a.resolve(cg).label
                a.close()
            finally:
                w.close()
        assert not w.ready.is_set()
        assert "k8s_api_unavailable" in {e["event"] for e in logs}
        assert all(e["log_level"] == "warning" for e in logs if e["event"] == "k8s_api_unavailable")

    def test_close_unblocks_open_watch(self, api: FakeApiServer) -> None:
        """close() ends the watching thread while a watch stream is idle (close waits
        a bounded time for it: a blocked read would leave the thread alive)."""
        before = set(threading.enumerate())
        w = watcher_for(api)
        mine = [t for t in threading.enumerate() if t.name == "capwatch-k8s-pods"]
        mine = [t for t in mine if t not in before]
        assert 1 == len(mine)
        assert wait_until(lambda: len(api.watch_queries()) >= 1)
        w.close()
        assert not mine[0].is_alive()

    def test_attributor_end_to_end(self, api: FakeApiServer, tmp_path: Path) -> None:
        """Events from a pod's cgroup get namespace/pod/container; after DELETED, ids again."""
        gate = threading.Event()
        api.watches.put([LIFECYCLE[0], LIFECYCLE[1], gate, LIFECYCLE[3]])
        uid_ = WORKER_UID.replace("-", "_")
        path = (
            f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/"
            f"cri-containerd-{WORKER_CID}.scope"
        )
        (tmp_path / path.lstrip("/")).mkdir(parents=True)
        cg = (tmp_path / path.lstrip("/")).stat().st_ino
        w = watcher_for(api)
        a = Attributor(
            resolver=CgroupResolver(str(tmp_path), background=False), names=False, k8s=w.cache
        )
        try:
            assert wait_until(lambda: a.resolve(cg).container_name == "worker")
            got = a.resolve(cg)
            assert ("batch", "worker-0", "worker", "worker-0/worker") == (
                got.namespace,
                got.pod,
                got.container_name,
                got.label,
            )
            gate.set()
            assert wait_until(lambda: a.resolve(cg).pod == "")
            assert WORKER_CID[:12] == a.resolve(cg).label
            assert w.cache.pod(WORKER_UID) is None
        finally:
            a.close()
            w.close()


class TestConfig:
    def sa_dir(self, tmp_path: Path) -> str:
        (tmp_path / "token").write_text("t")
        (tmp_path / "ca.crt").write_text("c")
        return str(tmp_path)

    @pytest.mark.parametrize(
        ("host", "expected"),
        [("10.96.0.1", "https://10.96.0.1:443"), ("fd00:10:96::1", "https://[fd00:10:96::1]:443")],
    )
    def test_in_cluster(self, tmp_path: Path, host: str, expected: str) -> None:
        """KUBERNETES_SERVICE_HOST/PORT and the service-account files make the config."""
        env = {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": "443"}
        config = ApiConfig.in_cluster(env=env, sa_dir=self.sa_dir(tmp_path))
        assert (expected, f"{tmp_path}/token", f"{tmp_path}/ca.crt") == (
            config.base_url,
            config.token_path,
            config.ca_path,
        )

    def test_not_in_cluster(self, tmp_path: Path) -> None:
        """Without the service env vars there is no in-cluster config."""
        with pytest.raises(K8sConfigError, match="not in a cluster"):
            ApiConfig.in_cluster(env={}, sa_dir=self.sa_dir(tmp_path))

    def test_missing_token(self, tmp_path: Path) -> None:
        """A missing service-account token is a config error naming the file."""
        env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
        with pytest.raises(K8sConfigError, match="token"):
            ApiConfig.in_cluster(env=env, sa_dir=str(tmp_path))

    def test_from_environment_needs_node_name(self, tmp_path: Path) -> None:
        """NODE_NAME is required to select this node's pods."""
        env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
        with pytest.raises(K8sConfigError, match="NODE_NAME"):
            PodWatcher.from_environment(env=env, sa_dir=self.sa_dir(tmp_path), start=False)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
class TestTls:
    def test_https_with_cluster_ca(self, tmp_path: Path, api: FakeApiServer) -> None:
        """Over HTTPS the client verifies the server against the service-account CA."""
        import ssl

        key, crt = tmp_path / "tls.key", tmp_path / "tls.crt"
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                str(key),
                "-out",
                str(crt),
                "-days",
                "1",
                "-subj",
                "/CN=kubernetes",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ],
            check=True,
            capture_output=True,
        )
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(crt, key)
        api.server.socket = ctx.wrap_socket(api.server.socket, server_side=True)
        https = ApiConfig(base_url=api.url.replace("http:", "https:"), ca_path=str(crt), timeout=2)
        w = PodWatcher(https, "node-a", backoff_initial=0.01, backoff_max=0.02)
        try:
            assert w.ready.wait(5)
        finally:
            w.close()
        assert 2 == len(w.cache)
