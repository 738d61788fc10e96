"""A real containerd and a real dockerd for tests, each in its own temporary directories.

Nothing is pulled: images come from the busybox root filesystem of
tests/kernel/podman.py (``docker import`` of its tarball; ``ctr run --rootfs``).
Both daemons use runc and the cgroupfs driver (PID 1 is not systemd here);
dockerd runs with no bridge and no iptables, so it touches no host network.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from capwatch.attribution.cgroups import cgroup_id_of_pid, find_cgroup2_mount
from tests.helpers import CAPWATCH, REPO

IMAGE = "capwatch-busybox:test"  # what the dockerd fixtures import the busybox tree as
DOCKER = "/usr/bin/docker"  # Debian's docker.io client (another `docker` may come first in PATH)
# Seccomp: docker's default profile refuses clock_settime before the kernel
# checks CAP_SYS_TIME; ctr runs without a profile unless --seccomp is given.
NO_SECCOMP = ("--security-opt", "seccomp=unconfined")


def require_runtimes() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: starts containerd and dockerd")
    missing = [b for b in ("containerd", "ctr", "dockerd", "runc") if shutil.which(b) is None]
    if missing or not os.path.exists(DOCKER):
        pytest.fail(
            f"{', '.join(missing or ['docker'])} not installed: deploy/host-setup.sh installs"
            " docker.io and containerd"
        )


def _wait(what: str, ok: object, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(ok) and ok():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    pytest.fail(f"{what} did not start: {tail}")


def _unmount_under(root: Path) -> None:
    """Lazily unmount whatever a daemon left mounted under ``root`` (netns, shm)."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in sorted((p for p in points if p.startswith(f"{root}/")), reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


class Containerd:
    """``containerd`` with its own root, state and socket."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "root"
        self.state = base / "state"
        self.address = str(base / "containerd.sock")
        self.log = base / "containerd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Containerd:
        self.base.mkdir(parents=True, exist_ok=True)
        config = self.base / "config.toml"
        # runc through the v2 shim, cgroupfs (no SystemdCgroup); no CRI plugin.
        config.write_text(
            "version = 2\n"
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[ttrpc]\n  address = "{self.address}.ttrpc"\n'
        )
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    "containerd",
                    "--config",
                    str(config),
                    "--root",
                    str(self.root),
                    "--state",
                    str(self.state),
                    "--address",
                    self.address,
                ],
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        _wait(
            "containerd",
            lambda: self.ctr("version", check=False).returncode == 0,
            self.proc,
            self.log,
            30,
        )
        return self

    def ctr(
        self, *args: str, ns: str = "default", check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ctr", "--address", self.address, "-n", ns, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def run(
        self, ns: str, cid: str, rootfs: Path, *cmd: str, extra: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess[str]:
        """``ctr run --rm`` in the foreground: returns once the container exits."""
        return self.ctr(
            "run",
            "--rm",
            "--env",
            "PATH=/bin",
            *extra,
            "--rootfs",
            str(rootfs),
            cid,
            *cmd,
            ns=ns,
            check=False,
        )

    def pid(self, ns: str, cid: str) -> int:
        """The host pid of a running task's init (``ctr task ls``)."""
        for line in self.ctr("task", "ls", ns=ns).stdout.splitlines()[1:]:
            task, pid, *_ = line.split()
            if task == cid:
                return int(pid)
        raise AssertionError(f"no task {ns}/{cid}")

    def remove(self, ns: str, cid: str) -> None:
        self.ctr("task", "kill", "-s", "SIGKILL", cid, ns=ns, check=False)
        for _ in range(50):
            if self.ctr("task", "delete", cid, ns=ns, check=False).returncode != 0:
                break
            time.sleep(0.1)
        self.ctr("container", "delete", cid, ns=ns, check=False)

    def stop(self) -> None:
        if self.proc is None:
            return
        # Tasks first: their shims outlive containerd otherwise.
        for ns in self.ctr("namespaces", "list", "-q", check=False).stdout.split():
            for cid in self.ctr("containers", "list", "-q", ns=ns, check=False).stdout.split():
                self.remove(ns, cid)
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        _unmount_under(self.base)


