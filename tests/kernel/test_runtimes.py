"""Real dockerd and containerd: denials in their containers, attributed, named and fixed.

The daemons run in temporary directories (tests/kernel/conftest.py); capwatch,
run as the CLI, finds them through DOCKER_HOST and CAPWATCH_CONTAINERD_STATE.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from capwatch.decode.caps import cap_name
from capwatch.diagnose.advise import CTR_DEFAULT_CAPS
from tests.helpers import CAPWATCH, REPO, run_capwatch
from tests.kernel.runtimes import (
    DOCKER,
    IMAGE,
    NO_SECCOMP,
    Containerd,
    Dockerd,
    LiveTrace,
    cgroup_of,
)
from tests.kernel.tracing import run_denied_date

pytestmark = [pytest.mark.kernel, pytest.mark.container, pytest.mark.usefixtures("runtime_env")]

CAP_SYS_TIME = 25
WAIT = "while [ ! -e /trigger/go ]; do sleep 0.1; done; "
DENY = "date -s 2020-01-01; ifconfig nosuchdev0; "


def new_id(prefix: str = "cw") -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def by_cap(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["capability"]: e for e in events}


def bounding(status: str) -> int:
    """The CapBnd mask from a /proc/self/status text."""
    line = next(x for x in status.splitlines() if x.startswith("CapBnd:"))
    return int(line.split()[1], 16)


def probed(cgroup_id: int) -> Callable[[dict[str, Any]], bool]:
    """ifconfig's CAP_SYS_MODULE probe from this cgroup: the last denial of DENY."""
    return lambda e: (
        (e["cgroup_id"], e["comm"], e["capability"])
        == (
            cgroup_id,
            "ifconfig",
            "CAP_SYS_MODULE",
        )
    )


class TestTrace:
    """The container waits (for TRIGGER/go) until capwatch has shown its denials, so a
    consumer running late on a loaded machine still finds its cgroup."""

    def test_docker(self, dockerd: Dockerd, tmp_path: Path) -> None:
        """date -s and ifconfig in a docker container: runtime docker, the full id docker
        reports, the container's name; a host denial in the same run stays host."""
        name = new_id()
        with LiveTrace() as tr:
            dockerd.docker(
                "run",
                "-d",
                "--name",
                name,
                "--network",
                "none",
                "-v",
                f"{tmp_path}:/trigger",
                *NO_SECCOMP,
                IMAGE,
                "sh",
                "-c",
                DENY + WAIT,
            )
            try:
                cid, pid = dockerd.inspect(name)
                tr.wait_for(probed(cgroup_of(pid)), "the container's ifconfig")
                host_pid = run_denied_date()
                tr.wait_for(lambda e: e["pid"] == host_pid, "the host's date")
            finally:
                (tmp_path / "go").touch()
            events, err = tr.stop()
        mine = by_cap([e for e in events if e["container_id"] == cid])
        assert {"CAP_SYS_TIME", "CAP_NET_ADMIN", "CAP_SYS_MODULE"} <= mine.keys(), (events, err)
        t = mine["CAP_SYS_TIME"]
        assert ("clock_settime", "docker", "docker", name, name) == (
            t["syscall"],
            t["kind"],
            t["runtime"],
            t["container_name"],
            t["container"],
        )
        for cap in ("CAP_NET_ADMIN", "CAP_SYS_MODULE"):
            m = mine[cap]
            assert ("ifconfig", "ioctl", "docker", name) == (
                m["comm"],
                m["syscall"],
                m["runtime"],
                m["container_name"],
            )
        host = [e for e in events if e["pid"] == host_pid]
        assert [("host", "host")] == [(e["container"], e["runtime"]) for e in host]

    def test_containerd(self, containerd: Containerd, busybox_root: Path, tmp_path: Path) -> None:
        """The same in a `ctr run` container: runtime containerd, its namespace and id."""
        ns, cid = new_id("ns"), new_id()
        with LiveTrace() as tr:
            containerd.ctr(
                "run",
                "-d",
                "--env",
                "PATH=/bin",
                "--mount",
                bind(tmp_path),
                "--rootfs",
                str(busybox_root),
                cid,
                "sh",
                "-c",
                DENY + WAIT,
                ns=ns,
            )
            try:
                tr.wait_for(probed(cgroup_of(containerd.pid(ns, cid))), "the container's ifconfig")
            finally:
                containerd.remove(ns, cid)
            events, err = tr.stop()
        mine = by_cap([e for e in events if e["container_id"] == cid])
        assert {"CAP_SYS_TIME", "CAP_NET_ADMIN", "CAP_SYS_MODULE"} <= mine.keys(), (events, err)
        for e in mine.values():
            assert ("containerd", "containerd", ns, cid, cid) == (
                e["kind"],
                e["runtime"],
                e["namespace"],
                e["container_id"],
                e["container"],
            )
        assert "clock_settime" == mine["CAP_SYS_TIME"]["syscall"]
        assert ("ifconfig", "ioctl") == (
            mine["CAP_SYS_MODULE"]["comm"],
            mine["CAP_SYS_MODULE"]["syscall"],
        )


