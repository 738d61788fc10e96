"""capwatch deployed the way the DaemonSet runs it, in real podman containers.

No registry is reachable here, so the image's root filesystem is built offline
by deploy/build-rootfs.sh (debootstrap; once per session, cached outside the
repository) and run with ``podman run --rootfs``. capwatch runs through the
image's entrypoint with the DaemonSet's arguments and host mounts
(``--pid=host``, tracefs, debugfs, the cgroup tree, /proc as /host/proc, host
headers under /host); a busybox container is denied CAP_SYS_TIME and capwatch
must report that container in its metrics and its log.

Set CAPWATCH_ROOTFS_CACHE to build the rootfs elsewhere.
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import REPO, require_root
from tests.kernel.podman import NO_SECCOMP, busybox_rootfs, require_podman

pytestmark = [pytest.mark.container, pytest.mark.slow]

ROOTFS_CACHE = Path(os.environ.get("CAPWATCH_ROOTFS_CACHE", "/var/cache/capwatch-test/rootfs"))
BUILD_ROOTFS = REPO / "deploy" / "build-rootfs.sh"
LEAST_PRIVILEGE_OVERLAY = REPO / "deploy/kubernetes/overlays/least-privilege/kustomization.yaml"
ENTRYPOINT = "/usr/local/bin/capwatch-entrypoint"
# This VM's podman cannot raise the default rlimits (runc: "error setting rlimit
# type 7: operation not permitted"); explicit values within the hard limits work.
ULIMITS = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=1000:1000"]
DAEMONSET = REPO / "deploy/kubernetes/base/daemonset.yaml"
#: The DaemonSet's optional host header volumes (mounted under /host).
HEADER_VOLUMES = frozenset({"host-modules", "host-usr-src"})
READY_TIMEOUT = 120.0
StartServe = Callable[..., "Served"]
REPORT_TIMEOUT = 20.0


def _podman(
    *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", "--runtime", "runc", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
    )


def _least_privilege_container() -> dict[str, Any]:
    """The container part of the least-privilege overlay's DaemonSet patch."""
    kust = yaml.safe_load(LEAST_PRIVILEGE_OVERLAY.read_text())
    patch = yaml.safe_load(kust["patches"][0]["patch"])
    container: dict[str, Any] = patch["spec"]["template"]["spec"]["containers"][0]
    return container


def _least_privilege_caps() -> list[str]:
    """The capabilities the least-privilege overlay adds."""
    caps: list[str] = _least_privilege_container()["securityContext"]["capabilities"]["add"]
    return caps


def _manifest_mounts(*, least_privilege: bool, headers: bool) -> list[str]:
    """podman -v flags for the DaemonSet's hostPath mounts, read from the manifest.

    The least-privilege overlay's volumeMounts are merged by mountPath (their
    strategic-merge key). emptyDir mounts are left out: the rootfs overlay is
    writable, and with --read-only podman mounts tmpfs on /run and /tmp.
    """
    pod = yaml.safe_load(DAEMONSET.read_text())["spec"]["template"]["spec"]
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert HEADER_VOLUMES <= set(host_paths)
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    if least_privilege:
        for m in _least_privilege_container().get("volumeMounts", []):
            mounts[m["mountPath"]] = {**mounts[m["mountPath"]], **m}
    flags = []
    for m in mounts.values():
        if m["name"] not in host_paths or (not headers and m["name"] in HEADER_VOLUMES):
            continue
        ro = ":ro" if m.get("readOnly") else ""
        flags += ["-v", f"{host_paths[m['name']]}:{m['mountPath']}{ro}"]
    return flags


def _least_privilege_args(*, seccomp_unconfined: bool = True) -> list[str]:
    args = ["--cap-drop=ALL", "--cap-add=" + ",".join(_least_privilege_caps()), "--read-only"]
    if seccomp_unconfined:  # as the overlay's seccompProfile: Unconfined
        args += list(NO_SECCOMP)
    return args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def _json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def _host_has_headers() -> bool:
    """Whether the host's /lib/modules/<release>/build is a usable tree (entrypoint's test)."""
    build = (Path("/lib/modules") / platform.release() / "build").resolve()
    if not build.is_dir():
        return False
    common = build.with_name(build.name.rsplit("-", 1)[0] + "-common")
    return any((d / "include/linux/kconfig.h").exists() for d in (build, common))


