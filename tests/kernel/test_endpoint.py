"""`capwatch serve`'s endpoint under hostile clients, with the real program attached:
slow clients and bad requests do not stop scrapes, and a denial made meanwhile is counted."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.kernel]

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", method=method, data=b"x" if method == "POST" else None
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture
def serve() -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    if os.geteuid() != 0:
        pytest.skip("needs root: loads BPF programs")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "capwatch.commands.cli", "serve", "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if _get(port, "/healthz")[0] == 200:
                break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("serve did not become healthy")
    try:
        yield port, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def _sys_time_denials(text: str) -> float:
    return sum(
        float(ln.rsplit(" ", 1)[1])
        for ln in text.splitlines()
        if ln.startswith("capwatch_checks_total{")
        and 'capability="CAP_SYS_TIME"' in ln
        and 'verdict="denied"' in ln
    )


def test_scrapes_and_denials_go_on_under_slow_and_bad_clients(
    serve: tuple[int, subprocess.Popen[bytes]],
) -> None:
    """200 slow clients hold connections; POSTs, oversized headers and a reset come in;
    scrapes still answer 200, a denial made meanwhile is counted, and serve prints
    no traceback."""
    port, proc = serve
    before = _sys_time_denials(_get(port, "/metrics")[1])
    slow = []
    for _ in range(200):
        c = socket.create_connection(("127.0.0.1", port), timeout=10)
        c.sendall(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
        slow.append(c)
    try:
        assert 405 == _get(port, "/metrics", method="POST")[0]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(b"GET /metrics HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 20000 + b"\r\n\r\n")
            assert c.recv(64).startswith(b"HTTP/1.1 431 ")
        c = socket.create_connection(("127.0.0.1", port), timeout=10)
        c.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        c.close()  # RST
        r = subprocess.run(
            ["capsh", "--drop=cap_sys_time", "--", "-c", "exec date -s 2020-01-01"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert "Operation not permitted" in r.stderr
        time.sleep(0.5)
        code, text = _get(port, "/metrics")
        assert 200 == code
        assert _sys_time_denials(text) >= before + 1
        outcomes = {
            ln.split('"')[1]: float(ln.rsplit(" ", 1)[1])
            for ln in text.splitlines()
            if ln.startswith("capwatch_http_connections_total{")
        }
        assert outcomes["method_not_allowed"] >= 1
        assert outcomes["too_large"] >= 1, outcomes
        assert outcomes["evicted"] >= 200 - 64
        assert 200 == _get(port, "/healthz")[0]
    finally:
        for c in slow:
            c.close()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert 0 == proc.returncode
    assert b"Traceback" not in err
