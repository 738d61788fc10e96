"""capwatch serve, scraped by a real Prometheus, with real denials in a real container."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench._harness import Serve, free_port
from tests.helpers import REPO, require_root
from tests.kernel.podman import (
    NO_SECCOMP,
    busybox_rootfs,
    new_name,
    podman_rm,
    podman_run,
    require_podman,
)

pytestmark = [pytest.mark.kernel, pytest.mark.container, pytest.mark.prometheus]


def get(url: str, timeout: float = 5) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_for(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if get(url, 1)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{url} did not come up in {timeout}s")


@pytest.fixture
def serve() -> Iterator[Serve]:
    require_root()
    s = Serve("--log-interval", "2s")
    yield s
    if s.proc.poll() is None:
        s.proc.kill()
        s.proc.wait()


@pytest.fixture
def prometheus(tmp_path: Path, serve: Serve) -> Iterator[str]:
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed (deploy/host-setup.sh installs it)")
    port = free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: capwatch\n    static_configs: [{{targets: ['127.0.0.1:{serve.port}']}}]\n"
    )
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={cfg}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/-/ready")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def query(prom: str, expr: str) -> list[dict[str, object]]:
    code, body = get(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert 200 == code, body
    result: list[dict[str, object]] = json.loads(body)["data"]["result"]
    return result


def wait_value(prom: str, expr: str, want: float, timeout: float = 20) -> float:
    deadline = time.monotonic() + timeout
    got = None
    while time.monotonic() < deadline:
        r = query(prom, expr)
        if r:
            got = float(r[0]["value"][1])  # type: ignore[index]
            if got == want:
                return got
        time.sleep(0.5)
    pytest.fail(f"{expr} = {got}, wanted {want}")


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_podman()
    return busybox_rootfs(tmp_path_factory.mktemp("busybox"))


class TestPrometheus:
    def test_denials_counted_exactly_through_prometheus(
        self, serve: Serve, prometheus: str, rootfs: Path
    ) -> None:
        """3 date -s denials in a container: Prometheus reads CAP_SYS_TIME/denied = 3 for it,
        unexpected; the scrape job is up; the log has the denial with the container's name."""
        name = new_name()
        try:
            r = podman_run(
                rootfs,
                name,
                "sh",
                "-c",
                "for i in 1 2 3; do date -s 2020-01-01; done; true",
                extra=NO_SECCOMP,
            )
            assert 3 == (r.stdout + r.stderr).count("Operation not permitted"), r
            sel = f'capability="CAP_SYS_TIME",container="{name}",runtime="podman"'
            wait_value(prometheus, f'capwatch_checks_total{{{sel},verdict="denied"}}', 3)
            wait_value(prometheus, f'capwatch_denials_total{{{sel},expected="false"}}', 3)
            wait_value(prometheus, 'up{job="capwatch"}', 1)
            wait_value(prometheus, 'sum(capwatch_events_lost_total{job="capwatch"})', 0)
        finally:
            podman_rm(name)
        serve.stop()
        lines = serve.log_lines()
        denials = [
            x
            for x in lines
            if x.get("event") == "denial" and x.get("container") == name and not x["expected"]
        ]
        # one line for the distinct denial, then a summary with the exact count
        assert [("date", "CAP_SYS_TIME", "clock_settime", "podman")] == [
            (d["comm"], d["capability"], d["syscall"], d["runtime"]) for d in denials
        ]
        summaries = [
            x
            for x in lines
            if x.get("event") == "denial summary"
            and x.get("container") == name
            and not x["expected"]
        ]
        assert [3] == [x["count"] for x in summaries]

    def test_expected_probe_is_classified(
        self, serve: Serve, prometheus: str, rootfs: Path
    ) -> None:
        """ifconfig nosuchdev0's CAP_SYS_MODULE denial matches the shipped policy: expected="true"."""
        name = new_name()
        try:
            podman_run(rootfs, name, "ifconfig", "nosuchdev0")
            wait_value(
                prometheus,
                f'capwatch_denials_total{{capability="CAP_SYS_MODULE",container="{name}",expected="true"}}',
                1,
            )
        finally:
            podman_rm(name)


class TestServeEndpoints:
    def test_only_metrics_and_health(self, serve: Serve) -> None:
        """Other paths are 404; /healthz is 200 while attached; /metrics has our families."""
        base = f"http://127.0.0.1:{serve.port}"
        assert 404 == get(f"{base}/")[0]
        assert 404 == get(f"{base}/debug")[0]
        code, body = get(f"{base}/healthz")
        assert (200, "ok: attached via raw_tracepoint\n") == (code, body)
        code, body = get(f"{base}/metrics")
        assert 200 == code
        assert 'capwatch_attach_info{mode="raw_tracepoint"} 1.0' in body

    def test_port_in_use(self, serve: Serve) -> None:
        """A second serve on the same port: one line, non-zero, before loading BPF."""
        r = subprocess.run(
            [sys.executable, "-m", "capwatch.commands.cli", "serve", "--listen", f"127.0.0.1:{serve.port}"],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO,
            check=False,
        )
        assert 1 == r.returncode
        assert [
            f"capwatch: cannot listen on 127.0.0.1:{serve.port}: Address already in use"
        ] == r.stderr.splitlines()

    def test_sigterm_detaches(self, serve: Serve) -> None:
        """SIGTERM: exit 0 (no hang: bounded wait), and no capwatch program is left attached."""
        before = subprocess.run(
            ["bpftool", "link", "show"], capture_output=True, text=True, check=True
        ).stdout.count("cap_capable")
        serve.proc.terminate()
        serve.proc.communicate(timeout=5)
        assert 0 == serve.proc.returncode
        after = subprocess.run(
            ["bpftool", "link", "show"], capture_output=True, text=True, check=True
        ).stdout.count("cap_capable")
        assert before - 1 == after


def test_serve_attach_failure_exits() -> None:
    """serve with a hook the kernel lacks: one line, exit 1, no hang on the bound socket
    (the run's timeout bounds it; no wall-clock assert on a shared machine)."""
    require_root()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "capwatch.commands.cli",
            "serve",
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--attach",
            "kprobe",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        check=False,
    )
    assert 1 == r.returncode
    assert 1 == len(r.stderr.splitlines()), r.stderr
    assert r.stderr.startswith("capwatch: attach mode kprobe failed")
