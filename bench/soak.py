"""Soak `capwatch serve` (issue 8, point 2).

    python -m bench.soak [--minutes 10] [--series-ttl 30]

A steady mixed load for MINUTES: a process making ~100,000 allowed checks a
second in bursts, a host denial every half second, and a podman container
started and removed every 10 s (each denied CAP_SYS_TIME once), while a real
Prometheus scrapes serve every second. serve's RSS and open fds are sampled
every 5 s. Passes when, after a warm-up (a fifth of the run, at least 30 s),
RSS grows less than 5%, fds do not grow, every container's denial was
counted, and the series of containers removed more than TTL + 15 s ago have
expired. Prints a table; exit 1 on failure.

With --json, prints the measured figures as one JSON object instead (no
verdict; exit 0 once measured): the test suite applies its own thresholds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

from bench._harness import Serve, free_port, machine
from tests.kernel.podman import NO_SECCOMP, busybox_rootfs
from tests.kernel.podman import RUN as PODMAN_RUN

RUN = [*PODMAN_RUN, *NO_SECCOMP]
LOAD = r"""
import os, time
while True:
    for _ in range(10000):
        os.setuid(0)
    time.sleep(0.1)
"""


def rootfs() -> Path:
    return busybox_rootfs(Path(tempfile.mkdtemp(prefix="capwatch-soak-rootfs-")) / "root")


class Prometheus:
    def __init__(self, target_port: int) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="capwatch-soak-prom-"))
        self.port = free_port()
        (self.dir / "p.yml").write_text(
            "global: {scrape_interval: 1s}\nscrape_configs:\n  - job_name: capwatch\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]\n"
        )
        self.proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={self.dir / 'p.yml'}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def query(self, expr: str) -> list[dict[str, object]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": expr}
        )
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.loads(r.read())["data"]["result"]  # type: ignore[no-any-return]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=15)
        shutil.rmtree(self.dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--series-ttl", type=float, default=30.0)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON, no verdict")
    a = ap.parse_args(argv)
    total = a.minutes * 60
    warm = max(30.0, total / 5)
    fs = rootfs()
    serve = Serve("--series-ttl", f"{a.series_ttl:g}s", "--log-interval", "10s")
    prom = Prometheus(serve.port)
    load = subprocess.Popen([sys.executable, "-c", LOAD])
    stop = threading.Event()
    host_denials = 0

    def deny() -> None:
        nonlocal host_denials
        while not stop.wait(0.5):
            subprocess.run(
                ["capsh", "--drop=cap_sys_time", "--", "-c", "exec date -s 2020-01-01"],
                capture_output=True,
                check=False,
            )
            host_denials += 1

    threading.Thread(target=deny, daemon=True).start()
    samples: list[tuple[float, dict[str, float]]] = []
    containers: list[tuple[str, float]] = []  # name, removed at
    t0 = time.monotonic()
    next_container = t0
    i = 0
    try:
        while time.monotonic() - t0 < total:
            now = time.monotonic()
            if now >= next_container:
                name = f"capwatch-soak-{i}"
                i += 1
                subprocess.run(
                    [
                        *RUN,
                        "--rm",
                        "--name",
                        name,
                        "--rootfs",
                        str(fs),
                        "sh",
                        "-c",
                        "date -s 2020-01-01; sleep 1",
                    ],
                    capture_output=True,
                    check=False,
                    timeout=60,
                )
                containers.append((name, time.monotonic()))
                next_container = now + 10
            samples.append((time.monotonic() - t0, serve.sample()))
            time.sleep(max(0.0, min(5.0, next_container - time.monotonic())))
        time.sleep(2)
        m = serve.metrics()
        end = time.monotonic()
        up = prom.query('up{job="capwatch"}')
        scraped = prom.query("count(capwatch_build_info)")
    finally:
        stop.set()
        load.terminate()
        load.wait()
        prom.stop()
        stop_s = serve.stop()
        shutil.rmtree(fs, ignore_errors=True)

    series_names = {k.split('container="', 1)[1].split('"', 1)[0] for k in m if 'container="' in k}
    expired_due = [n for n, t in containers if end - t > a.series_ttl + 15]
    recent = [n for n, t in containers if end - t < a.series_ttl - 2]
    not_expired = [n for n in expired_due if n in series_names]
    missing_recent = [n for n in recent if n not in series_names]
    after = [s for t, s in samples if t >= warm]
    base, last = after[0] if after else samples[0][1], samples[-1][1]
    rss_growth = (last["rss_mib"] - base["rss_mib"]) / base["rss_mib"] * 100
    fd_growth = last["fds"] - base["fds"]
    lost = sum(v for k, v in m.items() if k.startswith("capwatch_events_lost_total"))
    if a.json:
        figures = {
            "seconds": end - t0,
            "warm_up_s": warm,
            "series_ttl_s": a.series_ttl,
            "containers": len(containers),
            "host_denials": host_denials,
            "rss_mib_after_warm_up": base["rss_mib"],
            "rss_mib_end": last["rss_mib"],
            "fds_after_warm_up": base["fds"],
            "fds_end": last["fds"],
            "serve_cpu_s": last["cpu_s"] - samples[0][1]["cpu_s"],
            "removed_past_ttl": expired_due,
            "removed_past_ttl_still_exported": not_expired,
            "recent": recent,
            "recent_without_series": missing_recent,
            "prometheus_up": [float(str(r["value"][1])) for r in up],  # type: ignore[index]
            "events_lost": lost,
            "serve_stop_s": stop_s,
        }
        print(json.dumps(figures))
        return 0
    ok = rss_growth < 5 and fd_growth <= 0 and not not_expired and not missing_recent and bool(up)
    print(
        f"machine: {machine()}; soak {total / 60:.1f} min, warm-up {warm:.0f} s, series TTL {a.series_ttl:g} s"
    )
    print("| measure | value |")
    print("|---|---|")
    print(f"| containers started and removed | {len(containers)} |")
    print(f"| host denials caused | {host_denials} |")
    print(
        f"| RSS after warm-up / at end | {base['rss_mib']:.1f} / {last['rss_mib']:.1f} MiB ({rss_growth:+.2f}%) |"
    )
    print(f"| open fds after warm-up / at end | {base['fds']:.0f} / {last['fds']:.0f} |")
    print(f"| serve CPU over the run | {last['cpu_s'] - samples[0][1]['cpu_s']:.1f} s |")
    print(
        f"| series of removed containers past TTL still exported | {len(not_expired)} of {len(expired_due)} |"
    )
    print(
        f"| recent containers with series | {len(recent) - len(missing_recent)} of {len(recent)} |"
    )
    print(
        f"| Prometheus scraping (up / capwatch_build_info series) | {len(up)} / {scraped[0]['value'][1] if scraped else 0} |"
    )  # type: ignore[index]
    print(f"| events lost | {lost:.0f} |")
    print(f"| SIGTERM to exit | {stop_s:.2f} s |")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
