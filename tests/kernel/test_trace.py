"""capwatch trace on the real kernel: real BPF programs, real denials."""

from __future__ import annotations

import subprocess
from typing import ClassVar

import pytest

from capwatch.errors import CapwatchError
from capwatch.kernel.bpf import ProgramConfig, load, verify
from tests.helpers import require_root, require_tool, run_capwatch
from tests.kernel.tracing import TraceProcess, run_denied_date, setuid_loop

pytestmark = [pytest.mark.kernel]


@pytest.fixture(autouse=True)
def _root() -> None:
    require_root()
    require_tool("capsh")


class TestTrace:
    def test_date_denied_cap_sys_time(self) -> None:
        """date -s without CAP_SYS_TIME: a denied CAP_SYS_TIME event, comm date, its pid, clock_settime."""
        with TraceProcess() as tr:
            pid = run_denied_date()
            events, err = tr.stop()
        mine = [e for e in events if e["pid"] == pid]
        assert 1 <= len(mine), (events, err)
        ev = mine[0]
        assert ("date", "CAP_SYS_TIME", 25, "denied", "clock_settime") == (
            ev["comm"],
            ev["capability"],
            ev["cap"],
            ev["verdict"],
            ev["syscall"],
        )
        assert "lost 0 " in err

    def test_default_shows_only_denials(self) -> None:
        """Without --all, allowed checks (setuid(0) as root) are not streamed."""
        with TraceProcess() as tr:
            pid = setuid_loop(50)
            events, _ = tr.stop()
        assert [] == [e for e in events if e["pid"] == pid]
        assert all(e["verdict"] == "denied" for e in events)

    def test_all_counts_every_setuid(self) -> None:
        """With --all, N setuid(0) calls give exactly N allowed CAP_SETUID events."""
        n = 5000
        with TraceProcess("--all", "--cap", "CAP_SETUID") as tr:
            pid = setuid_loop(n)
            events, err = tr.stop()
        mine = [e for e in events if e["pid"] == pid]
        assert n == len(mine), err
        assert {("CAP_SETUID", "allowed", "setuid")} == {
            (e["capability"], e["verdict"], e["syscall"]) for e in mine
        }

    def test_unique_prints_each_tuple_once(self) -> None:
        """--unique: many identical checks give one event per (comm, cap, verdict, syscall)."""
        with TraceProcess("--unique") as tr:
            pid = setuid_loop(300)
            d1 = run_denied_date()
            d2 = run_denied_date()
            events, _ = tr.stop()
        assert 1 == len([e for e in events if e["pid"] == pid and e["cap"] == 7])
        dates = [e for e in events if e["comm"] == "date" and e["cap"] == 25]
        assert 1 == len(dates)
        assert dates[0]["pid"] in (d1, d2)

    def test_pid_filter(self) -> None:
        """--pid keeps only that process's checks (filtered in the kernel)."""
        with TraceProcess("--all", "--pid", "1") as tr:
            setuid_loop(20)
            events, _ = tr.stop()
        assert all(e["pid"] == 1 for e in events)

    def test_sigterm_exits_cleanly(self) -> None:
        """SIGTERM stops trace with exit 0 and the loss summary."""
        import signal

        tr = TraceProcess()
        tr.proc.send_signal(signal.SIGTERM)
        _, err = tr.proc.communicate(timeout=10)
        assert 0 == tr.proc.returncode
        assert "lost 0" in err


class TestModes:
    def test_tracepoint_mode(self) -> None:
        """The regular tracepoint capability:cap_capable also delivers the denial."""
        with TraceProcess("--attach", "tracepoint") as tr:
            pid = run_denied_date()
            events, _ = tr.stop()
        assert "attached via tracepoint" in tr.banner
        assert [("CAP_SYS_TIME", "clock_settime")] == [
            (e["capability"], e["syscall"]) for e in events if e["pid"] == pid
        ]

    def test_kprobe_variant_passes_verifier(self) -> None:
        """The kprobe/kretprobe programs compile and pass the verifier (attaching is impossible here)."""
        assert "cw_kprobe, cw_kretprobe" == verify("kprobe")

    def test_raw_tracepoint_passes_verifier_unattached(self) -> None:
        """verify() loads without attaching for the raw tracepoint too."""
        assert "cw_raw_tp" == verify("raw_tracepoint")

    def test_fexit_compiles(self) -> None:
        """fexit compiles; on this kernel the load is refused (EPERM), which is reported, not a compile error."""
        message = ""
        try:
            load(ProgramConfig(denial_pages=1), "fexit").close()
        except CapwatchError as exc:
            message = str(exc)
        assert "compile" not in message.lower(), message
        assert message == "" or "not permitted" in message

    def test_forced_mode_the_kernel_lacks(self) -> None:
        """--attach kprobe on a kernel without kprobes: one line, non-zero exit."""
        r = run_capwatch("trace", "--attach", "kprobe", "--duration", "1")
        assert 1 == r.returncode
        assert 1 == len(r.stderr.strip().splitlines()), r.stderr
        assert r.stderr.startswith("capwatch: attach mode kprobe failed (kprobe: ")
        # decided from the kernel's facts (no kprobe PMU, no kprobe_events), before compiling
        assert "kprobes are not available in" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


