"""OwnerResolver never makes a caller wait for the API server (issue 15's gap): GETs
run on its worker thread, asked for as pods appear; a real HTTP server on loopback
that holds its answers shows that neither a lookup nor a scrape waits for them."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from capwatch.attribution.k8s import OwnerResolver, PodCache
from capwatch.attribution.k8s_http import ApiConfig
from capwatch.sinks.profiles import ProfileSink
from tests.helpers import a_denial

RS_PATH = "/apis/apps/v1/namespaces/shop/replicasets/web-5d9c7"
DEPLOYMENT_REF = {"kind": "Deployment", "name": "web", "controller": True}


class HeldApi:
    """Answers GET of a ReplicaSet once ``release`` is set; records every path asked."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.paths: list[str] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                api.paths.append(self.path)
                api.release.wait(20)
                if self.path == RS_PATH:
                    body = json.dumps({"metadata": {"ownerReferences": [DEPLOYMENT_REF]}})
                    status = 200
                else:
                    body, status = '{"kind":"Status","code":404}', 404
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api() -> Iterator[HeldApi]:
    server = HeldApi()
    yield server
    server.close()


def until(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def resolver(api: HeldApi, **kw: Any) -> OwnerResolver:
    return OwnerResolver(ApiConfig(base_url=api.url, timeout=15.0), **kw)


def test_lookup_returns_at_once_and_the_answer_arrives_later(api: HeldApi) -> None:
    r = resolver(api)
    try:
        assert r("ReplicaSet", "shop", "web-5d9c7") is None  # the server holds its answer
        assert until(lambda: RS_PATH in api.paths)  # ... and was asked, by the worker
        assert r("ReplicaSet", "shop", "web-5d9c7") is None  # still unknown, not asked twice
        api.release.set()
        assert until(lambda: r("ReplicaSet", "shop", "web-5d9c7") is not None)
        assert [DEPLOYMENT_REF] == r("ReplicaSet", "shop", "web-5d9c7")
        assert 1 == api.paths.count(RS_PATH)
    finally:
        r.close()


def test_full_queue_is_counted(api: HeldApi) -> None:
    r = resolver(api, queue_limit=1)
    try:
        for i in range(5):
            r.prefetch("ReplicaSet", "shop", f"rs-{i}")
        # the worker holds one GET; one waits in the queue; the rest are dropped
        assert until(lambda: len(api.paths) == 1)
        assert r.dropped >= 3
    finally:
        r.close()


def test_profiles_ask_as_pods_appear_and_scrapes_do_not_wait(api: HeldApi) -> None:
    pods = PodCache()
    r = resolver(api)
    sink = ProfileSink(node="n1", pods=pods, owners=r)
    try:
        pods.apply(
            "ADDED",
            {
                "metadata": {
                    "uid": "u1",
                    "namespace": "shop",
                    "name": "web-5d9c7-abcde",
                    "ownerReferences": [
                        {"kind": "ReplicaSet", "name": "web-5d9c7", "controller": True}
                    ],
                },
                "spec": {"nodeName": "n1", "containers": [{"name": "app"}]},
            },
        )
        assert until(lambda: RS_PATH in api.paths)  # asked when the pod appeared
        sink.write(
            a_denial(
                kind="kubernetes",
                pod="web-5d9c7-abcde",
                namespace="shop",
                container_name="app",
                container="app",
            )
        )
        # a scrape while the API server holds its answer returns, owner not known yet
        out: list[bytes] = []
        t = threading.Thread(target=lambda: out.append(sink.exposition()), daemon=True)
        t.start()
        t.join(10)  # the server holds its answer for 20 s: a waiting scrape is still here
        assert not t.is_alive()
        assert not api.release.is_set()
        assert b'workload="web-5d9c7",workload_kind="ReplicaSet"' in out[0], out[0]
        api.release.set()
        assert until(lambda: b'workload="web",workload_kind="Deployment"' in sink.exposition())
    finally:
        sink.close()
