#!/usr/bin/env python3
"""Peer 2: a capability tracer written the way bcc's own tools are written.

One event per check built on the BPF stack and copied into a ring buffer with
ringbuf_output(); user space registers a Python callback with
open_ring_buffer() and polls; the callback decodes each record with
``table.event(data)`` and tallies it. bcc's tools/capable.py prints every
event instead; here the tally stands in for the print so the terminal is not
what gets measured. Same hook as capwatch (raw tracepoint cap_capable) and the
same 16 MiB of ring, so what differs is the consumer.

Run by bench/bench_overhead.py:  bcc_ringbuf_peer.py [--pages 4096]
Prints "ready" once attached; on SIGTERM or SIGINT drains the ring and prints
one JSON line: {"by_pid_cap": {"pid/cap": [allowed, denied]}, "events": n,
"last_event_ns": CLOCK_MONOTONIC ns of the last poll that returned events}.
"""

from __future__ import annotations

import argparse
import json
import signal
import time
from typing import Any

from bcc import BPF

BPF_TEXT = r"""
#include <uapi/linux/ptrace.h>
#include <linux/sched.h>

struct data_t {
    u32 tgid;
    u32 pid;
    u32 uid;
    int cap;
    int ret;
    char comm[TASK_COMM_LEN];
};
BPF_RINGBUF_OUTPUT(events, RING_PAGES);

/* cap_capable raw tracepoint (Linux 6.14): cred, target_ns, capable_ns, cap, ret */
RAW_TRACEPOINT_PROBE(cap_capable)
{
    struct data_t data = {};
    u64 pid_tgid = bpf_get_current_pid_tgid();
    data.tgid = pid_tgid >> 32;
    data.pid = pid_tgid;
    data.uid = bpf_get_current_uid_gid();
    data.cap = ctx->args[3];
    data.ret = ctx->args[4];
    bpf_get_current_comm(&data.comm, sizeof(data.comm));
    events.ringbuf_output(&data, sizeof(data), 0);
    return 0;
}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description="bcc ring-buffer callback tracer (benchmark peer)")
    parser.add_argument("--pages", type=int, default=4096, help="ring size in pages")
    args = parser.parse_args()

    b = BPF(text=BPF_TEXT, cflags=[f"-DRING_PAGES={args.pages}"])
    by_key: dict[tuple[int, int], list[int]] = {}

    def handle_event(ctx: Any, data: Any, size: int) -> None:
        event = b["events"].event(data)
        key = (event.tgid, event.cap)
        tally = by_key.get(key)
        if tally is None:
            tally = by_key[key] = [0, 0]
        tally[1 if event.ret else 0] += 1

    b["events"].open_ring_buffer(handle_event)

    exiting = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal exiting
        exiting = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print("ready", flush=True)

    seen = 0
    last_event_ns = 0
    while not exiting:
        b.ring_buffer_poll(100)
        total = sum(a + d for a, d in by_key.values())  # a few dozen pids: cheap per poll
        if total != seen:
            seen = total
            last_event_ns = time.monotonic_ns()
    b.ring_buffer_consume()
    events = sum(a + d for a, d in by_key.values())
    print(
        json.dumps(
            {
                "by_pid_cap": {f"{p}/{c}": v for (p, c), v in by_key.items()},
                "events": events,
                "last_event_ns": last_event_ns,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
