"""capwatch: see and explain Linux capability checks.

The data path, in the order to read it: bpf/capwatch.bpf.c (the kernel side),
capwatch.kernel.bpf (the one module that talks to bcc), capwatch.kernel.ringbuf (batch
reader), capwatch.decode.events (the record), capwatch.decode.caps / syscalls / procfs
(decoding), capwatch.attribution.workloads (containers), capwatch.sinks.render and cli.
"""

from __future__ import annotations

__version__ = "0.1.0"

from capwatch.decode.caps import cap_name, decode_mask, parse_cap, parse_mask
from capwatch.decode.events import Event
from capwatch.errors import CapwatchError

__all__ = [
    "CapwatchError",
    "Event",
    "__version__",
    "cap_name",
    "decode_mask",
    "parse_cap",
    "parse_mask",
]
