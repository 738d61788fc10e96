"""Real processes named with escape sequences, a 0xff byte and a newline
(prctl(PR_SET_NAME)), in a real cgroup whose directory name has a 0xff byte:
serve's /metrics and log, and trace's table and JSON, stay valid and show them escaped.

Before the fix, one allowed check from such a cgroup made every /metrics scrape
fail with UnicodeEncodeError while /healthz kept answering 200."""

from __future__ import annotations

import json
import os
import pty
import signal
import socket
import subprocess
import sys
import threading
import time
import unicodedata
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.kernel]

REPO = Path(__file__).resolve().parents[2]
CAPWATCH = [sys.executable, "-m", "capwatch.commands.cli"]
UNIFIED = b"/sys/fs/cgroup/unified"

#: comm bytes (at most 15) and how every sink must show them
NAMES = {
    b"\x1b]52;c;aGk=\x07": "\\x1b]52;c;aGk=\\x07",
    b"\x1b[8mev\xffil": "\\x1b[8mev\\xffil",
    b"two\nlines": "two\\nlines",
}

# A child: into the cgroup, renamed, denied CAP_SYS_TIME (clock_settime without it
# in its bounding set, via capsh), and one allowed CAP_SETUID check (setuid(0)).
CHILD = r"""
import ctypes, os, sys, time
cg, name = os.fsencode(sys.argv[1]), bytes.fromhex(sys.argv[2])
with open(cg + b"/cgroup.procs", "w") as f:
    f.write(str(os.getpid()))
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(15, ctypes.c_char_p(name), 0, 0, 0) == 0  # PR_SET_NAME
os.setuid(0)
try:
    time.clock_settime(time.CLOCK_REALTIME, time.clock_gettime(time.CLOCK_REALTIME))
except PermissionError:
    print("denied")
"""


def _clean(text: str) -> None:
    text.encode("utf-8")
    bad = [c for c in text if c != "\n" and unicodedata.category(c) in ("Cc", "Cf", "Cs")]
    assert [] == bad, text[:2000]


def _drain(fd: int, chunks: list[bytes]) -> None:
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the other side closed
            return
        if not chunk:
            return
        chunks.append(chunk)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture
def evil_cgroup() -> Iterator[bytes]:
    if os.geteuid() != 0:
        pytest.skip("needs root: loads BPF programs, makes cgroups")
    if not os.path.isdir(UNIFIED + b"/"):
        pytest.skip("no cgroup2 hierarchy at /sys/fs/cgroup/unified")
    path = UNIFIED + b"/capwatch-test-ev\xffil-%d.scope" % os.getpid()
    os.mkdir(path)
    try:
        yield path
    finally:
        for _ in range(50):
            try:
                os.rmdir(path)
                break
            except OSError:
                time.sleep(0.1)


def _run_children(cgroup: bytes) -> None:
    for raw in NAMES:
        p = subprocess.run(
            [
                "capsh",
                "--drop=cap_sys_time",
                "--",
                "-c",
                'exec "$0" -c "$1" "$2" "$3"',
                sys.executable,
                CHILD,
                os.fsdecode(cgroup),
                raw.hex(),
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        assert "denied" in p.stdout, p.stderr


def test_serve_scrapes_and_logs_hostile_names(evil_cgroup: bytes) -> None:
    """/metrics stays 200 and valid UTF-8 with the cgroup's byte escaped; the log
    shows each comm escaped; /healthz stays 200 because scrapes work."""
    port = _free_port()
    log_path = Path(f"/tmp/capwatch-hostile-{os.getpid()}.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*CAPWATCH, "serve", "--listen", f"127.0.0.1:{port}", "--log-interval", "1"],
            stdout=log,
            stderr=subprocess.PIPE,
            cwd=REPO,
        )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if _get(port, "/healthz")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        _run_children(evil_cgroup)
        time.sleep(2.5)  # the walk names the new cgroup; one log interval ends
        for _ in range(3):
            code, body = _get(port, "/metrics")
            assert 200 == code, body[:500]
            text = body.decode("utf-8")
            _clean(text)
        escaped = "capwatch-test-ev\\\\xffil-"  # the exposition escapes the backslash
        assert any(
            ln.startswith("capwatch_checks_total{")
            and escaped in ln
            and 'capability="CAP_SETUID"' in ln
            for ln in text.splitlines()
        ), text
        assert any(
            ln.startswith("capwatch_denials_total{") and escaped in ln and "CAP_SYS_TIME" in ln
            for ln in text.splitlines()
        ), text
        assert 200 == _get(port, "/healthz")[0]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    raw_log = log_path.read_bytes()
    log_path.unlink()
    assert 0 == proc.returncode, err
    log_text = raw_log.decode("utf-8")
    _clean(log_text)
    comms = {
        rec.get("comm")
        for rec in map(json.loads, log_text.splitlines())
        if rec.get("capability") == "CAP_SYS_TIME"
    }
    assert set(NAMES.values()) <= comms


@pytest.mark.parametrize("mode", ["json", "table"])
def test_trace_shows_hostile_names_escaped(evil_cgroup: bytes, mode: str) -> None:
    """trace's JSON lines and table carry the comms escaped, no raw control byte."""
    # the table is what a terminal gets: stdout is a pty for it
    master, slave = pty.openpty() if mode == "table" else (-1, -1)
    proc = subprocess.Popen(
        [*CAPWATCH, "trace", "--cap", "CAP_SYS_TIME", *(["--json"] if mode == "json" else [])],
        stdout=subprocess.PIPE if mode == "json" else slave,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    chunks: list[bytes] = []
    if mode == "table":
        os.close(slave)
        reader = threading.Thread(target=_drain, args=(master, chunks), daemon=True)
        reader.start()
    assert proc.stderr is not None
    deadline = time.monotonic() + 60
    banner = b""
    while time.monotonic() < deadline and b"attached via" not in banner:
        line = proc.stderr.readline()
        if not line:
            break
        banner += line
    assert b"attached via" in banner, banner
    _run_children(evil_cgroup)
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert 0 == proc.returncode, err
    if mode == "table":
        reader.join(10)
        os.close(master)
        out = b"".join(chunks).replace(b"\r\n", b"\n")  # the tty's own line ends
    text = out.decode("utf-8")
    _clean(text)
    if mode == "json":
        recs = [json.loads(ln) for ln in text.splitlines()]
        assert set(NAMES.values()) <= {r["comm"] for r in recs}
        assert all(
            "capwatch-test-ev\\xffil-" in r["container"]
            for r in recs
            if r["comm"] in NAMES.values()
        )
    else:
        for shown in NAMES.values():
            assert shown[:15] in text
