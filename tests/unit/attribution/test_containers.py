"""Tests for capwatch.attribution.containers: path classification, names, the Attributor facade."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from capwatch.attribution.cgroups import CgroupResolver
from capwatch.attribution.containers import (
    KINDS,
    Attributor,
    ContainerNames,
    Workload,
    classify,
    unresolved,
)
from capwatch.attribution.k8s import PodCache
from tests.helpers import FIXTURES

CGROUP_FIXTURES = FIXTURES / "cgroups"
PODMAN_STORE = CGROUP_FIXTURES / "podman-storage"
PROBE_ID = "ed2a9fa66717f6082a17b33044a94d3e258883b8a1d0640cd7e0669c0bdc393d"

CID = "3f1c2b9a8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a3928170f6e5d4c"
UID = "5a0b9c6e-8f2d-4c1b-9e3a-7d6f5c4b3a21"
UID_ = UID.replace("-", "_")


class FakeClock:
    """A hand-driven monotonic clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fields(w: Workload) -> dict[str, Any]:
    """The classification fields of a workload (names and ids of the event excluded)."""
    return {
        "kind": w.kind,
        "runtime": w.runtime,
        "container_id": w.container_id,
        "pod_uid": w.pod_uid,
        "service": w.service,
        "monitor": w.monitor,
    }


def want(
    kind: str,
    runtime: str = "",
    cid: str = "",
    uid: str = "",
    service: str = "",
    monitor: bool = False,
) -> dict[str, Any]:
    return {
        "kind": kind,
        "runtime": runtime or ("" if kind == "kubernetes" else kind),
        "container_id": cid,
        "pod_uid": uid,
        "service": service,
        "monitor": monitor,
    }


