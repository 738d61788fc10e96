"""Runs INSIDE a VM booted by tests/vm/harness.py: records facts, judges nothing.

One pass does every case for both attach modes with as few BPF compiles as
the cases allow (each compile costs 30-90 s under software emulation): per
mode one `capwatch trace --all --outcome` and one `capwatch serve --outcome`,
plus one `doctor` and one `trace` with auto, all started at once so that the
compiles overlap. Then one set of workloads runs while they are all attached,
and everything they printed is written to OUTDIR/results.json. The oracle
lives in tests/vm/test_kernels.py on the host.

    python tests/vm/guest.py OUTDIR [MODULES_DIR]
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CW = [sys.executable, "-m", "capwatch.commands.cli"]
MODES = ("fexit", "kprobe")
PORTS = {"fexit": 19649, "kprobe": 19650}
SETUID_N = 2000
ATTACH_TIMEOUT = 2700.0
#: What auto must pick on 6.1 and 6.12; that mode's trace runs without --attach.
AUTO_MODE = "fexit"
#: A module of Debian's kernels (CONFIG_DUMMY=m) that nothing loads at boot.
MODULE = "dummy"

_CHILD_MMAP = (
    "import mmap, os\n"
    "m = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)\n"
    "m[0] = 1\n"
    "print(os.getpid())\n"
)
_CHILD_SETUID = "import os,sys\nfor _ in range(int(sys.argv[1])): os.setuid(0)\nprint(os.getpid())"


class Proc:
    """A capwatch command in the background, its output in files under OUTDIR."""

    def __init__(self, name: str, args: list[str], out: Path) -> None:
        self.name = name
        self.stdout_path = out / f"{name}.stdout"
        self.stderr_path = out / f"{name}.stderr"
        self.started = time.monotonic()
        self.ready_after: float | None = None
        self.proc = subprocess.Popen(
            [*CW, *args],
            stdout=self.stdout_path.open("w"),
            stderr=self.stderr_path.open("w"),
            cwd=REPO,
        )

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 120) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            return str(r.read().decode())
    except OSError:
        return None


def wait_ready(procs: dict[str, Proc]) -> None:
    """Until every trace printed its banner and every serve answers /metrics (or exited)."""
    deadline = time.monotonic() + ATTACH_TIMEOUT
    pending = dict(procs)
    while pending and time.monotonic() < deadline:
        for name, p in list(pending.items()):
            if name.startswith("doctor"):
                done = p.proc.poll() is not None
            elif name.startswith("serve-"):
                done = p.proc.poll() is not None or scrape(PORTS[name[6:]]) is not None
            else:
                done = p.proc.poll() is not None or "attached via" in p.stderr()
            if done:
                p.ready_after = time.monotonic() - p.started
                del pending[name]
        time.sleep(1)


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)


def pid_of(p: subprocess.CompletedProcess[str]) -> int | None:
    first = p.stdout.split()
    return int(first[0]) if first and first[0].isdigit() else None


def workloads(out: Path) -> dict[str, Any]:
    """The checks every attached program should see; returns who did what."""
    facts: dict[str, Any] = {}
    p = run(["capsh", "--drop=cap_sys_time", "--", "-c", "echo $$; exec date -s 2020-01-01"])
    facts["date"] = {"pid": pid_of(p), "rc": p.returncode, "stderr": p.stderr}
    p = run(["python3", "-c", _CHILD_SETUID, str(SETUID_N)])
    facts["setuid"] = {"pid": pid_of(p), "n": SETUID_N, "rc": p.returncode, "stderr": p.stderr}
    p = run(
        ["capsh", "--drop=cap_sys_admin", "--", "-c", f'echo $$; exec python3 -c "{_CHILD_MMAP}"']
    )
    facts["mmap"] = {"pid": pid_of(p), "rc": p.returncode, "stderr": p.stderr}
    # A noaudit check that reaches cap_capable through security_capable(): reading
    # /proc/1/stat as another user asks ptrace_may_access(PTRACE_MODE_NOAUDIT) for
    # CAP_SYS_PTRACE; denied, and the read still succeeds (the fields are blanked).
    p = run(
        [
            "sh",
            "-c",
            "echo $$; exec setpriv --reuid=65534 --regid=65534 --clear-groups cat /proc/1/stat",
        ]
    )
    facts["ptrace_stat"] = {"pid": pid_of(p), "rc": p.returncode, "stderr": p.stderr}
    moddir = Path("/lib/modules") / platform.release()
    # vng links /lib/modules/RELEASE to the kernel's unpacked package (the
    # harness's cache, which must not be under /var/cache: vng hides that).
    link = os.readlink(moddir) if moddir.is_symlink() else None
    info = run(["modinfo", "-n", MODULE])
    facts["modprobe"] = {
        "module": MODULE,
        "moddir_exists": moddir.exists(),
        "moddir_link": link,
        "modinfo": (info.returncode, info.stdout.strip(), info.stderr.strip()),
        "loaded_before": Path(f"/sys/module/{MODULE}").exists(),
    }
    p = run(["capsh", "--drop=cap_sys_module", "--", "-c", f"echo $$; exec modprobe {MODULE}"])
    facts["modprobe"].update(
        {
            "pid": pid_of(p),
            "rc": p.returncode,
            "stderr": p.stderr,
            "loaded_after": Path(f"/sys/module/{MODULE}").exists(),
        }
    )
    time.sleep(1.0)  # let the consumers drain (50 ms timers) and the joiner see outcomes
    return facts


def kernel_facts() -> dict[str, Any]:
    tracefs = Path("/sys/kernel/tracing")
    return {
        "release": platform.release(),
        "tracefs_mounted": os.path.ismount(tracefs),
        "tp_cap_capable": (tracefs / "events/capability/cap_capable").exists(),
        "btf": Path("/sys/kernel/btf/vmlinux").exists(),
        "kprobe_events": (tracefs / "kprobe_events").exists(),
        "nproc": os.cpu_count(),
    }


def heartbeat(out: Path, t0: float) -> None:
    """Every 15 s, what runs in the guest and the memory left (OUT/progress.txt): the
    only view into a guest whose compiles take minutes."""
    while True:
        ps = run(["ps", "-eo", "etimes,time,rss,args", "--sort=-time"]).stdout.splitlines()[:12]
        mem = Path("/proc/meminfo").read_text().splitlines()[:3]
        (out / "progress.txt").write_text(
            f"{time.monotonic() - t0:.0f} s\n" + "\n".join(mem + [ln[:160] for ln in ps]) + "\n"
        )
        time.sleep(15)


def main() -> int:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    threading.Thread(target=heartbeat, args=(out, t0), daemon=True).start()
    result: dict[str, Any] = {"kernel": kernel_facts(), "modes": {}, "errors": []}
    procs: dict[str, Proc] = {}
    try:
        state = out / "state"
        state.mkdir(exist_ok=True)
        for mode in MODES:
            # fexit's trace is auto's (one compile fewer under emulation): the
            # host's oracle checks that auto chose fexit before using its events.
            attach = [] if mode == AUTO_MODE else ["--attach", mode]
            procs[f"trace-{mode}"] = Proc(
                f"trace-{mode}", ["trace", "--json", "--all", "--outcome", *attach], out
            )
            procs[f"serve-{mode}"] = Proc(
                f"serve-{mode}",
                [
                    "serve",
                    "--attach",
                    mode,
                    "--outcome",
                    "--listen",
                    f"127.0.0.1:{PORTS[mode]}",
                    "--state-file",
                    str(state / f"recent-{mode}.json"),
                    "--node",
                    "vm",
                ],
                out,
            )
        procs["doctor"] = Proc("doctor", ["doctor", "--json"], out)
        wait_ready(procs)
        result["attach_seconds"] = {n: p.ready_after for n, p in procs.items()}
        before = {m: scrape(PORTS[m]) for m in MODES}
        result["workloads"] = workloads(out)
        after = {m: scrape(PORTS[m]) for m in MODES}
        for mode in MODES:
            rc_trace = procs[f"trace-{mode}"].stop()
            rc_serve = procs[f"serve-{mode}"].stop(signal.SIGTERM)
            tr, sv = procs[f"trace-{mode}"], procs[f"serve-{mode}"]
            result["modes"][mode] = {
                "trace": {
                    "rc": rc_trace,
                    "stderr": tr.stderr(),
                    "events": parse_lines(tr.stdout()),
                },
                "serve": {
                    "rc": rc_serve,
                    "stderr": sv.stderr(),
                    "stdout": sv.stdout(),
                    "metrics_before": before[mode],
                    "metrics_after": after[mode],
                },
            }
        doc = procs["doctor"]
        doc.proc.wait(timeout=ATTACH_TIMEOUT)
        result["doctor"] = {
            "rc": doc.proc.returncode,
            "stdout": doc.stdout(),
            "stderr": doc.stderr(),
        }
        auto = result["modes"][AUTO_MODE]["trace"]
        result["auto"] = {"rc": auto["rc"], "stderr": auto["stderr"]}
    except Exception:
        result["errors"].append(traceback.format_exc())
    finally:
        for p in procs.values():
            if p.proc.poll() is None:
                p.proc.kill()
        result["guest_seconds"] = time.monotonic() - t0
        (out / "results.json").write_text(json.dumps(result, indent=1))
    return 0


def parse_lines(text: str) -> list[Any]:
    events = []
    for line in text.splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            events.append({"unparsed": line})
    return events


if __name__ == "__main__":
    sys.exit(main())
