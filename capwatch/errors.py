"""capwatch's own error types, all of them (one hierarchy under CapwatchError). OS and bcc exceptions become these at the one
boundary that touches them; the CLI prints ``str(err)`` as one line and exits
non-zero, never a traceback."""

from __future__ import annotations

__all__ = [
    "ApiError",
    "AttachError",
    "CapwatchError",
    "HeadersError",
    "K8sConfigError",
    "PolicyError",
    "PrivilegeError",
    "RecordingError",
    "RingBufferError",
    "UsageError",
]


class CapwatchError(Exception):
    """Base: the message is one line meant for the user."""

    exit_code = 1

    def __str__(self) -> str:
        return " ".join(super().__str__().split())  # never more than one line


class UsageError(CapwatchError):
    exit_code = 2


class PrivilegeError(CapwatchError):
    """Not allowed to load BPF programs."""


class HeadersError(CapwatchError):
    """No kernel header tree BCC can compile against."""


class AttachError(CapwatchError):
    """No attach mode worked (or the forced one failed)."""


class RingBufferError(CapwatchError):
    """The fd is not a usable ring-buffer map, or it could not be mapped."""


class PolicyError(CapwatchError):
    """A policy file that cannot be used: ``policy FILE:LINE: reason``."""

    def __init__(self, source: str, line: int | None, reason: str) -> None:
        self.source = source
        self.line = line
        self.reason = reason
        where = source if line is None else f"{source}:{line}"
        super().__init__(f"policy {where}: {reason}")


class K8sConfigError(CapwatchError):
    """No usable Kubernetes API configuration (not in a cluster, or token/CA missing)."""


class ApiError(CapwatchError):
    """The Kubernetes API server answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class RecordingError(CapwatchError):
    """A recording (capwatch record -o FILE) that cannot be read or written."""
