"""The metrics endpoint under slow clients and a GET flood (issue 12, finding 5).

    python -m bench.endpoint [--seconds 30] [--slow 200] [--flood 8]
    python -m bench.endpoint --compare OLD_REV [--seconds 10]

Default: a real `capwatch serve` on loopback. For SECONDS, ``--slow`` clients
hold connections open sending one header byte a second (slowloris; reopened
when cut), ``--flood`` threads GET /metrics back to back (at most 200,000
requests), a prober makes one real scrape a second and times it, and a process
in a cgroup of its own is denied CAP_SYS_TIME twice a second (the trickle).
Afterwards: every trickle denial must be in checks_total, denials_total and the
log summaries, every probe must have answered 200, and serve's RSS must stay
under the DaemonSet's memory limit (512 MiB). Exit 1 otherwise.

``--compare OLD_REV``: the same attack on a stand-alone MetricsServer of
this tree and of ``git show OLD_REV:capwatch/server.py``, each in a child
process with a synthetic 20 ms scrape, to compare the two designs
(probe latency, scrapes computed, threads, RSS).

Loopback only; bounded in time and in count.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from bench._harness import REPO, Cgroup, Serve, checks, machine

POD_MEMORY_LIMIT_MIB = 512  # deploy/kubernetes/base/daemonset.yaml
MAX_FLOOD_REQUESTS = 200_000
LOST_DENIALS = 'capwatch_events_lost_total{ring="denials"}'


class Attack:
    """Slow clients and a GET flood against 127.0.0.1:port, plus a timed prober."""

    def __init__(self, port: int, *, slow: int, flood: int) -> None:
        self.port = port
        self.slow = slow
        self.flood = flood
        self.stop = threading.Event()
        self.flood_status: Counter[str] = Counter()
        self.slow_cut = 0  # slow connections the server closed (then reopened)
        self.slow_open_max = 0
        self.probe_ms: list[float] = []
        self.probe_status: Counter[str] = Counter()
        self._lock = threading.Lock()

    def run(self, seconds: float) -> None:
        threads = [threading.Thread(target=self._slowloris, daemon=True)]
        threads += [threading.Thread(target=self._flood, daemon=True) for _ in range(self.flood)]
        threads.append(threading.Thread(target=self._probe, daemon=True))
        for t in threads:
            t.start()
        time.sleep(seconds)
        self.stop.set()
        for t in threads:
            t.join(15)

    def _connect(self) -> socket.socket | None:
        try:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=2)
        except OSError:
            return None
        s.setblocking(False)
        try:
            s.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        except OSError:
            s.close()
            return None
        return s

    def _slowloris(self) -> None:
        socks: list[socket.socket] = []
        while not self.stop.is_set():
            while len(socks) < self.slow and not self.stop.is_set():
                s = self._connect()
                if s is None:
                    break
                socks.append(s)
            self.slow_open_max = max(self.slow_open_max, len(socks))
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline and not self.stop.is_set():
                readable, _, _ = select.select(socks, [], [], 0.1)
                for s in readable:  # the server answered (408) or closed: cut
                    with contextlib.suppress(OSError):
                        s.recv(65536)
                    s.close()
                    socks.remove(s)
                    self.slow_cut += 1
            for s in list(socks):
                try:
                    s.send(b"X")  # one byte of a header that never ends
                except OSError:
                    s.close()
                    socks.remove(s)
                    self.slow_cut += 1
        for s in socks:
            s.close()

    def _get(self, path: str, timeout: float) -> int:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            c.request("GET", path)
            r = c.getresponse()
            r.read()
            return r.status
        finally:
            c.close()

    def _flood(self) -> None:
        while not self.stop.is_set():
            with self._lock:
                if sum(self.flood_status.values()) >= MAX_FLOOD_REQUESTS:
                    return
            try:
                key = str(self._get("/metrics", 10))
            except OSError as e:
                key = type(e).__name__
            with self._lock:
                self.flood_status[key] += 1

    def _probe(self) -> None:
        while not self.stop.wait(1.0):
            t0 = time.monotonic()
            try:
                key = str(self._get("/metrics", 10))
            except OSError as e:
                key = type(e).__name__
            self.probe_ms.append((time.monotonic() - t0) * 1000)
            self.probe_status[key] += 1


def _pct(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def run_serve(a: argparse.Namespace) -> int:
    serve = Serve("--log-interval", "5s")
    trickle = Cgroup("capwatch-trickle")
    try:
        before = serve.sample()
        attack = Attack(serve.port, slow=a.slow, flood=a.flood)
        runner = threading.Thread(target=attack.run, args=(a.seconds,), daemon=True)
        t0 = time.monotonic()
        runner.start()
        sent = 0
        rss_max = before["rss_mib"]
        while runner.is_alive():
            r = trickle.run(["capsh", "--drop=cap_sys_time", "--", "-c", "exec date -s 2020-01-01"])
            if "Operation not permitted" in r.stderr:
                sent += 1
            rss_max = max(rss_max, serve.sample()["rss_mib"])
            time.sleep(max(0.0, t0 + sent * 0.5 - time.monotonic()))
        elapsed = time.monotonic() - t0
        time.sleep(6)  # the last denial drains; the log interval ends
        after = serve.sample()
        m = serve.metrics()
        serve.stop()
        log = serve.log_lines()
    finally:
        trickle.remove()
    got_checks = checks(m, container=trickle.label, capability="CAP_SYS_TIME", verdict="denied")
    got_denials = sum(
        v
        for k, v in m.items()
        if k.startswith("capwatch_denials_total{") and f'container="{trickle.label}"' in k
    )
    summary = sum(
        int(str(x.get("count", 0)))
        for x in log
        if x.get("container") == trickle.label and x.get("event") == "denial summary"
    )
    http_out = {
        k.split('"')[1]: int(v)
        for k, v in m.items()
        if k.startswith("capwatch_http_connections_total{")
    }
    served = sum(v for k, v in attack.flood_status.items() if k == "200")
    cpu = after["cpu_s"] - before["cpu_s"]
    ok = (
        sent > 0
        and got_checks == sent
        and got_denials == sent
        and summary == sent
        and set(attack.probe_status) == {"200"}
        and rss_max < POD_MEMORY_LIMIT_MIB
    )
    print(f"machine: {machine()}; {elapsed:.0f} s of attack on loopback")
    print("| measure | value |")
    print("|---|---|")
    print(
        f"| slow clients held open (max) / cut by the server and reopened | {attack.slow_open_max} / {attack.slow_cut:,} |"
    )
    print(
        f"| flood GET /metrics answered 200 / other | {served:,} / {sum(attack.flood_status.values()) - served:,} {dict(attack.flood_status)} |"
    )
    print(
        f"| probe scrapes 200 / total; latency p50 / p99 / max | {attack.probe_status['200']} / {sum(attack.probe_status.values())}; "
        f"{_pct(attack.probe_ms, 0.5):.0f} / {_pct(attack.probe_ms, 0.99):.0f} / {max(attack.probe_ms, default=float('nan')):.0f} ms |"
    )
    print(f"| endpoint connection outcomes | {http_out} |")
    print(
        f"| trickle denials caused / in checks_total / in denials_total / in log summaries | {sent} / {got_checks:.0f} / {got_denials:.0f} / {summary} |"
    )
    print(f"| events lost (denials ring) | {m.get(LOST_DENIALS, 0):.0f} |")
    print(f"| serve CPU during the attack | {cpu:.1f} s ({100 * cpu / elapsed:.0f}% of one core) |")
    print(
        f"| serve RSS start / max / end (pod limit) | {before['rss_mib']:.0f} / {rss_max:.0f} / {after['rss_mib']:.0f} MiB ({POD_MEMORY_LIMIT_MIB} MiB) |"
    )
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


# -- --compare: the old and the new server, stand-alone --------------------------

_CHILD = r"""
import sys, threading, time, importlib.util
kind, path = sys.argv[1], sys.argv[2]
spec = importlib.util.spec_from_file_location("srv", path)
mod = importlib.util.module_from_spec(spec); sys.modules["srv"] = mod; spec.loader.exec_module(mod)
renders = [0]
body = b"".join(b'capwatch_checks_total{capability="CAP_SETUID",container="c%d"} 1\n' % i for i in range(5000))
def render():
    renders[0] += 1
    t = time.thread_time() + 0.02          # a 20 ms scrape, on the CPU
    while time.thread_time() < t:
        pass
    return body
