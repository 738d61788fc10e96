"""Capability profiles of workloads: what each container needed, what it holds,
and the least-privilege change, merged across replicas and nodes.

Pure. serve feeds :func:`use_of` each check of a Kubernetes container and
keeps the answer in a bounded :class:`ProfileBook` (exported as Prometheus
series); ``capwatch advise --prometheus`` reads those series back, merged by
Prometheus over every node, into :class:`ProfileSample` rows and
:func:`report` turns them into per-container advice with a ready patch.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from capwatch.decode.caps import CAP_LAST_CAP, DANGEROUS, cap_short, parse_cap
from capwatch.diagnose.advise import RUNTIME_COMMS

__all__ = [
    "PSS_RESTRICTED_ADD",
    "RUNTIME_DEFAULT_CAPS",
    "ContainerReport",
    "HeldSample",
    "ProfileBook",
    "ProfileSample",
    "controller_of",
    "held_capabilities",
    "owner_of",
    "report",
    "use_of",
]


def _caps(names: str) -> frozenset[int]:
    return frozenset(parse_cap(n) for n in names.split())


#: What a container holds when its spec adds and drops nothing, per runtime.
#: containerd (and docker/moby): oci.WithDefaultUnixCaps / moby's default list;
#: CRI-O: crio.conf's default_capabilities (since 1.18).
_CONTAINERD_DEFAULT = _caps(
    "CHOWN DAC_OVERRIDE FSETID FOWNER MKNOD NET_RAW SETGID SETUID SETFCAP SETPCAP"
    " NET_BIND_SERVICE SYS_CHROOT KILL AUDIT_WRITE"
)
RUNTIME_DEFAULT_CAPS: Mapping[str, frozenset[int]] = {
    "containerd": _CONTAINERD_DEFAULT,
    "docker": _CONTAINERD_DEFAULT,
    "crio": _caps("CHOWN DAC_OVERRIDE FSETID FOWNER SETGID SETUID SETPCAP NET_BIND_SERVICE KILL"),
}

#: The only capability the Pod Security Standard "restricted" lets a container add.
PSS_RESTRICTED_ADD = _caps("NET_BIND_SERVICE")
_ALL = frozenset(range(CAP_LAST_CAP + 1))


def held_capabilities(
    security_context: Mapping[str, Any] | None, runtime: str
) -> tuple[frozenset[int], str]:
    """What a container holds from its spec: ``privileged``, or the runtime's
    default set less ``drop`` plus ``add`` (``ALL`` in either). Returns the set
    and where it comes from, in words."""
    sc = security_context or {}
    if sc.get("privileged") is True:
        return _ALL, "privileged: true"
    caps = sc.get("capabilities") if isinstance(sc.get("capabilities"), Mapping) else {}
    assert isinstance(caps, Mapping)
    add = [str(x) for x in caps.get("add") or [] if isinstance(x, str)]
    drop = [str(x) for x in caps.get("drop") or [] if isinstance(x, str)]
    default = RUNTIME_DEFAULT_CAPS.get(runtime)
    if default is None:
        default = RUNTIME_DEFAULT_CAPS["containerd"]
        source = f"the containerd default set (runtime {runtime or 'unknown'} assumed alike)"
    else:
        source = f"the {runtime} default set"
    held = set(default)
    dropped, bad_drop = _parse_names(drop)
    added, bad_add = _parse_names(add)
    if any(d.upper() == "ALL" for d in drop):
        held.clear()
        source = "drop: [ALL]"
    else:
        held -= dropped
        if dropped:
            source += f" less {_names(dropped)}"
    if any(a.upper() == "ALL" for a in add):
        return _ALL, "add: [ALL]"
    held |= added
    if added:
        source += f" plus {_names(added)}"
    if bad_add + bad_drop:
        # spec strings are a tenant's: named only when they are capabilities
        source += f" ({bad_add + bad_drop} names that are not capabilities ignored)"
    return frozenset(held), source


def _parse_names(names: list[str]) -> tuple[set[int], int]:
    """The capabilities among ``names`` (ALL aside), and how many are not one."""
    caps: set[int] = set()
    bad = 0
    for n in names:
        c = _cap_or_none(n)
        if c is not None:
            caps.add(c)
        elif n.upper() != "ALL":
            bad += 1
    return caps, bad


def _names(caps: set[int]) -> str:
    return ", ".join(sorted(cap_short(c) for c in caps))


def _cap_or_none(name: str) -> int | None:
    try:
        return parse_cap(name)
    except ValueError:
        return None


#: (kind, namespace, name) -> the owner's ownerReferences, or None when unknown.
OwnerLookup = Any


def owner_of(
    namespace: str, pod: str, refs: Iterable[Mapping[str, Any]], lookup: OwnerLookup = None
) -> tuple[str, str]:
    """The workload that owns a pod: (kind, name). A ReplicaSet's Deployment and a
    Job's CronJob are found through ``lookup(kind, namespace, name)`` (their own
    ownerReferences); without it, or when it fails, the ReplicaSet or Job itself."""
    ctrl = _controller(refs)
    if ctrl is None:
        return "Pod", pod
    kind, name = ctrl
    if kind in ("ReplicaSet", "Job") and lookup is not None:
        parent = lookup(kind, namespace, name)
        up = _controller(parent or [])
        if up is not None and up[0] in ("Deployment", "CronJob"):
            return up
    return kind, name


def controller_of(refs: Iterable[Mapping[str, Any]]) -> tuple[str, str] | None:
    """A pod's controller from its ownerReferences: (kind, name), or None."""
    return _controller(refs)


