"""/proc/PID/status parsing, on fixture trees."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from capwatch.decode.caps import decode_mask
from capwatch.decode.procfs import list_pids, parse_status, read_status
from capwatch.errors import CapwatchError
from tests.helpers import FIXTURES

PROC = str(FIXTURES / "proc")


class TestReadStatus:
    def test_seed_container(self) -> None:
        """The seed post's container: 0000001dbdbeffff in CapPrm/CapEff/CapBnd."""
        st_ = read_status(1234, proc_root=PROC)
        assert ("modprobe", 1234, 0) == (st_.name, st_.pid, st_.uid)
        assert (0, 0x1DBDBEFFFF, 0x1DBDBEFFFF, 0x1DBDBEFFFF, 0) == (
            st_.cap_inh,
            st_.cap_prm,
            st_.cap_eff,
            st_.cap_bnd,
            st_.cap_amb,
        )

    def test_permitted_not_effective(self) -> None:
        """Fixture 77 holds CAP_SYS_TIME permitted but not effective."""
        st_ = read_status(77, proc_root=PROC)
        assert 25 in decode_mask(st_.cap_prm).present
        assert 25 in decode_mask(st_.cap_eff).absent

    def test_missing_pid(self) -> None:
        """A pid that does not exist is a one-line CapwatchError."""
        with pytest.raises(CapwatchError, match="no process with pid 999"):
            read_status(999, proc_root=PROC)

    def test_list_pids(self) -> None:
        """Only numeric entries are pids, sorted."""
        assert [77, 1234] == list_pids(proc_root=PROC)

    def test_real_self(self) -> None:
        """This process's own status parses (the real /proc)."""
        import os

        assert os.getpid() == read_status(os.getpid()).pid


class TestParseStatus:
    def test_malformed_mask(self) -> None:
        """A malformed mask line is a ValueError naming it."""
        with pytest.raises(ValueError, match="malformed status"):
            parse_status("Name:\tx\nUid:\t0\t0\t0\t0\nCapEff:\tnothex\n")

    def test_missing_uid(self) -> None:
        """A status without Uid is malformed."""
        with pytest.raises(ValueError, match="malformed status"):
            parse_status("Name:\tx\n")

    @given(st.text(max_size=300))
    def test_fuzz_never_raises_other_errors(self, text: str) -> None:
        """Any text either parses or raises ValueError: never anything else."""
        with contextlib.suppress(ValueError):
            parse_status(text)
