"""Attach-mode selection and the BPF build flags, without a kernel."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from capwatch.errors import AttachError, CapwatchError, UsageError
from capwatch.kernel.attach import MODES, KernelFacts, select_mode, tracepoint_exists, unavailable
from capwatch.kernel.bpf import ProgramConfig, build_cflags
from capwatch.kernel.facts import read_kernel_facts


class FakeLoader:
    """Fails the modes it is told to, with the kernel's kind of message."""

    def __init__(self, failing: dict[str, str]) -> None:
        self.failing = failing
        self.tried: list[str] = []

    def __call__(self, mode: str) -> str:
        self.tried.append(mode)
        if mode in self.failing:
            raise RuntimeError(self.failing[mode])
        return f"prog-{mode}"


class TestSelectMode:
    def test_auto_prefers_raw_tracepoint(self) -> None:
        """auto takes the first mode in preference order that works."""
        loader = FakeLoader({})
        sel = select_mode("auto", loader)
        assert ("raw_tracepoint", "prog-raw_tracepoint", ["raw_tracepoint"]) == (
            sel.mode,
            sel.result,
            loader.tried,
        )

    def test_auto_falls_back_in_order_and_keeps_reasons(self) -> None:
        """Each failed mode is recorded with its reason; the next is tried."""
        loader = FakeLoader({"raw_tracepoint": "no such raw tp", "tracepoint": "no tracefs"})
        sel = select_mode("auto", loader)
        assert "fexit" == sel.mode
        assert [
            ("raw_tracepoint", "no such raw tp"),
            ("tracepoint", "no tracefs"),
            ("fexit", None),
        ] == [(a.mode, a.error) for a in sel.attempts]

    def test_nothing_works_is_one_line_summary(self) -> None:
        """When every mode fails, AttachError names each with its reason, on one line."""
        loader = FakeLoader({m: f"{m} failed\nwith detail" for m in MODES})
        with pytest.raises(AttachError) as exc:
            select_mode("auto", loader)
        msg = str(exc.value)
        assert "\n" not in msg
        assert msg.startswith("no attach mode works on this kernel")
        for m in MODES:
            assert f"{m}: {m} failed with detail" in msg

    def test_forced_mode_is_not_substituted(self) -> None:
        """A forced mode that fails is an error; capwatch does not silently take another."""
        loader = FakeLoader({"kprobe": "kprobes not compiled in"})
        with pytest.raises(
            AttachError, match=r"attach mode kprobe failed .*kprobes not compiled in"
        ):
            select_mode("kprobe", loader)
        assert ["kprobe"] == loader.tried

    def test_unknown_mode(self) -> None:
        """An unknown mode is a usage error."""
        with pytest.raises(UsageError, match="unknown attach mode"):
            select_mode("uprobe", FakeLoader({}))

    def test_long_reason_is_cut(self) -> None:
        """Verifier logs are long: a reason is cut to 200 characters."""
        loader = FakeLoader({"raw_tracepoint": "x" * 5000})
        sel = select_mode("auto", loader)
        assert 200 == len(sel.attempts[0].error or "")