def _controller(refs: Iterable[Mapping[str, Any]]) -> tuple[str, str] | None:
    refs = [r for r in refs if isinstance(r, Mapping)]
    pick = next((r for r in refs if r.get("controller") is True), refs[0] if refs else None)
    if pick is None or not pick.get("kind") or not pick.get("name"):
        return None
    return str(pick["kind"]), str(pick["name"])


def use_of(
    *, denied: bool, comm: str, audit: bool | None, rule: str | None, role: str | None
) -> str | None:
    """Whether a check shows a capability the workload *needs*: "needed" (allowed,
    and not a known probe), "denied" (refused, not expected: wanted but missing),
    or None (a probe, the runtime's own set-up, an expected denial)."""
    if any(fnmatch.fnmatchcase(comm, pat) for pat in RUNTIME_COMMS):
        return None
    if rule is not None:
        return None  # the policy (or the outcome) calls it a probe
    if not denied:
        return None if audit is False else "needed"  # noaudit checks are probes by design
    return None if role == "probe" else "denied"


@dataclass(frozen=True, slots=True)
class ProfileKey:
    namespace: str
    workload_kind: str
    workload: str
    container: str
    pod: str
    capability: str
    syscall: str
    use: str


class ProfileBook:
    """Bounded: at most ``limit`` keys; later new keys are counted, not kept."""

    def __init__(self, limit: int = 20_000) -> None:
        self.limit = limit
        self.seen: dict[ProfileKey, list[float]] = {}  # key -> [first, last, events]
        self.overflow = 0

    def add(self, key: ProfileKey, when: float) -> None:
        v = self.seen.get(key)
        if v is not None:
            v[1] = max(v[1], when)
            v[2] += 1
            return
        if len(self.seen) >= self.limit:
            self.overflow += 1
            return
        self.seen[key] = [when, when, 1]


@dataclass(frozen=True, slots=True)
class ProfileSample:
    """One profile series as Prometheus returns it (labels and the last-seen value)."""

    namespace: str
    workload_kind: str
    workload: str
    container: str
    pod: str
    node: str
    capability: str
    syscall: str
    use: str
    last_seen: float


@dataclass(frozen=True, slots=True)
class HeldSample:
    namespace: str
    workload_kind: str
    workload: str
    container: str
    pod: str
    node: str
    capability: str
    source: str


@dataclass
class ContainerReport:
    namespace: str
    workload_kind: str
    workload: str
    container: str
    needed: dict[str, dict[str, Any]] = field(default_factory=dict)  # cap -> evidence
    held: set[str] = field(default_factory=set)
    held_source: set[str] = field(default_factory=set)

    @property
    def least(self) -> list[str]:
        return sorted(self.needed)

    @property
    def unused(self) -> list[str]:
        return sorted(self.held - set(self.needed)) if self.held else []

    @property
    def missing(self) -> list[str]:
        """Needed but not held (denied now): the change must add them."""
        return sorted(c for c, ev in self.needed.items() if ev["denied"])

    @property
    def fits_restricted(self) -> bool:
        return {parse_cap(c) for c in self.needed} <= PSS_RESTRICTED_ADD

    @property
    def dangerous(self) -> list[str]:
        return [c for c in self.least if parse_cap(c) in DANGEROUS]

    def _path(self) -> list[str]:
        if self.workload_kind == "CronJob":
            return ["spec", "jobTemplate", "spec", "template", "spec"]
        if self.workload_kind == "Pod":
            return ["spec"]
        return ["spec", "template", "spec"]

    def patch(self) -> dict[str, Any]:
        """A strategic-merge patch: drop ALL, add exactly the least set."""
        add = [cap_short(parse_cap(c)) for c in self.least]
        body: dict[str, Any] = {
            "containers": [
                {
                    "name": self.container,
                    "securityContext": {"capabilities": {"drop": ["ALL"], "add": add}},
                }
            ]
        }
        for key in reversed(self._path()[1:]):
            body = {key: body}
        return {"spec": body} if self._path()[0] == "spec" else body

    def kustomize_patch(self) -> str:
        """The same patch as a kustomize strategic-merge patch file (YAML)."""
        obj = {
            "apiVersion": _API_VERSION.get(self.workload_kind, "apps/v1"),
            "kind": self.workload_kind,
            "metadata": {"name": self.workload, "namespace": self.namespace},
            **self.patch(),
        }
        return _yaml(obj)

    def kubectl_patch(self) -> str:
        kind = self.workload_kind.lower()
        body = json.dumps(self.patch(), separators=(",", ":"))
        return (
            f"kubectl -n {self.namespace} patch {kind} {self.workload} --type strategic -p '{body}'"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "workload": f"{self.workload_kind}/{self.workload}",
            "container": self.container,
            "capabilities": self.least,
            "evidence": self.needed,
            "missing": self.missing,
            "held": sorted(self.held),
            "held_from": sorted(self.held_source),
            "held_never_used": self.unused,
            "fits_pss_restricted": self.fits_restricted,
            "dangerous": self.dangerous,
            "kustomize_patch": self.kustomize_patch(),
            "kubectl_patch": self.kubectl_patch(),
        }

    def render(self) -> str:
        out = [f"{self.namespace}/{self.workload_kind}/{self.workload} container {self.container}:"]
        if not self.needed:
            out.append("  used no capability: drop them all")
        for c in self.least:
            ev = self.needed[c]
            tag = " (denied now: add it)" if ev["denied"] else ""
            out.append(
                f"  {c}{tag}: {ev['checks']} checks in {', '.join(ev['syscalls'])};"
                f" {ev['replicas']} replica(s) on {ev['nodes']} node(s); last seen {ev['last_seen']}"
            )
        if self.held:
            unused = ", ".join(self.unused) or "none"
            out.append(f"  holds ({'; '.join(sorted(self.held_source))}), never used: {unused}")
        out.append(
            "  fits the Pod Security Standard 'restricted': "
            + ("yes" if self.fits_restricted else "no (it allows adding only NET_BIND_SERVICE)")
        )
        if self.dangerous:
            out.append(f"  warning: {', '.join(self.dangerous)} amount to root on the host")
        out.append("  kustomize patch:")
        out += ["    " + line for line in self.kustomize_patch().splitlines()]
        out.append(f"  kubectl: {self.kubectl_patch()}")
        return "\n".join(out) + "\n"


