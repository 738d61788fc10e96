"""Refusals that are not capability checks: say what refused, with the evidence.

A syscall of the watched target that ends in EPERM or EACCES with no
capability denied inside it (a CW_F_REFUSAL record, bpf/capwatch.bpf.c) was
refused by something else: a seccomp filter, file capabilities that the
bounding set cannot hold (execve), an LSM, a user namespace, a file's own
mode. :func:`gather` reads the evidence while the process lives (thin I/O,
roots as parameters); :func:`judge` is pure and decides the verdict and the
fix for the context. An EPERM that fits none says so, with what was seen.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import stat
import struct
from dataclasses import dataclass, field, replace
from typing import Any

from capwatch.decode.caps import cap_name, cap_short, decode_mask

__all__ = [
    "RUNTIME_SETUP_COMMS",
    "SECCOMP_UNLOCKED_BY",
    "FileEvidence",
    "Refusal",
    "RefusalFacts",
    "active_lsms",
    "file_caps",
    "gather",
    "judge",
    "lsm_names",
    "not_a_refusal",
    "tolerated_runtime",
    "with_stand_in",
]

_CONTAINER_KINDS = frozenset({"docker", "podman", "containerd", "crio", "kubernetes"})
_EXEC = frozenset({"execve", "execveat"})

#: Syscalls that docker's and podman's default seccomp profile (containers/common
#: seccomp.json, moby profiles/seccomp/default.json) refuse with EPERM unless the
#: container is granted the capability named here.
SECCOMP_UNLOCKED_BY: dict[str, str] = {
    **dict.fromkeys(
        ("clock_settime", "clock_settime64", "settimeofday", "stime", "adjtimex", "clock_adjtime"),
        "CAP_SYS_TIME",
    ),
    **dict.fromkeys(
        (
            "mount",
            "umount2",
            "unshare",
            "setns",
            "pivot_root",
            "fsopen",
            "fsmount",
            "fsconfig",
            "open_tree",
            "move_mount",
            "quotactl",
            "lookup_dcookie",
            "fanotify_init",
            "name_to_handle_at",
            "syslog",
            "sethostname",
            "setdomainname",
            "swapon",
            "swapoff",
        ),
        "CAP_SYS_ADMIN",
    ),
    **dict.fromkeys(("reboot",), "CAP_SYS_BOOT"),
    **dict.fromkeys(("init_module", "finit_module", "delete_module"), "CAP_SYS_MODULE"),
    **dict.fromkeys(("acct",), "CAP_SYS_PACCT"),
    **dict.fromkeys(("kcmp", "process_vm_readv", "process_vm_writev", "ptrace"), "CAP_SYS_PTRACE"),
    **dict.fromkeys(("iopl", "ioperm"), "CAP_SYS_RAWIO"),
    **dict.fromkeys(("vhangup",), "CAP_SYS_TTY_CONFIG"),
    **dict.fromkeys(("get_mempolicy", "set_mempolicy", "mbind"), "CAP_SYS_NICE"),
    **dict.fromkeys(("bpf",), "CAP_BPF"),
    **dict.fromkeys(("perf_event_open",), "CAP_PERFMON"),
}

# struct vfs_cap_data (include/uapi/linux/capability.h): magic_etc, then
# {permitted, inheritable} x2 (revision 2), plus rootid (revision 3).
_VFS_CAP_REVISION_MASK = 0xFF000000
_VFS_CAP_FLAGS_EFFECTIVE = 0x000001
_VFS_CAP_REVISIONS = {0x01000000: 1, 0x02000000: 2, 0x03000000: 2}


def file_caps(raw: bytes) -> tuple[int, bool] | None:
    """(permitted mask, effective bit) of a security.capability xattr; None if malformed."""
    if len(raw) < 12:
        return None
    (magic,) = struct.unpack_from("<I", raw)
    words = _VFS_CAP_REVISIONS.get(magic & _VFS_CAP_REVISION_MASK)
    if words is None or len(raw) < 4 + 8 * words:
        return None
    permitted = 0
    for i in range(words):
        (p,) = struct.unpack_from("<I", raw, 4 + 8 * i)
        permitted |= p << (32 * i)
    return permitted, bool(magic & _VFS_CAP_FLAGS_EFFECTIVE)


@dataclass(frozen=True)
class FileEvidence:
    """What the path a refused syscall named looked like when it was read."""

    path: str  # as the process named it
    exists: bool
    mode: int = 0
    uid: int = 0
    gid: int = 0
    file_caps: int | None = None  # permitted mask of security.capability, None: none
    seen_from: str = ""  # "the process's root" | "the host" (the process was gone)


@dataclass(frozen=True)
class RefusalFacts:
    syscall: str
    ret: int  # -EPERM or -EACCES
    comm: str
    pid: int
    uid: int
    seccomp: int | None = None  # /proc/PID/status Seccomp: 0, 1 strict, 2 filter
    no_new_privs: bool | None = None
    cap_bnd: int | None = None
    cap_eff: int | None = None
    in_userns: bool | None = None  # the process's user namespace is not the host's
    lsms: tuple[str, ...] | None = None  # active_lsms(): None if not known
    file: FileEvidence | None = None
    kind: str = "host"
    container: str = ""
    container_id: str = ""
    pod: str = ""
    namespace: str = ""
    count: int = 1
    evidence_from: str = ""  # "" when the process's own status was read
    #: whether the kernel saw the syscall enter; False: refused at entry (seccomp,
    #: or a ptrace tracer), before it ran; None: not known
    entered: bool | None = None


@dataclass
class Refusal:
    verdict: (
        str  # seccomp | file capabilities | file permissions | lsm | user namespace | unexplained
    )
    syscall: str
    outcome: str  # EPERM | EACCES
    comm: str
    pid: int
    summary: str
    details: list[str] = field(default_factory=list)
    fixes: list[dict[str, str]] = field(default_factory=list)
    count: int = 1
    kind: str = "host"
    container: str = ""
    container_id: str = ""
    pod: str = ""
    namespace: str = ""
    path: str = ""
    # explain's findings share these keys: a refusal is no capability check
    capability: str = ""
    role: str = "refusal"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def render(self) -> str:
        where = ""
        if self.pod:
            where = f" in pod {self.namespace}/{self.pod} container {self.container or '?'}"
        elif self.container and self.kind in _CONTAINER_KINDS:
            where = f" in {self.kind} container {self.container}"
        path = f" ({self.path})" if self.path else ""
        lines = [
            f"{self.syscall}{path} refused to {self.comm} (pid {self.pid}){where} with "
            f"{self.outcome}: {self.verdict}" + (f" x{self.count}" if self.count > 1 else "")
        ]
        lines.append(f"  {self.summary}")
        lines += [f"  {d}" for d in self.details]
        if self.fixes:
            lines.append("  fix:")
            lines += [f"    {f['context']}: {f['fix']}" for f in self.fixes]
        return "\n".join(lines) + "\n"


def _names(mask: int) -> list[str]:
    return [cap_name(c) for c in decode_mask(mask).present]


def _grant_fixes(f: RefusalFacts, caps: list[str]) -> list[dict[str, str]]:
    short = [cap_short(c) for c in (_cap_numbers(caps))]
    adds = " ".join(f"--cap-add={s}" for s in short)
    k8s = f"securityContext: {{capabilities: {{add: [{', '.join(repr(s) for s in short)}]}}}}"
    k8s = k8s.replace("'", '"')
    if f.kind == "docker":
        return [{"context": "docker", "fix": f"docker run {adds} ..."}]
    if f.kind == "podman":
        return [{"context": "podman", "fix": f"podman run {adds} ..."}]
    if f.kind in ("kubernetes", "crio", "containerd"):
        return [{"context": "kubernetes", "fix": k8s}]
    if f.kind == "systemd":
        return [{"context": "systemd", "fix": "CapabilityBoundingSet= " + " ".join(caps)}]
    return [
        {
            "context": "host",
            "fix": f"start it from a shell or service whose bounding set includes {', '.join(caps)}",
        }
    ]


def _cap_numbers(names: list[str]) -> list[int]:
    from capwatch.decode.caps import parse_cap

    return [parse_cap(n) for n in names]


def _mode(fe: FileEvidence) -> str:
    return f"{stat.filemode(fe.mode)} uid {fe.uid} gid {fe.gid}"


def judge(f: RefusalFacts) -> Refusal:
    """The verdict for a refusal in which no capability was denied."""
    outcome = errno.errorcode.get(-f.ret, f"errno:{-f.ret}")
    r = Refusal(
        verdict="unexplained",
        syscall=f.syscall,
        outcome=outcome,
        comm=f.comm,
        pid=f.pid,
        summary="",
        count=f.count,
        kind=f.kind,
        container=f.container,
        container_id=f.container_id,
        pod=f.pod,
        namespace=f.namespace,
        path=f.file.path if f.file else "",
    )
    r.details = [f"(status read from {f.evidence_from})"] if f.evidence_from else []
    in_container = f.kind in _CONTAINER_KINDS
    fe = f.file

    # 1. execve of a binary whose file capabilities the bounding set cannot hold:
    # bprm_caps_from_vfs_caps() fails the exec with EPERM without asking
    # cap_capable (security/commoncap.c, Linux 2.6.24 to 6.18).
    if f.syscall in _EXEC and f.ret == -errno.EPERM and fe is not None and fe.file_caps:
        beyond = fe.file_caps & ~f.cap_bnd if f.cap_bnd is not None else None
        r.verdict = "file capabilities"
        if beyond:
            names = _names(beyond)
            r.summary = (
                f"{fe.path} carries file capabilities ({', '.join(_names(fe.file_caps))}) that "
                f"the bounding set lacks ({', '.join(names)}): the kernel refuses the exec "
                "rather than run it without them."
            )
            r.fixes = _grant_fixes(f, names)
        else:
            names = _names(fe.file_caps)
            r.summary = (
                f"{fe.path} carries file capabilities ({', '.join(names)}); the exec was "
                "refused with EPERM, as when the bounding set lacks one of them "
                + (
                    "(the bounding set was not read)."
                    if f.cap_bnd is None
                    else "(the bounding set read holds them: it may have changed)."
                )
            )
            r.fixes = _grant_fixes(f, names)
        r.fixes.append(
            {
                "context": "image" if in_container else "file",
                "fix": f"setcap -r {fe.path} (if the program does not need them: "
                "it then runs with what it is given)",
            }
        )
        return r

    if f.syscall in _EXEC and f.ret == -errno.EPERM and (fe is None or not fe.exists):
        r.summary = (
            "The exec was refused with EPERM and the binary could not be read (the process "
            "was gone): the usual cause is file capabilities beyond the bounding set."
        )
        r.details.append(
            f"check it with getcap {fe.path if fe else 'PATH'}; the bounding set was "
            + ("not read" if f.cap_bnd is None else f"{f.cap_bnd:016x}")
        )
        return r

    # 2. seccomp: the filter returns EPERM before the syscall runs, so no capability
    # is ever checked.
    at_entry = f.entered is False and f.seccomp != 0
    if (f.seccomp == 2 or at_entry) and f.ret == -errno.EPERM:
        r.verdict = "seccomp"
        unlock = SECCOMP_UNLOCKED_BY.get(f.syscall)
        if f.seccomp == 2:
            r.summary = (
                f"A seccomp filter refused {f.syscall}: the process has a filter (Seccomp: 2) "
                "and no capability was checked in the call."
            )
        else:
            r.summary = (
                f"A seccomp filter refused {f.syscall}: the kernel refused it at entry, "
                "before it ran (no sys_enter), which is what a seccomp filter does; no "
                "capability was checked in the call."
            )
        if at_entry and f.seccomp is None:
            r.details.append(
                "the process was gone before its status could be read; a ptrace tracer "
                "skipping the call would look the same"
            )
        if unlock is not None:
            r.details.append(
                f"docker's and podman's default profile refuse {f.syscall} unless the "
                f"container has {unlock}."
            )
            if in_container:
                r.fixes = _grant_fixes(f, [unlock])
        else:
            r.details.append(
                f"{f.syscall} is not one that the default container profiles refuse: "
                "the filter is the program's, its service's or a custom profile."
            )
        profile = {
            "docker": f"docker run --security-opt seccomp=PROFILE.json (allowing {f.syscall}) ...",
            "podman": f"podman run --security-opt seccomp=PROFILE.json (allowing {f.syscall}) ...",
        }
        if f.kind in profile:
            r.fixes.append({"context": f.kind, "fix": profile[f.kind]})
        elif in_container:
            r.fixes.append(
                {
                    "context": "kubernetes",
                    "fix": "securityContext: {seccompProfile: {type: Localhost, "
                    f"localhostProfile: <one allowing {f.syscall}>}}",
                }
            )
        elif f.kind == "systemd":
            r.fixes.append({"context": "systemd", "fix": f"SystemCallFilter= allowing {f.syscall}"})
        return r

    # 3. A path whose own mode refuses this uid. A non-root process is asked for
    # CAP_DAC_* first (a capability finding); here the check was allowed or skipped.
    if (
        fe is not None
        and fe.exists
        and f.ret == -errno.EACCES
        and f.syscall in _EXEC
        and not fe.mode & 0o111
    ):
        r.verdict = "file permissions"
        r.summary = f"{fe.path} is not executable ({_mode(fe)}). Nothing to grant."
        r.fixes = [{"context": "file", "fix": f"chmod +x {fe.path}"}]
        return r
    if f.ret == -errno.EACCES and f.lsms:
        active = [m for m in f.lsms if m in ("apparmor", "selinux", "smack", "tomoyo", "landlock")]
        if active:
            r.verdict = "lsm"
            r.summary = (
                f"Refused with EACCES although no capability was refused: likely an LSM "
                f"(active: {', '.join(active)})."
            )
            r.fixes = [_lsm_fix(m, f.comm) for m in active]
            return r

    # 4. A process in a user namespace acting on what the host owns.
    if f.in_userns and f.ret == -errno.EPERM:
        r.verdict = "user namespace"
        r.summary = (
            "The process runs in a user namespace of its own: capabilities held there "
            "do not cover resources that the host's namespace owns. Nothing to grant inside."
        )
        return r

    # 5. Nothing fits: say what was seen.
    seen = [
        f"uid {f.uid}",
        "Seccomp: " + ("?" if f.seccomp is None else str(f.seccomp)),
        "NoNewPrivs: " + ("?" if f.no_new_privs is None else str(int(f.no_new_privs))),
        "user namespace: "
        + ("?" if f.in_userns is None else "own" if f.in_userns else "the host's"),
        "LSMs: " + ("not readable" if f.lsms is None else ", ".join(f.lsms) or "none"),
    ]
    if fe is not None:
        seen.append(f"{fe.path}: " + (_mode(fe) if fe.exists else "does not exist"))
    r.summary = (
        f"{f.syscall} failed with {outcome} and no capability was refused in it; it fits "
        "none of seccomp, file capabilities, an LSM or a user namespace."
    )
    r.details.append("seen: " + "; ".join(seen))
    return r


def _lsm_fix(lsm: str, comm: str) -> dict[str, str]:
    """Where to look for one active LSM's refusal (any of them may have refused)."""
    if lsm == "landlock":
        return {
            "context": "landlock",
            "fix": f"Landlock rules are set by {comm} itself or by the launcher that sandboxed "
            "it, not by a system policy: allow the path in those rules",
        }
    if lsm == "apparmor":
        return {
            "context": "apparmor",
            "fix": f"journalctl -k | grep 'apparmor=\"DENIED\"' for {comm}: widen its profile "
            "(a container's: --security-opt apparmor=PROFILE)",
        }
    if lsm == "selinux":
        return {
            "context": "selinux",
            "fix": f"ausearch -m AVC -c {comm}: a policy module (audit2allow) or the "
            "container's label (--security-opt label=...)",
        }
    return {
        "context": lsm,
        "fix": f"check the audit log for {comm}, and the {lsm} policy that confines it",
    }


