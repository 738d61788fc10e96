#!/usr/bin/env python3
"""capwatch itself, as the benchmark runs it: a Session consuming in batches.

Not a peer, but run the same way as the peers (its own process, pinned by the
benchmark to the consumer CPU) so that CPU, RSS and start-up are measured alike.

    python -m bench.peers.capwatch_consumer [--all] --cgroup-id ID --cap N

Prints one JSON line once attached ({"attach_s", "mode"}); consumes until
SIGTERM or SIGINT, then prints one JSON line: records received per ring and
(pid << 8 | cap), the exact count map's value for (ID, N, allowed), the kernel's loss
statistics, and the CLOCK_MONOTONIC ns of the last batch received.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time

import numpy as np

from capwatch.decode.events import Batch
from capwatch.kernel.bpf import ProgramConfig
from capwatch.kernel.session import Session


def main() -> None:
    parser = argparse.ArgumentParser(description="capwatch Session consumer (benchmark)")
    parser.add_argument("--all", action="store_true", help="stream every check (trace --all)")
    parser.add_argument("--cgroup-id", type=int, required=True)
    parser.add_argument("--cap", type=int, required=True)
    parser.add_argument("--outcome", action="store_true", help="outcome mode (sys_exit hook)")
    parser.add_argument(
        "--unique", action="store_true", help="each distinct allowed check once (serve --profiles)"
    )
    parser.add_argument("--mode", default="auto")
    args = parser.parse_args()

    session = Session(ProgramConfig(emit_all=args.all, outcome=args.outcome, unique=args.unique), args.mode)
    print(json.dumps({"attach_s": session.attach_seconds, "mode": session.mode}), flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    by_ring: dict[str, dict[int, int]] = {}
    last_event_ns = 0

    def on_batch(ring: str, batch: Batch) -> None:
        # Touch every record once, vectorised: records per (pid, cap).
        nonlocal last_event_ns
        keys = (batch["pid"].astype(np.uint64) << np.uint64(8)) | (
            batch["cap"].astype(np.uint64) & np.uint64(0xFF)
        )
        uniq, counts = np.unique(keys, return_counts=True)
        tally = by_ring.setdefault(ring, {})
        for key, n in zip(uniq.tolist(), counts.tolist(), strict=True):
            tally[key] = tally.get(key, 0) + n
        last_event_ns = time.monotonic_ns()

    try:
        session.run(stop, on_batch)
        counts = session.program.read_counts()
        report = {
            "by_ring": by_ring,
            "count": counts.get((args.cgroup_id, args.cap, False), 0),
            "stats": session.program.read_stats(),
            "records_read": session.records_read(),
            "decode_errors": session.decode_errors(),
            "last_event_ns": last_event_ns,
        }
    finally:
        session.close()
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