_API_VERSION = {
    **dict.fromkeys(("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"), "apps/v1"),
    **dict.fromkeys(("Job", "CronJob"), "batch/v1"),
    "Pod": "v1",
}


def _yaml(obj: Any, indent: int = 0) -> str:
    """A small YAML emitter for patches (dicts, lists, strings): block style, quoted strings."""
    pad = "  " * indent
    lines: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, dict | list) and v:
                lines.append(f"{pad}{k}:")
                lines.append(_yaml(v, indent + 1).rstrip("\n"))
            else:
                lines.append(f"{pad}{k}: {_scalar(v)}")
    elif isinstance(obj, list):
        for item in obj:
            if isinstance(item, dict) and item:
                first, *rest = _yaml(item, indent + 1).splitlines()
                lines.append(f"{pad}- {first.strip()}")
                lines += rest
            else:
                lines.append(f"{pad}- {_scalar(item)}")
    return "\n".join(lines) + "\n"


def _scalar(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(_scalar(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{}"
    return json.dumps(v)


def report(
    samples: Iterable[ProfileSample],
    held: Iterable[HeldSample] = (),
    checks: Mapping[tuple[str, str, str, str], float] | None = None,
) -> list[ContainerReport]:
    """Per (namespace, workload, container): the least set with evidence merged
    over replicas and nodes, and what it holds but never used. ``checks`` gives
    the exact number of checks per (namespace, pod, container, capability) over
    the same window (capwatch_checks_total), for the evidence."""
    checks = checks or {}
    by: dict[tuple[str, str, str, str], ContainerReport] = {}
    pods: dict[tuple[tuple[str, str, str, str], str], set[str]] = {}
    nodes: dict[tuple[tuple[str, str, str, str], str], set[str]] = {}
    for s in samples:
        key = (s.namespace, s.workload_kind, s.workload, s.container)
        rep = by.setdefault(key, ContainerReport(*key))
        ev = rep.needed.setdefault(s.capability, _evidence())
        if s.syscall not in ev["syscalls"]:
            ev["syscalls"].append(s.syscall)
            ev["syscalls"].sort()
        if s.pod not in ev["_pods"]:
            ev["_pods"].add(s.pod)
            ev["checks"] += int(checks.get((s.namespace, s.pod, s.container, s.capability), 0))
        ev["denied"] = ev["denied"] or s.use == "denied"
        pods.setdefault((key, s.capability), set()).add(s.pod)
        nodes.setdefault((key, s.capability), set()).add(s.node)
        ev["_last"] = max(ev["_last"], s.last_seen)
    for (key, cap), ps in pods.items():
        ev = by[key].needed[cap]
        ev["replicas"], ev["nodes"] = len(ps), len(nodes[(key, cap)])
        ev["last_seen"] = _iso(ev.pop("_last"))
        del ev["_pods"]
    for h in held:
        key = (h.namespace, h.workload_kind, h.workload, h.container)
        rep = by.setdefault(key, ContainerReport(*key))
        rep.held.add(h.capability)
        rep.held_source.add(h.source)
    return [by[k] for k in sorted(by)]


def _evidence() -> dict[str, Any]:
    return {
        "syscalls": [],
        "checks": 0,
        "replicas": 0,
        "nodes": 0,
        "last_seen": "",
        "denied": False,
        "_last": 0.0,
        "_pods": set(),
    }


def _iso(t: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
