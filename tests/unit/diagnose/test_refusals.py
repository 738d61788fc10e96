"""Refusals that are not capability checks (capwatch.diagnose.refusals), without a kernel."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from capwatch.decode.caps import parse_cap
from capwatch.diagnose.refusals import (
    FileEvidence,
    RefusalFacts,
    active_lsms,
    file_caps,
    gather,
    judge,
    lsm_names,
    tolerated_runtime,
    with_stand_in,
)

NET_RAW = parse_cap("CAP_NET_RAW")
FULL = (1 << 41) - 1
NO_NET_RAW = FULL & ~(1 << NET_RAW)
# `getfattr -e hex -n security.capability` of a busybox copy after
# `setcap cap_net_raw+ep` (Debian 12, kernel 6.18): revision 2, effective, bit 13.
NET_RAW_EP = bytes.fromhex("0100000200200000000000000000000000000000")

STATUS = """Name:\tdate
Umask:\t0022
State:\tS (sleeping)
Uid:\t0\t0\t0\t0
NoNewPrivs:\t0
Seccomp:\t2
Seccomp_filters:\t1
CapInh:\t0000000000000000
CapPrm:\t00000000800405fb
CapEff:\t00000000800405fb
CapBnd:\t00000000800405fb
CapAmb:\t0000000000000000
"""


def facts(**kw: object) -> RefusalFacts:
    base: dict[str, object] = {
        "syscall": "execve",
        "ret": -errno.EPERM,
        "comm": "sh",
        "pid": 7,
        "uid": 0,
        "seccomp": 0,
        "no_new_privs": False,
        "cap_bnd": FULL,
        "in_userns": False,
        "lsms": ("capability",),
    }
    base.update(kw)
    return RefusalFacts(**base)  # type: ignore[arg-type]


class TestFileCaps:
    @pytest.mark.parametrize(
        ("raw", "expected"),
        [
            (NET_RAW_EP, (1 << NET_RAW, True)),
            (bytes.fromhex("0000000200200000000000000000000000000000"), (1 << NET_RAW, False)),
            # revision 3 (namespaced, with a root uid): same permitted words
            (
                bytes.fromhex("01000003002000000000000000000000000000000000e803"),
                (1 << NET_RAW, True),
            ),
            (b"\x01\x00", None),
            (bytes.fromhex("01000009002000000000000000000000"), None),
        ],
    )
    def test_decode(self, raw: bytes, expected: tuple[int, bool] | None) -> None:
        """security.capability decodes to (permitted mask, effective bit); junk to None."""
        assert expected == file_caps(raw)


class TestJudge:
    def test_file_capabilities_beyond_bounding_in_podman(self) -> None:
        """exec of a cap_net_raw+ep binary in a container without NET_RAW: the podman fix and
        setcap -r in the image."""
        r = judge(
            facts(
                cap_bnd=NO_NET_RAW,
                kind="podman",
                container="web",
                file=FileEvidence("/bin/fcping", True, 0o100755, 0, 0, 1 << NET_RAW),
            )
        )
        assert "file capabilities" == r.verdict
        assert [
            {"context": "podman", "fix": "podman run --cap-add=NET_RAW ..."},
            {
                "context": "image",
                "fix": "setcap -r /bin/fcping (if the program does not need them: "
                "it then runs with what it is given)",
            },
        ] == r.fixes
        assert r.render().startswith(
            "execve (/bin/fcping) refused to sh (pid 7) in podman container web with EPERM: "
            "file capabilities"
        )

    def test_default_profile_seccomp(self) -> None:
        """clock_settime refused by a filter in a podman container: the profile admits it with
        SYS_TIME, so --cap-add=SYS_TIME comes first."""
        r = judge(facts(syscall="clock_settime", seccomp=2, kind="podman", comm="date"))
        assert "seccomp" == r.verdict
        assert {"context": "podman", "fix": "podman run --cap-add=SYS_TIME ..."} == r.fixes[0]
        assert "seccomp=PROFILE.json" in r.fixes[1]["fix"]

    def test_seccomp_on_an_unlisted_syscall_in_kubernetes(self) -> None:
        """A filtered syscall the default profiles allow: the filter is someone's own; the
        Kubernetes fix is a Localhost profile, no capability."""
        r = judge(facts(syscall="personality", seccomp=2, kind="kubernetes"))
        assert ("seccomp", ["kubernetes"]) == (r.verdict, [f["context"] for f in r.fixes])
        assert "not one that the default container profiles refuse" in r.details[0]

    def test_not_executable(self) -> None:
        """execve EACCES of a file without x bits: file permissions, nothing to grant."""
        r = judge(facts(ret=-errno.EACCES, file=FileEvidence("/tmp/x", True, 0o100644, 1000, 1000)))
        assert ("file permissions", [{"context": "file", "fix": "chmod +x /tmp/x"}]) == (
            r.verdict,
            r.fixes,
        )
        assert "-rw-r--r-- uid 1000 gid 1000" in r.summary

    def test_lsm(self) -> None:
        """EACCES with no capability refused and apparmor active: an LSM, named."""
        r = judge(facts(syscall="openat", ret=-errno.EACCES, lsms=("capability", "apparmor")))
        assert "lsm" == r.verdict
        assert "(active: apparmor)" in r.summary
        assert ["apparmor"] == [f["context"] for f in r.fixes]

    def test_each_active_lsm_gets_its_fix(self) -> None:
        """Several confining LSMs may have refused: one fix each, in the kernel's order;
        Landlock's rules are the program's own, no system policy."""
        r = judge(
            facts(syscall="openat", ret=-errno.EACCES, lsms=("capability", "landlock", "selinux"))
        )
        assert ["landlock", "selinux"] == [f["context"] for f in r.fixes]
        assert "not by a system policy" in r.fixes[0]["fix"]

    def test_user_namespace(self) -> None:
        """EPERM in a process of its own user namespace: nothing to grant inside."""
        r = judge(facts(syscall="mount", in_userns=True))
        assert ("user namespace", []) == (r.verdict, r.fixes)

    def test_nothing_fits_says_what_was_seen(self) -> None:
        """An EPERM that fits none: 'unexplained', with uid, seccomp, nnp, userns and LSMs."""
        r = judge(facts(syscall="kill", uid=1000, lsms=None))
        assert "unexplained" == r.verdict
        assert [
            "seen: uid 1000; Seccomp: 0; NoNewPrivs: 0; user namespace: the host's; "
            "LSMs: not readable"
        ] == r.details

    def test_json_shares_explain_keys(self) -> None:
        """A refusal's JSON carries capability (empty) and role like explain's findings."""
        d = judge(facts(syscall="kill")).to_dict()
        assert ("", "refusal", "kill") == (d["capability"], d["role"], d["syscall"])


class TestRuntime:
    @pytest.mark.parametrize(
        ("comm", "syscall", "tolerated"),
        [
            ("podman", "setrlimit", True),
            ("conmon", "write", True),
            ("runc:[2:INIT]", "epoll_ctl", True),
            ("runc:[2:INIT]", "execve", False),  # the entrypoint's exec is the workload's
            ("date", "clock_settime", False),
        ],
    )
    def test_tolerated(self, comm: str, syscall: str, tolerated: bool) -> None:
        """The runtime's own set-up refusals are tolerated; its exec of the workload is not."""
        assert tolerated == tolerated_runtime(comm, syscall)


