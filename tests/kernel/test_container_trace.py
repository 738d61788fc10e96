"""Issue 4 end to end: denials inside a real podman container, seen by `capwatch trace` on the host."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel.podman import (
    NO_SECCOMP,
    busybox_rootfs,
    new_name,
    podman_id,
    podman_rm,
    podman_run,
    require_podman,
)
from tests.kernel.tracing import TraceProcess, run_denied_date

pytestmark = [pytest.mark.kernel, pytest.mark.container]


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_podman()
    return busybox_rootfs(tmp_path_factory.mktemp("busybox"))


@pytest.fixture
def names() -> Iterator[list[str]]:
    made: list[str] = []
    yield made
    podman_rm(*made)


class TestContainerDenials:
    def test_date_and_ifconfig_in_podman(self, rootfs: Path, names: list[str]) -> None:
        """In a podman container, date -s (CAP_SYS_TIME, EPERM) and ifconfig nosuchdev0
        (CAP_SYS_MODULE) are reported with runtime podman, the container's id and name;
        a host denial in the same run is attributed to host."""
        name = new_name()
        names.append(name)
        with TraceProcess() as tr:
            r = podman_run(
                rootfs,
                name,
                "sh",
                "-c",
                "date -s 2020-01-01; ifconfig nosuchdev0; exit 0",
                extra=NO_SECCOMP,
            )
            host_pid = run_denied_date()
            events, err = tr.stop()
        assert "Operation not permitted" in r.stderr + r.stdout, r
        cid = podman_id(name)
        mine = [e for e in events if e["container_id"] == cid]
        by_cap = {e["capability"]: e for e in mine}
        assert {"CAP_SYS_TIME", "CAP_SYS_MODULE"} <= by_cap.keys(), (events, err)
        t = by_cap["CAP_SYS_TIME"]
        # busybox sh runs the date applet in its own process (NOFORK): comm is sh
        assert ("clock_settime", "podman", name, name) == (
            t["syscall"],
            t["runtime"],
            t["container_name"],
            t["container"],
        )
        m = by_cap["CAP_SYS_MODULE"]
        assert ("ifconfig", "ioctl", "podman") == (m["comm"], m["syscall"], m["runtime"])
        host = [e for e in events if e["pid"] == host_pid]
        assert [("host", "host")] == [(e["container"], e["runtime"]) for e in host]

    def test_container_filter(self, rootfs: Path, names: list[str]) -> None:
        """--container NAME keeps that container's denials and drops the host's."""
        name = new_name()
        names.append(name)
        with TraceProcess("--container", name) as tr:
            podman_run(rootfs, name, "date", "-s", "2020-01-01", extra=NO_SECCOMP)
            run_denied_date()
            events, _ = tr.stop()
        assert events
        assert {name} == {e["container_name"] for e in events}

    def test_host_only_filter(self, rootfs: Path, names: list[str]) -> None:
        """--host-only drops container denials."""
        name = new_name()
        names.append(name)
        with TraceProcess("--host-only") as tr:
            podman_run(rootfs, name, "date", "-s", "2020-01-01")
            pid = run_denied_date()
            events, _ = tr.stop()
        assert pid in {e["pid"] for e in events}
        assert all(e["runtime"] != "podman" for e in events)
