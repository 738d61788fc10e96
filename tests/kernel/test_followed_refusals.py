"""Refusals of the containers a command starts (explain -- podman run ...): the
container runs in a cgroup of its own, not under the command's, so the kernel
filter is "every cgroup but those that existed before" (refusal_cgroups=except),
and capwatch keeps the refusals of the containers it follows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO
from tests.kernel.podman import RUN, busybox_rootfs, new_name, podman_rm, require_podman

pytestmark = [pytest.mark.kernel, pytest.mark.container]


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_podman()
    return busybox_rootfs(tmp_path_factory.mktemp("busybox"))


def explain_run(rootfs: Path, name: str, *cmd: str) -> tuple[int, list[dict[str, Any]], str]:
    try:
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "capwatch.commands.cli",
                "explain",
                "--json",
                "--",
                *RUN,
                "--rm",
                "--name",
                name,
                "--rootfs",
                str(rootfs),
                *cmd,
            ],
            capture_output=True,
            text=True,
            timeout=180,
            cwd=REPO,
            check=False,
        )
    finally:
        podman_rm(name)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines, (r.stdout, r.stderr)
    return r.returncode, json.loads(lines[-1]), r.stderr


def test_seccomp_refusal_in_the_started_container(rootfs: Path) -> None:
    """date -s under podman's default seccomp profile: no capability is checked at all;
    the container's clock_settime refusal is shown as seccomp, with the container's
    name and podman's --cap-add fix (the profile admits the call when SYS_TIME is
    granted). Before, a followed container got no refusal verdicts."""
    name = new_name()
    _rc, found, err = explain_run(rootfs, name, "date", "-s", "2020-01-01")
    assert "can't set date: Operation not permitted" in err  # busybox date exits 0 anyway
    seccomp = [f for f in found if f.get("verdict") == "seccomp"]
    assert seccomp, found
    [f] = seccomp
    assert (name, "date") == (f["container"], f["comm"]), f
    assert f["syscall"] in ("clock_settime", "settimeofday"), f
    assert any("--cap-add=SYS_TIME" in x["fix"] for x in f["fixes"]), f["fixes"]
    # the go runtime's epoll_ctl EPERM ("not a pollable fd") of podman's CNI plugins
    # is no refusal; and nothing of this run is "unexplained"
    assert not [x for x in found if x.get("syscall") == "epoll_ctl"], found
    assert not [x for x in found if x.get("verdict") == "unexplained"], found


def test_other_containers_refusals_are_not_shown(rootfs: Path) -> None:
    """A container running before the command (its cgroup existed) is refused the same
    way meanwhile: its refusals are not the command's."""
    other = new_name()
    subprocess.run(
        [
            *RUN,
            "-d",
            "--name",
            other,
            "--rootfs",
            str(rootfs),
            "sh",
            "-c",
            "while :; do date -s 2020-01-01 2>/dev/null; sleep 0.1; done",
        ],
        capture_output=True,
        check=True,
        timeout=60,
    )
    try:
        name = new_name()
        _rc, found, err = explain_run(rootfs, name, "date", "-s", "2020-01-01")
    finally:
        podman_rm(other)
    containers = {f.get("container") for f in found if f.get("verdict") == "seccomp"}
    assert {name} == containers, (found, err)
