"""Least privilege from observation: which capabilities a workload really used.

Pure: fed what was observed (each distinct check with its verdict, the
syscall's outcome for denials, and the policy's verdict on known probes),
it proposes the smallest set to grant, with the evidence for each, and
never a capability that was only probed.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace
from typing import Any

from capwatch.decode.caps import DANGEROUS, cap_name, cap_short
from capwatch.text import visible, visible_all

__all__ = ["CTR_DEFAULT_CAPS", "RUNTIME_COMMS", "Advice", "Observation", "advise"]

#: Processes of the container runtime itself: their checks set the container
#: up (runc's init before it execs the entrypoint, conmon) and are not the
#: workload's own.
RUNTIME_COMMS = ("runc", "runc:*", "crun", "conmon", "containerd-shim*", "youki", "catatonit")


#: The capabilities ``ctr run`` grants by default (containerd's default OCI spec,
#: the same as docker's), by number: bounding set 0xa80425fb.
CTR_DEFAULT_CAPS = (0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31)


@dataclass(frozen=True)
class Observation:
    cap: int
    denied: bool
    syscall: str
    comm: str
    role: str = "unknown"  # for denials: cause | probe | unknown (from the outcome)
    outcome: str = "unknown"
    probe_rule: str | None = None  # the policy rule that calls this check a known probe
    count: int = 1
    reply: str = ""  # the netlink reply read after a send-family call: EPERM, ack, ...


@dataclass
class Advice:
    duration_s: float
    target: str
    grant: dict[int, list[str]] = field(default_factory=dict)  # cap -> evidence
    missing: dict[int, list[str]] = field(default_factory=dict)  # denied causes: must be added
    ignored: dict[int, list[str]] = field(default_factory=dict)  # probes, runtime, uncertain

    @property
    def caps(self) -> list[int]:
        return sorted(set(self.grant) | set(self.missing))

    def kubernetes(self) -> str:
        add = ", ".join(f'"{cap_short(c)}"' for c in self.caps)
        return f'securityContext:\n  capabilities:\n    drop: ["ALL"]\n    add: [{add}]\n'

    def docker(self) -> str:
        return " ".join(["--cap-drop=ALL", *(f"--cap-add={cap_short(c)}" for c in self.caps)])

    def ctr(self) -> str:
        """``ctr run`` flags: ctr has no "drop all", so each default it does not need is
        dropped by name (CAP_ prefix required), and what it needs beyond them added."""
        drop = [f"--cap-drop {cap_name(c)}" for c in CTR_DEFAULT_CAPS if c not in self.caps]
        add = [f"--cap-add {cap_name(c)}" for c in self.caps if c not in CTR_DEFAULT_CAPS]
        return " ".join(drop + add)

    def systemd(self) -> str:
        names = " ".join(cap_name(c) for c in self.caps)
        return f"CapabilityBoundingSet={names}\nAmbientCapabilities={names}\n"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = visible_all(self._dict())  # evidence quotes comms
        return out

    def _dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "observed_seconds": round(self.duration_s, 1),
            "capabilities": [cap_name(c) for c in self.caps],
            "evidence": {
                cap_name(c): self.grant.get(c, []) + self.missing.get(c, []) for c in self.caps
            },
            "ignored": {cap_name(c): v for c, v in sorted(self.ignored.items())},
            "kubernetes": self.kubernetes(),
            "docker": self.docker(),
            "ctr": self.ctr(),
            "systemd": self.systemd(),
            "dangerous": [cap_name(c) for c in self.caps if c in DANGEROUS],
        }

    def render(self) -> str:
        out = [f"observed {self.target} for {self.duration_s:.0f}s"]
        if not self.caps:
            out.append("it used no capability: drop them all")
        for c in self.caps:
            ev = self.grant.get(c, []) + self.missing.get(c, [])
            tag = " (denied now: add it)" if c in self.missing else ""
            out.append(f"  {cap_name(c)}{tag}: {'; '.join(ev[:3])}")
        if self.ignored:
            out.append("not proposed:")
            for c, why in sorted(self.ignored.items()):
                out.append(f"  {cap_name(c)}: {'; '.join(why[:2])}")
        out.append("kubernetes:")
        out += ["  " + line for line in self.kubernetes().splitlines()]
        out.append(f"docker/podman: {self.docker()}")
        out.append(f"ctr: {self.ctr()}")
        out.append("systemd:")
        out += ["  " + line for line in self.systemd().splitlines()]
        danger = [cap_name(c) for c in self.caps if c in DANGEROUS]
        if danger:
            verb = "amounts" if len(danger) == 1 else "amount"
            out.append(f"warning: {', '.join(danger)} {verb} to root on the host in a container")
        out.append(
            "note: only what ran while observed is covered; rarely used paths "
            "(error handling, upgrades, signals) may need more"
        )
        return "\n".join(visible(line) for line in out) + "\n"  # evidence quotes comms


def _is_runtime(comm: str) -> bool:
    return any(fnmatch.fnmatchcase(comm, pat) for pat in RUNTIME_COMMS)


def _merged(observations: list[Observation]) -> list[Observation]:
    """One observation per distinct check, its count the sum (no duplicated evidence)."""
    out: dict[Observation, Observation] = {}
    for o in observations:
        key = replace(o, count=0)
        prev = out.get(key)
        out[key] = o if prev is None else replace(prev, count=prev.count + o.count)
    return list(out.values())


def advise(observations: list[Observation], *, duration_s: float, target: str) -> Advice:
    a = Advice(duration_s=duration_s, target=target)
    for o in _merged(observations):
        what = f"{'denied' if o.denied else 'allowed'} in {o.syscall} ({o.comm}) x{o.count}"
        if _is_runtime(o.comm):
            a.ignored.setdefault(o.cap, []).append(f"container runtime setup: {what}")
        elif not o.denied and o.probe_rule is None:
            a.grant.setdefault(o.cap, []).append(what)
        elif not o.denied:
            a.ignored.setdefault(o.cap, []).append(f"known probe ({o.probe_rule}): {what}")
        elif o.role == "cause" and o.outcome == "success":
            how = (
                f"the netlink reply said {o.reply}"
                if o.reply
                else "no reply seen, the process exited non-zero"
            )
            a.missing.setdefault(o.cap, []).append(
                f"{what}, refused in the reply (the call returned success; {how})"
            )
        elif o.role == "probe" and o.reply:
            a.ignored.setdefault(o.cap, []).append(
                f"probe: {what}, the netlink reply said {o.reply}"
            )
        elif o.role == "cause":
            a.missing.setdefault(o.cap, []).append(f"{what}, the call failed with {o.outcome}")
        elif o.role == "probe":
            a.ignored.setdefault(o.cap, []).append(
                f"probe: {what}, the call ended with {o.outcome}"
            )
        else:
            a.ignored.setdefault(o.cap, []).append(f"uncertain (outcome unknown): {what}")
    for c in list(a.ignored):
        if c in a.grant or c in a.missing:
            del a.ignored[c]
    for table in (a.grant, a.missing, a.ignored):
        for c, lines in table.items():
            table[c] = list(dict.fromkeys(lines))  # one line per distinct piece of evidence
    return a
