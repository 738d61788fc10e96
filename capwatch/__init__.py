"""capwatch: see and explain Linux capability checks.

The data path, in the order to read it: bpf/capwatch.bpf.c (the kernel side),
capwatch._bpf (the one module that talks to bcc), capwatch._ringbuf (batch
reader), capwatch.events (the record), capwatch.caps / syscalls / procfs
(decoding), capwatch.workloads (containers), capwatch.render and cli.
"""

from __future__ import annotations

__version__ = "0.1.0"

from capwatch.caps import cap_name, decode_mask, parse_cap, parse_mask
from capwatch.errors import CapwatchError
from capwatch.events import Event

__all__ = [
    "CapwatchError",
    "Event",
    "__version__",
    "cap_name",
    "decode_mask",
    "parse_cap",
    "parse_mask",
]
