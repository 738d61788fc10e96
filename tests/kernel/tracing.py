"""Run `capwatch trace` as a subprocess and collect what it prints."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from typing import Any

import pytest

from tests.helpers import CAPWATCH, REPO


class TraceProcess:
    """`capwatch trace ARGS --json` in the background; wait() returns its events."""

    def __init__(self, *args: str, ready_timeout: float = 30) -> None:
        self.proc = subprocess.Popen(
            [*CAPWATCH, "trace", "--json", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        assert self.proc.stderr is not None
        deadline = time.monotonic() + ready_timeout
        self.banner = ""
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            if "attached via" in line:
                self.banner = line
                return
        self.proc.kill()
        _, err = self.proc.communicate()
        pytest.fail(f"capwatch trace did not attach: {self.banner}{err}")

    def stop(self, timeout: float = 10) -> tuple[list[dict[str, Any]], str]:
        time.sleep(0.3)  # let the consumer's drain timer pass (50 ms)
        self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate(timeout=timeout)
        assert 0 == self.proc.returncode, err
        return [json.loads(line) for line in out.splitlines() if line.strip()], err

    def __enter__(self) -> TraceProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run_denied_date() -> int:
    """`date -s` without CAP_SYS_TIME; returns date's pid (capsh and sh exec into it)."""
    p = subprocess.run(
        ["capsh", "--drop=cap_sys_time", "--", "-c", "echo $$; exec date -s 2020-01-01 >/dev/null"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert 0 != p.returncode, p.stderr
    assert "Operation not permitted" in p.stderr, p.stderr
    return int(p.stdout.split()[0])


def setuid_loop(n: int) -> int:
    """A child that calls setuid(0) n times (one CAP_SETUID check each); returns its pid."""
    code = "import os,sys\nfor _ in range(int(sys.argv[1])): os.setuid(0)\nprint(os.getpid())"
    p = subprocess.run(["python3", "-c", code, str(n)], capture_output=True, text=True, check=True)
    return int(p.stdout)


class RecordProcess:
    """`capwatch record -o FILE ARGS` in the background, stopped with SIGINT."""

    def __init__(self, path: str, *args: str, ready_timeout: float = 30) -> None:
        self.proc = subprocess.Popen(
            [*CAPWATCH, "record", "-o", path, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        assert self.proc.stderr is not None
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            if "attached via" in line:
                return
        self.proc.kill()
        _, err = self.proc.communicate()
        pytest.fail(f"capwatch record did not attach: {err}")

    def stop(self, timeout: float = 20) -> str:
        time.sleep(0.3)
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=timeout)
        assert 0 == self.proc.returncode, err
        return err

    def __enter__(self) -> RecordProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