# --- evidence (thin I/O) -------------------------------------------------------


def _status_fields(pid: int, proc_root: str) -> dict[str, str]:
    out: dict[str, str] = {}
    path = os.path.join(proc_root, str(pid), "status")
    with contextlib.suppress(OSError), open(path, encoding="utf-8") as fh:
        for line in fh:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def _file(
    path: str, pid: int, proc_root: str, *, host: bool, seen_as: str = "the process's root"
) -> FileEvidence:
    base = os.path.join(proc_root, str(pid), "root" if path.startswith("/") else "cwd")
    candidates = [(os.path.join(base, path.lstrip("/")), seen_as)]
    if path.startswith("/") and host:  # a container's paths mean nothing on the host
        candidates.append((path, "the host (the process was gone)"))
    for full, seen_from in candidates:
        try:
            st = os.stat(full)
        except OSError:  # gone, or a zombie whose root cannot be followed: next place
            continue
        fc = None
        with contextlib.suppress(OSError):
            parsed = file_caps(os.getxattr(full, "security.capability"))
            fc = parsed[0] if parsed else None
        return FileEvidence(path, True, st.st_mode, st.st_uid, st.st_gid, fc, seen_from)
    alive = os.path.exists(os.path.join(proc_root, str(pid), "root"))
    return FileEvidence(path, False, seen_from="nowhere" + ("" if alive else " (process gone)"))


