"""Attach-mode selection and the BPF build flags, without a kernel."""

from __future__ import annotations

import pytest

from capwatch.errors import AttachError, CapwatchError, UsageError
from capwatch.kernel.attach import MODES, select_mode
from capwatch.kernel.bpf import ProgramConfig, build_cflags


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

    def test_ring_size_must_be_power_of_two(self) -> None:
        """A ring size the kernel would refuse is caught before compiling."""
        with pytest.raises(CapwatchError, match="power of two"):
            build_cflags(ProgramConfig(denial_pages=3), "raw_tracepoint")