class TestGather:
    def tree(self, tmp: Path, pid: int, status: str, own_userns: bool) -> Path:
        proc = tmp / "proc"
        for p, ns in ((1, "user:[4026531837]"), (pid, "user:[4026532999]" if own_userns else "")):
            d = proc / str(p)
            (d / "ns").mkdir(parents=True, exist_ok=True)
            (d / "ns" / "user").unlink(missing_ok=True)
            os.symlink(ns or "user:[4026531837]", d / "ns" / "user")
        (proc / str(pid) / "status").write_text(status)
        root = tmp / "rootfs"
        (root / "bin").mkdir(parents=True)
        (root / "bin" / "tool").write_text("#!/bin/sh\n")
        (root / "bin" / "tool").chmod(0o644)
        os.symlink(root, proc / str(pid) / "root")
        return proc

    def test_reads_status_namespace_and_file(self, tmp_path: Path) -> None:
        """Seccomp, NoNewPrivs, CapBnd, the user namespace and the path (in the process's
        root) are read from a /proc tree given as a parameter."""
        proc = self.tree(tmp_path, 42, STATUS, own_userns=True)
        sysfs = tmp_path / "sys"
        (sysfs / "kernel" / "security").mkdir(parents=True)
        (sysfs / "kernel" / "security" / "lsm").write_text("capability,landlock,yama\n")
        f = gather(
            syscall="execve",
            ret=-errno.EACCES,
            comm="sh",
            pid=42,
            uid=0,
            path="/bin/tool",
            proc_root=str(proc),
            sys_root=str(sysfs),
            kind="podman",
        )
        assert (2, False, 0x800405FB, True, ("capability", "landlock", "yama")) == (
            f.seccomp,
            f.no_new_privs,
            f.cap_bnd,
            f.in_userns,
            f.lsms,
        )
        assert f.file is not None
        assert (True, 0o644, "the process's root") == (
            f.file.exists,
            f.file.mode & 0o777,
            f.file.seen_from,
        )
        assert "file permissions" == judge(f).verdict

    def test_gone_process_evidence_from_a_live_one(self, tmp_path: Path) -> None:
        """The refused process is gone: another process of the cgroup stands in for the status
        and the root, and the finding says so."""
        proc = self.tree(tmp_path, 43, STATUS, own_userns=False)
        gone = gather(
            syscall="clock_settime",
            ret=-errno.EPERM,
            comm="date",
            pid=99,
            uid=0,
            path=None,
            proc_root=str(proc),
            kind="podman",
        )
        assert gone.seccomp is None
        f = with_stand_in(gone, 43, str(proc))
        r = judge(f)
        assert (
            "seccomp",
            "(status read from pid 43 of the same cgroup for the status (pid 99 was gone))",
        ) == (
            r.verdict,
            r.details[0],
        )


