"""Explain a denial in plain words, and say how to grant the capability.

Pure: given what was observed (the denial, the syscall's outcome, the
process's capability sets, the workload it runs in) it decides which set
lacks the capability and writes the fix for that context. No kernel, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from capwatch.attribution.containers import CONTAINER_KINDS
from capwatch.decode.caps import DANGEROUS, cap_name, cap_short
from capwatch.decode.procfs import ProcStatus
from capwatch.diagnose.outcome import outcome_text, role_of
from capwatch.text import visible, visible_all

__all__ = ["DenialFacts", "Explanation", "explain"]


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

    def to_dict(self) -> dict[str, Any]:
        # comm, names and the fixes quoting them come from processes and runtimes
        out: dict[str, Any] = visible_all(self.__dict__)
        return out

    def render(self) -> str:
        lines = [
            f"{self.capability} denied to {self.comm} (pid {self.pid}) in {self.syscall}"
            + (f" x{self.count}" if self.count > 1 else "")
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
    role = role_of(f.ret)
    if role == "unknown" and f.known_probe:
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
    )
    in_container = f.kind in CONTAINER_KINDS

    # 1. Did this denial make the call fail?
    if role == "probe":
        if f.ret is None:
            ex.summary = (
                f"A known probe, not a cause ({f.known_probe}): the kernel checks "
                f"{name} and carries on without it. Nothing to grant."
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
    if role == "cause":
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
    else:
        ex.details.append("The process is gone: which set lacked it cannot be read any more.")

    # 3. The fix for this context.
    if missing in ("bounding", "unknown"):
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
    if f.cap in DANGEROUS and ex.fixes:
        ex.warning = (
            f"{name} is dangerous: granting it to a container is as good as giving it "
            "root on the host. Prefer a narrower way (a helper on the host, a device plugin)."
        )
    return ex