def _bpf_allowed_by_default_seccomp(caps: list[str]) -> bool:
    """Whether podman's default seccomp profile lets bpf(2) through with ``caps`` alone.

    A profile rule applies when all its ``includes.caps`` are held and none of its
    ``excludes.caps``; the last matching rule naming bpf decides (containers-common
    lists the allow rule, then the EPERM rule that excludes CAP_SYS_ADMIN).
    """
    path = Path("/usr/share/containers/seccomp.json")
    if not path.exists():
        return True  # no profile file: podman's built-in default; assume the new one
    held = {f"CAP_{c.upper()}" for c in caps}
    allowed = False
    default = json.loads(path.read_text())
    for rule in default.get("syscalls", []):
        if "bpf" not in rule.get("names", []):
            continue
        inc = set(rule.get("includes", {}).get("caps", []))
        exc = set(rule.get("excludes", {}).get("caps", []))
        if inc <= held and not (exc & held) and not rule.get("args"):
            allowed = rule["action"] == "SCMP_ACT_ALLOW"
    return allowed


@dataclass
class Served:
    name: str
    port: int

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def logs(self) -> str:
        r = _podman("logs", self.name, check=False)
        return r.stdout + r.stderr

    def running(self) -> bool:
        r = _podman("inspect", "--format", "{{.State.Running}}", self.name, check=False)
        return r.stdout.strip() == "true"


@dataclass(frozen=True)
class Victim:
    name: str
    id: str
    output: str
    returncode: int


