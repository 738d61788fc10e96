"""`capwatch decode`, `capwatch ps` and `capwatch doctor`: what a mask, a process or this kernel holds."""

from __future__ import annotations

import argparse
import json
from typing import Any, TextIO

from capwatch.decode.caps import CAPS, cap_name, decode_mask
from capwatch.errors import CapwatchError
from capwatch.text import visible

__all__ = ["cmd_decode", "cmd_doctor", "cmd_ps"]


# --- decode -----------------------------------------------------------------


def cmd_decode(args: argparse.Namespace, out: TextIO) -> int:
    dec = decode_mask(args.mask)
    if args.json:
        out.write(json.dumps(dec.to_dict()) + "\n")
        return 0
    out.write(f"mask 0x{dec.mask:016x}: {dec.headline()}\n")
    for c in CAPS:
        mark = "+" if c.number in dec.present else "-"
        out.write(f"  {mark} {c.number:>2} {c.name:<24} {c.summary}\n")
    for b in dec.unknown_bits:
        out.write(f"  + {b:>2} {cap_name(b):<24} (not a capability this table knows)\n")
    absent = ", ".join(cap_name(n) for n in dec.absent) or "none"
    out.write(f"absent: {absent}\n")
    return 0


# --- ps ---------------------------------------------------------------------


def _set_names(mask: int) -> str:
    dec = decode_mask(mask)
    if not dec.absent and not dec.unknown_bits:
        return "=all"
    if not dec.present and not dec.unknown_bits:
        return "none"
    if len(dec.absent) < len(dec.present):
        return "all except " + ",".join(cap_name(n)[4:].lower() for n in dec.absent)
    return ",".join(cap_name(n)[4:].lower() for n in dec.present)


def cmd_ps(args: argparse.Namespace, out: TextIO) -> int:
    from capwatch.decode import procfs

    explicit = bool(args.pids)
    pids = args.pids or procfs.list_pids(proc_root=args.proc_root)
    rows: list[dict[str, Any]] = []
    for pid in pids:
        try:
            st = procfs.read_status(pid, proc_root=args.proc_root)
        except CapwatchError:
            if explicit:
                raise
            continue  # the process exited while we listed
        rows.append(
            {
                "pid": st.pid,
                "name": visible(st.name),
                "uid": st.uid,
                **{k: f"{v:016x}" for k, v in st.caps().items()},
                "effective": [cap_name(n) for n in decode_mask(st.cap_eff).present],
                "bounding_lacks": [cap_name(n) for n in decode_mask(st.cap_bnd).absent],
            }
        )
        if not args.json:
            if len(rows) == 1:
                out.write(f"{'PID':>7} {'NAME':<15} {'UID':>5} {'CapEff':<16} EFFECTIVE\n")
            out.write(
                f"{st.pid:>7} {visible(st.name)[:15]:<15} {st.uid:>5} {st.cap_eff:016x} {_set_names(st.cap_eff)}\n"
            )
            if explicit:
                for k, v in st.caps().items():
                    out.write(f"{'':>7} {k}: {v:016x} {_set_names(v)}\n")
    if args.json:
        out.write(json.dumps(rows) + "\n")
    return 0


# --- doctor -----------------------------------------------------------------


def cmd_doctor(args: argparse.Namespace, out: TextIO) -> int:
    from capwatch.kernel.doctor import run_doctor

    report = run_doctor(kernel_headers=args.kernel_headers)
    if args.json:
        out.write(json.dumps(report.to_dict()) + "\n")
    else:
        out.write(report.render())
    return 0 if report.ok else 1
