"""Issue 16: record a real scenario while `trace` watches it live, then replay
the recording: the same records, the same explanations, the same counts."""

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

from tests.helpers import REPO, require_root, require_tool, run_capwatch
from tests.kernel.podman import (
    NO_SECCOMP,
    RUN,
    busybox_rootfs,
    new_name,
    podman_rm,
    require_podman,
)
from tests.kernel.tracing import RecordProcess, TraceProcess
from tests.kernel.workloads import unified_root

pytestmark = [pytest.mark.kernel, pytest.mark.container]


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_root()
    require_tool("capsh")
    require_podman()
    return busybox_rootfs(tmp_path_factory.mktemp("busybox"))


@pytest.fixture
def names() -> Iterator[list[str]]:
    made: list[str] = []
    yield made
    podman_rm(*made)


def own_copy(tmp: Path, tool: str, name: str) -> str:
    """A copy of ``tool`` under a name no other process on this machine uses,
    so the state file's distinct denials (keyed by comm) are this test's alone."""
    dst = tmp / name
    shutil.copy2(str(shutil.which(tool)), dst)
    return str(dst)


def capsh_run(drop: str, *argv: str) -> int:
    """Run argv under capsh without ``drop``; its pid (sh execs into it)."""
    p = subprocess.run(
        ["capsh", f"--drop={drop}", "--", "-c", 'echo $$; exec "$@" >/dev/null 2>&1', "sh", *argv],
        capture_output=True,
        text=True,
        check=False,
    )
    return int(p.stdout.split()[0])


def start_container(rootfs: Path, name: str) -> int:
    """A podman container that is denied CAP_SYS_TIME and runs ifconfig's probe
    a moment after it starts (so that its cgroup is known); its cgroup id."""
    subprocess.run(
        [
            *RUN,
            "-d",
            "--name",
            name,
            *NO_SECCOMP,
            "--rootfs",
            str(rootfs),
            "sh",
            "-c",
            "sleep 1; date -s 2020-01-01; ifconfig nosuchdev0; sleep 1",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    path = subprocess.run(
        ["podman", "inspect", "--format", "{{.State.CgroupPath}}", name],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    cg = os.stat(f"{unified_root()}/{path.lstrip('/')}").st_ino
    subprocess.run(["podman", "wait", name], capture_output=True, check=False, timeout=60)
    return cg


def replayed(*args: str) -> tuple[list[dict[str, Any]], str]:
    r = run_capwatch("trace", "--json", *args, timeout=120)
    assert 0 == r.returncode, r.stderr
    return [json.loads(x) for x in r.stdout.splitlines() if x.strip()], r.stderr


def explain_json(*args: str) -> list[dict[str, Any]]:
    r = run_capwatch("explain", "--json", *args, timeout=120, cwd=REPO)
    assert 0 == r.returncode, r.stderr
    out: list[dict[str, Any]] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def no_time(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "time"} for r in recs]


class TestRecordThenReplay:
    def test_denials_replay_as_traced_and_explain_as_live(
        self, rootfs: Path, names: list[str], tmp_path: Path
    ) -> None:
        """date -s on the host (capsh without CAP_SYS_TIME) and in a podman
        container, ifconfig's probe: `trace --from` prints the live trace's
        records (timestamps aside), `explain --from` explain --last's explanations."""
        rec_file, state = str(tmp_path / "a.cwrec"), str(tmp_path / "recent.json")
        date = own_copy(tmp_path, "date", "cwrec-date")
        ifconfig = own_copy(tmp_path, "ifconfig", "cwrec-ifconfig")
        name = new_name()
        names.append(name)
        with TraceProcess("--outcome", "--state-file", state, "--record", rec_file) as tr:
            cgroup_id = start_container(rootfs, name)
            host_date = capsh_run("cap_sys_time", date, "-s", "2020-01-01")
            host_if = capsh_run("cap_sys_module,cap_net_admin", ifconfig, "nosuchdev0")
            live, rp_err = tr.stop()
        logs = subprocess.run(["podman", "logs", name], capture_output=True, text=True, check=False)
        assert "Operation not permitted" in logs.stderr + logs.stdout, logs

        def mine(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [
                x for x in recs if x["pid"] in (host_date, host_if) or x["cgroup_id"] == cgroup_id
            ]

        live_mine = mine(live)
        caps = {(x["comm"], x["capability"]) for x in live_mine}
        assert {("cwrec-date", "CAP_SYS_TIME"), ("cwrec-ifconfig", "CAP_SYS_MODULE")} <= caps
        assert any(
            (x["cgroup_id"], x["capability"]) == (cgroup_id, "CAP_SYS_TIME") for x in live_mine
        )
        again, err = replayed("--from", rec_file, "--outcome")
        assert no_time(live_mine) == no_time(mine(again)), (rp_err, err)

        pids = {x["pid"] for x in live_mine}
        live_exps = [
            e for e in explain_json("--last", "1000", "--state-file", state) if e["pid"] in pids
        ]
        from_exps = [e for e in explain_json("--from", rec_file) if e["pid"] in pids]
        assert live_exps == from_exps
        by = {(e["comm"], e["capability"]): e for e in from_exps}
        assert ("cause", "probe") == (
            by[("cwrec-date", "CAP_SYS_TIME")]["role"],
            by[("cwrec-ifconfig", "CAP_SYS_MODULE")]["role"],
        )
        in_container = {
            x["pid"] for x in live_mine if x["cgroup_id"] == cgroup_id and x["cap"] == 25
        }
        assert any(e["pid"] in in_container and e["role"] == "cause" for e in from_exps)

    def test_every_check_of_a_setuid_loop_replays_with_exact_counts(self, tmp_path: Path) -> None:
        """--all: 3,000 allowed CAP_SETUID checks of one process, recorded by
        `capwatch record` and traced live at once (both filtered to its pid in
        the kernel: other floods share this machine): the replay has each of
        them, as the live trace did; advise --from names CAP_SETUID."""
        require_root()
        rec_file = str(tmp_path / "b.cwrec")
        code = "import os,sys\nsys.stdin.readline()\nfor _ in range(3000): os.setuid(0)\n"
        loop = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, text=True)
        try:
            pid = str(loop.pid)
            with (
                TraceProcess("--all", "--pid", pid, "--state-file", str(tmp_path / "s")) as tr,
                RecordProcess(rec_file, "--all", "--pid", pid) as rp,
            ):
                assert loop.stdin is not None
                loop.stdin.write("go\n")
                loop.stdin.close()
                assert 0 == loop.wait(timeout=60)
                rp.stop()
                live, _ = tr.stop()
        finally:
            if loop.poll() is None:
                loop.kill()
        setuid = [x for x in live if x["capability"] == "CAP_SETUID"]
        assert 3000 == len(setuid)
        again, _ = replayed("--from", rec_file)
        assert no_time(live) == no_time(again)
        r = run_capwatch("advise", "--json", "--from", rec_file, pid, timeout=120)
        assert 0 == r.returncode, r.stderr
        advice = json.loads(r.stdout)
        assert "CAP_SETUID" in advice["capabilities"]
