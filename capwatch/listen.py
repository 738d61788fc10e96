"""``--listen`` as a type: HOST:PORT parsed when the arguments are (pure, stdlib)."""

from __future__ import annotations

import argparse
import ipaddress
import re
import socket
from typing import NamedTuple

from capwatch.errors import UsageError

__all__ = ["Listen", "listen_type", "parse_listen"]

_HOST = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


class Listen(NamedTuple):
    """Where to listen: ``host`` without brackets; ``family`` AF_INET, AF_INET6,
    or AF_UNSPEC for a host name (resolved when binding)."""

    host: str
    port: int
    family: int

    def __str__(self) -> str:
        return (
            f"[{self.host}]:{self.port}"
            if self.family == socket.AF_INET6
            else f"{self.host}:{self.port}"
        )


def parse_listen(text: str) -> Listen:
    """'127.0.0.1:9649', '[::1]:9649', 'localhost:9649' -> Listen; UsageError otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--listen {text!r}: expected HOST:PORT with a port from 0 to 65535")
    if not host:
        raise UsageError(f"--listen {text!r}: give the address too (e.g. 127.0.0.1:{port})")
    if host.startswith("[") and host.endswith("]"):
        try:
            return Listen(str(ipaddress.IPv6Address(host[1:-1])), int(port), socket.AF_INET6)
        except ValueError:
            raise UsageError(f"--listen {text!r}: not an IPv6 address in brackets") from None
    if ":" in host:
        raise UsageError(f"--listen {text!r}: put an IPv6 address in brackets, e.g. [::1]:{port}")
    try:
        return Listen(str(ipaddress.IPv4Address(host)), int(port), socket.AF_INET)
    except ValueError:
        pass
    if host[0].isdigit() and host.replace(".", "").isdigit():
        raise UsageError(f"--listen {text!r}: not an IPv4 address")
    if not _HOST.match(host):
        raise UsageError(f"--listen {text!r}: not an address or host name")
    return Listen(host, int(port), socket.AF_UNSPEC)


def listen_type(text: str) -> Listen:
    """parse_listen for argparse (``type=``): the error is argparse's one line."""
    try:
        return parse_listen(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