class TestCflags:
    @pytest.mark.parametrize(
        ("mode", "define"),
        [
            ("raw_tracepoint", "-DCW_ATTACH_RAW_TP"),
            ("tracepoint", "-DCW_ATTACH_TP"),
            ("fexit", "-DCW_ATTACH_FEXIT"),
            ("kprobe", "-DCW_ATTACH_KPROBE"),
        ],
    )
    def test_mode_define(self, mode: str, define: str) -> None:
        """Each mode selects its hook with one -D flag."""
        assert define in build_cflags(ProgramConfig(self_pid=7), mode)

    def test_options(self) -> None:
        """Options become -D flags: never edits of the C text."""
        flags = build_cflags(
            ProgramConfig(emit_all=True, filter_pid=42, filter_cap=25, self_pid=7, rl_burst=5),
            "raw_tracepoint",
        )
        for f in (
            "-DCW_EMIT_ALL",
            "-DCW_FILTER_PID=42",
            "-DCW_FILTER_CAP=25",
            "-DCW_SELF_PID=7",
            "-DCW_RL_BURST=5",
        ):
            assert f in flags
        assert "-DCW_UNIQUE" not in flags

    def test_defaults_send_denials_only(self) -> None:
        """By default neither --all nor --unique nor filters are compiled in."""
        flags = " ".join(build_cflags(ProgramConfig(self_pid=7), "raw_tracepoint"))
        for f in ("CW_EMIT_ALL", "CW_UNIQUE", "CW_FILTER_PID", "CW_FILTER_CAP", "CW_NO_AUTOATTACH"):
            assert f not in flags

    @pytest.mark.parametrize(("how", "define"), [("only", 1), ("except", 2)])
    def test_refusals_by_a_cgroup_set(self, how: str, define: int) -> None:
        """Refusals filtered by a set of cgroups need no pid or cgroup filter."""
        flags = build_cflags(
            ProgramConfig(self_pid=7, outcome=True, refusals=True, refusal_cgroups=how),
            "raw_tracepoint",
        )
        assert {"-DCW_REFUSALS", f"-DCW_REFUSAL_CGROUPS={define}"} <= set(flags)
        assert "-DCW_REFUSAL_CGROUPS_MAX=16384" in flags

    def test_refusals_need_a_target(self) -> None:
        """Refusals for every process on the node are refused: nothing else may pay."""
        with pytest.raises(CapwatchError, match="pid or cgroup filter"):
            build_cflags(ProgramConfig(outcome=True, refusals=True), "raw_tracepoint")
        with pytest.raises(CapwatchError, match="'only' or 'except'"):
            build_cflags(
                ProgramConfig(outcome=True, refusals=True, refusal_cgroups="all"),
                "raw_tracepoint",
            )

    def test_ring_size_must_be_power_of_two(self) -> None:
        """A ring size the kernel would refuse is caught before compiling."""
        with pytest.raises(CapwatchError, match="power of two"):
            build_cflags(ProgramConfig(denial_pages=3), "raw_tracepoint")


def facts(**kw: object) -> KernelFacts:
    """Debian 12's 6.1 as measured in the VM: tracefs and BTF, no cap_capable tracepoint."""
    base: dict[str, object] = {
        "release": "6.1.0-57-amd64",
        "tracefs": True,
        "tp_in_tracefs": False,
        "btf": True,
        "btf_tp_type": False,
        "btf_cap_capable": True,
        "kprobes": True,
    }
    base.update(kw)
    return KernelFacts(**base)  # type: ignore[arg-type]


