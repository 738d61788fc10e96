"""Asynchronous refusals judged by the netlink reply itself (CW_F_REPLY), real processes.

rtnetlink checks CAP_NET_ADMIN inside sendmsg/sendto, which return the byte
count; the EPERM comes back in an NLMSG_ERROR message that a later
recvmsg/recvfrom reads. capwatch reads that message's error from the
process's buffer when the recv returns (bpf/capwatch.bpf.c cw_async_reply)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tests.helpers import REPO, require_root, require_tool

pytestmark = [pytest.mark.kernel]

#: Creates a dummy link over a raw rtnetlink socket (sendto, then recvfrom of
#: the reply), prints the reply's error and exits 0 whatever it said: a
#: program that copes with the refusal, so its exit status tells nothing.
NETLINK_CLIENT = r"""
import socket, struct, sys
def attr(t, payload):
    n = 4 + len(payload)
    return struct.pack("=HH", n, t) + payload + b"\0" * ((4 - n % 4) % 4)
name = sys.argv[1].encode() + b"\0"
body = struct.pack("=BxHiII", 0, 0, 0, 0, 0)  # struct ifinfomsg
body += attr(3, name)  # IFLA_IFNAME
body += attr(18, attr(1, b"dummy\0"))  # IFLA_LINKINFO { IFLA_INFO_KIND }
flags = 0x1 | 0x4 | 0x200 | 0x400  # REQUEST | ACK | EXCL | CREATE
msg = struct.pack("=IHHII", 16 + len(body), 16, flags, 1, 0) + body  # RTM_NEWLINK
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
s.send(msg)
reply = s.recv(65536)
ln, typ = struct.unpack_from("=IH", reply)
err = struct.unpack_from("=i", reply, 16)[0] if typ == 2 else None
print("reply", typ, err)
sys.exit(0)
"""


#: Pipelines two requests before reading any reply: a lookup of a link that does
#: not exist (answered ENODEV, no capability asked), then the dummy link's
#: creation (refused CAP_NET_ADMIN); then reads both replies, in that order.
NETLINK_PIPELINED = r"""
import socket, struct, sys
def attr(t, payload):
    n = 4 + len(payload)
    return struct.pack("=HH", n, t) + payload + b"\0" * ((4 - n % 4) % 4)
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
get = struct.pack("=BxHiII", 0, 0, 987654, 0, 0)
s.send(struct.pack("=IHHII", 16 + len(get), 18, 0x1 | 0x4, 7, 0) + get)  # RTM_GETLINK
body = struct.pack("=BxHiII", 0, 0, 0, 0, 0) + attr(3, sys.argv[1].encode() + b"\0")
body += attr(18, attr(1, b"dummy\0"))
s.send(struct.pack("=IHHII", 16 + len(body), 16, 0x1 | 0x4 | 0x200 | 0x400, 8, 0) + body)
for _ in range(2):
    r = s.recv(65536)
    print("reply", struct.unpack_from("=IHHII", r), struct.unpack_from("=i", r, 16)[0])
