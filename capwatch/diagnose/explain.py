"""Explain a denial in plain words, and say how to grant the capability.

Pure: given what was observed (the denial, the syscall's outcome, the
process's capability sets, the workload it runs in) it decides which set
lacks the capability and writes the fix for that context. No kernel, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from capwatch.attribution.containers import CONTAINER_KINDS
from capwatch.decode.caps import DANGEROUS, cap_name, cap_short, parse_cap
from capwatch.decode.procfs import ProcStatus
from capwatch.diagnose.outcome import is_async_candidate, outcome_text, reply_text, role_of
from capwatch.text import visible, visible_all

__all__ = ["DenialFacts", "Explanation", "explain", "fold"]

_SYSLOG = parse_cap("CAP_SYSLOG")
_SYS_ADMIN = parse_cap("CAP_SYS_ADMIN")
_DAC_PAIR = frozenset({parse_cap("CAP_DAC_OVERRIDE"), parse_cap("CAP_DAC_READ_SEARCH")})
#: Capabilities the kernel asks for only after a file's own permissions refused.
_FILE_PERMISSION = _DAC_PAIR | {parse_cap("CAP_FOWNER")}
#: Syscalls in which __vm_enough_memory() asks for CAP_SYS_ADMIN (noaudit) to
#: decide the overcommit reserve of a non-root process (mm/util.c, every
#: version since 2.6): the call goes on either way.
_VM_ACCOUNTING = frozenset(
    {
        "mmap",
        "brk",
        "clone",
        "clone3",
        "fork",
        "vfork",
        "execve",
        "execveat",
        "mprotect",
        "mremap",
        "shmat",
        "shmget",
        "mlock",
        "munmap",
    }
)


@dataclass(frozen=True)
class DenialFacts:
    cap: int
    syscall: str
    comm: str
    pid: int
    ret: int | None = None  # the syscall's return value (outcome mode), None if unknown
    known_probe: str | None = None  # the policy rule that calls it a known probe
    status: ProcStatus | None = None  # /proc/PID/status at the time, if readable
    kind: str = (
        "host"  # host | docker | podman | containerd | crio | kubernetes | systemd | unknown
    )
    container: str = ""  # name or short id
    pod: str = ""
    namespace: str = ""
    service: str = ""  # systemd unit
    userns: bool | None = None  # the resource's (target) user namespace is not the host's
    count: int = 1
    exit_code: int | None = None  # the process's exit status (asynchronous candidates)
    reply: int | None = None  # the netlink reply's error, 0 for an ack (asynchronous candidates)
    channel: str = ""  # what a send-family syscall wrote to: netlink | socket | file | ""
    uid: int | None = None  # the process's real uid when denied
    container_id: str = ""
    caps_source: str = ""  # where ``status``'s sets come from when not the process itself


@dataclass
class Explanation:
    capability: str
    syscall: str
    comm: str
    pid: int
    outcome: str  # EPERM | ENODEV | success | unknown
    role: str  # cause | probe | unknown
    missing_from: str  # bounding | permitted | effective | none | unknown
    userns: bool | None
    summary: str
    details: list[str] = field(default_factory=list)
    fixes: list[dict[str, str]] = field(default_factory=list)
    warning: str | None = None
    count: int = 1
    kind: str = "host"
    container: str = ""
    container_id: str = ""
    pod: str = ""
    namespace: str = ""
    asynchronous: bool = False  # the refusal came (or may have come) in a later reply
    reply: str = ""  # the netlink reply read after it: EPERM, ack, another errno; "" unseen
    caps_source: str = ""  # "" when the sets were the process's own
    #: what refused: capability | file permissions | no_new_privs
    verdict: str = "capability"

    def to_dict(self) -> dict[str, Any]:
        # comm, names and the fixes quoting them come from processes and runtimes
        out: dict[str, Any] = visible_all(self.__dict__)
        return out

    def where(self) -> str:
        """' in container NAME (id ...)' / ' in pod NS/POD container NAME' / ''."""
        if self.pod:
            return f" in pod {self.namespace}/{self.pod} container {self.container or '?'}"
        if self.container and self.kind in CONTAINER_KINDS:
            cid = self.container_id[:12]
            same = not cid or self.container.startswith(cid)
            return f" in {self.kind} container {self.container}" + ("" if same else f" ({cid})")
        return ""

    def render(self) -> str:
        lines = [
            f"{self.capability} denied to {self.comm} (pid {self.pid}){self.where()} in "
            f"{self.syscall}" + (f" x{self.count}" if self.count > 1 else "")
        ]
        lines.append(f"  {self.summary}")
        lines += [f"  {d}" for d in self.details]
        if self.fixes:
            lines.append("  fix:")
            lines += [f"    {f['context']}: {f['fix']}" for f in self.fixes]
        if self.warning:
            lines.append(f"  warning: {self.warning}")
        # each line escaped on its own: a newline or ESC in a comm stays visible text
        return "\n".join(visible(line) for line in lines) + "\n"


def _missing_from(cap: int, st: ProcStatus | None) -> str:
    if st is None:
        return "unknown"
    bit = 1 << cap
    if not st.cap_bnd & bit:
        return "bounding"
    if not st.cap_prm & bit:
        return "permitted"
    if not st.cap_eff & bit:
        return "effective"
    return "none"


def _container_fixes(kind: str, short: str, f: DenialFacts) -> list[dict[str, str]]:
    k8s = (
        f'securityContext: {{capabilities: {{add: ["{short}"]}}}} on container '
        f"{f.container or '<name>'}" + (f" of pod {f.namespace}/{f.pod}" if f.pod else "")
    )
    table = {
        "docker": [{"context": "docker", "fix": f"docker run --cap-add={short} ..."}],
        "podman": [{"context": "podman", "fix": f"podman run --cap-add={short} ..."}],
        "kubernetes": [{"context": "kubernetes", "fix": k8s}],
        # ctr takes only the CAP_-prefixed name ("capabilities must be specified
        # with 'CAP_' prefix"); checked against ctr 1.6 in tests/kernel/test_runtimes.py
        "containerd": [
            *([{"context": "kubernetes", "fix": k8s}] if f.namespace == "k8s.io" else []),
            {"context": "ctr", "fix": f"ctr run --cap-add {cap_name(f.cap)} ..."},
            {"context": "nerdctl", "fix": f"nerdctl run --cap-add={short} ..."},
        ],
        "crio": [{"context": "kubernetes", "fix": k8s}],
    }
    return table.get(
        kind,
        [
            {"context": "docker", "fix": f"docker run --cap-add={short} ..."},
            {"context": "podman", "fix": f"podman run --cap-add={short} ..."},
            {"context": "kubernetes", "fix": k8s},
        ],
    )


def explain(f: DenialFacts) -> Explanation:
    name, short = cap_name(f.cap), cap_short(f.cap)
    role = role_of(f.ret, f.syscall, f.exit_code, f.reply, f.channel)
    asynchronous = is_async_candidate(f.ret, f.syscall, f.channel)
    if role == "unknown" and f.known_probe and not asynchronous:
        role = "probe"
    missing = _missing_from(f.cap, f.status)
    ex = Explanation(
        capability=name,
        syscall=f.syscall,
        comm=f.comm,
        pid=f.pid,
        outcome=outcome_text(f.ret),
        role=role,
        missing_from=missing,
        userns=f.userns,
        summary="",
        count=f.count,
        kind=f.kind,
        container=f.container,
        container_id=f.container_id,
        pod=f.pod,
        namespace=f.namespace,
        asynchronous=asynchronous,
        reply=reply_text(f.reply) if asynchronous else "",
        caps_source=f.caps_source,
    )
    in_container = f.kind in CONTAINER_KINDS

    # 1. Did this denial make the call fail?
    if role == "probe" and f.cap == _SYSLOG and f.ret is not None and f.ret >= 0:
        ex.summary = (
            f"Not a failure, but it changes the result: without {name} the kernel shows "
            "kernel addresses as zeros (/proc/kallsyms, /proc/modules, %pK fields under "
            "kptr_restrict). Grant it only if the program needs the real addresses."
        )
        return ex
    if role == "probe":
        if f.ret is None:
            ex.summary = (
                f"A known probe, not a cause ({f.known_probe}): the kernel checks "
                f"{name} and carries on without it. Nothing to grant."
            )
        elif asynchronous and f.reply is not None:
            said = (
                "acknowledged the request"
                if f.reply == 0
                else f"refused it with {reply_text(f.reply)}, not EPERM"
            )
            ex.summary = (
                f"A probe, not a cause: {f.syscall} succeeded and the netlink reply {said}; "
                f"the kernel checked {name} and went on without it. Nothing to grant."
            )
        elif f.ret >= 0:
            ex.summary = (
                f"A probe, not a cause: {f.syscall} succeeded anyway. The kernel "
                f"checked {name} and went on without it. Nothing to grant."
            )
        else:
            ex.summary = (
                f"A probe, not a cause: {f.syscall} failed with {ex.outcome}, not "
                f"EPERM, so the missing {name} is not why it failed. Nothing to grant."
            )
        return ex
    if role == "cause" and asynchronous and f.reply is not None:
        ex.summary = (
            f"A cause (asynchronous): {f.syscall} returned success, but the kernel reports "
            f"netlink errors in the reply, not in the call; {name} was refused inside it and "
            f"the reply {f.comm} read said {reply_text(f.reply)}."
        )
    elif role == "cause" and asynchronous:
        ex.summary = (
            f"A cause (asynchronous): {f.syscall} returned success, but the kernel reports "
            f"netlink errors in the reply, not in the call; {name} was refused inside it and "
            f"{f.comm} then exited with status {f.exit_code} (the reply was not seen)."
        )
    elif asynchronous:
        if f.exit_code is None:
            seen = "its exit was not seen"
        elif f.exit_code == 0:
            seen = "it exited with status 0, so it may have coped"
        else:
            seen = (
                f"it exited with status {f.exit_code}, but {f.syscall} may have written to a "
                "file (then this was a probe): the process was gone before its fd could be read"
            )
        ex.summary = (
            f"Unknown, not a probe: {f.syscall} succeeded, but on a netlink socket the kernel "
            f"reports the refusal in the reply, and capwatch saw no reply read; {seen}."
        )
    elif role == "cause":
        ex.summary = f"{f.syscall} failed with {ex.outcome} because {name} is missing."
    else:
        ex.summary = (
            f"{f.syscall} needed {name} and was refused (the syscall's result is "
            "unknown: run with --outcome to tell causes from probes)."
        )

    # 2. Which set lacks it, and so who can fix it.
    if f.userns:
        # CW_F_USERNS: the target namespace (the one owning the resource) is not the
        # host's. A capability held in that namespace is enough, so the usual fix
        # works. (The opposite case, a rootless container touching what the host
        # owns, needs the process's own namespace, which capwatch cannot read
        # without kernel struct layouts: docs/design.md.)
        ex.details.append(
            f"The resource belongs to a user namespace other than the host's (a container "
            f"with its own user namespace): {name} held in that namespace is enough."
        )
    if missing == "bounding":
        ex.details.append(
            f"{name} is not in the process's bounding set: nothing inside the "
            + ("container" if in_container else "process tree")
            + " can gain it; only whoever starts it can."
        )
    elif missing == "permitted":
        ex.details.append(
            f"{name} is in the bounding set but not permitted: the process runs as uid "
            f"{f.status.uid if f.status else '?'} without file capabilities or ambient "
            "capabilities that would grant it."
        )
    elif missing == "effective":
        ex.details.append(
            f"{name} is permitted but not effective: the program has it and did not raise "
            "it (cap_set_proc / capset), or its file capabilities lack the +e bit."
        )
    elif missing == "none":
        ex.details.append(
            f"The process holds {name} now: it was granted after the denial, "
            "or another thread was denied."
        )
    elif in_container and f.uid == 0:
        ex.details.append(
            "The process is gone and its sets were not read; it ran as root in the "
            f"container, which holds every capability of its bounding set: {name} is most "
            "likely missing from the container's bounding set."
        )
        missing = ex.missing_from = "bounding (inferred)"
    else:
        ex.details.append("The process is gone: which set lacked it cannot be read any more.")
    if f.caps_source:
        ex.details.append(f"(capability sets from {f.caps_source})")

    # 3. The fix for this context.
    if missing in ("bounding", "unknown", "bounding (inferred)"):
        if in_container:
            ex.fixes += _container_fixes(f.kind, short, f)
        elif f.kind == "systemd":
            unit = f.service or "the unit"
            ex.fixes.append(
                {
                    "context": "systemd",
                    "fix": f"in {unit}: CapabilityBoundingSet={name} "
                    f"(or remove the line that drops it); AmbientCapabilities={name} for a non-root User=",
                }
            )
        else:
            ex.fixes.append(
                {
                    "context": "host",
                    "fix": "start it from a shell or service whose "
                    f"bounding set includes {name} (check the parent with capwatch ps)",
                }
            )
    uid = f.status.uid if f.status is not None else f.uid
    if missing == "permitted" and f.cap in _FILE_PERMISSION and uid not in (0, None):
        # generic_permission() asks for these only after the file's mode and owner
        # refused the uid (fs/namei.c, every version): the refusal is the file's.
        ex.verdict = "file permissions"
        ex.summary = (
            f"{f.syscall} failed with {ex.outcome}: file permissions refused uid {uid}; the "
            f"kernel then checked whether {name} lets it override them."
        )
        ex.details.append(
            f"This is a plain file permission refusal: the file's mode, owner or ACL refuse "
            f"uid {uid}, and the kernel then asked whether the process may override them "
            f"({name}). A path is not known from the syscall: check it with ls -l / stat."
        )
        ex.fixes.append(
            {
                "context": "file permissions",
                "fix": f"give uid {uid} access to the file (chown, chmod or setfacl), or run "
                f"as a user that has it; granting {name} would bypass the permissions of "
                "every file, not just this one",
            }
        )
        return _warn(ex, f, in_container)
    if missing == "permitted" and f.status is not None and f.status.no_new_privs:
        ex.verdict = "no_new_privs"
        ex.details.append(
            "no_new_privs is set (NoNewPrivs: 1): a setuid or file-capability binary gains "
            f"nothing on exec, so {f.comm} runs without {name} even if the binary carries it."
        )
        ex.fixes += [
            {"context": "setpriv", "fix": "run it without setpriv --no-new-privs"},
            {"context": "systemd", "fix": "NoNewPrivileges=no, or AmbientCapabilities=" + name},
            {
                "context": "container",
                "fix": "drop --security-opt no-new-privileges (docker/podman), or "
                "allowPrivilegeEscalation: true (kubernetes securityContext)",
            },
        ]
        return _warn(ex, f, in_container)
    if missing in ("permitted", "unknown"):
        ex.fixes.append({"context": "file", "fix": f"setcap {name.lower()}+ep /path/to/{f.comm}"})
        ex.fixes.append({"context": "systemd", "fix": f"AmbientCapabilities={name}"})
        if in_container:
            ex.fixes.append(
                {
                    "context": "container",
                    "fix": f"run as root, or add {short} and set it "
                    "on the binary with setcap (non-root users get no capabilities from --cap-add alone)",
                }
            )
    if missing == "effective":
        ex.fixes.append(
            {
                "context": "program",
                "fix": f"raise {name} into the effective set before "
                f"{f.syscall} (capset), or setcap {name.lower()}+ep on the binary",
            }
        )
    return _warn(ex, f, in_container)


def _warn(ex: Explanation, f: DenialFacts, in_container: bool) -> Explanation:
    name = ex.capability
    if f.cap in DANGEROUS and ex.fixes and ex.verdict == "capability":
        ex.warning = (
            (
                f"{name} is dangerous: granting it to a container is as good as giving it "
                "root on the host. Prefer a narrower way (a helper on the host, a device plugin)."
            )
            if in_container
            else (
                f"{name} is dangerous: a process holding it can take over the host. "
                "Grant it to this program only, not to its whole service or shell."
            )
        )
    return ex


def fold(exps: list[Explanation]) -> list[Explanation]:
    """The list as a reader wants it: the CAP_SYS_ADMIN memory-accounting probes
    (one per mmap, brk, clone, execve...) folded into one line, and the
    DAC_OVERRIDE / DAC_READ_SEARCH pair of one syscall marked "either would do"."""
    out: list[Explanation] = []
    vm: Explanation | None = None
    for e in exps:
        if (
            e.role == "probe"
            and e.capability == cap_name(_SYS_ADMIN)
            and e.syscall.split(",")[0] in _VM_ACCOUNTING
            and e.outcome == "success"
        ):
            if vm is None:
                vm = Explanation(**{**e.__dict__, "details": [], "fixes": []})
                vm.summary = (
                    "A probe, not a cause: memory accounting (__vm_enough_memory) asks for "
                    "CAP_SYS_ADMIN on every mmap, brk, clone and execve of a process that lacks "
                    "it, to size its overcommit reserve, and goes on without it. Nothing to grant."
                )
                out.append(vm)
            else:
                vm.count += e.count
                if e.syscall not in vm.syscall.split(","):
                    vm.syscall += f",{e.syscall}"
                if e.comm not in vm.comm.split(","):
                    vm.comm += f",{e.comm}"
            continue
        out.append(e)
    for e in out:
        if parse_cap(e.capability) not in _DAC_PAIR or e.role == "probe":
            continue
        other = next(
            (
                o
                for o in out
                if o is not e
                and parse_cap(o.capability) in _DAC_PAIR
                and o.capability != e.capability
                and (o.pid, o.syscall, o.role) == (e.pid, e.syscall, e.role)
            ),
            None,
        )
        if other is not None:
            e.details.append(
                f"{e.capability} and {other.capability} were both refused in this "
                f"{e.syscall}: either would do (CAP_DAC_READ_SEARCH is the narrower, "
                "for reading and searching only)."
            )
    return out
