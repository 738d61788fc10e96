"""Boot Debian's real kernels in QEMU (virtme-ng) and run tests/vm/guest.py inside.

Kernels: the newest `linux-image-6.1.0-N-amd64` (Debian 12's own) and the
newest `linux-image-6.12.N+deb12-amd64` (the 6.12 LTS Debian 12 ships) in the
configured apt sources. Each package is fetched with `apt-get download`,
unpacked with `dpkg-deb -x` (nothing is installed) and indexed with `depmod`
into a cache outside git (CAPWATCH_KERNEL_CACHE, default
/var/lib/capwatch-kernels); a second run reuses it. Not under /var/cache:
virtme-ng mounts a tmpfs over the guest's /var/cache, which would leave the
guest's /lib/modules/RELEASE link dangling (modprobe: "Module not found").

The guest shares the host's root file system read-only over 9p (virtme-ng),
so it runs this checkout with this venv; virtme-ng finds the modules of a
kernel unpacked under DIR/boot/ in DIR/lib/modules. Results come back as
JSON in a --rwdir directory: the console channel loses stdout.

Accelerator: KVM is probed with a short boot and used when the guest comes
up; otherwise TCG (software emulation, 30-40x slower). CAPWATCH_VM_ACCEL=tcg
or kvm forces one.

    python -m tests.vm.harness [OUTDIR]   # boot both kernels, print where results went
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
GUEST = Path(__file__).resolve().parent / "guest.py"
CACHE = Path(os.environ.get("CAPWATCH_KERNEL_CACHE", "/var/lib/capwatch-kernels"))
#: series -> the package-name pattern of Debian 12's amd64 images of it (first group: the build)
SERIES = {
    "6.1": re.compile(r"^linux-image-(6\.1\.0-(\d+)-amd64)$"),
    "6.12": re.compile(r"^linux-image-(6\.12\.(\d+)\+deb12-amd64)$"),
}
BOOT_TIMEOUT = 3600.0
#: vCPUs per guest. Both guests boot at once; under TCG each vCPU is a host thread,
#: so more vCPUs than host cores only adds contention (CAPWATCH_VM_CPUS overrides).
VM_CPUS = int(os.environ.get("CAPWATCH_VM_CPUS", "1"))
KVM_PROBE_TIMEOUT = 45.0


class HarnessError(Exception):
    """The harness could not prepare a kernel or boot it (one line)."""


@dataclass(frozen=True)
class Kernel:
    series: str  # "6.1"
    release: str  # "6.1.0-57-amd64", as uname -r says it
    root: Path  # the unpacked package: boot/vmlinuz-RELEASE, lib/modules/RELEASE

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.release}"


def qemu_missing() -> str | None:
    """Why QEMU cannot run here, or None."""
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (deploy/host-setup.sh installs qemu-system-x86)"
    if vng() is None:
        return "virtme-ng (vng) is not installed in this venv (pip install -e .[test])"
    if shutil.which("depmod") is None:
        return "depmod is not installed (Debian package kmod; deploy/host-setup.sh installs it)"
    return None


def vng() -> Path | None:
    cand = Path(sys.executable).parent / "vng"
    if cand.exists():
        return cand
    found = shutil.which("vng")
    return Path(found) if found else None


def _newest(series: str, names: list[str]) -> str | None:
    pat = SERIES[series]
    best: tuple[int, str] | None = None
    for n in names:
        m = pat.match(n.strip())
        if m and (best is None or int(m.group(2)) > best[0]):
            best = (int(m.group(2)), m.group(1))
    return best[1] if best else None


def _apt_names(series: str) -> list[str]:
    prefix = {"6.1": "linux-image-6.1.0-", "6.12": "linux-image-6.12."}[series]
    p = subprocess.run(
        ["apt-cache", "pkgnames", prefix], capture_output=True, text=True, check=False
    )
    return p.stdout.split()


def _cached(series: str) -> list[str]:
    return [f"linux-image-{d.name[5:]}" for d in CACHE.glob("root-*") if (d / "boot").is_dir()]


def resolve(series: str) -> str:
    """The release to test: the newest in apt's lists (updated once if they have none)."""
    rel = _newest(series, _apt_names(series))
    if rel is None and os.geteuid() == 0:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, check=False)
        rel = _newest(series, _apt_names(series))
    rel = rel or _newest(series, _cached(series))
    if rel is None:
        raise HarnessError(
            f"no Debian kernel package for {series} in apt's sources"
            f" (looked for {SERIES[series].pattern}) and none cached in {CACHE}"
        )
    return rel