class TestPrivilegesAndHeaders:
    SETPRIV: ClassVar[list[str]] = [
        "setpriv",
        "--inh-caps=-bpf,-perfmon,-sys_admin",
        "--bounding-set=-bpf,-perfmon,-sys_admin",
    ]

    def test_without_cap_bpf(self) -> None:
        """Without CAP_BPF/CAP_PERFMON/CAP_SYS_ADMIN, trace fails in one line naming them."""
        require_tool("setpriv")
        import sys

        r = subprocess.run(
            [*self.SETPRIV, sys.executable, "-m", "capwatch.commands.cli", "trace", "--duration", "1"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert 1 == r.returncode
        assert [
            "capwatch: loading BPF programs needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN);"
            " this process lacks CAP_BPF, CAP_PERFMON: run as root"
        ] == r.stderr.strip().splitlines()

    def test_doctor_without_cap_bpf(self) -> None:
        """doctor says why capwatch cannot run, and exits non-zero."""
        import sys

        r = subprocess.run(
            [*self.SETPRIV, sys.executable, "-m", "capwatch.commands.cli", "doctor"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert 1 == r.returncode
        assert "[FAIL] privileges" in r.stdout

    def test_no_header_tree(self, tmp_path: object) -> None:
        """A header directory that is no tree: one line, non-zero exit."""
        r = run_capwatch("trace", "--kernel-headers", str(tmp_path), "--duration", "1")
        assert 1 == r.returncode
        assert [
            f"capwatch: {tmp_path} is not a kernel header tree (no include/linux/kconfig.h)"
        ] == (r.stderr.strip().splitlines())

    def test_doctor_ok(self) -> None:
        """doctor tries every mode for real and exits 0 when one works."""
        r = run_capwatch("doctor", "--json", timeout=120)
        import json

        doc = json.loads(r.stdout)
        assert 0 == r.returncode
        assert doc["ok"]
        checks = {c["name"]: c["ok"] for c in doc["checks"]}
        assert checks["attach raw_tracepoint"]
        assert checks["attach tracepoint"]
        assert {"attach fexit", "attach kprobe"} <= checks.keys()
        # A mode the kernel's facts rule out is named with the reason, not compiled.
        from capwatch.kernel.attach import unavailable
        from capwatch.kernel.facts import read_kernel_facts

        details = {c["name"]: c["detail"] for c in doc["checks"]}
        facts = read_kernel_facts()
        for mode in ("raw_tracepoint", "tracepoint", "fexit", "kprobe"):
            why = unavailable(mode, facts)
            if why:
                assert f"not tried: {why}" == details[f"attach {mode}"]
                assert not checks[f"attach {mode}"]


class TestOutcome:
    def test_outcome_marks_cause_and_probe(self) -> None:
        """--outcome: date's EPERM makes a cause; ifconfig's CAP_SYS_MODULE denial before ENODEV a probe."""
        with TraceProcess("--outcome") as tr:
            pid = run_denied_date()
            p = subprocess.run(
                [
                    "capsh",
                    "--drop=cap_sys_module,cap_net_admin",
                    "--",
                    "-c",
                    "echo $$; exec ifconfig nosuchdev0",
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            ifpid = int(p.stdout.split()[0])
            events, _ = tr.stop()
        date = [(e["capability"], e["outcome"], e["role"]) for e in events if e["pid"] == pid]
        assert [("CAP_SYS_TIME", "EPERM", "cause")] == date
        ifc = {
            e["capability"]: (e["syscall"], e["outcome"], e["role"])
            for e in events
            if e["pid"] == ifpid
        }
        assert ("ioctl", "ENODEV", "probe") == ifc["CAP_SYS_MODULE"]
