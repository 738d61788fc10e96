"""Regenerate capwatch/decode/_syscall_tables.py from the Linux UAPI headers.

    python -m capwatch.decode._gen_syscalls > capwatch/decode/_syscall_tables.py

x86_64 from <asm/unistd_64.h>; arm64 from <asm-generic/unistd.h> with the
__ARCH_WANT_* macros that arch/arm64/include/uapi/asm/unistd.h defines.
Needs a C preprocessor and linux-libc-dev.
"""

from __future__ import annotations

import re
import subprocess

_ARM64_WANTS = [
    "-D__BITS_PER_LONG=64",
    "-D__ARCH_WANT_RENAMEAT",
    "-D__ARCH_WANT_NEW_STAT",
    "-D__ARCH_WANT_SET_GET_RLIMIT",
    "-D__ARCH_WANT_TIME32_SYSCALLS",
    "-D__ARCH_WANT_SYS_CLONE3",
    "-D__ARCH_WANT_MEMFD_SECRET",
]


def _macros(header: str, extra: list[str]) -> dict[int, str]:
    out = subprocess.run(
        ["cpp", "-dM", *extra, "-include", header, "/dev/null"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    raw = dict(re.findall(r"^#define (__NR\w+) (.+)$", out, re.M))
    table: dict[int, str] = {}
    for name, value in raw.items():
        if not name.startswith("__NR_") or name in ("__NR_syscalls",):
            continue
        v = value.strip()
        seen = 0
        while v in raw and seen < 5:  # __NR_fcntl -> __NR3264_fcntl -> 25
            v = raw[v].strip()
            seen += 1
        if v.isdigit():
            table.setdefault(int(v), name[5:])
    return dict(sorted(table.items()))


def main() -> None:
    x86 = _macros("asm/unistd_64.h", [])
    arm = _macros("asm-generic/unistd.h", _ARM64_WANTS)
    print('"""Syscall number -> name tables. Generated: python -m capwatch.decode._gen_syscalls"""')
    print()
    for var, table in (("X86_64", x86), ("ARM64", arm)):
        print(f"{var}: dict[int, str] = {{")
        for n, name in table.items():
            print(f'    {n}: "{name}",')
        print("}")


if __name__ == "__main__":
    main()