def fetch(series: str) -> Kernel:
    """The kernel of ``series``, downloaded and unpacked once into the cache."""
    release = resolve(series)
    root = CACHE / f"root-{release}"
    if (root / "boot" / f"vmlinuz-{release}").exists() and (
        root / "lib/modules" / release / "modules.dep"
    ).exists():
        return Kernel(series, release, root)
    debs = CACHE / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    pkg = f"linux-image-{release}"
    got = sorted(debs.glob(f"{pkg}_*.deb"))
    if not got:
        p = subprocess.run(
            ["apt-get", "download", pkg], cwd=debs, capture_output=True, text=True, check=False
        )
        got = sorted(debs.glob(f"{pkg}_*.deb"))
        if p.returncode != 0 or not got:
            raise HarnessError(f"apt-get download {pkg} failed: {p.stderr.strip()[-300:]}")
    tmp = Path(tempfile.mkdtemp(prefix=f"root-{release}.", dir=CACHE))
    subprocess.run(["dpkg-deb", "-x", str(got[-1]), str(tmp)], check=True)
    # The package's postinst would run depmod; virtme-ng needs modules.dep to
    # find the virtio and 9p modules the guest boots with.
    subprocess.run(["depmod", "-b", str(tmp), release], check=True)
    if root.exists():
        shutil.rmtree(root)
    tmp.rename(root)
    return Kernel(series, release, root)


def _vng_argv(kernel: Kernel, outdir: Path, accel: str, memory: str, cpus: int) -> list[str]:
    argv = [str(vng()), "--run", str(kernel.vmlinuz), "--user", "root"]
    argv += ["--memory", memory, "--cpus", str(cpus), "--rwdir", str(outdir)]
    if accel == "tcg":
        argv.append("--disable-kvm")
    return argv


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def probe_kvm(kernel: Kernel) -> tuple[bool, str]:
    """Boot ``kernel`` under KVM with a one-line guest: (works, what happened)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is not available"
    with tempfile.TemporaryDirectory(prefix="capwatch-kvm-") as d:
        out = Path(d)
        argv = [*_vng_argv(kernel, out, "kvm", "1G", 1), "--", "sh", "-c", f"echo up > {out}/up"]
        try:
            p = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=KVM_PROBE_TIMEOUT,
                env=_env(),
                stdin=subprocess.DEVNULL,
                check=False,
            )
            tail = " ".join((p.stdout + p.stderr).split())[-240:]
        except subprocess.TimeoutExpired:
            tail = f"no guest after {KVM_PROBE_TIMEOUT:.0f} s"
        if (out / "up").exists():
            return True, "KVM boots"
        return False, f"KVM did not boot the guest: {tail}"


def choose_accel(kernel: Kernel) -> tuple[str, str]:
    forced = os.environ.get("CAPWATCH_VM_ACCEL")
    if forced in ("kvm", "tcg"):
        return forced, f"forced by CAPWATCH_VM_ACCEL={forced}"
    ok, why = probe_kvm(kernel)
    return ("kvm", why) if ok else ("tcg", why)


class Boot:
    """One VM running the guest script, in the background."""

    def __init__(self, kernel: Kernel, outdir: Path, accel: str) -> None:
        self.kernel = kernel
        self.outdir = outdir
        self.accel = accel
        outdir.mkdir(parents=True, exist_ok=True)
        self.log = (outdir / "vng.log").open("w")
        argv = [*_vng_argv(kernel, outdir, accel, "4G", VM_CPUS), "--"]
        argv += [sys.executable, str(GUEST), str(outdir)]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            argv, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_env()
        )

    def wait(self) -> dict[str, Any]:
        """The guest's results.json, with the host's view added (accel, seconds)."""
        try:
            self.proc.wait(timeout=BOOT_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        seconds = time.monotonic() - self.started
        self.log.close()
        path = self.outdir / "results.json"
        if not path.exists():
            log = " ".join((self.outdir / "vng.log").read_text(errors="replace").split())[-400:]
            raise HarnessError(
                f"{self.kernel.release}: no results from the guest after {seconds:.0f} s"
                f" (vng exit {self.proc.returncode}): {log}"
            )
        res: dict[str, Any] = json.loads(path.read_text())
        res["host"] = {"accel": self.accel, "seconds": seconds, "release": self.kernel.release}
        return res


class Runs:
    """For pytest: the guest results of every kernel, or why a kernel produced none."""

    def __init__(self) -> None:
        self.results: dict[str, dict[str, Any]] = {}
        self.errors: dict[str, str] = {}
        self.skip: str | None = None
        self.accel = ""
        self.accel_why = ""

    def of(self, series: str) -> dict[str, Any]:
        import pytest

        if self.skip:
            pytest.skip(self.skip)
        if series in self.errors:
            pytest.fail(self.errors[series], pytrace=False)
        return self.results[series]


def main() -> int:
    why = qemu_missing()
    if why:
        print(f"harness: {why}", file=sys.stderr)
        return 1
    out = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="capwatch-vm-"))
    kernels = [fetch(s) for s in SERIES]
    accel, why = choose_accel(kernels[0])
    print(f"harness: {accel} ({why})", file=sys.stderr)
    boots = [Boot(k, out / k.series, accel) for k in kernels]
    for b in boots:
        res = b.wait()
        print(f"harness: {b.kernel.release}: {res['host']['seconds']:.0f} s, {b.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
