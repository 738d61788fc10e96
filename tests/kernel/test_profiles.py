"""Issue 15: cluster-wide least privilege, for real.

Two `capwatch serve --profiles` instances stand for two nodes (each with its
--node-name and a Kubernetes API replayed on loopback, listing the pods of its
node with their ownerReferences and securityContexts). Real processes run in
cgroups laid out as the kubelet's systemd driver lays them out (created here,
owned by root): Deployment shop/web with a replica on each node binds a port
below 1024 and chowns a file; Deployment shop/admin holds SYS_ADMIN it never
uses. A real Prometheus scrapes both serves, and `capwatch advise --prometheus`
must propose exactly NET_BIND_SERVICE + CHOWN for web (merged from both nodes),
say admin never used SYS_ADMIN, and give patches that validate.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from bench._harness import Serve, free_port
from tests.helpers import REPO, require_root

pytestmark = [pytest.mark.kernel, pytest.mark.prometheus, pytest.mark.slow]

BUSYBOX = "/bin/busybox"
NS = "shop"


def _pod(
    name: str, node: str, uid: str, cid: str, rs: str, sc: dict[str, Any] | None
) -> dict[str, Any]:
    """A v1 Pod as the API server returns it (the fields capwatch reads, and their neighbours)."""
    container: dict[str, Any] = {"name": "app", "image": "busybox"}
    if sc is not None:
        container["securityContext"] = sc
    return {
        "metadata": {
            "name": name,
            "namespace": NS,
            "uid": uid,
            "resourceVersion": "100",
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": rs,
                    "uid": str(uuid.uuid4()),
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {"nodeName": node, "containers": [container]},
        "status": {
            "phase": "Running",
            "containerStatuses": [
                {"name": "app", "containerID": f"containerd://{cid}", "ready": True}
            ],
        },
    }


class FakeApi:
    """The few API calls serve makes, answered from real-shaped objects: LIST pods by
    node, WATCH (ends at once: nothing changes), GET a ReplicaSet (its Deployment)."""

    def __init__(self, pods: list[dict[str, Any]], replicasets: dict[str, str]) -> None:
        self.pods = pods
        self.replicasets = replicasets
        self.requests: list[str] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                q = dict(urllib.parse.parse_qsl(url.query))
                api.requests.append(self.path)
                if url.path == "/api/v1/pods" and q.get("watch") == "true":
                    self._send(200, b"")
                elif url.path == "/api/v1/pods":
                    node = q.get("fieldSelector", "").removeprefix("spec.nodeName=")
                    items = [p for p in api.pods if p["spec"]["nodeName"] == node]
                    body = {"kind": "PodList", "apiVersion": "v1",
                            "metadata": {"resourceVersion": "100"}, "items": items}  # fmt: skip
                    self._send(200, json.dumps(body).encode())
                elif url.path.startswith(f"/apis/apps/v1/namespaces/{NS}/replicasets/"):
                    name = url.path.rsplit("/", 1)[1]
                    dep = api.replicasets.get(name)
                    if dep is None:
                        self._send(404, b'{"kind":"Status","code":404}')
                        return
                    obj = {"kind": "ReplicaSet", "metadata": {"name": name, "namespace": NS,
                           "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                                                "name": dep, "controller": True}]}}  # fmt: skip
                    self._send(200, json.dumps(obj).encode())
                else:
                    self._send(404, b'{"kind":"Status","code":404}')

            def _send(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _unified() -> Path:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        f = line.split()
        if f[f.index("-") + 1] == "cgroup2":
            return Path(f[4])
    pytest.skip("no cgroup v2 hierarchy")


class KubeletCgroups:
    """kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice/
    cri-containerd-<id>.scope, as the kubelet's systemd driver and containerd make them."""

    def __init__(self) -> None:
        self.root = _unified()
        self.qos = self.root / "kubepods.slice" / "kubepods-besteffort.slice"
        self.made: list[Path] = []
        for d in (self.qos.parent, self.qos):
            if not d.exists():
                d.mkdir()
                self.made.append(d)

    def container(self, pod_uid: str, cid: str) -> Path:
        pod = self.qos / f"kubepods-besteffort-pod{pod_uid.replace('-', '_')}.slice"
        pod.mkdir()
        scope = pod / f"cri-containerd-{cid}.scope"
        scope.mkdir()
        self.made += [pod, scope]
        return scope

    def run(self, scope: Path, script: str) -> subprocess.CompletedProcess[str]:
        """busybox sh in the container's cgroup (entered before exec, by a tiny shell)."""
        return subprocess.run(
            [
                "/bin/sh",
                "-c",
                f'echo $$ > {scope}/cgroup.procs && exec {BUSYBOX} sh -c "$0"',
                script,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def remove(self) -> None:
        for d in reversed(self.made):
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[dict[str, Any]]:
    require_root()
    if not os.path.exists(BUSYBOX) or shutil.which("prometheus") is None:
        pytest.fail("busybox-static and prometheus must be installed (deploy/host-setup.sh)")
    cg = KubeletCgroups()
    ids = {
        k: (str(uuid.uuid4()), uuid.uuid4().hex + uuid.uuid4().hex)
        for k in ("web-a", "web-b", "admin")
    }
    pods = [
        _pod("web-7f9c-a1", "node-a", *ids["web-a"], "web-7f9c", None),
        _pod("web-7f9c-b2", "node-b", *ids["web-b"], "web-7f9c", None),
        _pod("admin-5d8e-c3", "node-a", *ids["admin"], "admin-5d8e",
             {"capabilities": {"add": ["SYS_ADMIN"]}}),
    ]  # fmt: skip
    api = FakeApi(pods, {"web-7f9c": "web", "admin-5d8e": "admin"})
    serves: list[Serve] = []
    prom = None
    try:
        for node in ("node-a", "node-b"):
            serves.append(
                Serve("--profiles", "--kube-api", api.url, "--node-name", node,
                      "--state-file", str(tmp_path / f"{node}.json"), "--no-drop-privileges")
            )  # fmt: skip
        port = free_port()
        cfg = tmp_path / "prometheus.yml"
        targets = ", ".join(f"'127.0.0.1:{s.port}'" for s in serves)
        cfg.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            f"  - job_name: capwatch\n    static_configs: [{{targets: [{targets}]}}]\n"
        )
        prom = subprocess.Popen(
            ["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        _wait(lambda: _get(f"{url}/-/ready")[0] == 200, "prometheus ready")
        yield {"cgroups": cg, "ids": ids, "serves": serves, "prometheus": url, "api": api,
               "tmp": tmp_path}  # fmt: skip
    finally:
        if prom is not None:
            prom.terminate()
            prom.wait(timeout=10)
        for s in serves:
            s.stop()
        api.close()
        cg.remove()


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except OSError:
        return 0, ""


def _wait(cond: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")


def _advise(*args: str) -> dict[str, Any]:
    r = subprocess.run(
        [sys.executable, "-m", "capwatch.commands.cli", "advise", "--json", *args],
        capture_output=True, text=True, timeout=60, cwd=REPO, check=False,
    )  # fmt: skip
    assert 0 == r.returncode, r.stderr
    out: dict[str, Any] = json.loads(r.stdout)
    return out


WEB = "nc -l -p {port} & sleep 0.3; kill $!; touch /tmp/cw-{tag}; chown 1000 /tmp/cw-{tag}; rm -f /tmp/cw-{tag}"


def _by_workload(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {w["workload"]: w for w in report["workloads"]}


def test_least_privilege_merged_across_nodes(cluster: dict[str, Any]) -> None:
    """web used NET_BIND_SERVICE and CHOWN on both nodes: exactly those are proposed,
    with evidence from both; admin holds SYS_ADMIN and never used it."""
    cg, ids = cluster["cgroups"], cluster["ids"]
    for i, key in enumerate(("web-a", "web-b")):
        scope = cg.container(*ids[key])
        r = cg.run(scope, WEB.format(port=80 + i, tag=key))
        assert 0 == r.returncode, r.stderr
    admin = cg.container(*ids["admin"])
    assert 0 == cg.run(admin, "sleep 0.2; true").returncode
    prom = cluster["prometheus"]

    def merged() -> bool:
        r = _advise("--prometheus", prom, "--namespace", NS, "--since", "10m")
        web = _by_workload(r).get("Deployment/web")
        return web is not None and {"node-a", "node-b"} <= set(_nodes(prom))

    _wait(merged, "both nodes' profiles in Prometheus")
    report = _advise("--prometheus", prom, "--namespace", NS, "--since", "10m")
    web = _by_workload(report)["Deployment/web"]
    assert ["CAP_CHOWN", "CAP_NET_BIND_SERVICE"] == web["capabilities"]
    for cap in web["capabilities"]:
        ev = web["evidence"][cap]
        assert (2, 2) == (ev["replicas"], ev["nodes"]), (cap, ev)
        assert ev["checks"] >= 2, (cap, ev)  # exact counts from capwatch_checks_total
    assert ["bind"] == web["evidence"]["CAP_NET_BIND_SERVICE"]["syscalls"]
    assert any(
        s.startswith(("chown", "fchown"))
        for s in web["evidence"]["CAP_CHOWN"]["syscalls"]
    )
    assert not web["fits_pss_restricted"]  # CHOWN is more than restricted allows
    admin_r = _by_workload(report)["Deployment/admin"]
    assert "CAP_SYS_ADMIN" in admin_r["held_never_used"]
    assert "CAP_SYS_ADMIN" not in admin_r["capabilities"]  # its mmap/execve probes never count
    _validate(web)


def _nodes(prom: str) -> list[str]:
    q = urllib.parse.urlencode({"query": "count by (node) (capwatch_capability_last_seen_seconds)"})
    code, body = _get(f"{prom}/api/v1/query?{q}")
    if code != 200:
        return []
    return [r["metric"].get("node", "") for r in json.loads(body)["data"]["result"]]


DEPLOYMENT = """apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: app
        image: busybox
"""


def _validate(web: dict[str, Any]) -> None:
    """The kustomize patch applies to a base with the Deployment, and the result
    validates against the Kubernetes schema; the kubectl patch body is the same patch."""
    import tempfile

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl (for kustomize) must be installed")
    with tempfile.TemporaryDirectory() as d:
        base = Path(d)
        (base / "deployment.yaml").write_text(DEPLOYMENT)
        (base / "patch.yaml").write_text(web["kustomize_patch"])
        (base / "kustomization.yaml").write_text(
            "resources: [deployment.yaml]\npatches:\n- path: patch.yaml\n"
        )
        r = subprocess.run([kubectl, "kustomize", d], capture_output=True, text=True, check=False)
        assert 0 == r.returncode, r.stderr
        import yaml

        obj = yaml.safe_load(r.stdout)
    caps = obj["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]
    assert {"drop": ["ALL"], "add": ["CHOWN", "NET_BIND_SERVICE"]} == caps
    import kubernetes_validate  # type: ignore[import-untyped]

    kubernetes_validate.validate(obj, "1.28", strict=True)
    body = web["kubectl_patch"].split(" -p ", 1)[1].strip("'")
    patch = json.loads(body)
    assert (
        caps
        == patch["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]
    )
