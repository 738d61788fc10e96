"""Glue between the tracer and container attribution: identity of a cgroup id
as the columns and JSON fields users see, and the workload filters."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from capwatch.render import Identity, default_identity

__all__ = ["make_identity"]


def make_identity(
    args: argparse.Namespace,
) -> tuple[Callable[[int], Identity], Callable[[dict[str, Any]], bool]]:
    identity = default_identity

    def keep(rec: dict[str, Any]) -> bool:
        return True

    return identity, keep