class Dockerd:
    """``dockerd`` on its own socket, data-root and exec-root, using ``containerd``."""

    def __init__(self, base: Path, containerd: Containerd, *, live_restore: bool = False) -> None:
        self.base = base
        self.containerd = containerd
        self.socket = str(base / "docker.sock")
        self.host = f"unix://{self.socket}"
        self.log = base / "dockerd.log"
        self.live_restore = live_restore
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Dockerd:
        self.base.mkdir(parents=True, exist_ok=True)
        config = self.base / "daemon.json"
        config.write_text(json.dumps({"live-restore": self.live_restore}))
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    "dockerd",
                    "--config-file",
                    str(config),
                    "-H",
                    self.host,
                    "--data-root",
                    str(self.base / "data"),
                    "--exec-root",
                    str(self.base / "exec"),
                    "--pidfile",
                    str(self.base / "docker.pid"),
                    "--containerd",
                    self.containerd.address,
                    "--exec-opt",
                    "native.cgroupdriver=cgroupfs",
                    "--storage-driver",
                    "vfs",
                    "--iptables=false",
                    "--ip-masq=false",
                    "--bridge=none",
                ],
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        _wait(
            "dockerd",
            lambda: self.docker("version", check=False).returncode == 0,
            self.proc,
            self.log,
            60,
        )
        return self

    def docker(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [DOCKER, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            env={**os.environ, "DOCKER_HOST": self.host},
        )

    def inspect(self, name: str) -> tuple[str, int]:
        """(full id, host pid of the init) of a container, as docker reports them."""
        cid, pid = self.docker("inspect", "--format", "{{.Id}} {{.State.Pid}}", name).stdout.split()
        return cid, int(pid)

    def import_rootfs(self, rootfs: Path, tag: str) -> str:
        """``docker import`` of a tarball of ``rootfs``; returns the tag."""
        tarball = self.base / "rootfs.tar"
        with tarfile.open(tarball, "w") as tar:
            tar.add(rootfs, arcname=".")
        self.docker("import", str(tarball), tag)
        return tag

    def kill(self) -> None:
        """SIGKILL, as a crash would: the socket file stays, nothing answers on it."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(subprocess.SubprocessError):
            ids = self.docker("ps", "-aq", check=False, timeout=30).stdout.split()
            if ids:
                self.docker("rm", "-f", *ids, check=False, timeout=60)
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        _unmount_under(self.base)


class LiveTrace:
    """`capwatch trace --json ARGS`, its records read as they come.

    On a loaded machine the consumer can run seconds behind the kernel; tests
    wait for a record (``wait_for``) instead of sleeping, and keep a container
    alive until its records were read.
    """

    def __init__(self, *args: str, ready_timeout: float = 60) -> None:
        self.proc = subprocess.Popen(
            [*CAPWATCH, "trace", "--json", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        self.records: list[dict[str, Any]] = []
        self.err: list[str] = []
        self._cond = threading.Condition()
        assert self.proc.stderr is not None
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.err.append(line)
            if "attached via" in line:
                break
        else:
            line = ""
        if "attached via" not in line:
            self.proc.kill()
            pytest.fail(f"capwatch trace did not attach: {''.join(self.err)}")
        self._threads = [
            threading.Thread(target=self._read_out, daemon=True),
            threading.Thread(target=self._read_err, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                rec = json.loads(line)
            except ValueError:
                # not a record: structlog's default logger (until capwatch configures
                # one, issue 11) prints module warnings to stdout
                self.err.append(line)
                continue
            with self._cond:
                self.records.append(rec)
                self._cond.notify_all()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err.append(line)

    def wait_for(
        self, pred: Callable[[dict[str, Any]], bool], what: str, timeout: float = 60
    ) -> dict[str, Any]:
        """The first record ``pred`` accepts, waiting for it up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for rec in self.records:
                    if pred(rec):
                        return rec
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    pytest.fail(f"capwatch trace never showed {what}: {''.join(self.err)}")
                self._cond.wait(timeout=min(left, 0.5))

    def stop(self, timeout: float = 20) -> tuple[list[dict[str, Any]], str]:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=timeout)
        for t in self._threads:
            t.join(timeout=5)
        assert 0 == self.proc.returncode, "".join(self.err)
        with self._cond:
            return list(self.records), "".join(self.err)

    def __enter__(self) -> LiveTrace:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def cgroup_of(pid: int | str) -> int:
    """The cgroup id of ``pid`` in the unified hierarchy (what capwatch records)."""
    root = find_cgroup2_mount("/proc/self/mountinfo")
    assert root is not None
    cg = cgroup_id_of_pid(pid, cgroup_root=str(root))
    assert cg is not None, pid
    return cg