def with_stand_in(f: RefusalFacts, pid: int, proc_root: str = "/proc") -> RefusalFacts:
    """``f`` completed from another live process of the same cgroup (the refused one
    is gone): it shares the container's bounding set, seccomp filter and root."""
    other = gather(
        syscall=f.syscall,
        ret=f.ret,
        comm=f.comm,
        pid=pid,
        uid=f.uid,
        path=None,
        proc_root=proc_root,
    )
    out, took = f, []
    if f.seccomp is None and other.seccomp is not None:
        took.append("status")
        out = replace(
            out,
            seccomp=other.seccomp,
            no_new_privs=other.no_new_privs,
            cap_bnd=other.cap_bnd,
            in_userns=other.in_userns,
            lsms=other.lsms,
        )
    if f.file is not None and not f.file.exists:  # the same container: the same root
        fe = _file(f.file.path, pid, proc_root, host=False, seen_as=f"the root of pid {pid}")
        if fe.exists:
            took.append("file")
            out = replace(out, file=fe)
    if not took:
        return f
    what = " and ".join(took)
    return replace(
        out, evidence_from=f"pid {pid} of the same cgroup for the {what} (pid {f.pid} was gone)"
    )


#: LSM ids of lsm_list_modules(2) (include/uapi/linux/lsm.h, Linux 6.8 to 6.18)
LSM_IDS = {
    100: "capability",
    101: "selinux",
    102: "smack",
    103: "tomoyo",
    104: "apparmor",
    105: "yama",
    106: "loadpin",
    107: "safesetid",
    108: "lockdown",
    109: "bpf",
    110: "landlock",
    111: "ima",
    112: "evm",
    113: "ipe",
}
#: lsm_list_modules's number: the common table's everywhere since Linux 5.1, but alpha
_NR_LSM_LIST_MODULES = None if platform.machine() == "alpha" else 461