# Real-shaped unified-hierarchy paths, as /proc/<pid>/cgroup prints them.
CLASSIFY_TABLE = [
    # host and plain slices
    ("/", want("host")),
    ("/system.slice", want("host")),
    ("/user.slice/user-1000.slice", want("host")),
    ("/machine.slice", want("host")),
    # systemd services and sessions
    ("/system.slice/ssh.service", want("systemd", service="ssh.service")),
    (
        "/system.slice/system-getty.slice/getty@tty1.service",
        want("systemd", service="getty@tty1.service"),
    ),
    ("/init.scope", want("systemd", service="init.scope")),
    ("/user.slice/user-1000.slice/session-3.scope", want("systemd", service="session-3.scope")),
    # a user's own manager: delegated to that user, never a system unit
    (
        "/user.slice/user-1000.slice/user@1000.service/app.slice/dbus.service",
        want("user-delegated", service="dbus.service"),
    ),
    # docker: systemd driver, cgroupfs driver, rootless
    (f"/system.slice/docker-{CID}.scope", want("docker", cid=CID)),
    (f"/docker/{CID}", want("docker", cid=CID)),
    # rootless docker: a unit of the user's manager, never a root container
    (
        f"/user.slice/user-1000.slice/user@1000.service/app.slice/docker-{CID}.scope",
        want("user-delegated", runtime="docker", service=f"docker-{CID}.scope"),
    ),
    # containerd outside Kubernetes (nerdctl, systemd driver)
    (f"/system.slice/nerdctl-{CID}.scope", want("containerd", cid=CID)),
    # podman: this machine's cgroupfs layout, systemd layout, its inner cgroup, pods, conmon
    (f"/libpod_parent/libpod-{CID}", want("podman", cid=CID)),
    (f"/machine.slice/libpod-{CID}.scope", want("podman", cid=CID)),
    (f"/machine.slice/libpod-{CID}.scope/container", want("podman", cid=CID)),
    (
        f"/machine.slice/machine-libpod_pod_{'a' * 64}.slice/libpod-{CID}.scope",
        want("podman", cid=CID),
    ),
    (f"/machine.slice/libpod-conmon-{CID}.scope", want("podman", cid=CID, monitor=True)),
    (f"/libpod_parent/libpod-conmon-{CID}", want("podman", cid=CID, monitor=True)),
    # rootless podman: likewise
    (
        f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope",
        want("user-delegated", runtime="podman", service=f"libpod-{CID}.scope"),
    ),
    # Kubernetes, systemd driver: burstable, besteffort, guaranteed (no QoS level)
    (
        f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/"
        f"cri-containerd-{CID}.scope",
        want("kubernetes", runtime="containerd", cid=CID, uid=UID),
    ),
    (
        f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/"
        f"crio-{CID}.scope",
        want("kubernetes", runtime="crio", cid=CID, uid=UID),
    ),
    (
        f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/"
        f"crio-conmon-{CID}.scope",
        want("kubernetes", runtime="crio", cid=CID, uid=UID, monitor=True),
    ),
    (
        f"/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope",
        want("kubernetes", runtime="containerd", cid=CID, uid=UID),
    ),
    (
        f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/"
        f"docker-{CID}.scope",
        want("kubernetes", runtime="docker", cid=CID, uid=UID),
    ),
    # the pod-level slice itself, and a QoS slice without a pod
    (
        f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice",
        want("kubernetes", uid=UID),
    ),
    ("/kubepods.slice/kubepods-burstable.slice", want("kubernetes")),
    # kind nests kubelet's slices under kubelet.slice
    (
        f"/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
        f"kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope",
        want("kubernetes", runtime="containerd", cid=CID, uid=UID),
    ),
    # Kubernetes, cgroupfs driver (k3s, kubeadm with cgroupfs): QoS dirs, bare ids
    (f"/kubepods/burstable/pod{UID}/{CID}", want("kubernetes", cid=CID, uid=UID)),
    (f"/kubepods/besteffort/pod{UID}/{CID}", want("kubernetes", cid=CID, uid=UID)),
    (f"/kubepods/pod{UID}/{CID}", want("kubernetes", cid=CID, uid=UID)),
    (f"/kubepods/burstable/pod{UID}", want("kubernetes", uid=UID)),
    # static pods: the UID is a 32-hex config hash
    (
        f"/kubepods/burstable/pod{'c' * 32}/{CID}",
        want("kubernetes", cid=CID, uid="c" * 32),
    ),
    # not a container: an unknown tree, a short id, a "pod" outside kubepods
    ("/process_api/f7bc56c27ec3d51ef317d0faadac7a55", want("unknown")),
    (f"/other/{CID}", want("unknown", cid=CID)),
    ("/system.slice/docker-abc123.scope", want("systemd", service="docker-abc123.scope")),
    (f"/pod{UID}", want("unknown")),
]


class TestClassify:
    @pytest.mark.parametrize(("path", "expected"), CLASSIFY_TABLE)
    def test_table(self, path: str, expected: dict[str, Any]) -> None:
        """Each real-shaped cgroup path maps to its runtime, ids and unit."""
        assert expected == fields(classify(path, 77))

    @pytest.mark.parametrize(("path", "expected"), CLASSIFY_TABLE)
    def test_keeps_path_and_id(self, path: str, expected: dict[str, Any]) -> None:
        """The workload carries the cgroup path and id it was built from."""
        w = classify(path, 77)
        assert (path, 77) == (w.cgroup_path, w.cgroup_id)

    @given(st.text(alphabet="/abcdef0123456789-_.@:podkubesrvicltn", max_size=120))
    def test_never_raises_and_kind_is_known(self, path: str) -> None:
        """Any string classifies to one of the documented kinds without raising."""
        assert classify(path).kind in KINDS

    @given(
        cid=st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
        uid=st.uuids().map(str),
        template=st.sampled_from(
            [
                (
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u_}.slice/"
                    "cri-containerd-{c}.scope",
                    "containerd",
                ),
                ("/kubepods.slice/kubepods-pod{u_}.slice/crio-{c}.scope", "crio"),
                ("/kubepods/besteffort/pod{u}/{c}", ""),
                ("/kubepods/pod{u}/{c}", ""),
            ]
        ),
    )
    def test_kubernetes_round_trip(self, cid: str, uid: str, template: tuple[str, str]) -> None:
        """Any container id and pod UID put into a kubelet path come back out unchanged."""
        path = template[0].format(c=cid, u=uid, u_=uid.replace("-", "_"))
        w = classify(path)
        assert ("kubernetes", template[1], cid, uid) == (
            w.kind,
            w.runtime,
            w.container_id,
            w.pod_uid,
        )

    @given(st.lists(st.sampled_from(["system.slice", "user.slice", "a.slice"]), max_size=4))
    def test_slices_only_is_host(self, parts: list[str]) -> None:
        """A path made only of slices is the host."""
        assert "host" == classify("/" + "/".join(parts)).kind


