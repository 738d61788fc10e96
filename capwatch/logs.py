"""capwatch's one logging set-up (structlog).

Every log line capwatch writes goes through :func:`make_logger`'s processor
chain: ``time`` (RFC 3339 UTC, unless the caller gave one), ``level``,
``event`` first, then the fields; JSON lines, or structlog's console renderer
on a terminal. Commands call :func:`configure` once, so module loggers
(``structlog.get_logger(__name__)`` in attribution, names, Kubernetes...)
write to the same stream in the same format: stdout for ``serve`` (the
DaemonSet's log), stderr for the interactive commands (their stdout is data).
The denial log builds its logger with :func:`make_logger` too, on its own
stream.
"""

from __future__ import annotations

import json
import logging
from collections.abc import MutableMapping
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

import structlog

from capwatch.text import visible_fields

__all__ = ["Format", "configure", "iso_time", "make_logger", "processors"]

Format = Literal["auto", "json", "console"]


def iso_time(t: float) -> str:
    """RFC 3339 UTC with milliseconds: 2025-01-02T03:04:05.678Z."""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _add_time(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    if "time" not in event_dict:
        import time

        event_dict["time"] = iso_time(time.time())
    return event_dict


def _lead_fields(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """time, level, event first: what a reader scans for."""
    head = {k: event_dict.pop(k) for k in ("time", "level", "event") if k in event_dict}
    head.update(event_dict)
    return head


def _dumps(obj: Any, **_kw: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, default=str)


def _resolve(stream: TextIO, fmt: Format) -> Literal["json", "console"]:
    if fmt != "auto":
        return fmt
    isatty = getattr(stream, "isatty", None)
    return "console" if isatty is not None and isatty() else "json"


def processors(stream: TextIO, fmt: Format = "auto") -> list[Any]:
    """The processor chain, ending in the renderer for ``stream``."""
    renderer: Any
    if _resolve(stream, fmt) == "console":
        renderer = structlog.dev.ConsoleRenderer(
            colors=bool(getattr(stream, "isatty", lambda: False)()),
            timestamp_key="time",
            sort_keys=False,
        )
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_dumps)
    # visible_fields: comm, cgroup paths and names are any bytes; lines stay valid
    # UTF-8 and carry no terminal control sequence, in JSON and on a console alike
    return [structlog.processors.add_log_level, _add_time, _lead_fields, visible_fields, renderer]


def make_logger(stream: TextIO, fmt: Format = "auto") -> Any:
    """A logger of its own on ``stream`` (the denial log), same chain as the rest."""
    return structlog.wrap_logger(
        structlog.PrintLogger(stream),
        processors=processors(stream, fmt),
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        context_class=dict,
        cache_logger_on_first_use=True,
    )


def configure(stream: TextIO, fmt: Format = "auto") -> None:
    """Point every module logger at ``stream``; called once by each command."""
    structlog.configure(
        processors=processors(stream, fmt),
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        context_class=dict,
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