def lsm_names(ids: list[int]) -> tuple[str, ...]:
    """lsm_list_modules's ids as /sys/kernel/security/lsm names them (lsm:N if unknown)."""
    return tuple(LSM_IDS.get(i, f"lsm:{i}") for i in ids)


def _list_modules() -> list[int] | None:
    """The active LSMs' ids from the kernel (lsm_list_modules, Linux 6.8+), None if
    the kernel has no such call."""
    if _NR_LSM_LIST_MODULES is None:
        return None
    ids = (ctypes.c_uint64 * 64)()
    size = ctypes.c_uint32(ctypes.sizeof(ids))
    libc = ctypes.CDLL(None, use_errno=True)
    n = int(libc.syscall(_NR_LSM_LIST_MODULES, ids, ctypes.byref(size), 0))
    return None if n < 0 else [int(i) for i in ids[:n]]


def active_lsms(sys_root: str = "/sys") -> tuple[str, ...] | None:
    """The active LSMs, in the kernel's order: /sys/kernel/security/lsm when
    securityfs is mounted, else (on the real /sys only) the kernel's own answer
    from lsm_list_modules, which needs no mount and no privilege; None when
    neither answers."""
    lsm_file = os.path.join(sys_root, "kernel", "security", "lsm")
    with contextlib.suppress(OSError), open(lsm_file, encoding="utf-8") as fh:
        return tuple(x for x in fh.read().strip().split(",") if x)
    if os.path.realpath(sys_root) != "/sys":
        return None  # a recorded or test root: the running kernel is not its
    ids = _list_modules()
    return None if ids is None else lsm_names(ids)


