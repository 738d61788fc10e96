"""A user's delegated cgroup named like a victim's container is attributed to
the user, not the victim (issue 12, finding 3). Real cgroups, a real
unprivileged process denied, a real victim podman container, `capwatch trace`.

The attacker (uid 4242) gets a cgroup subtree delegated the two ways it
happens: a user manager's ``user@4242.service`` (systemd's delegation, here
under a test top-level directory), and a directory chowned to the user under
podman's own root (``/libpod_parent``). In them it creates, as uid 4242, the
victim's Kubernetes-shaped path and its podman-shaped path; a process of its
own, moved in, is denied CAP_SYS_TIME.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench._harness import Serve
from tests.helpers import require_root, require_tool
from tests.kernel.podman import (
    RUN,
    busybox_rootfs,
    new_name,
    podman_id,
    podman_rm,
    require_podman,
)
from tests.kernel.tracing import TraceProcess
from tests.kernel.workloads import unified_root

pytestmark = [pytest.mark.kernel, pytest.mark.container]

ATTACKER = 4242

# settimeofday(NULL, NULL) n times: one CAP_SYS_TIME check each, denied for uid 4242.
_DENIED = r"""
import ctypes, os, platform, sys
libc = ctypes.CDLL(None, use_errno=True)
nr = {"x86_64": 164, "aarch64": 170}[platform.machine()]
print(os.getpid(), flush=True)
sys.stdin.readline()
for _ in range(int(sys.argv[1])):
    libc.syscall(nr, None, None)