health = lambda: (True, "ok")
if kind == "old":
    s = mod.MetricsServer(render, health, "127.0.0.1", 0)
else:
    s = mod.MetricsServer(render, health, mod.parse_listen("127.0.0.1:0"))
s.start()
print(s.port, flush=True)
sys.stdin.read()
print(renders[0], flush=True)
"""


def _child_stats(pid: int) -> tuple[float, int]:
    st = Path(f"/proc/{pid}/status").read_text().splitlines()
    rss = next(int(x.split()[1]) for x in st if x.startswith("VmRSS:")) / 1024
    threads = next(int(x.split()[1]) for x in st if x.startswith("Threads:"))
    return rss, threads


def compare(a: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="capwatch-endpoint-"))
    old = tmp / "old_server.py"
    old.write_text(
        subprocess.run(
            ["git", "show", f"{a.compare}:capwatch/server.py"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    print(
        f"machine: {machine()}; {a.seconds:.0f} s per server; {a.slow} slow clients, {a.flood} flood threads"
    )
    print(
        "| server | probe 200/total | probe p50 / max ms | flood 200 | scrapes computed "
        "| slow clients open max / cut | threads max | RSS max MiB | tracebacks |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, path in (("old", old), ("new", REPO / "capwatch" / "server.py")):
        err_path = tmp / f"{kind}.stderr"
        with open(err_path, "w") as err_file:
            child = subprocess.Popen(
                [sys.executable, "-c", _CHILD, kind, str(path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err_file,
                text=True,
                cwd=REPO,
            )
            assert child.stdout is not None
            assert child.stdin is not None
            port = int(child.stdout.readline())
            attack = Attack(port, slow=a.slow, flood=a.flood)
            runner = threading.Thread(target=attack.run, args=(a.seconds,), daemon=True)
            runner.start()
            rss_max, thr_max = 0.0, 0
            while runner.is_alive():
                rss, thr = _child_stats(child.pid)
                rss_max, thr_max = max(rss_max, rss), max(thr_max, thr)
                time.sleep(0.2)
            child.stdin.close()
            renders = int(child.stdout.readline() or 0)
            child.wait(10)
        tracebacks = err_path.read_text().count("Traceback")
        p = attack.probe_ms
        print(
            f"| {kind} ({a.compare if kind == 'old' else 'this tree'}) "
            f"| {attack.probe_status['200']}/{sum(attack.probe_status.values())} "
            f"| {statistics.median(p) if p else float('nan'):.0f} / {max(p, default=float('nan')):.0f} "
            f"| {attack.flood_status['200']:,} | {renders:,} "
            f"| {attack.slow_open_max} / {attack.slow_cut:,} | {thr_max} | {rss_max:.0f} | {tracebacks} |"
        )
        print(
            f"  probe statuses {dict(attack.probe_status)}; flood statuses {dict(attack.flood_status)}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--slow", type=int, default=200)
    ap.add_argument("--flood", type=int, default=8)
    ap.add_argument("--compare", metavar="OLD_REV")
    a = ap.parse_args(argv)
    if not 0 < a.seconds <= 600 or not 0 <= a.slow <= 1000 or not 0 <= a.flood <= 64:
        ap.error("bounded: --seconds up to 600, --slow up to 1000, --flood up to 64")
    if a.compare:
        return compare(a)
    if os.geteuid() != 0:
        print("needs root: runs capwatch serve", file=sys.stderr)
        return 1
    return run_serve(a)


if __name__ == "__main__":
    sys.exit(main())
