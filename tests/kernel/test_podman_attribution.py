"""A real podman container is attributed to podman, its full id and its name; the host to host."""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from capwatch.attribution.containers import Attributor, ContainerNames
from tests.kernel.podman import RUN, busybox_rootfs, require_podman

pytestmark = pytest.mark.container


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=60, check=check
    )


@dataclass(frozen=True)
class Container:
    name: str
    id: str
    pid: int


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A busybox root filesystem (tests/kernel/podman.py)."""
    require_podman()
    return busybox_rootfs(tmp_path_factory.mktemp("busybox-rootfs"))


def start_sleeper(rootfs: Path, name: str) -> None:
    """A detached `sleep 30` container named ``name``."""
    r = subprocess.run(
        [*RUN, "-d", "--name", name, "--rootfs", str(rootfs), "sleep", "30"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert 0 == r.returncode, r.stderr


@pytest.fixture(scope="module")
def container(rootfs: Path) -> Iterator[Container]:
    """A running `sleep 30` container, removed at the end."""
    name = f"capwatch-test-{secrets.token_hex(4)}"
    try:
        start_sleeper(rootfs, name)
        out = podman("inspect", "--format", "{{.Id}} {{.State.Pid}}", name).stdout.split()
        yield Container(name=name, id=out[0], pid=int(out[1]))
    finally:
        podman("rm", "-f", "-t", "0", name, check=False)


class TestPodmanAttribution:
    def test_container_cgroup_is_podman_with_id_and_name(self, container: Container) -> None:
        """resolve(cgroup id of the container's pid) gives podman, the inspect id and the name.

        ``podman inspect`` is disabled: the name must come from podman's on-disk store.
        """
        names = ContainerNames(inspect=False)
        a = Attributor(container_names=names)
        try:
            cgroup_id = a.cgroup_id_of_pid(container.pid)
            assert cgroup_id is not None
            first = a.resolve(cgroup_id)
            assert ("podman", container.id) == (first.runtime, first.container_id)
            deadline = time.monotonic() + 10  # the name is learned off the event path
            while a.resolve(cgroup_id).name != container.name and time.monotonic() < deadline:
                time.sleep(0.01)
            w = a.resolve(cgroup_id)
            assert (container.name, container.name) == (w.name, w.label)
            assert w.cgroup_path is not None
            assert container.id in w.cgroup_path
            assert 0 == names.inspections
        finally:
            a.close()
            names.close()

    def test_container_started_after_attributor(self, rootfs: Path) -> None:
        """A container created after the first walk resolves after a re-walk (miss path)."""
        a = Attributor(min_walk_interval=0.05)
        name = f"capwatch-test-{secrets.token_hex(4)}"
        try:
            start_sleeper(rootfs, name)
            cid, pid = podman("inspect", "--format", "{{.Id}} {{.State.Pid}}", name).stdout.split()
            cgroup_id = a.cgroup_id_of_pid(pid)
            assert cgroup_id is not None
            assert f"cgroup:{cgroup_id}" == a.resolve(cgroup_id).label
            deadline = time.monotonic() + 10
            while a.resolve(cgroup_id).label != name and time.monotonic() < deadline:
                time.sleep(0.01)
            w = a.resolve(cgroup_id)
            assert ("podman", cid, name) == (w.runtime, w.container_id, w.label)
        finally:
            a.close()
            podman("rm", "-f", "-t", "0", name, check=False)

    def test_host_is_host(self, container: Container) -> None:
        """The root cgroup is `host`; this test process is host or a systemd unit, not podman."""
        a = Attributor()
        try:
            assert a.cgroup_root is not None
            root_id = os.stat(a.cgroup_root).st_ino
            assert "host" == a.resolve(root_id).label
            own = a.cgroup_id_of_pid(os.getpid())
            assert own is not None
            assert a.resolve(own).kind in {"host", "systemd"}
        finally:
            a.close()