class TestDecideBeforeCompiling:
    def test_debian_61_compiles_once(self) -> None:
        """On 6.1, auto passes over both tracepoint modes without compiling and takes fexit first."""
        loader = FakeLoader({})
        sel = select_mode("auto", loader, facts())
        assert ("fexit", ["fexit"]) == (sel.mode, loader.tried)
        reason = "the capability:cap_capable tracepoint needs Linux 6.14+; this is 6.1.0-57-amd64"
        assert [
            ("raw_tracepoint", reason, False),
            ("tracepoint", reason, False),
            ("fexit", None, True),
        ] == [(a.mode, a.error, a.compiled) for a in sel.attempts]

    def test_tracepoint_known_from_btf_without_tracefs(self) -> None:
        """No tracefs: the BTF type btf_trace_cap_capable tells whether the tracepoint exists."""
        f = facts(tracefs=False, tp_in_tracefs=None, btf_tp_type=True, release="6.18.0")
        assert tracepoint_exists(f) is True
        assert unavailable("raw_tracepoint", f) is None
        assert "not mounted: mount -t tracefs" in (unavailable("tracepoint", f) or "")
        f = facts(tracefs=False, tp_in_tracefs=None, btf_tp_type=False)
        assert tracepoint_exists(f) is False

    def test_cannot_tell_means_try(self) -> None:
        """Neither tracefs nor BTF: nothing is passed over, every mode is compiled and tried."""
        f = facts(
            tracefs=False,
            tp_in_tracefs=None,
            btf=False,
            btf_tp_type=None,
            btf_cap_capable=None,
            kprobes=None,
        )
        assert tracepoint_exists(f) is None
        loader = FakeLoader({"raw_tracepoint": "x", "tracepoint": "y"})
        sel = select_mode("auto", loader, replace(f, btf=True))
        assert ["raw_tracepoint", "tracepoint", "fexit"] == loader.tried
        assert "fexit" == sel.mode

    def test_no_btf_no_fexit(self) -> None:
        """Without BTF fexit is passed over with the config option named; kprobe is next."""
        loader = FakeLoader({})
        sel = select_mode("auto", loader, facts(btf=False, btf_tp_type=None, btf_cap_capable=None))
        assert ("kprobe", ["kprobe"]) == (sel.mode, loader.tried)
        assert "CONFIG_DEBUG_INFO_BTF" in (sel.attempts[2].error or "")

    def test_new_kernel_takes_raw_tracepoint(self) -> None:
        """A 6.14+ kernel with the tracepoint: nothing passed over, raw_tracepoint first."""
        loader = FakeLoader({})
        sel = select_mode("auto", loader, facts(tp_in_tracefs=True, btf_tp_type=True))
        assert ("raw_tracepoint", ["raw_tracepoint"]) == (sel.mode, loader.tried)

    def test_forced_mode_that_cannot_work_is_refused_without_compiling(self) -> None:
        """--attach kprobe on a kernel without kprobes: a one-line reason, no compile."""
        loader = FakeLoader({})
        with pytest.raises(
            AttachError, match=r"attach mode kprobe failed \(kprobe: kprobes are not available"
        ):
            select_mode("kprobe", loader, facts(kprobes=False))
        assert [] == loader.tried

    def test_nothing_works_names_every_reason(self) -> None:
        """All passed over: the summary carries each mode's reason."""
        f = facts(btf=False, btf_tp_type=None, btf_cap_capable=None, kprobes=False)
        with pytest.raises(AttachError) as exc:
            select_mode("auto", FakeLoader({}), f)
        assert "needs Linux 6.14+" in str(exc.value)
        assert "CONFIG_KPROBE_EVENTS" in str(exc.value)


class TestReadKernelFacts:
    def make(self, root: Path, *paths: str, btf: bytes | None = None) -> None:
        for p in paths:
            (root / p).mkdir(parents=True, exist_ok=True)
        if btf is not None:
            (root / "kernel/btf").mkdir(parents=True)
            (root / "kernel/btf/vmlinux").write_bytes(btf)

    def test_debian_61_layout(self, tmp_path: Path) -> None:
        """tracefs without the capability event, BTF with cap_capable only, the kprobe PMU."""
        self.make(
            tmp_path,
            "kernel/tracing/events/syscalls",
            "bus/event_source/devices/kprobe",
            btf=b"\0\0cap_capable\0btf_trace_sched_switch\0",
        )
        f = read_kernel_facts(str(tmp_path), release="6.1.0-57-amd64")
        assert facts() == f

    def test_tracepoint_kernel_without_kprobes(self, tmp_path: Path) -> None:
        """This machine's shape: the capability event, BTF type, no kprobe PMU nor kprobe_events."""
        self.make(
            tmp_path,
            "kernel/tracing/events/capability/cap_capable",
            btf=b"\0cap_capable\0btf_trace_cap_capable\0",
        )
        f = read_kernel_facts(str(tmp_path), release="6.18.0")
        assert (True, True, True, False) == (
            f.tp_in_tracefs,
            f.btf_tp_type,
            f.tracefs,
            bool(f.kprobes),
        )
        assert f.kprobes is False

    def test_nothing_mounted(self, tmp_path: Path) -> None:
        """No tracefs, no BTF: every fact unknown, nothing will be passed over."""
        f = read_kernel_facts(str(tmp_path), release="5.4.0")
        assert (False, None, False, None, None) == (
            f.tracefs,
            f.tp_in_tracefs,
            f.btf,
            f.btf_tp_type,
            f.kprobes,
        )
        assert all(unavailable(m, replace(f, btf=True)) is None for m in MODES)