def gather(
    *,
    syscall: str,
    ret: int,
    comm: str,
    pid: int,
    uid: int,
    path: str | None,
    proc_root: str = "/proc",
    sys_root: str = "/sys",
    entered: bool | None = None,
    **workload: Any,
) -> RefusalFacts:
    """Read the evidence for one refusal now (the process may still be there)."""
    st = _status_fields(pid, proc_root)

    def num(key: str, base: int = 10) -> int | None:
        try:
            return int(st[key], base)
        except (KeyError, ValueError):
            return None

    nnp = num("NoNewPrivs")
    userns: bool | None = None
    with contextlib.suppress(OSError):
        userns = os.readlink(os.path.join(proc_root, str(pid), "ns", "user")) != os.readlink(
            os.path.join(proc_root, "1", "ns", "user")
        )
    lsms = active_lsms(sys_root)
    return RefusalFacts(
        syscall=syscall,
        ret=ret,
        comm=comm,
        pid=pid,
        uid=uid,
        seccomp=num("Seccomp"),
        no_new_privs=None if nnp is None else bool(nnp),
        cap_bnd=num("CapBnd", 16),
        cap_eff=num("CapEff", 16),
        in_userns=userns,
        lsms=lsms,
        file=(
            _file(path, pid, proc_root, host=workload.get("kind") not in _CONTAINER_KINDS)
            if path
            else None
        ),
        entered=entered,
        **workload,
    )


