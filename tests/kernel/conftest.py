"""Fixtures for tests/kernel: a real containerd and dockerd (tests/kernel/runtimes.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel.podman import busybox_rootfs
from tests.kernel.runtimes import IMAGE, Containerd, Dockerd, require_runtimes


@pytest.fixture(scope="session")
def busybox_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A busybox root filesystem, for ``ctr run --rootfs`` and ``docker import``."""
    return busybox_rootfs(tmp_path_factory.mktemp("runtime-rootfs") / "rootfs")


@pytest.fixture(scope="session")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    """A containerd of its own, stopped (tasks first) at the end of the session."""
    require_runtimes()
    c = Containerd(tmp_path_factory.mktemp("ctd"))
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.fixture(scope="session")
def dockerd(
    containerd: Containerd, busybox_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Dockerd]:
    """A dockerd of its own on that containerd, with the busybox image imported as IMAGE."""
    d = Dockerd(tmp_path_factory.mktemp("dkd"), containerd)
    try:
        d.start()
        d.import_rootfs(busybox_root, IMAGE)
        yield d
    finally:
        d.stop()


@pytest.fixture
def runtime_env(monkeypatch: pytest.MonkeyPatch, containerd: Containerd, dockerd: Dockerd) -> None:
    """capwatch run from the test (a child process) finds these daemons, not the host's."""
    monkeypatch.setenv("DOCKER_HOST", dockerd.host)
    monkeypatch.setenv("CAPWATCH_CONTAINERD_STATE", str(containerd.state))