def observe(command: str, target: str, trigger: Path) -> Any:
    """`capwatch COMMAND --json --container TARGET`; the container starts its work (it waits
    for TRIGGER/go) once capwatch says it is watching."""
    p = subprocess.Popen(
        [*CAPWATCH, command, "--json", "--container", target, "--duration", "4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert p.stderr is not None
        line = p.stderr.readline()
        assert "watching container" in line, line + p.stderr.read()
        (trigger / "go").touch()
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert 0 == p.returncode, err
    return json.loads(out)


def sys_time_explanation(exps: list[dict[str, Any]]) -> dict[str, Any]:
    """The CAP_SYS_TIME explanation: a cause, missing from the bounding set (read from
    the container's still running shell if date itself is gone)."""
    (e,) = [x for x in exps if x["capability"] == "CAP_SYS_TIME"]
    assert ("clock_settime", "EPERM", "cause", "bounding") == (
        e["syscall"],
        e["outcome"],
        e["role"],
        e["missing_from"],
    )
    return e


def fix_for(fixes: list[dict[str, str]], context: str) -> list[str]:
    """The fix for ``context`` as argv, without its trailing '...'."""
    (fix,) = [f["fix"] for f in fixes if f["context"] == context]
    argv = fix.split()
    assert "..." == argv[-1], fix
    return argv[:-1]


def mask(cap_names: list[str]) -> int:
    numbers = {cap_name(n): n for n in range(64)}
    return sum(1 << numbers[c] for c in cap_names)


ADVISE = "(nc -l -p 80 &); sleep 0.5; touch /tmp/f; chown 1000 /tmp/f; sleep 1"


class TestExplainAndAdvise:
    def test_explain_docker_container(self, dockerd: Dockerd, tmp_path: Path) -> None:
        """explain --container NAME: docker's own flag, and docker accepts it as written."""
        name = new_id()
        dockerd.docker(
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "none",
            "-v",
            f"{tmp_path}:/trigger",
            *NO_SECCOMP,
            IMAGE,
            "sh",
            "-c",
            WAIT + "date -s 2020-01-01; sleep 30",
        )
        try:
            e = sys_time_explanation(observe("explain", name, tmp_path))
        finally:
            dockerd.docker("rm", "-f", name, check=False)
        assert [{"context": "docker", "fix": "docker run --cap-add=SYS_TIME ..."}] == e["fixes"]
        argv = fix_for(e["fixes"], "docker")
        r = dockerd.docker(
            *argv[1:], "--rm", "--network", "none", IMAGE, "cat", "/proc/self/status"
        )
        assert bounding(r.stdout) & (1 << CAP_SYS_TIME)

    def test_explain_docker_run_follows_the_container(self, dockerd: Dockerd) -> None:
        """explain -- docker run ...: dockerd runs the container, not the command, in a
        cgroup of its own; capwatch follows the new docker cgroup and judges its refusal:
        docker's default seccomp profile refuses date's clock_settime (no capability is
        checked), with the container named and docker's --cap-add fix."""
        name = new_id()
        try:
            r = run_capwatch(
                "explain", "--json", "--", DOCKER, "run", "--rm", "--name", name,
                "--network", "none", IMAGE, "date", "-s", "2020-01-01",
                timeout=180,
            )  # fmt: skip
        finally:
            dockerd.docker("rm", "-f", name, check=False)
        assert "Traceback" not in r.stderr, r.stderr
        assert "runs this container, not the command" not in r.stderr
        found = json.loads(r.stdout.strip().splitlines()[-1])
        [f] = [x for x in found if x.get("verdict") == "seccomp"]
        assert (name, "docker", "date") == (f["container"], f["kind"], f["comm"]), f
        assert {"context": "docker", "fix": "docker run --cap-add=SYS_TIME ..."} in f["fixes"]

    def test_explain_ctr_container(
        self, containerd: Containerd, busybox_root: Path, tmp_path: Path
    ) -> None:
        """explain --container ID of a `ctr run` container: ctr's own wording (CAP_ prefix,
        which ctr requires: the docker spelling is refused), and ctr accepts it as written."""
        ns, cid = new_id("ns"), new_id()
        containerd.ctr(
            "run",
            "-d",
            "--env",
            "PATH=/bin",
            "--mount",
            bind(tmp_path),
            "--rootfs",
            str(busybox_root),
            cid,
            "sh",
            "-c",
            WAIT + "date -s 2020-01-01; sleep 30",
            ns=ns,
        )
        try:
            e = sys_time_explanation(observe("explain", cid, tmp_path))
        finally:
            containerd.remove(ns, cid)
        assert ["ctr", "run", "--cap-add", "CAP_SYS_TIME"] == fix_for(e["fixes"], "ctr")
        r = containerd.run(
            ns,
            new_id(),
            busybox_root,
            "cat",
            "/proc/self/status",
            extra=tuple(fix_for(e["fixes"], "ctr")[2:]),
        )
        assert 0 == r.returncode, r.stderr
        assert bounding(r.stdout) & (1 << CAP_SYS_TIME)
        refused = containerd.run(
            ns, new_id(), busybox_root, "true", extra=("--cap-add", "SYS_TIME")
        )
        assert "must be specified with 'CAP_' prefix" in refused.stderr, refused

    def test_advise_docker_container(self, dockerd: Dockerd, tmp_path: Path) -> None:
        """advise --container NAME: docker's flags give exactly the proposed set when run.

        docker (20.10+) sets net.ipv4.ip_unprivileged_port_start=0 in the container's
        network namespace: binding port 80 checks no capability there, and advise,
        which proposes what was checked, does not propose NET_BIND_SERVICE."""
        name = new_id()
        dockerd.docker(
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "none",
            "-v",
            f"{tmp_path}:/trigger",
            IMAGE,
            "sh",
            "-c",
            WAIT + ADVISE,
        )
        try:
            a = observe("advise", name, tmp_path)
        finally:
            dockerd.docker("rm", "-f", name, check=False)
        assert "CAP_CHOWN" in a["capabilities"], a
        assert "CAP_NET_BIND_SERVICE" not in a["capabilities"], a
        r = dockerd.docker(
            "run",
            *a["docker"].split(),
            "--rm",
            "--network",
            "none",
            IMAGE,
            "cat",
            "/proc/self/status",
        )
        assert mask(a["capabilities"]) == bounding(r.stdout), a["docker"]

    def test_advise_ctr_container(
        self, containerd: Containerd, busybox_root: Path, tmp_path: Path
    ) -> None:
        """advise --container ID: ctr's flags (ctr has no "drop ALL": each default it does
        not need is dropped by name) give exactly the proposed set when run."""
        ns, cid = new_id("ns"), new_id()
        containerd.ctr(
            "run",
            "-d",
            "--env",
            "PATH=/bin",
            "--mount",
            bind(tmp_path),
            "--rootfs",
            str(busybox_root),
            cid,
            "sh",
            "-c",
            WAIT + ADVISE,
            ns=ns,
        )
        try:
            a = observe("advise", cid, tmp_path)
        finally:
            containerd.remove(ns, cid)
        assert {"CAP_NET_BIND_SERVICE", "CAP_CHOWN"} <= set(a["capabilities"]), a
        r = containerd.run(
            ns, new_id(), busybox_root, "cat", "/proc/self/status", extra=tuple(a["ctr"].split())
        )
        assert 0 == r.returncode, r.stderr
        assert mask(a["capabilities"]) == bounding(r.stdout), a["ctr"]
        assert bounding(r.stdout) != sum(1 << c for c in CTR_DEFAULT_CAPS)


def bind(host_dir: Path) -> str:
    """ctr's --mount for the trigger directory."""
    return f"type=bind,src={host_dir},dst=/trigger,options=rbind:rw"