class TestWorkloadLabel:
    @pytest.mark.parametrize(
        ("workload", "expected"),
        [
            (classify("/", 1), "host"),
            (classify("/system.slice", 5), "host"),
            (classify("/system.slice/cron.service", 9), "cron.service"),
            (classify(f"/libpod_parent/libpod-{CID}", 3), CID[:12]),
            (Workload(kind="podman", container_id=CID, cgroup_path="/x", name="web"), "web"),
            (classify(f"/machine.slice/libpod-conmon-{CID}.scope"), f"conmon:{CID[:12]}"),
            (classify(f"/kubepods/burstable/pod{UID}/{CID}"), CID[:12]),
            (classify(f"/kubepods/burstable/pod{UID}"), f"pod:{UID}"),
            (
                Workload(
                    kind="kubernetes",
                    container_id=CID,
                    pod_uid=UID,
                    cgroup_path="/k",
                    pod="api-7d4b9",
                    namespace="prod",
                    container_name="app",
                ),
                "api-7d4b9/app",
            ),
            (Workload(kind="kubernetes", pod="api-7d4b9", cgroup_path="/k"), "api-7d4b9/pod"),
            (classify("/process_api/f7bc", 4), "/process_api/f7bc"),
            (unresolved(12345), "cgroup:12345"),
        ],
    )
    def test_labels(self, workload: Workload, expected: str) -> None:
        """The short label: name, 12-char id, unit, host, path, or cgroup:<id>."""
        assert expected == workload.label

    def test_replace_recomputes_label(self) -> None:
        """dataclasses.replace with a name gives the name as label (label is derived)."""
        from dataclasses import replace

        w = classify(f"/docker/{CID}", 8)
        assert "web" == replace(w, name="web").label

    def test_to_json(self) -> None:
        """JSON carries non-empty identity fields plus the cgroup id."""
        w = Workload(
            kind="podman",
            runtime="podman",
            container_id=CID,
            cgroup_path="/p",
            cgroup_id=9,
            name="web",
        )
        expected = {
            "kind": "podman",
            "label": "web",
            "runtime": "podman",
            "container_id": CID,
            "name": "web",
            "cgroup_path": "/p",
            "cgroup_id": 9,
        }
        assert expected == w.to_json()


class CountingNames(ContainerNames):
    """A fake at the subprocess boundary: records inspect calls, knows no names."""

    def __init__(self, **kwargs: Any) -> None:
        self.asked: list[tuple[str, str]] = []
        super().__init__(**kwargs)

    def _run_inspect(self, runtime: str, container_id: str) -> str | None:
        self.asked.append((runtime, container_id))
        return None


