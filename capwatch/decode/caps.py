"""Capability knowledge: the 41 Linux capabilities, names, and mask decoding.

Pure Python, no kernel. Numbers follow include/uapi/linux/capability.h
(CAP_LAST_CAP = 40, CAP_CHECKPOINT_RESTORE, since Linux 5.9). Unknown numbers
decode as ``cap:N``; nothing here raises on a number.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "CAPS",
    "CAP_LAST_CAP",
    "DANGEROUS",
    "Capability",
    "MaskDecode",
    "cap_name",
    "cap_short",
    "decode_mask",
    "encode_mask",
    "parse_cap",
    "parse_mask",
]


@dataclass(frozen=True, slots=True)
class Capability:
    number: int
    name: str  # CAP_SYS_TIME
    summary: str

    @property
    def short(self) -> str:
        """The name without CAP_, as docker --cap-add and Kubernetes spell it."""
        return self.name[4:]


_TABLE: tuple[tuple[str, str], ...] = (
    ("CAP_CHOWN", "change file owners and groups (chown)"),
    ("CAP_DAC_OVERRIDE", "bypass file read, write and execute permission checks"),
    ("CAP_DAC_READ_SEARCH", "bypass file read and directory read/search permission checks"),
    ("CAP_FOWNER", "bypass checks that the caller owns the file (chmod, utime, ...)"),
    ("CAP_FSETID", "keep set-user/group-ID bits when a file is modified"),
    ("CAP_KILL", "send signals to processes of other users"),
    ("CAP_SETGID", "change group IDs (setgid, setgroups)"),
    ("CAP_SETUID", "change user IDs (setuid, setreuid, ...)"),
    ("CAP_SETPCAP", "change capability bounding/inheritable sets, securebits"),
    ("CAP_LINUX_IMMUTABLE", "set the immutable and append-only file attributes"),
    ("CAP_NET_BIND_SERVICE", "bind sockets to ports below 1024"),
    ("CAP_NET_BROADCAST", "broadcast and listen to multicast (unused)"),
    ("CAP_NET_ADMIN", "network administration: interfaces, routes, firewall"),
    ("CAP_NET_RAW", "use RAW and PACKET sockets (ping, tcpdump)"),
    ("CAP_IPC_LOCK", "lock memory (mlock, mlockall, SHM_LOCK)"),
    ("CAP_IPC_OWNER", "bypass permission checks on System V IPC objects"),
    ("CAP_SYS_MODULE", "load and unload kernel modules"),
    ("CAP_SYS_RAWIO", "raw I/O: iopl, ioperm, /dev/mem"),
    ("CAP_SYS_CHROOT", "use chroot"),
    ("CAP_SYS_PTRACE", "trace and inspect any process (ptrace, process_vm_readv)"),
    ("CAP_SYS_PACCT", "configure process accounting (acct)"),
    ("CAP_SYS_ADMIN", "a wide range of system administration (mount, sethostname, ...)"),
    ("CAP_SYS_BOOT", "reboot and kexec_load"),
    ("CAP_SYS_NICE", "raise priority, set real-time scheduling and CPU affinity of others"),
    ("CAP_SYS_RESOURCE", "override resource limits and quotas"),
    ("CAP_SYS_TIME", "set the system clock (settimeofday, clock_settime, adjtimex)"),
    ("CAP_SYS_TTY_CONFIG", "vhangup and privileged terminal ioctls"),
    ("CAP_MKNOD", "create device special files (mknod)"),
    ("CAP_LEASE", "take leases on files the caller does not own"),
    ("CAP_AUDIT_WRITE", "write records to the kernel audit log"),
    ("CAP_AUDIT_CONTROL", "configure kernel auditing"),
    ("CAP_SETFCAP", "set file capabilities"),
    ("CAP_MAC_OVERRIDE", "override mandatory access control (Smack)"),
    ("CAP_MAC_ADMIN", "configure mandatory access control (Smack)"),
    ("CAP_SYSLOG", "privileged syslog operations, read kernel addresses"),
    ("CAP_WAKE_ALARM", "set alarms that wake the system"),
    ("CAP_BLOCK_SUSPEND", "block system suspend (epoll EPOLLWAKEUP)"),
    ("CAP_AUDIT_READ", "read the audit log through multicast netlink"),
    ("CAP_PERFMON", "performance monitoring (perf_event_open, BPF tracing)"),
    ("CAP_BPF", "privileged BPF operations (maps, programs)"),
    ("CAP_CHECKPOINT_RESTORE", "checkpoint/restore: set_tid, read /proc/PID/map_files"),
)

CAPS: tuple[Capability, ...] = tuple(
    Capability(i, name, summary) for i, (name, summary) in enumerate(_TABLE)
)
CAP_LAST_CAP = len(CAPS) - 1
_BY_NAME = {c.name: c.number for c in CAPS}

#: Capabilities that make a container equivalent to root on the host.
DANGEROUS: frozenset[int] = frozenset(
    _BY_NAME[n]
    for n in (
        "CAP_SYS_MODULE",
        "CAP_SYS_ADMIN",
        "CAP_SYS_RAWIO",
        "CAP_SYS_PTRACE",
        "CAP_BPF",
        "CAP_DAC_READ_SEARCH",
        "CAP_SYS_BOOT",
        "CAP_MAC_ADMIN",
        "CAP_MAC_OVERRIDE",
    )
)


def cap_name(number: int) -> str:
    """CAP_SYS_TIME for 25; ``cap:N`` for a number past the table."""
    if 0 <= number <= CAP_LAST_CAP:
        return CAPS[number].name
    return f"cap:{number}"


def cap_short(number: int) -> str:
    """SYS_TIME for 25, as container runtimes spell it."""
    name = cap_name(number)
    return name[4:] if name.startswith("CAP_") else name


def parse_cap(text: str) -> int:
    """Accept ``CAP_SYS_TIME``, ``sys_time``, ``SYS_TIME`` or ``25``.

    Raises ValueError with a one-line message for anything else.
    """
    t = text.strip()
    if t.isdigit():
        n = int(t)
        if n <= 63:
            return n
        raise ValueError(f"capability number {n} is out of range 0-63")
    up = t.upper()
    if not up.startswith("CAP_"):
        up = "CAP_" + up
    try:
        return _BY_NAME[up]
    except KeyError:
        raise ValueError(f"unknown capability {text!r} (e.g. CAP_SYS_TIME, sys_time, 25)") from None


def parse_mask(text: str) -> int:
    """Parse a hex capability mask as /proc/PID/status prints it (``0x`` optional).

    Raises ValueError with a one-line message when it is not a 64-bit hex number.
    """
    t = text.strip()
    if t[:2].lower() == "0x":
        t = t[2:]
    if not t or len(t) > 16 or any(c not in "0123456789abcdefABCDEF" for c in t):
        raise ValueError(f"not a capability mask: {text!r} (expected up to 16 hex digits)")
    return int(t, 16)


def encode_mask(numbers: set[int] | frozenset[int] | list[int]) -> int:
    mask = 0
    for n in numbers:
        if not 0 <= n <= 63:
            raise ValueError(f"capability number {n} is out of range 0-63")
        mask |= 1 << n
    return mask


@dataclass(frozen=True, slots=True)
class MaskDecode:
    mask: int
    present: tuple[int, ...]  # known capabilities in the mask
    absent: tuple[int, ...]  # known capabilities not in the mask
    unknown_bits: tuple[int, ...]  # bits set beyond CAP_LAST_CAP

    def headline(self) -> str:
        """'N of M capabilities', plus the bits set beyond the last known one."""
        known = len(self.present) + len(self.absent)
        text = f"{len(self.present)} of {known} capabilities"
        if self.unknown_bits:
            n = len(self.unknown_bits)
            text += f", and {n} bit{'s' if n > 1 else ''} set beyond them (not capabilities here)"
        return text

    def to_dict(self) -> dict[str, object]:
        return {
            "mask": f"{self.mask:016x}",
            "present": [cap_name(n) for n in self.present],
            "absent": [cap_name(n) for n in self.absent],
            "unknown_bits": list(self.unknown_bits),
        }


def decode_mask(mask: int) -> MaskDecode:
    present = tuple(c.number for c in CAPS if mask >> c.number & 1)
    absent = tuple(c.number for c in CAPS if not mask >> c.number & 1)
    unknown = tuple(b for b in range(CAP_LAST_CAP + 1, 64) if mask >> b & 1)
    return MaskDecode(mask, present, absent, unknown)