print("done", flush=True)
"""


@dataclass(frozen=True)
class Victim:
    name: str
    id: str


@pytest.fixture(scope="module")
def victim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Victim]:
    """A running rootful podman container: the identity the attacker spoofs."""
    require_root()
    require_podman()
    rootfs = busybox_rootfs(tmp_path_factory.mktemp("rootfs"))
    name = new_name("capwatch-victim")
    r = subprocess.run(
        [*RUN, "-d", "--name", name, "--rootfs", str(rootfs), "sleep", "120"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert 0 == r.returncode, r.stderr
    try:
        yield Victim(name, podman_id(name))
    finally:
        podman_rm(name)


def as_attacker(*argv: str) -> list[str]:
    return [
        "setpriv",
        f"--reuid={ATTACKER}",
        f"--regid={ATTACKER}",
        "--clear-groups",
        "--inh-caps=-all",
        *argv,
    ]


def delegate(base: Path) -> None:
    """Root makes ``base`` and hands it to the attacker (what systemd does for
    user@UID.service, or an admin for a user)."""
    base.mkdir(parents=True, exist_ok=True)
    os.chown(base, ATTACKER, ATTACKER)


def attacker_mkdir(path: Path) -> None:
    """The attacker makes ``path`` itself, in the tree delegated to it."""
    subprocess.run(as_attacker("mkdir", "-p", str(path)), check=True)
    assert ATTACKER == os.stat(path).st_uid


def remove_tree(top: Path) -> None:
    """Move any process left to the root cgroup, remove the directories deepest first."""
    if not top.exists():
        return
    root_procs = unified_root() / "cgroup.procs"
    dirs = sorted((p for p in [top, *top.rglob("*")] if p.is_dir()), key=lambda p: -len(p.parts))
    for d in dirs:
        with contextlib.suppress(OSError):
            for pid in (d / "cgroup.procs").read_text().split():
                root_procs.write_text(pid)
        with contextlib.suppress(OSError):
            d.rmdir()


def spoofed_paths(victim: Victim) -> tuple[list[Path], list[tuple[Path, Path]]]:
    """(tops to remove, [(delegated base, spoof below it)]) for each way of delegation."""
    root = unified_root()
    top = root / f"capwatch-test-{secrets.token_hex(4)}"
    pod = uuid.uuid4()
    user = top / f"user-{ATTACKER}.slice" / f"user@{ATTACKER}.service"
    chowned = root / "libpod_parent" / f"capwatch-test-{secrets.token_hex(4)}"
    return [top, chowned], [
        (user, user / f"kubepods-x/pod{pod}/cri-containerd-{victim.id}.scope"),
        (user, user / f"machine.slice/libpod-{victim.id}.scope"),
        (chowned, chowned / f"libpod-{victim.id}"),
    ]


def test_spoofed_container_is_the_attackers(victim: Victim) -> None:
    """Each spoofing cgroup's denials are attributed to uid 4242's delegated
    cgroup: kind user-delegated, label user-4242:..., no container id, no pod,
    never the victim's name or id."""
    require_tool("setpriv")
    tops, cases = spoofed_paths(victim)
    children: list[subprocess.Popen[str]] = []
    try:
        for base, spoof in cases:
            delegate(base)
            attacker_mkdir(spoof)
        with TraceProcess() as trace:
            pids: dict[int, Path] = {}
            for _, spoof in cases:
                p = subprocess.Popen(
                    as_attacker(sys.executable, "-c", _DENIED, "3"),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                children.append(p)
                assert p.stdout is not None
                pid = int(p.stdout.readline())
                (spoof / "cgroup.procs").write_text(str(pid))
                pids[pid] = spoof
            for p in children:
                assert p.stdin is not None
                p.stdin.write("go\n")
                p.stdin.flush()
            for p in children:
                assert p.stdout is not None
                assert "done" == p.stdout.readline().strip()
            events, err = trace.stop()
        seen: dict[int, list[dict[str, object]]] = {}
        for e in events:
            if e.get("pid") in pids and e.get("capability") == "CAP_SYS_TIME":
                seen.setdefault(int(str(e["pid"])), []).append(e)
        assert set(pids) == set(seen), err
        for pid, evs in seen.items():
            for e in evs:
                assert ("denied", "user-delegated", "", "", "") == (
                    e["verdict"],
                    e["kind"],
                    e.get("container_id") or "",
                    e.get("pod") or "",
                    e.get("container_name") or "",
                ), (pids[pid], e)
                assert str(e["container"]).startswith(f"user-{ATTACKER}:"), e
                assert victim.name not in str(e["container"])
    finally:
        for p in children:
            if p.poll() is None:
                p.kill()
            p.wait()
        for top in tops:
            remove_tree(top)


def test_serve_after_the_drop_sees_through_a_hidden_subtree(tmp_path: Path) -> None:
    """The attacker makes its delegated directory 0700, so that serve, once down to
    CAP_BPF (no CAP_DAC_READ_SEARCH), cannot walk into it: the denials are still
    counted, attributed to uid 4242's delegated cgroup (learnt from the process's
    /proc/PID/cgroup), not to the pod it names."""
    require_root()
    require_tool("setpriv")
    root = unified_root()
    top = root / f"capwatch-test-{secrets.token_hex(4)}"
    user = top / f"user-{ATTACKER}.slice" / f"user@{ATTACKER}.service"
    pod = uuid.uuid4()
    spoof = user / f"kubepods/burstable/pod{pod}/{'ab' * 32}"
    s: Serve | None = None
    p: subprocess.Popen[str] | None = None
    try:
        delegate(user)
        attacker_mkdir(spoof)
        user.chmod(0o700)
        s = Serve("--state-file", str(tmp_path / "state" / "recent.json"))
        p = subprocess.Popen(
            as_attacker(sys.executable, "-c", _DENIED, "3"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert p.stdin is not None
        assert p.stdout is not None
        pid = int(p.stdout.readline())
        (spoof / "cgroup.procs").write_text(str(pid))
        p.stdin.write("go\n")
        p.stdin.flush()
        assert "done" == p.stdout.readline().strip()
        want = f'container="user-{ATTACKER}:/{spoof.relative_to(root).as_posix()}"'
        deadline = time.monotonic() + 15
        found: dict[str, float] = {}
        while time.monotonic() < deadline and not found:
            found = {
                k: v
                for k, v in s.metrics().items()
                if k.startswith("capwatch_denials_total{") and want in k
            }
            time.sleep(0.2)
        assert [3.0] == list(found.values()), want
        [series] = found
        assert 'runtime="user-delegated"' in series
        assert 'pod=""' in series
    finally:
        if p is not None:
            if p.poll() is None:
                p.kill()
            p.wait()
        if s is not None and s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()
        remove_tree(top)