#: Runtime processes whose refusals set a container up and are tolerated by them
#: (podman's setrlimit, conmon's writes, runc probing): not the workload's.
#: Their execve refusals are kept: runc's init exec is the workload's entrypoint.
RUNTIME_SETUP_COMMS = (
    "podman",
    "docker",
    "nerdctl",
    "conmon",
    "runc",
    "runc:*",
    "crun",
    "containerd*",
    "catatonit",
)


def tolerated_runtime(comm: str, syscall: str) -> bool:
    """A refusal that the container runtime makes and tolerates while it sets up."""
    import fnmatch

    if syscall in _EXEC:
        return False
    return any(fnmatch.fnmatchcase(comm, p) for p in RUNTIME_SETUP_COMMS)


#: Syscalls whose EPERM says something other than "not permitted": no privilege,
#: capability or policy changes it, so it is no refusal to explain (Go's runtime
#: adds every fd to its epoll set and takes EPERM for "a regular file").
NOT_PERMISSION_EPERM: dict[str, str] = {
    "epoll_ctl": "the fd does not support epoll (a regular file or a directory)",
    "setsid": "the caller already leads a process group",
    "setpgid": "a session leader, or a group in another session",
}


def not_a_refusal(syscall: str, ret: int) -> bool:
    """An EPERM that means something else for this syscall (NOT_PERMISSION_EPERM)."""
    return ret == -errno.EPERM and syscall in NOT_PERMISSION_EPERM