class TestContainerNames:
    def test_podman_store(self) -> None:
        """podman names come from <graphroot>/overlay-containers/containers.json."""
        names = ContainerNames(storage_root=str(PODMAN_STORE), inspect=False, background=False)
        assert "capwatch-probe" == names.lookup("podman", PROBE_ID)

    def test_podman_store_reread_on_change(self, tmp_path: Path) -> None:
        """A container created after the first read is found once the file changes."""
        store = tmp_path / "overlay-containers"
        store.mkdir()
        f = store / "containers.json"
        f.write_text(json.dumps([{"id": "a" * 64, "names": ["first"]}]))
        names = ContainerNames(storage_root=str(tmp_path), inspect=False, background=False)
        assert "first" == names.lookup("podman", "a" * 64)
        f.write_text(
            json.dumps(
                [{"id": "a" * 64, "names": ["first"]}, {"id": "b" * 64, "names": ["second"]}]
            )
        )
        assert "second" == names.lookup("podman", "b" * 64)

    def test_docker_config(self, tmp_path: Path) -> None:
        """docker names come from containers/<id>/config.v2.json ("Name": "/web")."""
        d = tmp_path / "containers" / CID
        d.mkdir(parents=True)
        (d / "config.v2.json").write_text(json.dumps({"ID": CID, "Name": "/web"}))
        names = ContainerNames(docker_root=str(tmp_path), inspect=False, background=False)
        assert "web" == names.lookup("docker", CID)

    def test_unknown_asked_once(self, tmp_path: Path) -> None:
        """An id no source knows is looked up once; later lookups are dict reads."""
        names = CountingNames(storage_root=str(tmp_path), inspect=True, background=False)
        assert names.lookup("podman", CID) is None
        assert names.lookup("podman", CID) is None
        assert [("podman", CID)] == names.asked

    def test_corrupt_store_warns(self, tmp_path: Path) -> None:
        """A corrupt containers.json is logged and skipped."""
        (tmp_path / "overlay-containers").mkdir()
        (tmp_path / "overlay-containers" / "containers.json").write_text("{not json")
        names = ContainerNames(storage_root=str(tmp_path), inspect=False, background=False)
        with structlog.testing.capture_logs() as logs:
            assert names.lookup("podman", CID) is None
        assert ["podman_store_unreadable"] == [e["event"] for e in logs]

    def test_background_lookup_notifies(self) -> None:
        """On the background thread, a miss returns None and listeners hear of the name."""
        names = ContainerNames(storage_root=str(PODMAN_STORE), inspect=False)
        heard: list[str] = []
        names.subscribe(heard.append)
        try:
            assert names.lookup("podman", PROBE_ID) is None
            deadline = time.monotonic() + 5
            while not heard and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            names.close()
        assert [PROBE_ID] == heard
        assert "capwatch-probe" == names.lookup("podman", PROBE_ID)


def make_cgroups(root: Path, rels: list[str]) -> dict[str, int]:
    out = {"/": root.stat().st_ino}
    for rel in rels:
        (root / rel.lstrip("/")).mkdir(parents=True, exist_ok=True)
        out[rel] = (root / rel.lstrip("/")).stat().st_ino
    return out


def pod_object(uid: str, name: str, cid: str | None, rv: str) -> dict[str, Any]:
    statuses = [{"name": "app", "containerID": f"containerd://{cid}"}] if cid else []
    return {
        "metadata": {"uid": uid, "name": name, "namespace": "prod", "resourceVersion": rv},
        "spec": {"nodeName": "node-a"},
        "status": {"containerStatuses": statuses},
    }


