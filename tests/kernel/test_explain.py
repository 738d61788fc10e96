"""Issue 6 scenarios: real processes and containers, explained and advised."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import CAPWATCH, REPO, require_root, require_tool
from tests.kernel.podman import NO_SECCOMP, RUN, busybox_rootfs, new_name, podman_rm, require_podman

pytestmark = [pytest.mark.kernel]

# A process that holds CAP_SYS_TIME permitted but clears it from its effective set,
# then tries to set the clock (syscall settimeofday with the current time).
PERMITTED_NOT_EFFECTIVE = r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
class H(ctypes.Structure): _fields_ = [("v", ctypes.c_uint32), ("pid", ctypes.c_int)]
class D(ctypes.Structure): _fields_ = [("e", ctypes.c_uint32), ("p", ctypes.c_uint32), ("i", ctypes.c_uint32)]
h, d = H(0x20080522, 0), (D * 2)()
libc.syscall(125, ctypes.byref(h), ctypes.byref(d))  # capget
d[0].e &= ~(1 << 25)                                  # CAP_SYS_TIME: permitted, not effective
assert libc.syscall(126, ctypes.byref(h), ctypes.byref(d)) == 0  # capset
class TV(ctypes.Structure): _fields_ = [("s", ctypes.c_long), ("us", ctypes.c_long)]
tv = TV(); libc.gettimeofday(ctypes.byref(tv), None)
r = libc.syscall(164, ctypes.byref(tv), None)          # settimeofday: denied
print("settimeofday", r, ctypes.get_errno())
"""


