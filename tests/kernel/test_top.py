"""Issue 16: `capwatch top` in a real terminal (tmux, 80x24): a podman container
denied CAP_SYS_TIME in a loop while the host makes allowed checks."""

from __future__ import annotations

import re
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import REPO, require_root, require_tool
from tests.kernel.podman import (
    NO_SECCOMP,
    RUN,
    busybox_rootfs,
    new_name,
    podman_id,
    podman_rm,
    require_podman,
)

pytestmark = [pytest.mark.kernel, pytest.mark.container]

LOOP = "while :; do date -s 2020-01-01 >/dev/null 2>&1; echo x; usleep 20000; done"
HOST_CHECKS = (
    "import os, time\nwhile True:\n    for _ in range(200): os.setuid(0)\n    time.sleep(0.1)\n"
)


class Tmux:
    """A tmux server of its own (-L), one 80x24 window running a shell."""

    def __init__(self) -> None:
        self.sock = f"cwtop-{secrets.token_hex(4)}"
        self.run("new-session", "-d", "-x", "80", "-y", "24", "-s", "t", "bash --norc --noprofile")
        self.run("set-option", "-t", "t", "status", "off")

    def run(self, *args: str) -> str:
        return subprocess.run(
            ["tmux", "-L", self.sock, *args], capture_output=True, text=True, check=True
        ).stdout

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", "t", *keys)

    def screen(self) -> list[str]:
        return self.run("capture-pane", "-p", "-t", "t").splitlines()

    def wait_for(self, pattern: str, timeout: float = 60) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.screen()
            if any(re.search(pattern, ln) for ln in lines):
                return lines
            time.sleep(0.2)
        pytest.fail(f"{pattern!r} never appeared; screen:\n" + "\n".join(self.screen()))

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.sock, "kill-server"], capture_output=True, check=False)


def rows(lines: list[str]) -> list[list[str]]:
    """The table's rows (the lines after the header), split into cells."""
    i = next(i for i, ln in enumerate(lines) if ln.startswith("WORKLOAD"))
    return [
        ln.split() for ln in lines[i + 1 :] if ln.strip() and not ln.startswith(("q quit", "..."))
    ]


def loop_lines(name: str) -> int:
    r = subprocess.run(["podman", "logs", name], capture_output=True, text=True, check=False)
    return r.stdout.count("x\n")


@pytest.fixture
def scene(tmp_path: Path) -> Iterator[tuple[str, str]]:
    require_root()
    require_podman()
    require_tool("tmux")
    rootfs = busybox_rootfs(tmp_path / "rootfs")
    name = new_name("cwtop")
    subprocess.run(
        [*RUN, "-d", "--name", name, *NO_SECCOMP, "--rootfs", str(rootfs), "sh", "-c", LOOP],
        capture_output=True,
        check=True,
        timeout=60,
    )
    host = subprocess.Popen([sys.executable, "-c", HOST_CHECKS])
    try:
        yield name, podman_id(name)
    finally:
        host.kill()
        host.wait()
        podman_rm(name)


def test_top_in_a_terminal(scene: tuple[str, str]) -> None:
    """Filtered to the container (other agents' floods share this machine), its
    denied CAP_SYS_TIME row is first, above its forks' CAP_SYS_ADMIN probes
    (faster, but expected), at the loop's rate (within 20%); r sorts by rate
    (the probes first), d back; a filter on SETUID shows the host's allowed
    checks only; q quits and gives the shell its screen back."""
    name, cid = scene
    tmux = Tmux()
    try:
        tmux.keys(f"cd {REPO} && {sys.executable} -m capwatch.commands.cli top", "Enter")
        tmux.wait_for(r"^WORKLOAD")
        screen = tmux.screen()
        assert 24 == len(screen)
        assert all(len(ln) <= 80 for ln in screen)
        assert screen[1].startswith("lost: denials")
        tmux.keys("/")
        tmux.wait_for(r"^filter: _")
        tmux.keys(name, "Enter")
        tmux.wait_for(rf"filter:{name}")
        tmux.wait_for(r"CAP_SYS_TIME\s+denied\s+\d")
        time.sleep(2.5)  # a full interval after the first, partial one
        # the loop's own rate over the same seconds, from its output
        n0, t0 = loop_lines(name), time.monotonic()
        shown: list[float] = []
        for _ in range(4):
            time.sleep(1.0)
            table = rows(tmux.screen())
            first = table[0]
            assert len(first[0]) >= 8, table
            assert name.startswith(first[0]) or cid.startswith(first[0]), table
            assert ["CAP_SYS_TIME", "denied"] == first[1:3], table
            assert any(r[1:3] == ["CAP_SYS_ADMIN", "expected"] for r in table[1:]), table
            shown.append(float(first[3]))
        loop_rate = (loop_lines(name) - n0) / (time.monotonic() - t0)
        assert loop_rate > 10, "the container's loop runs"
        assert abs(statistics.median(shown) - loop_rate) <= 0.2 * loop_rate, (shown, loop_rate)

        tmux.keys("r")
        lines = tmux.wait_for(r"sort:rate")
        assert ["CAP_SYS_ADMIN", "expected"] == rows(lines)[0][1:3], lines
        tmux.keys("d")
        lines = tmux.wait_for(r"sort:denials")
        assert ["CAP_SYS_TIME", "denied"] == rows(lines)[0][1:3], lines

        tmux.keys("/")
        tmux.wait_for(r"^filter: ")
        tmux.keys(*["BSpace"] * (len(name) + 2), "SETUID", "Enter")
        lines = tmux.wait_for(r"filter:SETUID")
        table = rows(lines)
        assert any(r[:3] == ["host", "CAP_SETUID", "allowed"] for r in table), lines
        assert all("CAP_SETUID" in r for r in table), lines

        tmux.keys("q")
        deadline = time.monotonic() + 30
        while (
            time.monotonic() < deadline
            and tmux.run("display-message", "-p", "-t", "t", "#{alternate_on}").strip() != "0"
        ):
            time.sleep(0.2)
        time.sleep(1.0)  # capwatch detaches and exits after restoring the screen
        tmux.keys("echo done-$((20+22))", "Enter")
        tmux.wait_for(r"^done-42$", timeout=20)
        assert "0" == tmux.run("display-message", "-p", "-t", "t", "#{alternate_on}").strip()
    finally:
        tmux.kill()