@pytest.fixture(scope="session")
def rootfs() -> Path:
    """The image's rootfs, built (or found up to date) once per session."""
    require_root()
    for tool in ("podman", "runc", "debootstrap"):
        if shutil.which(tool) is None:
            pytest.fail(
                f"{tool} is not installed (apt-get install {tool}); the deploy test needs it"
            )
    t0 = time.monotonic()
    r = subprocess.run(
        [str(BUILD_ROOTFS), str(ROOTFS_CACHE)],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if r.returncode != 0:
        pytest.fail(
            f"build-rootfs.sh failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        )
    print(f"rootfs ready in {time.monotonic() - t0:.1f} s: {r.stdout.strip()}")
    return ROOTFS_CACHE


@pytest.fixture(scope="session")
def busybox_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_podman()
    return busybox_rootfs(tmp_path_factory.mktemp("busybox-root"))


def _serve(rootfs: Path, security: list[str], mounts: list[str]) -> Served:
    served = Served(name=f"capwatch-deploy-{secrets.token_hex(4)}", port=_free_port())
    _podman(
        "run", "-d", "--name", served.name, *security, "--pid=host", *ULIMITS, *mounts,
        "--network=host", "--rootfs", f"{rootfs}:O",
        ENTRYPOINT, f"--listen=127.0.0.1:{served.port}", "--proc-root=/host/proc",
    )  # fmt: skip
    return served


def _wait_ready(served: Served) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if not served.running():
            pytest.fail(f"capwatch exited before it was ready; log:\n{served.logs()[-4000:]}")
        try:
            if _http_get(served.url("/healthz"))[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.25)
    pytest.fail(f"/healthz not 200 after {READY_TIMEOUT} s; log:\n{served.logs()[-4000:]}")


@pytest.fixture
def serve(rootfs: Path) -> Iterator[StartServe]:
    """Start capwatch in a container; removed at the end of the test."""
    started: list[Served] = []

    def start(security: list[str], mounts: list[str], *, wait: bool = True) -> Served:
        served = _serve(rootfs, security, mounts)
        started.append(served)
        if wait:
            _wait_ready(served)
        return served

    yield start
    for s in started:
        _podman("rm", "-f", "-t", "0", s.name, check=False)


def _run_victim(busybox_root: Path) -> Victim:
    """A busybox container whose `date -s` is denied CAP_SYS_TIME.

    CAP_SYS_TIME is dropped explicitly (the host clock must not move). Seccomp is
    unconfined as Kubernetes runs pods by default: podman's default profile
    answers clock_settime with EPERM itself, before any capability check. The
    container then lives 2 s more: capwatch learns a new cgroup's path by walking
    the cgroup tree off the event path, and a container gone before that walk is
    reported as ``cgroup:<id>`` (seen with a `date -s` that exits at once).
    """
    name = f"capwatch-victim-{secrets.token_hex(4)}"
    cid = _podman(
        "create", "--name", name, *ULIMITS, "--cap-drop=SYS_TIME",
        *NO_SECCOMP, "--rootfs", str(busybox_root),
        "/bin/busybox", "sh", "-c", "/bin/busybox date -s 2020-01-01; /bin/busybox sleep 2",
    ).stdout.strip()  # fmt: skip
    try:
        r = _podman("start", "-a", name, check=False)
        return Victim(name=name, id=cid, output=r.stdout + r.stderr, returncode=r.returncode)
    finally:
        _podman("rm", "-f", "-t", "0", name, check=False)


def _is_victim(label: object, victim: Victim) -> bool:
    return isinstance(label, str) and label in {victim.name, victim.id[:12]}


def _denied_sys_time_samples(served: Served, victim: Victim) -> list[dict[str, str]]:
    status, body = _http_get(served.url("/metrics"))
    assert 200 == status
    found = []
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            if (
                s.name == "capwatch_checks_total"
                and s.labels.get("capability") == "CAP_SYS_TIME"
                and s.labels.get("verdict") == "denied"
                and _is_victim(s.labels.get("container"), victim)
                and s.value >= 1
            ):
                found.append(dict(s.labels))
    return found


def _denial_log_lines(served: Served, victim: Victim) -> list[dict[str, Any]]:
    return [
        d
        for d in _json_lines(served.logs())
        if d.get("event") == "denial"
        and d.get("capability") == "CAP_SYS_TIME"
        and _is_victim(d.get("container"), victim)
    ]


def _headers_line(served: Served) -> dict[str, Any]:
    lines = [d for d in _json_lines(served.logs()) if d.get("event") == "kernel_headers"]
    assert lines, f"no kernel_headers log line:\n{served.logs()[-3000:]}"
    return lines[0]


def _metric_value(served: Served, name: str) -> float | None:
    for family in text_string_to_metric_families(_http_get(served.url("/metrics"))[1]):
        for s in family.samples:
            if s.name == name:
                return float(s.value)
    return None


def _assert_reports_victim(served: Served, busybox_root: Path) -> None:
    victim = _run_victim(busybox_root)
    assert "Operation not permitted" in victim.output, victim.output
    deadline = time.monotonic() + REPORT_TIMEOUT
    samples: list[dict[str, str]] = []
    lines: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not (samples and lines):
        samples = _denied_sys_time_samples(served, victim)
        lines = _denial_log_lines(served, victim)
        time.sleep(0.25)
    if not samples:
        body = _http_get(served.url("/metrics"))[1]
        seen = [ln for ln in body.splitlines() if "CAP_SYS_TIME" in ln]
        pytest.fail(f"no denied CAP_SYS_TIME series for {victim.name}/{victim.id[:12]}: {seen}")
    assert "podman" == samples[0]["runtime"]
    assert lines, f"no denial log line for {victim.name}/{victim.id[:12]}:\n{served.logs()[-3000:]}"
    assert "clock_settime" == lines[0].get("syscall")


class TestPrivileged:
    def test_denial_in_another_container_is_reported(
        self, serve: StartServe, busybox_root: Path
    ) -> None:
        """--privileged, DaemonSet mounts: the victim's CAP_SYS_TIME denial is in metrics and log."""
        served = serve(["--privileged"], _manifest_mounts(least_privilege=False, headers=True))
        assert 1.0 == _metric_value(served, "capwatch_attached")
        _assert_reports_victim(served, busybox_root)

    def test_host_headers_are_used_when_mounted(self, serve: StartServe) -> None:
        """With the host's /lib/modules and /usr/src under /host, the host's tree is used."""
        served = serve(["--privileged"], _manifest_mounts(least_privilege=False, headers=True))
        line = _headers_line(served)
        # "explicit": the entrypoint found the host tree under /host and passed it.
        expected = {"explicit", "host"} if _host_has_headers() else {"shipped"}
        assert line["source"] in expected, line


class TestLeastPrivilege:
    def test_denial_in_another_container_is_reported(
        self, serve: StartServe, busybox_root: Path
    ) -> None:
        """drop ALL + the overlay's capabilities, read-only root: same report as privileged."""
        served = serve(
            _least_privilege_args(), _manifest_mounts(least_privilege=True, headers=True)
        )
        assert 1.0 == _metric_value(served, "capwatch_attached")
        _assert_reports_victim(served, busybox_root)

    def test_default_seccomp_profile_decides_bpf(self, serve: StartServe) -> None:
        """Without seccomp=unconfined, podman's profile decides: EPERM unless it admits CAP_BPF.

        containers-common 0.50 (Debian 12) allows bpf(2) only with CAP_SYS_ADMIN,
        so capwatch cannot load its maps there; a profile that admits CAP_BPF works.
        """
        caps = _least_privilege_caps()
        served = serve(
            _least_privilege_args(seccomp_unconfined=False),
            _manifest_mounts(least_privilege=True, headers=False),
            wait=False,
        )
        if _bpf_allowed_by_default_seccomp(caps):
            _wait_ready(served)
            return
        # Refused: capwatch says why, then exits or stays up answering 503.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if "Operation not permitted" in served.logs() or not served.running():
                break
            time.sleep(0.25)
        assert "Operation not permitted" in served.logs(), served.logs()[-3000:]
        if served.running():
            assert 503 == _http_get(served.url("/healthz"))[0]


class TestHeaderFallback:
    def test_shipped_tree_when_no_headers_are_mounted(self, serve: StartServe) -> None:
        """No /lib/modules nor /usr/src from the host: the image's tree is used and it attaches."""
        served = serve(["--privileged"], _manifest_mounts(least_privilege=False, headers=False))
        line = _headers_line(served)
        assert "shipped" == line["source"]
        assert "linux-headers-" in line["path"]
        assert 1.0 == _metric_value(served, "capwatch_attached")
