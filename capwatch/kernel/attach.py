"""Attach-mode selection: pure logic, no kernel (unit-tested with fake loaders).

Preference (docs/design.md, "Kernel side"): the raw tracepoint cap_capable (Linux 6.14+), the
regular tracepoint capability:cap_capable, fexit on cap_capable, then
kprobe + kretprobe on cap_capable (older kernels).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from capwatch.errors import AttachError, UsageError

__all__ = ["MODES", "Attempt", "Selection", "select_mode"]

MODES: tuple[str, ...] = ("raw_tracepoint", "tracepoint", "fexit", "kprobe")
T = TypeVar("T")


@dataclass(frozen=True)
class Attempt:
    mode: str
    error: str | None  # None: it worked


@dataclass(frozen=True)
class Selection(Generic[T]):
    mode: str
    result: T
    attempts: tuple[Attempt, ...]  # every mode tried, in order, with its reason


def select_mode(requested: str, try_mode: Callable[[str], T]) -> Selection[T]:
    """Try ``requested`` (or each mode in order for ``auto``) with ``try_mode``.

    ``try_mode`` returns the loaded program or raises an exception whose
    message says why the mode failed. Raises AttachError with a one-line
    summary of every attempt when nothing works.
    """
    if requested != "auto" and requested not in MODES:
        raise UsageError(f"unknown attach mode {requested!r}: choose auto, {', '.join(MODES)}")
    order = MODES if requested == "auto" else (requested,)
    attempts: list[Attempt] = []
    for mode in order:
        try:
            result = try_mode(mode)
        except Exception as exc:
            attempts.append(Attempt(mode, _one_line(exc)))
            continue
        attempts.append(Attempt(mode, None))
        return Selection(mode, result, tuple(attempts))
    summary = "; ".join(f"{a.mode}: {a.error}" for a in attempts)
    if requested == "auto":
        raise AttachError(f"no attach mode works on this kernel ({summary})")
    raise AttachError(f"attach mode {requested} failed ({summary})")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
