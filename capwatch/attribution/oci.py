"""A container's capability sets from its own configuration, not from a live process.

A short-lived process is often gone before /proc/PID/status is read; its
container's OCI bundle (config.json, written by podman, CRI-O, containerd and
docker before the container starts) or runc's state.json still says which
sets its processes start with. Pure parsing plus a thin reader whose roots
are parameters; the source file is returned with the sets, so that explain
states where they came from.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
from dataclasses import dataclass
from typing import Any

from capwatch.decode.caps import parse_cap
from capwatch.decode.procfs import ProcStatus

__all__ = ["BUNDLE_PATTERNS", "ConfigSets", "config_sets", "parse_config", "sets_status"]

#: Where runtimes keep a container's config (``{id}``: the full container id),
#: relative to the host's root. podman (root) and CRI-O, containerd (any
#: namespace: k8s.io, moby), docker's own containerd, runc's state.
BUNDLE_PATTERNS = (
    "var/lib/containers/storage/overlay-containers/{id}/userdata/config.json",
    "run/containers/storage/overlay-containers/{id}/userdata/config.json",
    "run/containerd/io.containerd.runtime.v2.task/*/{id}/config.json",
    "run/docker/containerd/daemon/io.containerd.runtime.v2.task/moby/{id}/config.json",
    "run/runc/{id}/state.json",
    "run/crun/{id}/config.json",
)


@dataclass(frozen=True)
class ConfigSets:
    uid: int
    bounding: int
    permitted: int
    effective: int
    inheritable: int
    ambient: int
    no_new_privs: bool
    source: str  # the file read


def _mask(names: Any) -> int:
    mask = 0
    if isinstance(names, list):
        for n in names:
            with contextlib.suppress(ValueError, TypeError):
                mask |= 1 << parse_cap(str(n))
    return mask


def parse_config(doc: Any, source: str) -> ConfigSets | None:
    """The sets of an OCI config.json (``process.capabilities``) or of runc's
    state.json (``config.capabilities`` with capitalised keys); None if neither."""
    if not isinstance(doc, dict):
        return None
    proc = doc.get("process")
    if isinstance(proc, dict) and isinstance(proc.get("capabilities"), dict):
        caps = proc["capabilities"]
        user: dict[str, Any] = proc["user"] if isinstance(proc.get("user"), dict) else {}
        return ConfigSets(
            uid=int(user.get("uid", 0)),
            bounding=_mask(caps.get("bounding")),
            permitted=_mask(caps.get("permitted")),
            effective=_mask(caps.get("effective")),
            inheritable=_mask(caps.get("inheritable")),
            ambient=_mask(caps.get("ambient")),
            no_new_privs=bool(proc.get("noNewPrivileges", False)),
            source=source,
        )
    cfg = doc.get("config")
    if isinstance(cfg, dict) and isinstance(cfg.get("capabilities"), dict):
        caps = cfg["capabilities"]
        return ConfigSets(
            uid=0,  # runc's state does not keep the process's user
            bounding=_mask(caps.get("Bounding")),
            permitted=_mask(caps.get("Permitted")),
            effective=_mask(caps.get("Effective")),
            inheritable=_mask(caps.get("Inheritable")),
            ambient=_mask(caps.get("Ambient")),
            no_new_privs=bool(cfg.get("no_new_privileges", False)),
            source=source,
        )
    return None


def config_sets(container_id: str, *, host_root: str = "/") -> ConfigSets | None:
    """The first readable configuration of container ``container_id`` (a full id)."""
    if len(container_id) < 12 or not all(c in "0123456789abcdef" for c in container_id):
        return None  # an id, never a pattern
    for pat in BUNDLE_PATTERNS:
        for path in sorted(glob.glob(os.path.join(host_root, pat.format(id=container_id)))):
            try:
                with open(path, encoding="utf-8") as f:
                    doc = json.load(f)
            except (OSError, ValueError):
                continue
            sets = parse_config(doc, path)
            if sets is not None:
                return sets
    return None


def sets_status(sets: ConfigSets, pid: int, comm: str, uid: int) -> ProcStatus:
    """The sets as explain reads them; ``uid`` is the denied process's own (from the event).

    A process running as another uid than the configured one changed user after
    starting, so its permitted and effective sets are not the configured ones:
    only the bounding set (which no process can raise) is kept then."""
    same_user = uid == sets.uid
    return ProcStatus(
        pid=pid,
        name=comm,
        uid=uid,
        euid=uid,
        cap_inh=sets.inheritable if same_user else 0,
        cap_prm=sets.permitted if same_user else 0,
        cap_eff=sets.effective if same_user else 0,
        cap_bnd=sets.bounding,
        cap_amb=sets.ambient if same_user else 0,
        no_new_privs=sets.no_new_privs,
    )
