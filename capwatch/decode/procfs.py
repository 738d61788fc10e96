"""/proc/PID/status: a process's capability sets, parsed without a kernel.

``proc_root`` is a parameter so that the DaemonSet can read the host's /proc
(mounted at /host/proc) and tests can read fixture trees.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from capwatch.decode.caps import parse_mask
from capwatch.errors import CapwatchError

__all__ = ["CAP_FIELDS", "ProcStatus", "fd_kind", "list_pids", "parse_status", "read_status"]

#: The five capability sets, in the order /proc prints them.
CAP_FIELDS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


@dataclass(frozen=True, slots=True)
class ProcStatus:
    pid: int
    name: str
    uid: int  # real uid
    euid: int
    cap_inh: int
    cap_prm: int
    cap_eff: int
    cap_bnd: int
    cap_amb: int
    nspid: tuple[int, ...] = ()  # pid in each nested pid namespace, outermost first
    no_new_privs: bool = False

    def caps(self) -> dict[str, int]:
        return {
            "CapInh": self.cap_inh,
            "CapPrm": self.cap_prm,
            "CapEff": self.cap_eff,
            "CapBnd": self.cap_bnd,
            "CapAmb": self.cap_amb,
        }


def parse_status(text: str, pid: int = 0) -> ProcStatus:
    """Parse the text of /proc/PID/status. Raises ValueError on a malformed one."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    try:
        uids = fields["Uid"].split()
        caps = [parse_mask(fields.get(f, "0")) for f in CAP_FIELDS]
        nspid = tuple(int(x) for x in fields.get("NSpid", "").split())
        return ProcStatus(
            pid=int(fields.get("Pid", pid)),
            name=fields.get("Name", "?"),
            uid=int(uids[0]),
            euid=int(uids[1]),
            cap_inh=caps[0],
            cap_prm=caps[1],
            cap_eff=caps[2],
            cap_bnd=caps[3],
            cap_amb=caps[4],
            nspid=nspid,
            no_new_privs=fields.get("NoNewPrivs", "0") == "1",
        )
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"malformed status: {exc}") from None


def read_status(pid: int, *, proc_root: str = "/proc") -> ProcStatus:
    path = os.path.join(proc_root, str(pid), "status")
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except FileNotFoundError:
        raise CapwatchError(f"no process with pid {pid} (no {path})") from None
    except OSError as exc:
        raise CapwatchError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return parse_status(text, pid)
    except ValueError as exc:
        raise CapwatchError(f"{path}: {exc}") from None


def list_pids(*, proc_root: str = "/proc") -> list[int]:
    try:
        return sorted(int(d) for d in os.listdir(proc_root) if d.isdigit())
    except OSError as exc:
        raise CapwatchError(f"cannot list {proc_root}: {exc.strerror}") from None


def fd_kind(pid: int, fd: int, *, proc_root: str = "/proc") -> str | None:
    """What ``fd`` of ``pid`` is: "netlink", "socket" (another family), "file"
    (a file, pipe, tty, anonymous inode), or None when it cannot be told (the
    process or the fd is gone). A netlink socket is found by its inode in the
    process's own network namespace's /proc/PID/net/netlink (last column)."""
    try:
        link = os.readlink(f"{proc_root}/{pid}/fd/{fd}")
    except OSError:
        return None
    if not (link.startswith("socket:[") and link.endswith("]")):
        return "file"
    inode = link[len("socket:[") : -1]
    try:
        with open(f"{proc_root}/{pid}/net/netlink", encoding="ascii", errors="replace") as f:
            table = f.read()
    except OSError:
        return None
    for line in table.splitlines()[1:]:
        cols = line.split()
        if cols and cols[-1] == inode:
            return "netlink"
    return "socket"
