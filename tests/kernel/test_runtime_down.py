"""dockerd killed while capwatch traces: tracing goes on, ids are shown, names come back.

A dockerd of its own (live-restore, so that its containers outlive it), killed
with SIGKILL as a crash would, then started again on the same directories.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel.runtimes import (
    IMAGE,
    NO_SECCOMP,
    Containerd,
    Dockerd,
    LiveTrace,
    cgroup_of,
    require_runtimes,
)
from tests.kernel.tracing import run_denied_date

pytestmark = [pytest.mark.kernel, pytest.mark.container, pytest.mark.slow]

# date -s every 0.3 s, for as long as the container lives
DENY_LOOP = "while true; do date -s 2020-01-01 2>/dev/null; sleep 0.3; done"


@pytest.fixture
def crashable(
    tmp_path: Path, busybox_root: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Dockerd]:
    require_runtimes()
    c = Containerd(tmp_path / "ctd")
    d = Dockerd(tmp_path / "dkd", c, live_restore=True)
    try:
        c.start()
        d.start()
        d.import_rootfs(busybox_root, IMAGE)
        monkeypatch.setenv("DOCKER_HOST", d.host)
        monkeypatch.setenv("CAPWATCH_CONTAINERD_STATE", str(c.state))
        yield d
    finally:
        if d.proc is None:
            d.start()  # to remove its containers
        d.stop()
        c.stop()


def test_dockerd_killed_then_back(crashable: Dockerd, tmp_path: Path) -> None:
    """dockerd is killed under two capwatch traces: one started before the crash, one
    during the outage.

    The first keeps tracing and keeps the names it had (A's and B's, learnt from one
    container list). The second, knowing no name, shows B's denials by B's full id
    (runtime docker) while dockerd is dead, and by B's name once dockerd answers again.
    A host denial during the outage reaches both. B waits on a FIFO (no syscall, so
    no capability check) until the second trace is attached."""
    d = crashable
    trigger = tmp_path / "trigger"
    trigger.mkdir()
    os.mkfifo(trigger / "go")
    a, b = "cw-before", "cw-during"
    d.docker(
        "run",
        "-d",
        "--name",
        b,
        "--network",
        "none",
        "-v",
        f"{trigger}:/trigger",
        *NO_SECCOMP,
        IMAGE,
        "sh",
        "-c",
        "read x < /trigger/go; " + DENY_LOOP,
    )
    b_id, b_pid = d.inspect(b)
    b_cg = cgroup_of(b_pid)
    with LiveTrace() as before:
        d.docker(
            "run",
            "-d",
            "--name",
            a,
            "--network",
            "none",
            *NO_SECCOMP,
            IMAGE,
            "sh",
            "-c",
            DENY_LOOP,
        )
        a_id, _ = d.inspect(a)
        before.wait_for(lambda e: e["container_id"] == a_id and e["container_name"] == a, "A")
        d.kill()
        with LiveTrace() as during:
            with open(trigger / "go", "w") as fifo:
                fifo.write("go\n")
            first_b = during.wait_for(lambda e: e["cgroup_id"] == b_cg, "B, docker dead")
            b_before = before.wait_for(lambda e: e["cgroup_id"] == b_cg, "B in the first trace")
            host_pid = run_denied_date()
            for tr in (before, during):
                tr.wait_for(lambda e: e["pid"] == host_pid, "a host denial, docker dead")
            a_down = before.wait_for(
                lambda e: e["container_id"] == a_id and e["time"] > first_b["time"], "A, dead"
            )
            d.start()
            during.wait_for(
                lambda e: e["container_id"] == b_id and e["container_name"] == b,
                "B named once docker is back",
                timeout=90,
            )
            events, _ = during.stop()
        before.stop()
    assert ("docker", b_id, "", b_id[:12]) == (
        first_b["runtime"],
        first_b["container_id"],
        first_b["container_name"],
        first_b["container"],
    )
    assert (a, b) == (a_down["container"], b_before["container"])
    host = [e for e in events if e["pid"] == host_pid]
    assert [("host", "CAP_SYS_TIME")] == [(e["container"], e["capability"]) for e in host]
