"""Issue 13: refusals that today's answer gets wrong, reproduced with real processes and
containers: netlink's asynchronous EPERM, the exit status of `explain -- CMD`, and
refusals that are not capability checks (seccomp, file capabilities, no_new_privs,
file permissions)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from capwatch.diagnose.refusals import active_lsms
from tests.helpers import CAPWATCH, REPO, require_root, require_tool
from tests.kernel.podman import (
    BUSYBOX,
    NO_SECCOMP,
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
        [sys.executable, "-m", "capwatch.commands.cli", *args],
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
        assert {("cause", "bounding")} == {(e["role"], e["missing_from"]) for e in exps}
        assert {True} == {e["asynchronous"] for e in exps}
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
        name = container("sleep 120")
        exps = net_admin(
            watch_then(
                name, 10, ["podman", "exec", name, "ip", "link", "add", "d0", "type", "dummy"]
            )
        )
        assert exps
        e = exps[0]
        assert "cause" == e["role"]
        assert [{"context": "podman", "fix": "podman run --cap-add=NET_ADMIN ..."}] == e["fixes"]
        assert (True, name, "podman") == (e["asynchronous"], e["container"], e["kind"])
        assert podman_id(name) == e["container_id"]

    def test_advise_proposes_net_admin(self, container: Any) -> None:
        """advise on the same container proposes NET_ADMIN as missing, from the refused ip."""
        name = container("sleep 120")
        a = watch_then(
            name,
            10,
            ["podman", "exec", name, "ip", "link", "add", "d0", "type", "dummy"],
            command="advise",
        )
        assert "CAP_NET_ADMIN" in a["capabilities"], a
        assert "--cap-add=NET_ADMIN" in a["docker"]
        assert any("(ip)" in ev for ev in a["evidence"]["CAP_NET_ADMIN"])


@pytest.fixture
def shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory that uid 65534 can traverse (pytest's own are 0700)."""
    d = Path(f"/tmp/capwatch-test-{os.getpid()}-{os.urandom(3).hex()}")
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def verdicts(exps: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """(syscall, verdict) -> finding, for refusals and capability findings alike."""
    return {(e["syscall"], e.get("verdict", "capability")): e for e in exps}


class TestRefusalsOnHost:
    def test_file_capabilities_beyond_bounding_set(self, shared_dir: Path) -> None:
        """A busybox copy with cap_net_raw+ep exec'd under capsh --drop=cap_net_raw: the kernel
        refuses the exec (no cap_capable call); verdict file capabilities, the fix names
        NET_RAW and setcap -r."""
        require_tool("setcap")
        binary = shared_dir / "fcping"
        shutil.copy2(BUSYBOX, binary)
        subprocess.run(["setcap", "cap_net_raw+ep", str(binary)], check=True)
        r = capwatch(
            "explain", "--json", "--", "capsh", "--drop=cap_net_raw", "--", "-c", str(binary)
        )
        e = verdicts(findings(r))[("execve", "file capabilities")]
        assert (str(binary), "EPERM") == (e["path"], e["outcome"])
        assert "(CAP_NET_RAW)" in e["summary"]
        assert [
            "start it from a shell or service whose bounding set includes CAP_NET_RAW",
            f"setcap -r {binary} (if the program does not need them: "
            "it then runs with what it is given)",
        ] == [f["fix"] for f in e["fixes"]]
        assert 126 == r.returncode

    def test_setuid_binary_under_no_new_privs(self, shared_dir: Path) -> None:
        """A setuid-root busybox run as nobody under setpriv --no-new-privs: ping's socket() is
        refused CAP_NET_RAW; the verdict is no_new_privs, the fix drops it, not setcap."""
        require_tool("setpriv")
        sub = shared_dir / "suid"
        sub.mkdir(mode=0o755)
        binary = sub / "busybox"
        shutil.copy2(BUSYBOX, binary)
        binary.chmod(0o4755)
        r = capwatch(
            "explain",
            "--json",
            "--",
            "setpriv",
            "--no-new-privs",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            str(binary),
            "ping",
            "-c1",
            "-W1",
            "127.0.0.1",
        )
        e = verdicts(findings(r))[("socket", "no_new_privs")]
        assert ("CAP_NET_RAW", "cause", "permitted") == (
            e["capability"],
            e["role"],
            e["missing_from"],
        )
        assert "setpriv" == e["fixes"][0]["context"]
        assert not any("setcap" in f["fix"] for f in e["fixes"])

    def test_touch_of_root_owned_file(self, shared_dir: Path) -> None:
        """touch of a root-owned 0644 file as nobody: CAP_DAC_OVERRIDE is refused in openat, but
        the verdict is file permissions, with a chown/chmod fix and no setcap."""
        target = shared_dir / "rootfile"
        target.write_text("x")
        target.chmod(0o644)
        r = capwatch(
            "explain",
            "--json",
            "--",
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "touch",
            str(target),
        )
        e = verdicts(findings(r))[("openat", "file permissions")]
        assert ("CAP_DAC_OVERRIDE", "EACCES") == (e["capability"], e["outcome"])
        assert ["file permissions"] == [f["context"] for f in e["fixes"]]
        assert "uid 65534" in e["fixes"][0]["fix"]
        assert 1 == r.returncode

    def test_dac_pair_refused_in_one_openat(self, shared_dir: Path) -> None:
        """cat, as root without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, of a 0600 file that
        another user owns: both are refused in the one openat (EACCES); the finding says that
        either would do, naming both, and cat's status is kept (issue 13, defect 7)."""
        target = shared_dir / "theirs"
        target.write_text("x")
        target.chmod(0o600)
        os.chown(target, 65534, 65534)
        r = capwatch(
            "explain",
            "--json",
            "--",
            "capsh",
            "--drop=cap_dac_override,cap_dac_read_search",
            "--",
            "-c",
            f"exec cat {target}",
        )
        exps = [e for e in findings(r) if e["syscall"] == "openat"]
        assert {
            ("CAP_DAC_OVERRIDE", "cause", "EACCES"),
            ("CAP_DAC_READ_SEARCH", "cause", "EACCES"),
        } == {(e["capability"], e["role"], e["outcome"]) for e in exps}
        tie = (
            "CAP_DAC_READ_SEARCH and CAP_DAC_OVERRIDE were both refused in this openat: either "
            "would do (CAP_DAC_READ_SEARCH is the narrower, for reading and searching only)."
        )
        [read_search] = [e for e in exps if e["capability"] == "CAP_DAC_READ_SEARCH"]
        assert tie in read_search["details"]
        assert 1 == r.returncode

    def test_landlock_refuses_what_root_may_write(self, shared_dir: Path) -> None:
        """root writes a 0600 file that another user owns (cap_capable allows CAP_DAC_OVERRIDE)
        after restricting itself with Landlock (no write anywhere): the open fails with EACCES
        although no capability was refused. The verdict is the LSM, named landlock; not file
        permissions and not a capability (the allowed-then-refused case)."""
        if _landlock_abi() < 1:
            pytest.skip("Landlock is not enabled in this kernel")
        target = shared_dir / "theirs"
        target.write_text("x")
        target.chmod(0o600)
        os.chown(target, 65534, 65534)
        script = shared_dir / "landlocked.py"
        script.write_text(LANDLOCK_WRITE)
        r = capwatch(
            "explain", "--json", "--", sys.executable, "-I", "-B", str(script), str(target)
        )
        assert "refused: [Errno 13] Permission denied" in r.stderr, r.stderr
        exps = findings(r)
        assert [] == [e for e in exps if e["capability"]], exps  # no capability refused
        [e] = [x for x in exps if x["syscall"] == "openat"]
        assert ("lsm", "EACCES", str(target)) == (e["verdict"], e["outcome"], e["path"])
        assert "likely an LSM (active: landlock)" in e["summary"]
        assert ["landlock"] == [f["context"] for f in e["fixes"]]
        assert 1 == r.returncode


class TestActiveLsms:
    def test_without_securityfs_as_with_it(self) -> None:
        """Where securityfs is not mounted (as here), the kernel's own list
        (lsm_list_modules) is the one /sys/kernel/security/lsm shows once mounted
        (in a mount namespace of the test's own)."""
        require_tool("unshare")
        mounted = subprocess.run(
            [
                "unshare",
                "-m",
                "sh",
                "-c",
                "mount -t securityfs none /sys/kernel/security 2>/dev/null; "
                "cat /sys/kernel/security/lsm",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert mounted.startswith("capability") or ",capability" in mounted
        assert tuple(mounted.split(",")) == active_lsms("/sys")


#: restrict this process with Landlock (ABI 1: no file may be opened for writing),
#: then open argv[1] for writing; ctypes only, syscalls 444 and 446 (x86_64, arm64)
LANDLOCK_WRITE = """\
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
WRITE_FILE = 1 << 1  # LANDLOCK_ACCESS_FS_WRITE_FILE
attr = ctypes.c_uint64(WRITE_FILE)  # struct landlock_ruleset_attr, ABI 1
fd = libc.syscall(444, ctypes.byref(attr), ctypes.sizeof(attr), 0)
if fd < 0 or libc.syscall(446, fd, 0) != 0:
    sys.exit(f"landlock: {os.strerror(ctypes.get_errno())}")
try:
    open(sys.argv[1], "w").close()
except OSError as e:
    sys.exit(f"refused: {e}")
print("written")
"""


def _landlock_abi() -> int:
    """landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION): the ABI, or -1."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.syscall(444, None, 0, 1))


def watch_then(
    name: str, duration: float, *cmds: list[str], command: str = "explain", paused: bool = False
) -> Any:
    """capwatch COMMAND --json --container NAME; once it says it is watching (the program is
    attached), run ``cmds`` (podman exec ...): no race with a loaded machine's compile time.
    ``paused``: capwatch is stopped (SIGSTOP) while ``cmds`` run and continued after, so it
    reads their records only once they have exited (the kernel's ring buffer keeps them)."""
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "capwatch.commands.cli",
            command,
            "--json",
            "--container",
            name,
            "--duration",
            str(duration),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert p.stderr is not None
    line = p.stderr.readline()  # written once the program is attached
    assert line.startswith("capwatch: watching"), line
    if paused:
        os.kill(p.pid, signal.SIGSTOP)
    try:
        for cmd in cmds:
            subprocess.run(cmd, capture_output=True, timeout=60, check=False)
    finally:
        if paused:
            os.kill(p.pid, signal.SIGCONT)
    out, err = p.communicate(timeout=120)
    assert 0 == p.returncode, err
    assert "Traceback" not in err, err
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.container
class TestRefusalsInContainer:
    def test_default_seccomp_refuses_date(self, container: Any) -> None:
        """date -s in a container with podman's default seccomp profile: clock_settime is
        refused by the filter before any capability check; verdict seccomp, fix --cap-add=SYS_TIME
        (the default profile admits it then) or a profile of one's own."""
        name = container("sleep 60")
        exps = watch_then(name, 10, ["podman", "exec", name, "date", "-s", "2020-01-01"])
        e = verdicts(exps)[("clock_settime", "seccomp")]
        assert ("date", "EPERM", name) == (e["comm"], e["outcome"], e["container"])
        assert {"fix": "podman run --cap-add=SYS_TIME ...", "context": "podman"} == e["fixes"][0]

    def test_file_capabilities_beyond_container_bounding_set(
        self, container: Any, rootfs: Path
    ) -> None:
        """A file-capability binary (cap_net_raw+ep) exec'd in a container started with
        --cap-drop=NET_RAW: the exec is refused; verdict file capabilities, fix
        podman run --cap-add=NET_RAW or setcap -r in the image."""
        require_tool("setcap")
        binary = rootfs / "bin" / "fcping"
        shutil.copy2(BUSYBOX, binary)
        subprocess.run(["setcap", "cap_net_raw+ep", str(binary)], check=True)
        name = container("sleep 60", "--cap-drop=NET_RAW")
        exps = watch_then(name, 10, ["podman", "exec", name, "/bin/fcping"])
        assert ("execve", "file capabilities") in verdicts(exps), [
            (e.get("path"), e.get("details")) for e in exps
        ]
        e = verdicts(exps)[("execve", "file capabilities")]
        assert ("/bin/fcping", "EPERM") == (e["path"], e["outcome"])
        assert [
            {"context": "podman", "fix": "podman run --cap-add=NET_RAW ..."},
            {
                "context": "image",
                "fix": "setcap -r /bin/fcping (if the program does not need them: "
                "it then runs with what it is given)",
            },
        ] == e["fixes"]


@pytest.mark.container
class TestContainerInFindings:
    def test_findings_name_the_container(self, container: Any) -> None:
        """explain --container NAME --json: each finding carries the container's name, full id
        and kind, not only the header on stderr (issue 13, defect 3)."""
        name = container("sleep 60", *NO_SECCOMP)
        exps = watch_then(name, 8, ["podman", "exec", name, "date", "-s", "2020-01-01"])
        [e] = [x for x in exps if x["capability"] == "CAP_SYS_TIME"]
        assert (name, podman_id(name), "podman") == (e["container"], e["container_id"], e["kind"])


@pytest.mark.container
class TestShortLivedInContainer:
    def test_container_whose_only_process_is_gone(self, container: Any, rootfs: Path) -> None:
        """A container whose only process (date -s, its PID 1) is denied CAP_SYS_TIME and exits
        at once, while capwatch is stopped (SIGSTOP) so that it reads the denial only after the
        process and its container are gone: the sets come from the container's config.json,
        which the finding names, and the fix is the podman flag only, never setcap, systemd
        or "run as root" (issue 13, defect 4)."""
        go = rootfs / "tmp" / f"go-{os.getpid()}"
        name = container(
            f"while [ ! -e /tmp/{go.name} ]; do sleep 0.1; done; exec date -s 2020-01-01",
            "--security-opt",
            "seccomp=unconfined",
        )
        try:
            exps = watch_then(name, 20, ["touch", str(go)], ["podman", "wait", name], paused=True)
        finally:
            go.unlink(missing_ok=True)
        [e] = [x for x in exps if x["capability"] == "CAP_SYS_TIME"]
        assert [{"context": "podman", "fix": "podman run --cap-add=SYS_TIME ..."}] == e["fixes"]
        assert ("cause", "bounding", name) == (e["role"], e["missing_from"], e["container"])
        cid = podman_id(name)
        assert e["caps_source"].startswith("the container's configuration /"), e["caps_source"]
        assert e["caps_source"].endswith(f"/{cid}/userdata/config.json (pid {e['pid']} was gone)")
        assert f"(capability sets from {e['caps_source']})" in e["details"]


@pytest.mark.container
class TestExplainPodmanRun:
    def test_the_containers_denial_not_the_runtimes(self, rootfs: Path) -> None:
        """explain -- podman run ... date -s: the container runs in a cgroup of its own, which
        is followed; its CAP_SYS_TIME denial is shown with the container's name and the
        --cap-add fix, and podman's and conmon's tolerated refusals are not causes (defect 5)."""
        name = new_name()
        try:
            r = capwatch(
                "explain",
                "--json",
                "--",
                *RUN,
                "--rm",
                "--name",
                name,
                "--security-opt",
                "seccomp=unconfined",
                "--rootfs",
                str(rootfs),
                "date",
                "-s",
                "2020-01-01",
            )
        finally:
            podman_rm(name)
        exps = findings(r)
        [e] = [x for x in exps if x["capability"] == "CAP_SYS_TIME"]
        assert ("cause", name, "date") == (e["role"], e["container"], e["comm"])
        assert [{"context": "podman", "fix": "podman run --cap-add=SYS_TIME ..."}] == e["fixes"]
        runtime = [x for x in exps if x["comm"] in ("podman", "conmon")]
        assert all("probe" == x["role"] for x in runtime), runtime


@pytest.mark.container
class TestAdvisePodmanRun:
    def test_the_containers_needs_not_the_runtimes(self, rootfs: Path) -> None:
        """advise -- podman run ... date -s: the container started by the command is followed,
        as explain does; the advice proposes what the container needs (SYS_TIME, refused to
        date) with --cap-add, and none of what podman, conmon and runc used or were refused
        while setting it up (SYS_ADMIN for the mounts, SYS_RESOURCE for setrlimit...)."""
        name = new_name()
        try:
            r = capwatch(
                "advise",
                "--json",
                "--",
                *RUN,
                "--rm",
                "--name",
                name,
                *NO_SECCOMP,
                "--rootfs",
                str(rootfs),
                "date",
                "-s",
                "2020-01-01",
            )
        finally:
            podman_rm(name)
        assert "Traceback" not in r.stderr, r.stderr
        a = json.loads(r.stdout.strip().splitlines()[-1])
        assert ["CAP_SYS_TIME"] == a["capabilities"], a
        assert "--cap-drop=ALL --cap-add=SYS_TIME" == a["docker"]
        assert any("(date)" in ev for ev in a["evidence"]["CAP_SYS_TIME"]), a["evidence"]
        runtime = ("podman", "conmon")
        assert not [
            ev
            for evs in a["evidence"].values()
            for ev in evs
            if any(f"({c})" in ev for c in runtime)
        ]


@pytest.mark.container
class TestWaitForContainer:
    def test_explain_waits_for_a_container_started_after_it(self, rootfs: Path) -> None:
        """explain --container NAME --wait: started before the container, it waits, then
        watches it and explains its denial (defect 6)."""
        name = new_name()
        script = "date -s 2020-01-01; sleep 5"
        p = subprocess.Popen(
            [
                *CAPWATCH,
                "explain",
                "--json",
                "--container",
                name,
                "--wait",
                "60",
                "--duration",
                "8",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        try:
            assert p.stderr is not None
            assert p.stderr.readline().startswith(
                f"capwatch: waiting up to 60s for container {name}"
            )
            go = rootfs / "tmp" / name
            subprocess.run(
                [
                    *RUN,
                    "-d",
                    "--name",
                    name,
                    *("--security-opt", "seccomp=unconfined", "--rootfs", str(rootfs)),
                    *("sh", "-c", f"while [ ! -e /tmp/{name} ]; do sleep 0.1; done; {script}"),
                ],
                capture_output=True,
                check=True,
                timeout=60,
            )
            assert p.stderr.readline().startswith("capwatch: watching container")
            go.touch()
            out, err = p.communicate(timeout=120)
        finally:
            podman_rm(name)
            (rootfs / "tmp" / name).unlink(missing_ok=True)
        assert 0 == p.returncode, err
        exps = json.loads(out.strip().splitlines()[-1])
        [e] = [x for x in exps if x["capability"] == "CAP_SYS_TIME"]
        assert ("cause", name) == (e["role"], e["container"])

    def test_without_wait_says_how_to_wait(self) -> None:
        """No such container and no --wait: one line that names --wait, exit 1."""
        r = capwatch("explain", "--container", "capwatch-no-such-container-x")
        assert (1, 1) == (r.returncode, len(r.stderr.splitlines()))
        assert "--wait DURATION waits for it" in r.stderr


# --- trace --outcome with one target, and explain --last from its state file ---------


def trace_then(
    target: list[str], state: Path, act: Any, *, duration: float = 8
) -> tuple[list[dict[str, Any]], str]:
    """capwatch trace --outcome --json TARGET (--pid P or --container NAME) writing
    ``state``; once it says it is attached, ``act()`` makes the refusal. Its JSON
    records, and its stderr."""
    p = subprocess.Popen(
        [
            *CAPWATCH,
            "trace",
            "--outcome",
            "--json",
            *target,
            "--duration",
            str(duration),
            "--state-file",
            str(state),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert p.stderr is not None
    said = ""
    while not said.splitlines()[-1:] or not said.splitlines()[-1].startswith("capwatch: att"):
        line = p.stderr.readline()  # "attached" is written once the program is attached
        assert line, said
        said += line
    act()
    out, err = p.communicate(timeout=120)
    assert 0 == p.returncode, err
    assert "Traceback" not in err, err
    return [json.loads(x) for x in out.splitlines() if x.strip()], said + err


def refused(recs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """(syscall, verdict) -> record, for every record that says what refused it."""
    return {(r["syscall"], r["refusal"]["verdict"]): r for r in recs if "refusal" in r}


def explain_last(state: Path) -> dict[tuple[str, str], dict[str, Any]]:
    r = capwatch("explain", "--last", "20", "--json", "--state-file", str(state))
    assert 0 == r.returncode, r.stderr
    return verdicts(findings(r))


def nobody_waiting(script: str) -> subprocess.Popen[bytes]:
    """``sh -c 'read x; SCRIPT'`` as uid 65534: it waits on stdin (no syscall refused
    meanwhile), so a trace of its pid can attach first; write a line to start it."""
    return subprocess.Popen(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/bin/sh",
            "-c",
            f"read x; {script}",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def go(p: subprocess.Popen[bytes]) -> None:
    """Start it; it is not reaped until the trace is over: a zombie's status still
    shows its sets and NoNewPrivs, which the trace reads when the denial arrives."""
    assert p.stdin is not None
    p.stdin.write(b"go\n")
    p.stdin.close()


class TestTraceVerdictsOnHost:
    def test_touch_of_root_owned_file_under_trace_pid(self, shared_dir: Path) -> None:
        """trace --outcome --pid: touch (as nobody) of a root-owned 0644 file is refused
        CAP_DAC_OVERRIDE in openat; the record says file permissions, with the chown/chmod
        fix, and explain --last then says the same from the state file trace wrote."""
        target = shared_dir / "rootfile"
        target.write_text("x")
        target.chmod(0o644)
        state = shared_dir / "state" / "recent.json"
        p = nobody_waiting(f"exec /usr/bin/touch {target}")
        try:
            recs, _ = trace_then(["--pid", str(p.pid)], state, lambda: go(p))
        finally:
            p.kill()
            p.wait()
        r = refused(recs)[("openat", "file permissions")]
        assert ("touch", "CAP_DAC_OVERRIDE", "EACCES", "cause") == (
            r["comm"],
            r["capability"],
            r["outcome"],
            r["role"],
        )
        assert ["file permissions"] == [f["context"] for f in r["refusal"]["fixes"]]
        assert "uid 65534" in r["refusal"]["fixes"][0]["fix"]
        e = explain_last(state)[("openat", "file permissions")]
        assert (r["refusal"]["summary"], r["refusal"]["fixes"]) == (e["summary"], e["fixes"])

    def test_exec_of_a_file_without_x_bits_is_a_refusal_record(self, shared_dir: Path) -> None:
        """exec of a 0644 script as nobody: EACCES with no capability checked at all. trace
        --outcome --pid shows it as a refused syscall with its path, verdict file permissions
        and chmod +x; the state file keeps it and explain --last shows the same words."""
        script = shared_dir / "noexec"
        script.write_text("#!/bin/sh\necho hi\n")
        script.chmod(0o644)
        state = shared_dir / "state" / "recent.json"
        p = nobody_waiting(f"exec {script}")
        try:
            recs, _ = trace_then(["--pid", str(p.pid)], state, lambda: go(p))
        finally:
            p.kill()
            p.wait()
        r = refused(recs)[("execve", "file permissions")]
        assert ("refused", "", "EACCES", p.pid) == (
            r["verdict"],
            r["capability"],
            r["outcome"],
            r["pid"],
        )
        assert (str(script), [{"context": "file", "fix": f"chmod +x {script}"}]) == (
            r["refusal"]["path"],
            r["refusal"]["fixes"],
        )
        e = explain_last(state)[("execve", "file permissions")]
        assert (str(script), r["refusal"]["summary"], r["refusal"]["fixes"]) == (
            e["path"],
            e["summary"],
            e["fixes"],
        )
        text = capwatch("explain", "--last", "--state-file", str(state)).stdout
        assert f"execve ({script}) refused to " in text
        assert f"with EACCES: file permissions\n  {script} is not executable" in text

    def test_setuid_binary_under_no_new_privs_under_trace_pid(self, shared_dir: Path) -> None:
        """trace --outcome --pid of a setuid-root busybox's ping run as nobody under
        setpriv --no-new-privs: socket() refused CAP_NET_RAW, verdict no_new_privs, in the
        trace and in explain --last."""
        require_tool("setpriv")
        sub = shared_dir / "suid"
        sub.mkdir(mode=0o755)
        binary = sub / "busybox"
        shutil.copy2(BUSYBOX, binary)
        binary.chmod(0o4755)
        state = shared_dir / "state" / "recent.json"
        p = subprocess.Popen(
            [
                "setpriv",
                "--no-new-privs",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "/bin/sh",
                "-c",
                f"read x; exec {binary} ping -c1 -W1 127.0.0.1",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            recs, _ = trace_then(["--pid", str(p.pid)], state, lambda: go(p))
        finally:
            p.kill()
            p.wait()
        r = refused(recs).get(("socket", "no_new_privs")) or pytest.fail(str(recs))
        assert ("CAP_NET_RAW", "cause") == (r["capability"], r["role"])
        assert "setpriv" == r["refusal"]["fixes"][0]["context"]
        e = explain_last(state)[("socket", "no_new_privs")]
        assert r["refusal"]["fixes"] == e["fixes"]

    def test_without_one_target_it_says_so_once(self, shared_dir: Path) -> None:
        """trace --outcome of everything: refusals need one target, said once on stderr
        (the kernel program is built without them: nothing else pays)."""
        recs, err = trace_then([], shared_dir / "state" / "recent.json", lambda: None, duration=1)
        assert 1 == err.count("are shown only for one target"), err
        assert "; tracing denials, Ctrl-C to stop" in err, err
        assert not [r for r in recs if r["verdict"] == "refused"]


@pytest.mark.container
class TestTraceVerdictsInContainer:
    def test_default_seccomp_refuses_date_under_trace_container(
        self, container: Any, shared_dir: Path
    ) -> None:
        """trace --outcome --container NAME: date -s in the podman container is refused by
        the default seccomp profile (no capability checked); the record says seccomp with
        the podman fix, and explain --last says the same from trace's state file."""
        name = container("sleep 60")
        state = shared_dir / "state" / "recent.json"
        recs, _ = trace_then(
            ["--container", name],
            state,
            lambda: subprocess.run(
                ["podman", "exec", name, "date", "-s", "2020-01-01"],
                capture_output=True,
                timeout=60,
                check=False,
            ),
        )
        r = refused(recs)[("clock_settime", "seccomp")]
        assert ("date", "refused", "EPERM", name) == (
            r["comm"],
            r["verdict"],
            r["outcome"],
            r["container_name"],
        )
        fix = {"context": "podman", "fix": "podman run --cap-add=SYS_TIME ..."}
        assert fix == r["refusal"]["fixes"][0]
        e = explain_last(state)[("clock_settime", "seccomp")]
        assert ("date", name, fix) == (e["comm"], e["container"], e["fixes"][0])
        assert r["refusal"]["summary"] == e["summary"]
