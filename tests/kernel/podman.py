"""Real podman containers from a busybox root filesystem, for tests."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
# podman's default seccomp profile refuses clock_settime and friends with EPERM
# before the kernel checks CAP_SYS_TIME (the filter admits them only when SYS_TIME
# is granted): no capability check happens at all. Tests that need the check run
# without the filter, as Kubernetes runs pods by default; README's "Known limits".
NO_SECCOMP = ("--security-opt", "seccomp=unconfined")
RUN = [
    "podman",
    "--runtime",
    "runc",
    "run",
    "--ulimit",
    "nofile=20000:20000",
    "--ulimit",
    "nproc=1000:1000",
]


def require_podman() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: runs podman containers")
    if shutil.which("podman") is None or not os.path.exists(BUSYBOX):
        pytest.fail(
            "podman and busybox-static must be installed (deploy/host-setup.sh installs them)"
        )


def busybox_rootfs(root: Path) -> Path:
    """bin/busybox plus one relative symlink per applet."""
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True)
    shutil.copy2(BUSYBOX, bin_dir / "busybox")
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True)
    for applet in applets.stdout.split():
        if applet != "busybox":
            (bin_dir / applet).symlink_to("busybox")
    for d in ("etc", "tmp", "proc", "sys", "dev", "run"):
        (root / d).mkdir(exist_ok=True)
    (root / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n"
    )
    (root / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")
    return root


def new_name(prefix: str = "capwatch-test") -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def podman_run(
    rootfs: Path, name: str, *cmd: str, extra: tuple[str, ...] = (), timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in a fresh container (kept after exit, so that it can be inspected)."""
    return subprocess.run(
        [*RUN, "--name", name, *extra, "--rootfs", str(rootfs), *cmd],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def podman_id(name: str) -> str:
    return subprocess.run(
        ["podman", "inspect", "--format", "{{.Id}}", name],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def podman_rm(*names: str) -> None:
    subprocess.run(["podman", "rm", "-f", "-t", "0", *names], capture_output=True, check=False)
