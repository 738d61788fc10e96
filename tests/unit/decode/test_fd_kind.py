"""procfs.fd_kind on this process's own descriptors (real /proc, no root needed)."""

from __future__ import annotations

import os
import socket

from capwatch.decode.procfs import fd_kind


def test_netlink_socket() -> None:
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as s:
        s.bind((0, 0))  # listed in /proc/PID/net/netlink once it has a port
        assert "netlink" == fd_kind(os.getpid(), s.fileno())


def test_other_socket_family() -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        assert "socket" == fd_kind(os.getpid(), s.fileno())


def test_pipe_and_file() -> None:
    r, w = os.pipe()
    try:
        assert ("file", "file") == (fd_kind(os.getpid(), w), fd_kind(os.getpid(), r))
    finally:
        os.close(r)
        os.close(w)
    fd = os.open("/dev/null", os.O_WRONLY)
    try:
        assert "file" == fd_kind(os.getpid(), fd)
    finally:
        os.close(fd)


def test_gone_is_unknown(tmp_path: object) -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    assert fd_kind(os.getpid(), w) is None  # closed
    assert fd_kind(2**22 + 12345, 1) is None  # no such process
