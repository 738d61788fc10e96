"""Find a kernel header tree for BCC.

Order: an explicit directory (``--kernel-headers`` or $CAPWATCH_KERNEL_HEADERS),
the host's ``/lib/modules/$(uname -r)/build``, then the newest Debian tree
under /usr/src (shipped in the container image). capwatch's BPF program reads
no kernel struct layout, so a tree of another version serves.

Debian splits a tree in two (``linux-headers-X-amd64`` with the generated
files, ``linux-headers-X-common`` with the rest). BCC only copes with that
split under /lib/modules/<release>/{build,source}; for anything else it takes
one directory from $BCC_KERNEL_SOURCE, so we lay a small symlink farm that
merges the two halves into one directory (a few dozen links, in a work dir).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from capwatch.errors import HeadersError

__all__ = ["HeaderTree", "find_headers"]

_DEBIAN_ARCH = {"x86_64": ("amd64", "x86"), "aarch64": ("arm64", "arm64")}


@dataclass(frozen=True)
class HeaderTree:
    source: str  # explicit | host | shipped
    path: str
    env: dict[str, str] = field(default_factory=dict)  # for BCC


def _is_full_tree(p: Path) -> bool:
    return (p / "include" / "linux" / "kconfig.h").exists()


def _merge_split(arch_dir: Path, common_dir: Path, karch: str, work: Path) -> Path:
    """Symlink farm: common's files, with arch_dir's generated dirs laid over.

    Built in a directory of its own and renamed into place, so that capwatch
    processes starting at once (trace and serve after a boot) never see, or
    trip over, each other's half-built farm: the first rename wins, the others
    use it."""
    final = work / f"kernel-headers-{arch_dir.name}"
    if (final / ".capwatch-merged").exists():
        return final
    work.mkdir(parents=True, exist_ok=True)
    dest = Path(tempfile.mkdtemp(prefix=f".kernel-headers-{arch_dir.name}.", dir=work))
    # Deepest first: include/ and arch/<karch>/include/ are merged per entry.
    merge_points = [Path("include"), Path("arch") / karch / "include"]

    def link(src: Path, dst: Path) -> None:
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        dst.symlink_to(src)

    def farm(rel: Path) -> None:
        (dest / rel).mkdir(parents=True, exist_ok=True)
        for entry in sorted((common_dir / rel).iterdir()):
            r = rel / entry.name
            if any(r == m or r in m.parents for m in merge_points):
                farm(r)  # a real directory, merged entry by entry
            else:
                link(entry, dest / r)
        if rel in merge_points and (arch_dir / rel).is_dir():
            for entry in sorted((arch_dir / rel).iterdir()):
                link(entry, dest / rel / entry.name)  # generated/, config/ win

    farm(Path("."))
    for top in ("Makefile", "Module.symvers"):
        if (arch_dir / top).exists():
            link(arch_dir / top, dest / top)
    (dest / ".capwatch-merged").touch()
    dest.chmod(0o755)  # mkdtemp made it 0700
    for _ in range(2):
        try:
            os.rename(dest, final)
            return final
        except OSError:
            if (final / ".capwatch-merged").exists():  # another process's farm won
                shutil.rmtree(dest, ignore_errors=True)
                return final
            # a farm left half-built (by a capwatch that died while building it)
            shutil.rmtree(final, ignore_errors=True)
    shutil.rmtree(dest, ignore_errors=True)
    raise HeadersError(f"cannot put the merged kernel headers at {final}")


def _as_bcc_dir(p: Path, karch: str, work: Path) -> Path:
    if _is_full_tree(p):
        return p
    if (p / "include" / "generated").is_dir() and p.name.endswith(f"-{_debian_arch()[0]}"):
        common = p.with_name(p.name[: -len(_debian_arch()[0])] + "common")
        if _is_full_tree(common):
            return _merge_split(p, common, karch, work)
    raise HeadersError(f"{p} is not a kernel header tree (no include/linux/kconfig.h)")


def _debian_arch() -> tuple[str, str]:
    return _DEBIAN_ARCH.get(platform.machine(), ("amd64", "x86"))


def _version_key(p: Path) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", p.name)]


def find_headers(
    explicit: str | None = None,
    *,
    release: str | None = None,
    modules_dir: str = "/lib/modules",
    src_dir: str = "/usr/src",
    work_dir: str | None = None,
) -> HeaderTree:
    release = release or platform.release()
    explicit = explicit or os.environ.get("CAPWATCH_KERNEL_HEADERS") or None
    deb, karch = _debian_arch()
    work = Path(work_dir or os.environ.get("CAPWATCH_WORK_DIR", "/run/capwatch"))
    if explicit:
        p = _as_bcc_dir(Path(explicit), karch, work)
        return HeaderTree("explicit", str(p), {"BCC_KERNEL_SOURCE": str(p)})
    host = Path(modules_dir) / release / "build"
    if host.is_dir() and (_is_full_tree(host) or _is_full_tree(host.parent / "source")):
        return HeaderTree("host", str(host.resolve()))
    candidates = sorted(Path(src_dir).glob(f"linux-headers-*-{deb}"), key=_version_key)
    full = sorted(
        (
            p
            for p in Path(src_dir).glob("linux-headers-*")
            if not p.name.endswith("-common") and _is_full_tree(p)
        ),
        key=_version_key,
    )
    # Debian split trees first (newest first), then self-contained trees.
    for p in [*reversed(candidates), *reversed(full)]:
        try:
            d = _as_bcc_dir(p, karch, work)
        except (HeadersError, OSError):
            continue
        return HeaderTree("shipped", str(d), {"BCC_KERNEL_SOURCE": str(d)})
    raise HeadersError(
        f"no kernel header tree: {host} is missing and {src_dir} has no linux-headers-*;"
        " install linux-headers-amd64 (deploy/host-setup.sh does) or pass --kernel-headers DIR"
    )