class TestAttributor:
    @pytest.fixture
    def clock(self) -> FakeClock:
        return FakeClock()

    @staticmethod
    def resolver(root: Path, clock: FakeClock) -> CgroupResolver:
        return CgroupResolver(str(root), background=False, clock=clock)

    def make(
        self,
        root: Path,
        clock: FakeClock,
        resolver: CgroupResolver | None = None,
        **kwargs: Any,
    ) -> Attributor:
        resolver = resolver or self.resolver(root, clock)
        names = ContainerNames(storage_root=str(PODMAN_STORE), inspect=False, background=False)
        return Attributor(resolver=resolver, container_names=names, **kwargs)

    def test_host_and_podman(self, tmp_path: Path, clock: FakeClock) -> None:
        """The root cgroup is host; a podman cgroup gets runtime, full id and name."""
        ids = make_cgroups(tmp_path, [f"/libpod_parent/libpod-{PROBE_ID}"])
        a = self.make(tmp_path, clock)
        w = a.resolve(ids[f"/libpod_parent/libpod-{PROBE_ID}"])
        assert ("podman", PROBE_ID, "capwatch-probe") == (w.runtime, w.container_id, w.name)
        assert "host" == a.resolve(ids["/"]).label

    def test_cached_object_is_reused(self, tmp_path: Path, clock: FakeClock) -> None:
        """The second resolve of an id returns the same object (the dict hit path)."""
        a = self.make(tmp_path, clock)
        root = tmp_path.stat().st_ino
        assert a.resolve(root) is a.resolve(root)

    def test_unknown_then_found(self, tmp_path: Path, clock: FakeClock) -> None:
        """An id created after start shows cgroup:<id>, then resolves after the next walk."""
        resolver = self.resolver(tmp_path, clock)
        a = self.make(tmp_path, clock, resolver)
        ino = make_cgroups(tmp_path, ["/system.slice/late.service"])["/system.slice/late.service"]
        assert f"cgroup:{ino}" == a.resolve(ino).label
        clock.now += 1
        resolver.lookup(ino)  # the walk the miss asked for (synchronous mode)
        assert "late.service" == a.resolve(ino).label

    def test_permanently_unknown_stops_asking(self, tmp_path: Path, clock: FakeClock) -> None:
        """An id a later walk did not find stays cgroup:<id> without more walks."""
        resolver = self.resolver(tmp_path, clock)
        a = self.make(tmp_path, clock, resolver)
        bogus = 10**12
        a.resolve(bogus)
        clock.now += 1
        resolver.walk()
        walks = resolver.walks
        for _ in range(100):
            clock.now += 1
            assert f"cgroup:{bogus}" == a.resolve(bogus).label
        assert walks == resolver.walks

    def test_periodic_rescan_retries_unknown(self, tmp_path: Path, clock: FakeClock) -> None:
        """An id given up on stays cgroup:<id> through ordinary walks, even once its
        cgroup shows up; the next periodic rescan tries it again and names it."""
        resolver = self.resolver(tmp_path, clock)
        a = self.make(tmp_path, clock, resolver)
        ino = make_cgroups(tmp_path, ["/late.service"])["/late.service"]
        away = tmp_path.parent / f"{tmp_path.name}-away"
        (tmp_path / "late.service").rename(away)  # same inode, outside the cgroup root
        assert f"cgroup:{ino}" == a.resolve(ino).label
        clock.now += 1
        resolver.walk()  # began after the miss and did not find it: given up
        away.rename(tmp_path / "late.service")
        clock.now += 1
        resolver.walk()
        assert ino in resolver.known()
        assert f"cgroup:{ino}" == a.resolve(ino).label
        resolver.walk(periodic=True)
        assert "late.service" == a.resolve(ino).label

    def test_forgotten_cgroup_leaves_cache(self, tmp_path: Path, clock: FakeClock) -> None:
        """After the dead TTL the cached workload of a removed cgroup is dropped."""
        ino = make_cgroups(tmp_path, ["/gone.service"])["/gone.service"]
        resolver = CgroupResolver(str(tmp_path), background=False, clock=clock, dead_ttl=5)
        a = Attributor(resolver=resolver, names=False)
        assert "gone.service" == a.resolve(ino).label
        (tmp_path / "gone.service").rmdir()
        resolver.walk()
        assert "gone.service" == a.resolve(ino).label  # dead, still within the TTL
        clock.now += 6
        resolver.walk()
        assert f"cgroup:{ino}" == a.resolve(ino).label

    def test_flood_of_unknown_ids_is_bounded(self, tmp_path: Path, clock: FakeClock) -> None:
        """Many distinct bogus ids: answers stay cgroup:<id>, one walk, and only a
        bounded number of them is remembered (a remembered answer is the same object)."""
        resolver = self.resolver(tmp_path, clock)
        a = self.make(tmp_path, clock, resolver)
        bogus = range(10**12, 10**12 + 10_000)
        for cid in bogus:
            assert f"cgroup:{cid}" == a.resolve(cid).label
        remembered = sum(a.resolve(cid) is a.resolve(cid) for cid in bogus)
        assert 0 < remembered <= 4096
        assert 1 == resolver.walks

    def test_no_cgroup_root(self, tmp_path: Path) -> None:
        """Without a cgroup2 mount every id degrades to cgroup:<id>."""
        mountinfo = CGROUP_FIXTURES / "mountinfo-nocgroup2.txt"
        a = Attributor(mountinfo=str(mountinfo), names=False, background=False)
        assert "cgroup:1" == a.resolve(1).label
        assert a.cgroup_id_of_pid("self") is None
        a.close()

    def test_explicit_root_overrides_mountinfo(self, tmp_path: Path) -> None:
        """cgroup_root wins over whatever mountinfo says."""
        a = Attributor(
            cgroup_root=str(tmp_path), mountinfo="/nonexistent", names=False, background=False
        )
        assert str(tmp_path) == a.cgroup_root
        assert "host" == a.resolve(tmp_path.stat().st_ino).label
        a.close()

    def test_name_learned_later_replaces_entry(self, tmp_path: Path) -> None:
        """With background name look-ups, the id label is replaced by the name once known."""
        ids = make_cgroups(tmp_path, [f"/libpod_parent/libpod-{PROBE_ID}"])
        names = ContainerNames(storage_root=str(PODMAN_STORE), inspect=False)
        a = Attributor(cgroup_root=str(tmp_path), container_names=names, background=False)
        cg = ids[f"/libpod_parent/libpod-{PROBE_ID}"]
        try:
            assert PROBE_ID[:12] == a.resolve(cg).label
            deadline = time.monotonic() + 5
            while a.resolve(cg).label != "capwatch-probe" and time.monotonic() < deadline:
                time.sleep(0.01)
            assert "capwatch-probe" == a.resolve(cg).label
        finally:
            a.close()
            names.close()

    def test_kubernetes_names_follow_pod_cache(self, tmp_path: Path, clock: FakeClock) -> None:
        """Pod added -> names; pod deleted -> back to ids; the cache is consulted, not copied."""
        path = (
            f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/"
            f"cri-containerd-{CID}.scope"
        )
        cg = make_cgroups(tmp_path, [path])[path]
        pods = PodCache()
        a = self.make(tmp_path, clock, k8s=pods)
        assert CID[:12] == a.resolve(cg).label
        pods.apply("ADDED", pod_object(UID, "api-7d4b9", CID, "10"))
        w = a.resolve(cg)
        expected = ("prod", "api-7d4b9", "app", "containerd", "api-7d4b9/app")
        assert expected == (w.namespace, w.pod, w.container_name, w.runtime, w.label)
        pods.apply("DELETED", pod_object(UID, "api-7d4b9", CID, "11"))
        w = a.resolve(cg)
        assert ("", "", CID[:12]) == (w.namespace, w.pod, w.label)
        a.close()

    def test_cgroupfs_k8s_runtime_from_container_id_scheme(
        self, tmp_path: Path, clock: FakeClock
    ) -> None:
        """A cgroupfs-driver path has no runtime; the pod status's containerID scheme fills it."""
        path = f"/kubepods/besteffort/pod{UID}/{CID}"
        cg = make_cgroups(tmp_path, [path])[path]
        pods = PodCache()
        pods.apply("ADDED", pod_object(UID, "web-0", CID, "5"))
        a = self.make(tmp_path, clock, k8s=pods)
        assert ("containerd", "web-0/app") == (a.resolve(cg).runtime, a.resolve(cg).label)
        a.close()

    def test_close_unsubscribes(self, tmp_path: Path, clock: FakeClock) -> None:
        """After close the pod cache no longer calls the attributor."""
        path = (
            f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/"
            f"cri-containerd-{CID}.scope"
        )
        cg = make_cgroups(tmp_path, [path])[path]
        pods = PodCache()
        a = self.make(tmp_path, clock, k8s=pods)
        assert CID[:12] == a.resolve(cg).label
        a.close()
        pods.apply("ADDED", pod_object(UID, "api-7d4b9", CID, "10"))
        assert CID[:12] == a.resolve(cg).label  # not told: the cached answer stands

    def test_this_process(self) -> None:
        """On this host, resolving our own cgroup id gives a resolved workload."""
        a = Attributor(names=False, background=False)
        try:
            own = a.cgroup_id_of_pid("self")
            if own is None:
                pytest.skip("no cgroup2 mount on this host")
            w = a.resolve(own)
            assert w.cgroup_path is not None
        finally:
            a.close()
