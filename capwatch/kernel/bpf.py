"""The one door to the kernel: the only module that imports bcc (lazily).

It compiles bpf/capwatch.bpf.c with -D flags for the chosen attach mode and
options, attaches, and hands out what user space needs: the ring-buffer maps
(fd and size, for capwatch.kernel.ringbuf), and readers of the exact count map and
the per-CPU stats. bcc and OS errors become capwatch.errors types here.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from capwatch.decode import procfs
from capwatch.errors import CapwatchError, PrivilegeError
from capwatch.kernel.attach import Attempt, Selection, select_mode
from capwatch.kernel.headers import HeaderTree, find_headers

__all__ = [
    "COUNT_KEY_DTYPE",
    "STAT_NAMES",
    "LoadedProgram",
    "ProgramConfig",
    "RingSpec",
    "bpf_source_dir",
    "build_cflags",
    "cache_slot_key",
    "check_privileges",
    "load",
]

_MODE_DEFINE = {
    "raw_tracepoint": "CW_ATTACH_RAW_TP",
    "tracepoint": "CW_ATTACH_TP",
    "fexit": "CW_ATTACH_FEXIT",
    "kprobe": "CW_ATTACH_KPROBE",
}
#: Names of the per-CPU stats slots (bpf/capwatch.h CW_STAT_*).
STAT_NAMES = (
    "lost_denials",
    "lost_checks",
    "suppressed",
    "count_fail",
    "own_checks",
    "lost_outcomes",
    "count_new",
    "held_new",
    "held_fail",
    "budget",
    "kprobe_unpaired",
)
#: How many times read_counts re-reads before it settles for a partial read.
READ_ATTEMPTS = 100

CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39


@dataclass(frozen=True)
class ProgramConfig:
    """What the BPF program is compiled to do (see bpf/capwatch.bpf.c)."""

    emit_all: bool = False  # every check crosses the checks ring
    unique: bool = False  # only the first check of each distinct tuple
    filter_pid: int | None = None
    filter_cap: int | None = None
    filter_cgroup: int | None = None
    denial_pages: int = 256  # 1 MiB: 14,500 denials
    check_pages: int = 4096  # 16 MiB: 233,000 checks
    rl_burst: int = 200  # denials per (cgroup, pid, cap, syscall) per window, then held (counted)
    rl_window_ns: int = 1_000_000_000
    cg_burst: int = 1000  # denials per cgroup per window, then held (counted)
    count_entries: int = 65536
    held_entries: int = 16384
    self_pid: int = 0  # 0: this process
    outcome: bool = False  # hook syscall exit to learn each denial's syscall result
    # with outcome and a filter: also EPERM/EACCES that no capability denial explains
    refusals: bool = False
    #: refusals filtered by a set of cgroups (LoadedProgram.set_refusal_cgroups):
    #: "only" those of the set (a pod's containers), "except" those (the cgroups
    #: that existed before a command started a container); None: by the filters
    refusal_cgroups: str | None = None
    refusal_cgroups_max: int = 16384
    #: with refusals: watch what the target enters (a raw sys_enter program, which
    #: every syscall of the node pays while loaded: explain only), so that a refusal
    #: at entry is known to be seccomp's even when the process is gone
    refusal_entry: bool = False


@dataclass(frozen=True)
class RingSpec:
    name: str
    fd: int
    data_size: int


def bpf_source_dir() -> Path:
    env = os.environ.get("CAPWATCH_BPF_DIR")
    if env:
        return Path(env)
    pkg = Path(__file__).resolve().parent.parent  # capwatch/
    here = pkg
    for cand in (pkg.parent / "bpf", pkg / "bpf_src"):
        if (cand / "capwatch.bpf.c").exists():
            return cand
    raise CapwatchError(f"BPF source capwatch.bpf.c not found near {here}")


def _pow2(n: int, what: str) -> int:
    if n < 1 or n & (n - 1):
        raise CapwatchError(f"{what} must be a power of two, got {n}")
    return n


def build_cflags(config: ProgramConfig, mode: str, *, no_autoattach: bool = False) -> list[str]:
    """The -D flags for ``mode`` and ``config``: pure, unit-tested."""
    flags = [
        f"-D{_MODE_DEFINE[mode]}",
        f"-I{bpf_source_dir()}",
        f"-DCW_SELF_PID={config.self_pid or os.getpid()}",
        f"-DCW_DENIAL_PAGES={_pow2(config.denial_pages, 'denial ring pages')}",
        f"-DCW_CHECK_PAGES={_pow2(config.check_pages, 'check ring pages')}",
        f"-DCW_RL_BURST={config.rl_burst}",
        f"-DCW_RL_WINDOW_NS={config.rl_window_ns}ULL",
        f"-DCW_CG_BURST={config.cg_burst}",
        f"-DCW_COUNT_ENTRIES={config.count_entries}",
        f"-DCW_HELD_ENTRIES={config.held_entries}",
        "-Wno-macro-redefined",
    ]
    if config.emit_all:
        flags.append("-DCW_EMIT_ALL")
    if config.unique:
        flags.append("-DCW_UNIQUE")
    if config.filter_pid is not None:
        flags.append(f"-DCW_FILTER_PID={config.filter_pid}")
    if config.filter_cap is not None:
        flags.append(f"-DCW_FILTER_CAP={config.filter_cap}")
    if config.filter_cgroup is not None:
        flags.append(f"-DCW_FILTER_CGROUP={config.filter_cgroup}ULL")
    if config.outcome:
        flags.append("-DCW_OUTCOME")
    if config.refusals:
        targeted = config.filter_cgroup is not None or config.filter_pid is not None
        if not config.outcome or not (targeted or config.refusal_cgroups):
            raise CapwatchError("refusals need outcome mode and a pid or cgroup filter")
        flags.append("-DCW_REFUSALS")
        if config.refusal_cgroups:
            how = {"only": 1, "except": 2}.get(config.refusal_cgroups)
            if how is None:
                raise CapwatchError(
                    f"refusal_cgroups is 'only' or 'except', not {config.refusal_cgroups!r}"
                )
            flags.append(f"-DCW_REFUSAL_CGROUPS={how}")
            flags.append(f"-DCW_REFUSAL_CGROUPS_MAX={config.refusal_cgroups_max}")
        if config.refusal_entry:
            flags.append("-DCW_REFUSAL_ENTRY")
    if no_autoattach:
        flags.append("-DCW_NO_AUTOATTACH")
    return flags


def check_privileges(proc_root: str = "/proc") -> None:
    """Fail early, in one line, when this process cannot load BPF programs."""
    try:
        eff = procfs.read_status(os.getpid(), proc_root=proc_root).cap_eff
    except CapwatchError:
        return  # cannot tell: let the kernel say
    if eff >> CAP_SYS_ADMIN & 1:
        return
    missing = [
        n for bit, n in ((CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")) if not eff >> bit & 1
    ]
    if missing:
        raise PrivilegeError(
            "loading BPF programs needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN);"
            f" this process lacks {', '.join(missing)}: run as root"
        )


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """bcc's C side prints compile and verifier errors on fd 2: keep them for
    the error message instead of spilling them on the terminal."""
    lines: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(tmp.read().decode("utf-8", "replace").splitlines())


def _reason(exc: BaseException, stderr: list[str]) -> str:
    msg = " ".join(str(exc).split())
    detail = [
        ln.strip()
        for ln in stderr
        if ln.strip()
        and ("error" in ln.lower() or "failed" in ln.lower() or "permission" in ln.lower())
    ]
    if detail and detail[-1] not in msg:
        msg = f"{msg}: {detail[-1]}"
    if "Need super-user" in msg or "Operation not permitted" in msg:
        msg += (
            " (the kernel refused to load it: EPERM; in a container, a seccomp profile"
            " that blocks bpf(2) gives the same error)"
        )
    return msg


#: Mirror of ``struct cw_count_key`` (bpf/capwatch.h), the count map's key.
COUNT_KEY_DTYPE = np.dtype([("cgroup_id", "<u8"), ("cap", "<i4"), ("denied", "<u4")])


def cache_slot_key(slot: int) -> tuple[int, bool]:
    """(capability, denied) counted in slot ``slot`` of ``struct cw_cache``'s n[]
    (the inverse of capwatch.h's CW_CACHE_SLOT)."""
    return slot >> 1, bool(slot & 1)


_HELD_KEY = np.dtype([("cgroup_id", "<u8"), ("cap", "<i4"), ("syscall_nr", "<i4")])


class _CountBatch:
    """Read the whole per-CPU count map with BPF_MAP_LOOKUP_BATCH into numpy
    buffers (one syscall per few thousand keys, no ctypes object per key):
    5,000 keys in about 1 ms here, against 10 ms through bcc's items."""

    def __init__(self, fd: int, max_entries: int, key: np.dtype[Any] = COUNT_KEY_DTYPE) -> None:
        from bcc.libbcc import lib  # the one door: still this module
        from bcc.utils import get_possible_cpus

        self._lib = lib
        self.fd = fd
        self.max = max_entries
        self.ncpu = len(get_possible_cpus())
        self.keys = np.zeros(max_entries, dtype=key)
        self.values = np.zeros((max_entries, self.ncpu), dtype="<u8")

    def read_raw(self) -> tuple[Any, Any]:
        """Keys and per-CPU values (copies), for any key layout."""
        import ctypes as ct
        import errno as _errno

        token_in, token_out = ct.c_uint32(0), ct.c_uint32(0)
        total = 0
        kp = self.keys.ctypes.data
        vp = self.values.ctypes.data
        ksz, vsz = self.keys.itemsize, self.values.shape[1] * 8
        while total < self.max:
            cnt = ct.c_uint32(self.max - total)
            res = self._lib.bpf_lookup_batch(
                self.fd,
                ct.byref(token_in) if total else None,
                ct.byref(token_out),
                ct.c_void_p(kp + ksz * total),
                ct.c_void_p(vp + vsz * total),
                ct.byref(cnt),
            )
            err = ct.get_errno()
            total += cnt.value
            if res != 0:
                if err == _errno.ENOENT:
                    break
                raise OSError(err, os.strerror(err))
            if cnt.value == 0:
                break
            token_in.value = token_out.value
        return self.keys[:total].copy(), self.values[:total].copy()

    def read(self) -> tuple[Any, Any, Any, Any]:
        k, v = self.read_raw()
        return k["cgroup_id"], k["cap"], k["denied"], v


class LoadedProgram:
    """An attached capwatch BPF program."""

    def __init__(self, bpf: Any, mode: str, config: ProgramConfig, headers: HeaderTree) -> None:
        self._bpf = bpf
        self.mode = mode
        self.config = config
        self.headers = headers
        self.attempts: tuple[Attempt, ...] = ()  # modes tried before this one worked
        self._batch: _CountBatch | None = None
        self._held_batch: _CountBatch | None = None
        #: False when the last read_counts could not get a quiet read of every
        #: CPU within READ_ATTEMPTS: it then under-counts (never over-counts).
        self.last_read_consistent = True
        self.inconsistent_reads = 0
        self._deleted = 0  # count-map entries deleted by delete_counts
        self._evicted = 0  # count-map entries the LRU evicted (a lower bound, exact when idle)
        self._held_evicted = 0
        self._held_deleted = 0

    def rings(self) -> list[RingSpec]:
        names = ["denials"]
        if self.config.emit_all or self.config.unique:
            names.append("checks")
        return [
            RingSpec(n, int(self._bpf[n.encode()].map_fd), int(self._bpf[n.encode()].max_entries))
            for n in names
        ]

    def hooks(self) -> list[str]:
        """What this program is attached to, as bcc recorded it."""
        b = self._bpf
        out = [f"raw_tracepoint:{k.decode()}" for k in getattr(b, "raw_tracepoint_fds", {})]
        out += [f"tracepoint:{k.decode()}" for k in getattr(b, "tracepoint_fds", {})]
        out += [f"kprobe:{k.decode()}" for k in getattr(b, "kprobe_fds", {})]
        out += [f"fexit:{k.decode()}" for k in getattr(b, "kfunc_exit_fds", {})]
        return sorted(out)

    def read_counts(self) -> dict[tuple[int, int, bool], int]:
        """Exact counts by (cgroup id, capability, denied): :meth:`read_counts_split`'s
        two parts added."""
        hashed, cached = self.read_counts_split()
        for key, n in cached.items():
            hashed[key] = hashed.get(key, 0) + n
        return hashed

    def read_counts_split(
        self,
    ) -> tuple[dict[tuple[int, int, bool], int], dict[tuple[int, int, bool], int]]:
        """Exact counts by (cgroup id, capability, denied), summed over CPUs, in
        two parts: the count map's (whose entries the LRU may evict), and each
        CPU's cache of its last cgroup (never evicted) (see the
        comment on count_cache in bpf/capwatch.bpf.c for why this is exact).

        Each CPU's slot of the map changes only when that CPU flushes its
        cache, so a CPU is taken from the first read during which it did not
        flush (its sequence numbers equal and unchanged around the read); CPUs
        that flushed are read again. On a busy node every CPU needs one quiet
        read, not all of them the same one.

        Bounded: after READ_ATTEMPTS reads, a CPU that never had a quiet one
        (two processes of different cgroups alternating on it) is taken from
        the last read's hash column without its cache: counts in its cache, or
        moving during that read, are left out, so the result can only be
        short, never double. last_read_consistent then says False and
        inconsistent_reads counts it; the exporter never lets a series go down
        (capwatch/tally.py)."""
        import ctypes

        cache = self._bpf[b"count_cache"]
        zero = ctypes.c_int(0)
        stats = self._bpf[b"stats"]
        taken: dict[int, tuple[list[tuple[int, int, bool]], list[int], int, list[int]]] = {}
        new_before = int(sum(stats[ctypes.c_int(STAT_NAMES.index("count_new"))]))
        keys: list[tuple[int, int, bool]] = []
        columns: list[list[int]] = []
        for _ in range(READ_ATTEMPTS):
            first = [(int(c.seq_head), int(c.seq_tail)) for c in cache[zero]]
            keys, columns = self._read_hash_columns()
            second = cache[zero]
            for cpu, ((h, t), c) in enumerate(zip(first, second, strict=True)):
                if cpu not in taken and h == t == int(c.seq_head) == int(c.seq_tail):
                    taken[cpu] = (keys, columns[cpu], int(c.cgroup_id), [int(n) for n in c.n])
            if len(taken) == len(first):
                self.last_read_consistent = True
                break
        else:
            self.last_read_consistent = False
            self.inconsistent_reads += 1
            for cpu, column in enumerate(columns):
                taken.setdefault(cpu, (keys, column, 0, []))
        # Entries created before this read that are neither live nor deleted by
        # us were evicted; new_before was read first, so this is a lower bound.
        self._evicted = max(self._evicted, new_before - len(keys) - self._deleted)
        out: dict[tuple[int, int, bool], int] = {}
        in_caches: dict[tuple[int, int, bool], int] = {}
        for keys, column, cg, cached in taken.values():
            for key, n in zip(keys, column, strict=True):
                if n:
                    out[key] = out.get(key, 0) + n
            for i, n in enumerate(cached):
                if n:
                    key = (cg, *cache_slot_key(i))
                    in_caches[key] = in_caches.get(key, 0) + n
        return out, in_caches

    def _read_hash_columns(self) -> tuple[list[tuple[int, int, bool]], list[list[int]]]:
        """The count map's keys, and each CPU's values for them (one list per CPU)."""
        if self._batch is None:
            table = self._bpf[b"counts"]
            self._batch = _CountBatch(int(table.map_fd), int(table.max_entries))
        try:
            cg, cap, denied, values = self._batch.read()
        except OSError:  # kernels without BPF_MAP_LOOKUP_BATCH (before 5.6)
            items = list(self._bpf[b"counts"].items())
            keys = [(int(k.cgroup_id), int(k.cap), bool(k.denied)) for k, _ in items]
            ncpu = len(items[0][1]) if items else 0
            return keys, [[int(v[i]) for _, v in items] for i in range(ncpu)]
        keys = list(zip(cg.tolist(), cap.tolist(), denied.astype(bool).tolist(), strict=True))
        return keys, values.T.tolist()

    def delete_counts(self, keys: list[tuple[int, int, bool]]) -> None:
        """Forget the counts of cgroups that are gone (the exporter's series TTL)."""
        table = self._bpf[b"counts"]
        for cg, cap, denied in keys:
            with contextlib.suppress(KeyError):
                del table[table.Key(cg, cap, int(denied))]
                self._deleted += 1

    def delete_held(self, keys: list[tuple[int, int, int]]) -> None:
        """Forget the held counts of cgroups that are gone."""
        table = self._bpf[b"held"]
        for cg, cap, nr in keys:
            with contextlib.suppress(KeyError):
                del table[table.Key(cg, cap, nr)]
                self._held_deleted += 1

    def read_held(self) -> dict[tuple[int, int, int], int]:
        """Denials the kernel counted but did not send (rate limit, cgroup
        budget, full ring), by (cgroup id, capability, syscall nr), summed
        over CPUs. Never-decreasing per entry until the LRU evicts it."""
        import ctypes

        stats = self._bpf[b"stats"]
        new_before = int(sum(stats[ctypes.c_int(STAT_NAMES.index("held_new"))]))
        if self._held_batch is None:
            table = self._bpf[b"held"]
            self._held_batch = _CountBatch(int(table.map_fd), int(table.max_entries), _HELD_KEY)
        try:
            k, v = self._held_batch.read_raw()
        except OSError:  # kernels without BPF_MAP_LOOKUP_BATCH (before 5.6)
            return {
                (int(hk.cgroup_id), int(hk.cap), int(hk.syscall_nr)): int(sum(hv))
                for hk, hv in self._bpf[b"held"].items()
            }
        self._held_evicted = max(self._held_evicted, new_before - len(k) - self._held_deleted)
        sums = v.sum(axis=1).tolist()
        return {
            (cg, cap, nr): n
            for cg, cap, nr, n in zip(
                k["cgroup_id"].tolist(),
                k["cap"].tolist(),
                k["syscall_nr"].tolist(),
                sums,
                strict=True,
            )
            if n
        }

    def reset_unique(self) -> int:
        """Forget which distinct allowed checks were sent (--unique), so each is sent
        again on its next occurrence: serve --profiles does this periodically to
        keep last-seen times current. Returns how many tuples were forgotten."""
        if not self.config.unique:
            return 0
        table = self._bpf[b"seen"]
        keys = list(table.keys())
        for k in keys:
            with contextlib.suppress(KeyError):
                del table[k]
        return len(keys)

    def refusal_path(self, tid: int, syscall_nr: int) -> str | None:
        """The path named by ``tid``'s refused execve/open-like syscall ``syscall_nr``
        (refusals mode), taken from the map: None when it named none or was not kept."""
        if not self.config.refusals:
            return None
        import ctypes

        table = self._bpf[b"refusal_path"]
        key = ctypes.c_uint32(tid)
        try:
            entry = table[key]
        except KeyError:
            return None
        if int(entry.nr) != syscall_nr:  # named by another syscall of this thread
            return None
        with contextlib.suppress(KeyError):
            del table[key]
        raw = bytes(entry.p)
        return raw.split(b"\0", 1)[0].decode("utf-8", "replace") or None

    def read_stats(self) -> dict[str, int]:
        table = self._bpf[b"stats"]
        import ctypes

        out = {}
        for i, name in enumerate(STAT_NAMES):
            out[name] = int(sum(table[ctypes.c_int(i)]))
        out["recursion_misses"] = self.recursion_misses() or 0
        out["count_evicted"] = self._evicted
        out["held_evicted"] = self._held_evicted
        out["inconsistent_reads"] = self.inconsistent_reads
        return out

    def set_refusal_cgroups(self, cgroup_ids: Iterable[int]) -> int:
        """Put ``cgroup_ids`` in the refusal filter's set (ProgramConfig.refusal_cgroups);
        returns how many did not fit (the map holds refusal_cgroups_max)."""
        import ctypes

        table = self._bpf[b"refusal_cgroups"]
        left = 0
        for cg in cgroup_ids:
            try:
                table[ctypes.c_uint64(cg)] = ctypes.c_uint8(1)
            except Exception:  # bcc raises a bare Exception when the map is full
                left += 1
        return left

    def recursion_misses(self) -> int | None:
        """Runs of the cap_capable programs the kernel skipped because one was
        already running on that CPU (kernel/proginfo.py): checks not counted.
        None when the kernel keeps no such count (before 5.12)."""
        from capwatch.kernel.proginfo import recursion_misses

        found = [
            recursion_misses(int(fn.fd))
            for name, fn in getattr(self._bpf, "funcs", {}).items()
            if b"cap_capable" in name
        ]
        known = [n for n in found if n is not None]
        return sum(known) if known else None

    def close(self) -> None:
        if self._bpf is not None:
            with contextlib.suppress(Exception):
                self._bpf.cleanup()
            self._bpf = None

    def __enter__(self) -> LoadedProgram:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _import_bcc() -> Any:
    try:
        import bcc
    except ImportError as exc:
        raise CapwatchError(
            f"bcc is not importable ({exc}); install Debian's python3-bpfcc"
            " (deploy/host-setup.sh) and use a venv with --system-site-packages"
        ) from None
    return bcc


def _compile(bcc: Any, src: Path, cflags: list[str]) -> Any:
    with _captured_stderr() as err:
        try:
            return bcc.BPF(src_file=str(src).encode(), cflags=cflags)
        except Exception as exc:
            captured = exc
    raise CapwatchError(_reason(captured, err))


def load(
    config: ProgramConfig,
    mode: str = "auto",
    *,
    kernel_headers: str | None = None,
) -> LoadedProgram:
    """Compile, load and attach; try modes in order for ``auto``."""
    check_privileges()
    headers = find_headers(kernel_headers)
    os.environ.update(headers.env)
    bcc = _import_bcc()
    src = bpf_source_dir() / "capwatch.bpf.c"

    def attempt(m: str) -> Any:
        return _compile(bcc, src, build_cflags(config, m))

    from capwatch.kernel.facts import read_kernel_facts

    sel: Selection[Any] = select_mode(mode, attempt, read_kernel_facts())
    prog = LoadedProgram(sel.result, sel.mode, config, headers)
    prog.attempts = sel.attempts
    return prog


def verify(mode: str, config: ProgramConfig | None = None) -> str:
    """Compile ``mode`` without attaching and load its programs into the
    verifier (kprobe programs load even where kprobes cannot attach).
    Returns the names of the programs that passed."""
    check_privileges()
    headers = find_headers()
    os.environ.update(headers.env)
    bcc = _import_bcc()
    cfg = config or ProgramConfig()
    b = _compile(
        bcc, bpf_source_dir() / "capwatch.bpf.c", build_cflags(cfg, mode, no_autoattach=True)
    )
    try:
        names = {"raw_tracepoint": ["cw_raw_tp"], "kprobe": ["cw_kprobe", "cw_kretprobe"]}[mode]
        kinds = {"raw_tracepoint": bcc.BPF.RAW_TRACEPOINT, "kprobe": bcc.BPF.KPROBE}[mode]
        with _captured_stderr() as err:
            try:
                for n in names:
                    b.load_func(n.encode(), kinds)
            except Exception as exc:
                raise CapwatchError(_reason(exc, err)) from None
        return ", ".join(names)
    finally:
        b.cleanup()
