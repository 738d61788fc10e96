"""A hostile tenant against `capwatch serve`: laundering and blinding (issue 12, findings 1 and 4).

    python -m bench.hostile [--seconds 10] [--flooders 100]

1. Laundering: a non-root process floods "expected" CAP_SYS_ADMIN denials (writable
   private mmaps, bench/launder.c) and tries mount(2) four times a second. Every mount
   denial must be counted unexpected, and every denial of its cgroup counted once.
2. Blinding: FLOODERS non-root processes in one cgroup flood eight kinds of denial
   (bench/denyflood.c) while a victim in another cgroup is denied CAP_SYS_TIME three
   times (`date -s` without it). All three must be in the metrics and in the log.

Prints a Markdown table (docs/hardening.md). Exit 1 on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from bench._harness import Cgroup, Serve, compile_c, machine

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def labelled(metrics: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the series of ``name`` whose labels include ``labels``."""
    total = 0.0
    for key, value in metrics.items():
        m = re.fullmatch(rf"{name}\{{(.*)\}}", key)
        if m is None:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(1)))
        if all(have.get(k) == v for k, v in labels.items()):
            total += value
    return total


def settle(serve: Serve, label: str, cap: str) -> dict[str, float]:
    """Scrape until the cgroup's classified denials equal its counted ones (15 s at most)."""
    deadline = time.monotonic() + 15
    while True:
        m = serve.metrics()
        checked = labelled(
            m, "capwatch_checks_total", capability=cap, verdict="denied", container=label
        )
        classified = labelled(m, "capwatch_denials_total", capability=cap, container=label)
        if (checked and checked == classified) or time.monotonic() > deadline:
            return m
        time.sleep(0.5)


def runnable(path: str) -> str:
    """compile_c's directory is private: let the non-root attacker reach its binary."""
    Path(path).parent.chmod(0o755)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--flooders", type=int, default=100)
    a = ap.parse_args(argv)
    launder = runnable(compile_c("launder"))
    denyflood = runnable(compile_c("denyflood"))
    serve = Serve("--log-interval", "1s")
    rows: list[tuple[str, str]] = []
    ok = True
    cgs: list[Cgroup] = []
    try:
        # 1. laundering
        cg = Cgroup("capwatch-launder")
        cgs.append(cg)
        p = cg.popen([*NOBODY, launder, str(a.seconds), "0.25"], stdout=subprocess.PIPE)
        out, _ = p.communicate(timeout=a.seconds + 60)
        maps, mounts = (int(x) for x in out.split())
        m = settle(serve, cg.label, "CAP_SYS_ADMIN")
        checked = labelled(
            m,
            "capwatch_checks_total",
            capability="CAP_SYS_ADMIN",
            verdict="denied",
            container=cg.label,
        )
        unexpected = labelled(
            m,
            "capwatch_denials_total",
            capability="CAP_SYS_ADMIN",
            expected="false",
            container=cg.label,
        )
        expected = labelled(
            m,
            "capwatch_denials_total",
            capability="CAP_SYS_ADMIN",
            expected="true",
            container=cg.label,
        )
        rows += [
            ("laundering: mmap denials made / mount denials made", f"{maps:,} / {mounts:,}"),
            (
                "laundering: CAP_SYS_ADMIN denied in checks_total / expected / unexpected",
                f"{checked:,.0f} / {expected:,.0f} / {unexpected:,.0f}",
            ),
        ]
        ok &= unexpected == mounts and checked == expected + unexpected and maps <= expected
        # 2. blinding by volume
        flood_cg, victim_cg = Cgroup("capwatch-flooders"), Cgroup("capwatch-victim")
        cgs += [flood_cg, victim_cg]
        before = serve.metrics()
        floods = [
            flood_cg.popen([*NOBODY, denyflood, str(a.seconds)], stdout=subprocess.PIPE)
            for _ in range(a.flooders)
        ]
        time.sleep(a.seconds / 3)
        for _ in range(3):
            r = victim_cg.run(
                ["capsh", "--drop=cap_sys_time", "--", "-c", "exec date -s 2020-01-01"]
            )
            ok &= "Operation not permitted" in r.stderr
            time.sleep(0.2)
        made = sum(int(f.communicate(timeout=a.seconds + 60)[0]) for f in floods)
        m = settle(serve, victim_cg.label, "CAP_SYS_TIME")
        time.sleep(2)  # the log's interval
        m = serve.metrics()
        victim_metrics = labelled(
            m,
            "capwatch_denials_total",
            capability="CAP_SYS_TIME",
            expected="false",
            container=victim_cg.label,
        )
        logged = [
            json.loads(ln) for ln in serve.log_path.read_text().splitlines() if ln.startswith("{")
        ]
        victim_log = sum(
            1
            for r in logged
            if r.get("container") == victim_cg.label and r.get("event") == "denial"
        )
        flood_checked = labelled(
            m, "capwatch_checks_total", verdict="denied", container=flood_cg.label
        )
        flood_classified = labelled(m, "capwatch_denials_total", container=flood_cg.label)
        held = m["capwatch_denials_suppressed_total"] - before["capwatch_denials_suppressed_total"]
        lost = labelled(m, "capwatch_events_lost_total", ring="denials") - labelled(
            before, "capwatch_events_lost_total", ring="denials"
        )
        rows += [
            (f"blinding: {a.flooders} flooders' denials made", f"{made:,}"),
            (
                "blinding: flooders' denials in checks_total / in denials_total",
                f"{flood_checked:,.0f} / {flood_classified:,.0f}",
            ),
            ("blinding: held back in the kernel (counted by syscall)", f"{held:,.0f}"),
            ("blinding: denial ring reservations lost", f"{lost:,.0f}"),
            (
                "blinding: victim denials caused / in denials_total / log lines",
                f"3 / {victim_metrics:.0f} / {victim_log}",
            ),
        ]
        ok &= victim_metrics == 3 and victim_log >= 1 and flood_checked == flood_classified
        ok &= made <= flood_checked
    finally:
        serve.proc.terminate()
        serve.proc.wait(timeout=30)
        for c in cgs:
            c.remove()
        if os.path.exists("/tmp/capwatch-flood-mknod"):
            os.unlink("/tmp/capwatch-flood-mknod")
    print(f"machine: {machine()}; {a.seconds:g} s per attack")
    print("| measure | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