def explain_json(*args: str, timeout: float = 60, rc: int = 0) -> list[dict[str, Any]]:
    """explain's findings; ``rc`` is the status expected: the watched command's own."""
    r = subprocess.run(
        [sys.executable, "-m", "capwatch.commands.cli", "explain", "--json", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        check=False,
    )
    assert rc == r.returncode, r.stderr
    out: list[dict[str, Any]] = json.loads(r.stdout.strip().splitlines()[-1])
    return out




def by_cap(exps: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["capability"]: e for e in exps}


@pytest.fixture(autouse=True)
def _root() -> None:
    require_root()
    require_tool("capsh")


class TestHostScenarios:
    def test_date_without_sys_time(self) -> None:
        """date -s under capsh --drop: CAP_SYS_TIME, clock_settime, EPERM, bounding set, a cause."""
        e = by_cap(
            explain_json(
                "--", "capsh", "--drop=cap_sys_time", "--", "-c", "exec date -s 2020-01-01", rc=1
            )
        )["CAP_SYS_TIME"]
        assert ("clock_settime", "EPERM", "cause", "bounding") == (
            e["syscall"],
            e["outcome"],
            e["role"],
            e["missing_from"],
        )
        assert ["host"] == [f["context"] for f in e["fixes"]]

    def test_ping_without_net_raw(self) -> None:
        """busybox ping without CAP_NET_RAW: socket() refused with EPERM, bounding set lacks it."""
        exps = explain_json(
            "--", "capsh", "--drop=cap_net_raw", "--", "-c", "busybox ping -c1 -W1 127.0.0.1", rc=1
        )
        e = by_cap(exps)["CAP_NET_RAW"]
        assert ("socket", "EPERM", "cause", "bounding") == (
            e["syscall"],
            e["outcome"],
            e["role"],
            e["missing_from"],
        )

    def test_chown_without_cap_chown(self, tmp_path: Path) -> None:
        """chown of another user's file without CAP_CHOWN: fchownat, EPERM, bounding set."""
        f = tmp_path / "f"
        f.write_text("x")
        import os

        os.chown(f, 1000, 1000)
        exps = explain_json(
            "--", "capsh", "--drop=cap_chown", "--", "-c", f"exec chown 0 {f}", rc=1
        )
        e = by_cap(exps)["CAP_CHOWN"]
        assert ("fchownat", "EPERM", "cause", "bounding") == (
            e["syscall"],
            e["outcome"],
            e["role"],
            e["missing_from"],
        )

    def test_permitted_not_effective(self) -> None:
        """A process holding CAP_SYS_TIME permitted, not effective: the fix is to raise it (capset)."""
        exps = explain_json("--", sys.executable, "-c", PERMITTED_NOT_EFFECTIVE)
        e = by_cap(exps)["CAP_SYS_TIME"]
        assert ("settimeofday", "EPERM", "cause", "effective") == (
            e["syscall"],
            e["outcome"],
            e["role"],
            e["missing_from"],
        )
        assert ["program"] == [f["context"] for f in e["fixes"]]
        assert "capset" in e["fixes"][0]["fix"]

    def test_no_target_is_usage_error(self) -> None:
        """explain without a target: one line, exit 2."""
        r = subprocess.run(
            [sys.executable, "-m", "capwatch.commands.cli", "explain"],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=False,
        )
        assert (2, 1) == (r.returncode, len(r.stderr.splitlines()))
        assert "give exactly one of PID, --container NAME, -- COMMAND" in r.stderr

    def test_missing_pid(self) -> None:
        """explain of a pid that does not exist: one line, exit 1."""
        r = subprocess.run(
            [sys.executable, "-m", "capwatch.commands.cli", "explain", "99999999"],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=False,
        )
        assert (1, ["capwatch: no process with pid 99999999 (no /proc/99999999/status)"]) == (
            r.returncode,
            r.stderr.splitlines(),
        )


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_podman()
    return busybox_rootfs(tmp_path_factory.mktemp("busybox"))


@pytest.fixture
def container(rootfs: Path) -> Iterator[Any]:
    names: list[str] = []

    def start(script: str, *extra: str) -> str:
        """``script`` runs once the test touches /tmp/NAME (see watch): not before
        capwatch is attached, however long the compile takes on a loaded machine."""
        name = new_name()
        names.append(name)
        gated = f"while [ ! -e /tmp/{name} ]; do sleep 0.1; done; {script}"
        subprocess.run(
            [*RUN, "-d", "--name", name, *extra, "--rootfs", str(rootfs), "sh", "-c", gated],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        return name

    yield start
    podman_rm(*names)
    for name in names:
        (rootfs / "tmp" / name).unlink(missing_ok=True)


def watch(rootfs: Path, name: str, command: str, duration: float) -> Any:
    """capwatch COMMAND --json --container NAME, releasing the container's script (see
    ``container``) once capwatch says it is watching."""
    p = subprocess.Popen(
        [*CAPWATCH, command, "--json", "--container", name, "--duration", str(duration)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert p.stderr is not None
    line = p.stderr.readline()
    assert line.startswith("capwatch: watching"), line
    (rootfs / "tmp" / name).touch()
    out, err = p.communicate(timeout=120)
    assert 0 == p.returncode, err
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.container
class TestContainerScenarios:
    def test_date_in_container(self, container: Any, rootfs: Path) -> None:
        """date -s in a podman container: EPERM, the container's bounding set lacks SYS_TIME,
        fix podman run --cap-add=SYS_TIME."""
        name = container("date -s 2020-01-01; sleep 3", *NO_SECCOMP)
        e = by_cap(watch(rootfs, name, "explain", 5))["CAP_SYS_TIME"]
        assert ("clock_settime", "EPERM", "cause", "bounding") == (
            e["syscall"],
            e["outcome"],
            e["role"],
            e["missing_from"],
        )
        assert [{"context": "podman", "fix": "podman run --cap-add=SYS_TIME ..."}] == e["fixes"]

    def test_ifconfig_probe_in_container(self, container: Any, rootfs: Path) -> None:
        """ifconfig nosuchdev0 in a container: CAP_SYS_MODULE denied, ioctl ENODEV: a probe, no fix."""
        name = container("ifconfig nosuchdev0; sleep 3")
        e = by_cap(watch(rootfs, name, "explain", 5))["CAP_SYS_MODULE"]
        assert ("ioctl", "ENODEV", "probe", []) == (
            e["syscall"],
            e["outcome"],
            e["role"],
            e["fixes"],
        )

    def test_advise_port_and_chown(self, container: Any, rootfs: Path) -> None:
        """A container binding port 80 and chowning a file: advise proposes NET_BIND_SERVICE and
        CHOWN; every other proposal rests on an allowed check of the workload itself."""
        name = container(
            "(nc -l -p 80 &); sleep 0.5; touch /tmp/f; chown 1000 /tmp/f; sleep 3",
            "--network",
            "none",
        )
        a = watch(rootfs, name, "advise", 5)
        assert {"CAP_NET_BIND_SERVICE", "CAP_CHOWN"} <= set(a["capabilities"]), a
        for cap in a["capabilities"]:
            ev = a["evidence"][cap]
            assert ev, cap
            assert all(e.startswith("allowed in ") for e in ev), (cap, ev)
            assert not any("runc" in e or "conmon" in e for e in ev), (cap, ev)
        assert 'drop: ["ALL"]' in a["kubernetes"]
        assert "--cap-add=NET_BIND_SERVICE" in a["docker"]


def test_failed_explain_leaves_no_cgroup() -> None:
    """explain -- CMD that fails before watching (a bad policy) removes the cgroup it made."""
    require_root()
    from tests.kernel.workloads import unified_root

    before = {p.name for p in unified_root().glob("capwatch-run-*")}
    r = subprocess.run(
        [sys.executable, "-m", "capwatch.commands.cli", "explain", "--policy", "/nonexistent", "--", "true"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert 1 == r.returncode
    assert [
        "capwatch: policy /nonexistent: cannot read: No such file or directory"
    ] == r.stderr.splitlines()
    assert before == {p.name for p in unified_root().glob("capwatch-run-*")}
