"""Flood-proofness of `capwatch serve` (issue 8, point 1).

    python -m bench.flood [--seconds 60]

An adversarial process floods allowed (CAP_SETUID) and denied (CAP_SYS_TIME)
checks at full speed, pinned to CPU 0, for SECONDS, while another process,
in a cgroup of its own, causes one real denial (date -s without CAP_SYS_TIME)
a second. Afterwards: every trickle denial must be in the metrics (exact) and
in the log (distinct line + summaries whose counts add up), losses must be
zero or counted, and serve's CPU and memory are reported. Exit 1 on failure.

With --json, prints the measured figures as one JSON object instead (no
verdict; exit 0 once measured): the test suite applies its own thresholds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from bench._harness import Cgroup, Serve, checks, compile_c, machine


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON, no verdict")
    a = ap.parse_args(argv)
    flood_bin = compile_c("flood")
    serve = Serve("--log-interval", "10s")
    trickle = Cgroup("capwatch-trickle")
    floodcg = Cgroup("capwatch-flood")
    try:
        before = serve.sample()
        t0 = time.monotonic()
        flood = floodcg.popen(
            [
                "taskset",
                "-c",
                "0",
                "capsh",
                "--drop=cap_sys_time",
                "--",
                "-c",
                f"exec {flood_bin} {a.seconds}",
            ],
            stdout=subprocess.PIPE,
        )
        sent = 0
        rss_max = before["rss_mib"]
        while time.monotonic() - t0 < a.seconds:
            r = trickle.run(["capsh", "--drop=cap_sys_time", "--", "-c", "exec date -s 2020-01-01"])
            if "Operation not permitted" not in r.stderr:
                print(f"trickle denial did not happen: {r.stderr}", file=sys.stderr)
                return 1
            sent += 1
            rss_max = max(rss_max, serve.sample()["rss_mib"])
            time.sleep(max(0.0, t0 + sent - time.monotonic()))
        out, _ = flood.communicate(timeout=a.seconds + 30)
        allowed, denied = (int(x) for x in out.split())
        elapsed = time.monotonic() - t0
        time.sleep(2)  # let the last denial drain
        after = serve.sample()
        m = serve.metrics()
        stop_s = serve.stop()
        log = serve.log_lines()
    finally:
        trickle.remove()
        floodcg.remove()

    got_metric = checks(m, container=trickle.label, capability="CAP_SYS_TIME", verdict="denied")
    got_denials = sum(
        v
        for k, v in m.items()
        if k.startswith("capwatch_denials_total{") and f'container="{trickle.label}"' in k
    )
    flood_allowed = checks(m, container=floodcg.label, capability="CAP_SETUID", verdict="allowed")
    flood_denied = checks(m, container=floodcg.label, capability="CAP_SYS_TIME", verdict="denied")
    t_lines = [x for x in log if x.get("container") == trickle.label]
    t_summary = sum(
        int(str(x.get("count", 0))) for x in t_lines if x.get("event") == "denial summary"
    )
    f_lines = [x for x in log if x.get("container") == floodcg.label]
    lost = {k: v for k, v in m.items() if k.startswith("capwatch_events_lost_total")}
    cpu = after["cpu_s"] - before["cpu_s"]
    lost_d = lost.get('capwatch_events_lost_total{ring="denials"}', 0)
    lost_c = lost.get('capwatch_events_lost_total{ring="checks"}', 0)
    if a.json:
        figures = {
            "seconds": elapsed,
            "trickle_sent": sent,
            "trickle_checks_total": got_metric,
            "trickle_denials_total": got_denials,
            "trickle_log_summary_count": t_summary,
            "flood_allowed_made": allowed,
            "flood_denied_made": denied,
            "flood_allowed_counted": flood_allowed,
            "flood_denied_counted": flood_denied,
            "flood_suppressed": m.get("capwatch_denials_suppressed_total", 0),
            "flood_log_lines": len(f_lines),
            "lost_denials": lost_d,
            "lost_checks": lost_c,
            "serve_cpu_s": cpu,
            "serve_rss_mib_start": before["rss_mib"],
            "serve_rss_mib_max": rss_max,
            "serve_rss_mib_end": after["rss_mib"],
            "serve_stop_s": stop_s,
        }
        print(json.dumps(figures))
        return 0
    ok = (
        got_metric == sent
        and got_denials == sent
        and t_summary == sent
        and flood_allowed == allowed
        and flood_denied == denied
        and lost.get('capwatch_events_lost_total{ring="denials"}', 0) == 0
    )
    print(f"machine: {machine()}; flood pinned to CPU 0 for {elapsed:.0f} s")
    print("| measure | value |")
    print("|---|---|")
    print(f"| flood checks made (allowed / denied) | {allowed:,} / {denied:,} |")
    print(
        f"| flood checks counted in metrics (allowed / denied) | {flood_allowed:,.0f} / {flood_denied:,.0f} |"
    )
    print(
        f"| flood denials rate-limited in the kernel (counted) | {m.get('capwatch_denials_suppressed_total', 0):,.0f} |"
    )
    print(f"| flood log lines | {len(f_lines)} |")
    print(
        f"| trickle denials caused / in checks_total / in denials_total / in log summaries | {sent} / {got_metric:.0f} / {got_denials:.0f} / {t_summary} |"
    )
    print(f"| events lost (denials ring / checks ring) | {lost_d:.0f} / {lost_c:.0f} |")
    print(f"| serve CPU during the flood | {cpu:.2f} s ({100 * cpu / elapsed:.1f}% of one core) |")
    print(
        f"| serve RSS start / max / end | {before['rss_mib']:.0f} / {rss_max:.0f} / {after['rss_mib']:.0f} MiB |"
    )
    print(f"| SIGTERM to exit | {stop_s:.2f} s |")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