"""


def explain(*cmd: str) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    r = subprocess.run(
        [sys.executable, "-m", "capwatch.commands.cli", "explain", "--json", "--", *cmd],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=False,
    )
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines, (r.stdout, r.stderr)
    found: list[dict[str, Any]] = json.loads(lines[-1])
    return r, [e for e in found if e.get("capability") == "CAP_NET_ADMIN"]


@pytest.fixture(autouse=True)
def _root() -> None:
    require_root()
    require_tool("capsh")


def test_reply_says_eperm_although_the_process_exits_0() -> None:
    """A netlink client refused CAP_NET_ADMIN that reads the EPERM reply and exits 0 is a
    cause: the reply said so. Judged by the exit status alone it was "unknown"."""
    r, exps = explain(
        "capsh",
        "--drop=cap_net_admin",
        "--",
        "-c",
        f"exec {sys.executable} -c '{NETLINK_CLIENT}' cwnl13",
    )
    subprocess.run(["ip", "link", "del", "cwnl13"], capture_output=True, check=False)
    assert 0 == r.returncode, r.stderr
    assert exps, r.stdout
    assert {("cause", True, "EPERM", "sendto")} == {
        (e["role"], e["asynchronous"], e["reply"], e["syscall"]) for e in exps
    }
    assert all(f"the reply {e['comm']} read said EPERM" in e["summary"] for e in exps), exps


def test_ip_link_add_reply_read_with_recvmsg() -> None:
    """iproute2 reads the reply with recvmsg (a peek without a buffer first): the
    reply's EPERM is found through the message's first iovec."""
    require_tool("ip")
    r, exps = explain(
        "capsh", "--drop=cap_net_admin", "--", "-c", "exec ip link add cwdummy14 type dummy"
    )
    assert 2 == r.returncode, r.stderr
    # ip first sends an empty RTM_NEWLINK with sendto (refused too, each request
    # paired with its own reply), then the real request with sendmsg
    assert {("cause", "EPERM")} == {(e["role"], e["reply"]) for e in exps}, exps
    assert "sendmsg" in {e["syscall"] for e in exps}, exps


def explain_fsetid(tmp_path: Any, script: str) -> tuple[list[dict[str, Any]], int]:
    """Run ``script`` (with $F a setuid file) under capsh --drop=cap_fsetid in explain:
    each write to $F succeeds and the kernel drops the setuid bit, without CAP_FSETID."""
    f = tmp_path / "suid"
    f.write_text("")
    f.chmod(0o4755)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "capwatch.commands.cli",
            "explain",
            "--json",
            "--",
            "capsh",
            "--drop=cap_fsetid",
            "--",
            "-c",
            f"F={f}; {script}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=False,
    )
    assert "Traceback" not in r.stderr, r.stderr
    assert 0 == f.stat().st_mode & 0o4000  # the kernel went on without CAP_FSETID
    found = json.loads(r.stdout.strip().splitlines()[-1])
    fsetid = [e for e in found if e.get("capability") == "CAP_FSETID"]
    assert fsetid, r.stdout
    return fsetid, r.returncode


def test_write_to_a_file_is_a_probe(tmp_path: Any) -> None:
    """The fd is still open when capwatch looks: a file, so a probe at once. Judged as a
    possible netlink request it was a cause, since the shell exited 3."""
    exps, rc = explain_fsetid(tmp_path, "exec 5>>$F; echo x >&5; sleep 1; exit 3")
    assert 3 == rc
    assert {("write", "probe", False)} == {
        (e["syscall"], e["role"], e["asynchronous"]) for e in exps
    }, exps


def test_write_by_a_process_gone_at_once_is_never_a_cause(tmp_path: Any) -> None:
    """The shell exits right after the write: its fd cannot be read any more, and no
    netlink reply was read. Unknown (or a probe if the fd was still seen), never a
    cause: a file takes writes too."""
    exps, rc = explain_fsetid(tmp_path, "echo x >> $F; exit 3")
    assert 3 == rc
    assert {"write"} == {e["syscall"] for e in exps}
    assert {e["role"] for e in exps} <= {"unknown", "probe"}, exps


def test_pipelined_requests_each_get_their_own_reply() -> None:
    """The reply read first answers an earlier request (ENODEV, seq 7); the denied
    request's own reply (seq 8) says EPERM: matched by sequence number, a cause.
    Taking the first reply read, it was called a probe ("refused with ENODEV")."""
    r, exps = explain(
        "capsh",
        "--drop=cap_net_admin",
        "--",
        "-c",
        f"exec {sys.executable} -c '{NETLINK_PIPELINED}' cwnl15",
    )
    subprocess.run(["ip", "link", "del", "cwnl15"], capture_output=True, check=False)
    assert 0 == r.returncode, r.stderr
    assert {("cause", "EPERM", "sendto")} == {
        (e["role"], e["reply"], e["syscall"]) for e in exps
    }, exps
