"""Attribution only where a runtime could have put the cgroup (issue 12, finding 3).

Real-shaped paths for each driver, and the spoofing paths a user with a
delegated subtree can create. ``owners`` is what cgroups.cgroup_owners reads.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from capwatch.attribution.cgroups import cgroup_owners
from capwatch.attribution.containers import Attributor, classify

CID = "3f1c2b9a8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a3928170f6e5d4c"
OTHER = "0123456789abcdef" * 4
UID = "5a0b9c6e-8f2d-4c1b-9e3a-7d6f5c4b3a21"
UID_ = UID.replace("-", "_")
USER = "/user.slice/user-1000.slice/user@1000.service"

# Paths an unprivileged user can create in the tree delegated to them, each
# naming a victim's pod and container.
SPOOFS = [
    f"{USER}/kubepods-x/pod{UID}/cri-containerd-{CID}.scope",
    f"{USER}/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/"
    f"cri-containerd-{CID}.scope",
    f"{USER}/kubepods/burstable/pod{UID}/{CID}",
    f"{USER}/app.slice/kubepods/pod{UID}/{CID}",
    f"{USER}/machine.slice/libpod-{CID}.scope",
    f"{USER}/libpod_parent/libpod-{CID}",
    f"{USER}/docker/{CID}",
    f"{USER}/system.slice/docker-{CID}.scope",
]


class TestDelegatedSubtree:
    @pytest.mark.parametrize("path", SPOOFS)
    def test_spoof_under_user_manager_is_the_user(self, path: str) -> None:
        """A container/pod path below user@1000.service is user 1000's cgroup:
        no pod UID, no container id, a label that names the user."""
        w = classify(path, 5)
        assert ("user-delegated", 1000, "", "") == (w.kind, w.uid, w.pod_uid, w.container_id)
        assert w.label.startswith("user-1000:")

    @pytest.mark.parametrize("path", SPOOFS)
    def test_spoof_under_a_directory_chowned_to_a_user(self, path: str) -> None:
        """The same paths moved under a directory owned by uid 4242 (not a user
        manager's name): the owner facts make them that user's."""
        path = "/delegated" + path[len(USER) :]
        depth = len([p for p in path.split("/") if p])
        w = classify(path, 5, owners=(4242,) * depth)
        assert ("user-delegated", 4242, "", "") == (w.kind, w.uid, w.pod_uid, w.container_id)

    def test_chowned_child_of_a_runtime_root(self) -> None:
        """/libpod_parent/<dir owned by 4242>/libpod-<id>: where podman puts a pod's
        containers, but a user made the directory: not podman's."""
        path = f"/libpod_parent/mine/libpod-{CID}"
        assert "podman" == classify(path).kind  # by its shape alone, a podman pod's container
        w = classify(path, owners=(0, 4242, 4242))
        assert ("user-delegated", 4242, "") == (w.kind, w.uid, w.container_id)

    def test_rootless_podman_is_honest(self) -> None:
        """Rootless podman is a real runtime in a user's tree: podman, the user,
        the unit name; not a root container, no id to look a name up with."""
        w = classify(f"{USER}/user.slice/libpod-{CID}.scope", 3)
        assert ("user-delegated", "podman", 1000, "", f"libpod-{CID}.scope") == (
            w.kind,
            w.runtime,
            w.uid,
            w.container_id,
            w.service,
        )
        assert f"user-1000:libpod-{CID}.scope" == w.label
        assert 1000 == w.to_json()["uid"]


class TestRuntimeRoots:
    @pytest.mark.parametrize(
        "path",
        [
            f"/system.slice/kubepods/burstable/pod{UID}/{CID}",
            f"/kubelet.slice/other.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope",
            f"/system.slice/foo.service/docker-{CID}.scope",
            f"/system.slice/libpod-{CID}.scope",
            f"/machine.slice/docker-{CID}.scope",
            f"/user.slice/docker/{CID}",
        ],
    )
    def test_container_patterns_elsewhere_are_not_containers(self, path: str) -> None:
        """kubepods below the top, a scope inside a service, a runtime's pattern
        under another runtime's root: no container id, no pod."""
        w = classify(path)
        assert ("", "") == (w.container_id, w.pod_uid)
        assert w.kind != "kubernetes"

    def test_outermost_container_wins(self) -> None:
        """A container that makes cgroups inside its own (cgroup namespaces,
        nested runtimes) cannot claim another container's identity."""
        for path, runtime in [
            (f"/machine.slice/libpod-{CID}.scope/libpod-{OTHER}.scope", "podman"),
            (f"/system.slice/docker-{CID}.scope/docker-{OTHER}.scope", "docker"),
            (f"/docker/{CID}/{OTHER}", "docker"),
        ]:
            w = classify(path)
            assert (runtime, CID) == (w.runtime, w.container_id), path
        w = classify(f"/kubepods/burstable/pod{UID}/{CID}/kubepods/pod{'1' * 32}/{OTHER}")
        assert (UID, CID) == (w.pod_uid, w.container_id)

    def test_userns_container_owns_its_directory(self) -> None:
        """A runtime chowns a user-namespaced container's cgroup to its root
        (uid 100000 here): the container is still the runtime's, its children too."""
        w = classify(f"/machine.slice/libpod-{CID}.scope/container", owners=(0, 100000, 100000))
        assert ("podman", CID) == (w.kind, w.container_id)
        w = classify(
            f"/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope/x/y",
            owners=(0, 0, 100000, 100000, 100000),
        )
        assert ("kubernetes", UID, CID) == (w.kind, w.pod_uid, w.container_id)

    def test_pod_owned_by_a_user_keeps_the_pod_not_the_container(self) -> None:
        """If a pod's directory were someone else's, its children are theirs:
        the pod stays (root made it), the container id does not."""
        w = classify(f"/kubepods/burstable/pod{UID}/{CID}", owners=(0, 0, 4242, None))
        assert ("kubernetes", UID, "") == (w.kind, w.pod_uid, w.container_id)


def make_dirs(root: Path, rel: str, owner: int | None = None) -> int:
    d = root / rel.lstrip("/")
    d.mkdir(parents=True)
    if owner is not None:
        os.chown(d, owner, owner)
    return d.stat().st_ino


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
class TestAttributorReadsOwners:
    def test_owners_of_a_real_tree(self, tmp_path: Path) -> None:
        """cgroup_owners reads the uid of each directory along the path; None once
        a component is missing."""
        make_dirs(tmp_path, "/libpod_parent")
        make_dirs(tmp_path, "/libpod_parent/mine", owner=4242)
        assert (0, 4242, None) == cgroup_owners(str(tmp_path), "/libpod_parent/mine/gone")

    def test_attributor_passes_the_owners_in(self, tmp_path: Path) -> None:
        """A directory tree where a user owns a directory under podman's root:
        the Attributor classifies the spoofed container below it as the user's,
        and a real-shaped container beside it as podman's."""
        make_dirs(tmp_path, "/libpod_parent/mine", owner=4242)
        spoof = make_dirs(tmp_path, f"/libpod_parent/mine/libpod-{CID}")
        real = make_dirs(tmp_path, f"/libpod_parent/libpod-{OTHER}")
        a = Attributor(cgroup_root=str(tmp_path), names=False, background=False)
        try:
            w = a.resolve(spoof)
            assert ("user-delegated", 4242, "") == (w.kind, w.uid, w.container_id)
            w = a.resolve(real)
            assert ("podman", OTHER) == (w.kind, w.container_id)
        finally:
            a.close()
