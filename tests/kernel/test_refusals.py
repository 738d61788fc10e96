"""Issue 13: refusals that today's answer gets wrong, reproduced with real processes and
containers: netlink's asynchronous EPERM, the exit status of `explain -- CMD`, and
refusals that are not capability checks (seccomp, file capabilities, no_new_privs,
file permissions)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, require_root, require_tool
from tests.kernel.podman import (
    RUN,
    busybox_rootfs,
    new_name,
    podman_id,
    podman_rm,
    require_podman,
)

pytestmark = [pytest.mark.kernel]


def capwatch(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "capwatch.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        check=False,
    )


def findings(r: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert "Traceback" not in r.stderr, r.stderr
    out: list[dict[str, Any]] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def net_admin(exps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in exps if e.get("capability") == "CAP_NET_ADMIN"]


@pytest.fixture(autouse=True)
def _root() -> None:
    require_root()
    require_tool("capsh")


class TestNetlinkOnHost:
    def test_ip_link_add_is_an_asynchronous_cause(self) -> None:
        """ip link add under capsh --drop=cap_net_admin: sendmsg returns success, the EPERM
        comes in the netlink reply; capwatch calls it a cause (asynchronous), never a probe,
        and explain exits with ip's status."""
        require_tool("ip")
        r = capwatch(
            "explain",
            "--json",
            "--",
            "capsh",
            "--drop=cap_net_admin",
            "--",
            "-c",
            "exec ip link add cwdummy13 type dummy",
        )
        exps = net_admin(findings(r))
        assert exps, r.stdout
        assert {("cause", True, "bounding")} == {
            (e["role"], e["asynchronous"], e["missing_from"]) for e in exps
        }
        assert any(e["syscall"] in ("sendmsg", "sendto") for e in exps)
        assert 2 == r.returncode, r.stderr  # ip's own status: "RTNETLINK answers: ..."

    def test_exit_status_of_the_command_is_kept(self) -> None:
        """explain -- CMD exits with CMD's status (here 3), not 0 (issue 13, defect 7)."""
        r = capwatch("explain", "--", "sh", "-c", "exit 3")
        assert (3, "no capability was denied") == (r.returncode, r.stdout.strip()[:24])


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_podman()
    return busybox_rootfs(tmp_path_factory.mktemp("busybox"))


@pytest.fixture
def container(rootfs: Path) -> Iterator[Any]:
    names: list[str] = []

    def start(script: str, *extra: str) -> str:
        name = new_name()
        names.append(name)
        subprocess.run(
            [*RUN, "-d", "--name", name, *extra, "--rootfs", str(rootfs), "sh", "-c", script],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        return name

    yield start
    podman_rm(*names)


@pytest.mark.container
class TestNetlinkInContainer:
    def test_explain_ip_link_add(self, container: Any) -> None:
        """ip link add in a podman container without NET_ADMIN: a cause, the container is named
        in the finding, and the fix is podman run --cap-add=NET_ADMIN."""
        name = container("sleep 4; ip link add dummy0 type dummy; sleep 3")
        r = capwatch("explain", "--json", "--container", name, "--duration", "7")
        exps = net_admin(findings(r))
        assert exps, r.stdout
        e = exps[0]
        assert ("cause", True, name, "podman") == (
            e["role"],
            e["asynchronous"],
            e["container"],
            e["kind"],
        )
        assert [{"context": "podman", "fix": "podman run --cap-add=NET_ADMIN ..."}] == e["fixes"]
        assert podman_id(name) == e["container_id"]

    def test_advise_proposes_net_admin(self, container: Any) -> None:
        """advise on the same container proposes NET_ADMIN as missing, from the refused ip."""
        name = container("sleep 4; ip link add dummy0 type dummy; sleep 3")
        r = capwatch("advise", "--json", "--container", name, "--duration", "7")
        assert 0 == r.returncode, r.stderr
        a = json.loads(r.stdout)
        assert "CAP_NET_ADMIN" in a["capabilities"], a
        assert "--cap-add=NET_ADMIN" in a["docker"]
        assert any("(ip)" in ev for ev in a["evidence"]["CAP_NET_ADMIN"])


def _explain_text(*cmd: str) -> subprocess.CompletedProcess[str]:
    return capwatch("explain", "--", *cmd)


def test_binaries_used_exist() -> None:
    """The tools the scenarios below need are here (they are part of the test host)."""
    for tool in ("setpriv", "setcap", "capsh"):
        assert shutil.which(tool), tool
    assert os.path.exists("/bin/busybox")
