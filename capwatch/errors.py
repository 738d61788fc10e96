"""capwatch's own error types. OS and bcc exceptions become these at the one
boundary that touches them; the CLI prints ``str(err)`` as one line and exits
non-zero, never a traceback."""

from __future__ import annotations

__all__ = ["AttachError", "CapwatchError", "HeadersError", "PrivilegeError", "UsageError"]


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