class TestExecUnseen:
    def test_exec_refused_binary_unread_is_not_seccomp(self) -> None:
        """An exec refused with EPERM whose binary could not be read is not blamed on the
        process's seccomp filter: unexplained, with the getcap hint."""
        r = judge(facts(seccomp=2, file=FileEvidence("/bin/x", False)))
        assert (
            "unexplained",
            [f"check it with getcap /bin/x; the bounding set was {FULL:016x}"],
        ) == (r.verdict, r.details)


class TestActiveLsms:
    def test_ids_as_securityfs_names_them(self) -> None:
        """lsm_list_modules's ids (as this kernel 6.18 answers: 108, 100, 110, 109) read as
        /sys/kernel/security/lsm spells them, in order; an id not in the table is kept."""
        assert ("lockdown", "capability", "landlock", "bpf", "lsm:999") == lsm_names(
            [108, 100, 110, 109, 999]
        )

    def test_securityfs_file_first(self, tmp_path: Path) -> None:
        """A root with kernel/security/lsm: its list."""
        (tmp_path / "kernel" / "security").mkdir(parents=True)
        (tmp_path / "kernel" / "security" / "lsm").write_text("capability,apparmor\n")
        assert ("capability", "apparmor") == active_lsms(str(tmp_path))

    def test_another_root_without_the_file_is_not_known(self, tmp_path: Path) -> None:
        """A root other than /sys without the file: not known (the running kernel's list
        would describe another machine than the root's)."""
        assert active_lsms(str(tmp_path)) is None


class TestRefusedAtEntry:
    """The kernel saw no sys_enter for the refused syscall (CW_F_ENTERED absent)."""

    def facts(self, **kw: object) -> RefusalFacts:
        base: dict[str, object] = {
            "syscall": "clock_settime",
            "ret": -errno.EPERM,
            "comm": "date",
            "pid": 9,
            "uid": 0,
            "kind": "podman",
            "container": "web",
        }
        base.update(kw)
        return RefusalFacts(**base)  # type: ignore[arg-type]

    def test_gone_process_refused_at_entry_is_seccomp(self) -> None:
        r = judge(self.facts(entered=False))
        assert "seccomp" == r.verdict
        assert "refused it at entry, before it ran" in r.summary
        assert {"context": "podman", "fix": "podman run --cap-add=SYS_TIME ..."} in r.fixes

    def test_entered_and_status_unknown_is_not_seccomp(self) -> None:
        assert "seccomp" != judge(self.facts(entered=True)).verdict

    def test_no_filter_known_is_not_seccomp(self) -> None:
        """Seccomp: 0 read from its status: a tracer skipped it, not a filter."""
        assert "seccomp" != judge(self.facts(entered=False, seccomp=0)).verdict


def test_eperm_that_means_something_else() -> None:
    from capwatch.diagnose.refusals import not_a_refusal

    assert not_a_refusal("epoll_ctl", -errno.EPERM)
    assert not not_a_refusal("epoll_ctl", -errno.EACCES)
    assert not not_a_refusal("clock_settime", -errno.EPERM)
