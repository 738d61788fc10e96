"""Shared pieces of the soak and flood scripts: serve as a subprocess, a
Prometheus-format scrape parser, process CPU/RSS/fd sampling, a private cgroup."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def compile_c(name: str) -> str:
    out = Path(tempfile.mkdtemp(prefix="capwatch-bench-")) / name
    cc = shutil.which("cc") or shutil.which("gcc") or "cc"
    subprocess.run([cc, "-O2", "-o", str(out), str(REPO / "bench" / f"{name}.c")], check=True)
    return str(out)


class Serve:
    """`capwatch serve` on a free loopback port; stdout (the log) kept in a file."""

    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.log_path = Path(tempfile.mkdtemp(prefix="capwatch-serve-")) / "serve.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "capwatch.commands.cli",
                "serve",
                "--listen",
                f"127.0.0.1:{self.port}",
                *args,
            ],
            stdout=self._log,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if self.get("/healthz")[0] == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise SystemExit(
                    f"serve exited: {self.proc.stderr.read() if self.proc.stderr else ''}"
                )
            time.sleep(0.1)
        raise SystemExit("serve did not become healthy in 30 s")

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for line in self.get("/metrics")[1].splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def sample(self) -> dict[str, float]:
        """CPU seconds, RSS (MiB) and open fds of the serve process."""
        pid = self.proc.pid
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(stat[11]) + int(stat[12])) / CLK_TCK
        rss = (
            next(
                int(x.split()[1])
                for x in Path(f"/proc/{pid}/status").read_text().splitlines()
                if x.startswith("VmRSS:")
            )
            / 1024
        )
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        return {"cpu_s": cpu, "rss_mib": rss, "fds": fds}

    def stop(self) -> float:
        t0 = time.monotonic()
        self.proc.terminate()
        self.proc.wait(timeout=15)
        self._log.close()
        return time.monotonic() - t0

    def log_lines(self) -> list[dict[str, object]]:
        import json

        out = []
        for line in self.log_path.read_text().splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out


class Cgroup:
    """A private cgroup v2 directory (its path is the workload label serve shows)."""

    def __init__(self, prefix: str) -> None:
        root = next(
            line.split()[4]
            for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[line.split().index("-") + 1] == "cgroup2"
        )
        self.root = Path(root)
        self.name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self.path = self.root / self.name
        self.path.mkdir()
        self.label = "/" + self.name

    def run(self, argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        procs = str(self.path / "cgroup.procs")

        def enter() -> None:
            with open(procs, "w") as f:
                f.write("0")

        return subprocess.run(
            argv, preexec_fn=enter, capture_output=True, text=True, check=False, **kw
        )  # type: ignore[call-overload]

    def popen(self, argv: list[str], **kw: object) -> subprocess.Popen[str]:
        procs = str(self.path / "cgroup.procs")

        def enter() -> None:
            with open(procs, "w") as f:
                f.write("0")

        return subprocess.Popen(argv, preexec_fn=enter, text=True, **kw)  # type: ignore[call-overload]  # noqa: PLW1509

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def checks(metrics: dict[str, float], *, container: str, capability: str, verdict: str) -> float:
    return sum(
        v
        for k, v in metrics.items()
        if k.startswith("capwatch_checks_total{")
        and f'container="{container}"' in k
        and f'capability="{capability}"' in k
        and f'verdict="{verdict}"' in k
    )


def machine() -> str:
    return f"{os.cpu_count()} cores, Linux {os.uname().release}"
