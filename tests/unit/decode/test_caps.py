"""Capability table, names and masks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from capwatch.decode.caps import (
    CAP_LAST_CAP,
    CAPS,
    cap_name,
    cap_short,
    decode_mask,
    encode_mask,
    parse_cap,
    parse_mask,
)
from tests.helpers import SEED_ABSENT


class TestTable:
    def test_all_41_capabilities_in_kernel_order(self) -> None:
        """The table has CAP_CHOWN (0) to CAP_CHECKPOINT_RESTORE (40), numbered by position."""
        assert 41 == len(CAPS)
        assert 40 == CAP_LAST_CAP
        assert [c.number for c in CAPS] == list(range(41))
        assert "CAP_CHECKPOINT_RESTORE" == CAPS[40].name

    def test_matches_uapi_header(self) -> None:
        """Every name and number agrees with /usr/include/linux/capability.h."""
        import re
        from pathlib import Path

        hdr = Path("/usr/include/linux/capability.h")
        if not hdr.exists():
            pytest.skip("linux-libc-dev not installed")
        defs = dict(re.findall(r"#define (CAP_[A-Z_]+)\s+(\d+)\s*$", hdr.read_text(), re.M))
        expected = {c.name: str(c.number) for c in CAPS}
        assert expected == {k: v for k, v in defs.items() if k in expected}


class TestNames:
    @pytest.mark.parametrize(
        ("number", "name", "short"),
        [
            (0, "CAP_CHOWN", "CHOWN"),
            (16, "CAP_SYS_MODULE", "SYS_MODULE"),
            (25, "CAP_SYS_TIME", "SYS_TIME"),
            (40, "CAP_CHECKPOINT_RESTORE", "CHECKPOINT_RESTORE"),
            (41, "cap:41", "cap:41"),
            (-1, "cap:-1", "cap:-1"),
        ],
    )
    def test_names(self, number: int, name: str, short: str) -> None:
        """Known numbers have their kernel name; unknown ones degrade to cap:N."""
        assert name == cap_name(number)
        assert short == cap_short(number)

    @pytest.mark.parametrize(
        ("text", "number"),
        [("CAP_SYS_TIME", 25), ("sys_time", 25), ("SYS_TIME", 25), ("25", 25), (" cap_bpf ", 39)],
    )
    def test_parse_cap(self, text: str, number: int) -> None:
        """Names with or without CAP_, any case, and numbers are accepted."""
        assert number == parse_cap(text)

    @pytest.mark.parametrize("text", ["", "CAP_NOPE", "sys time", "64", "-1", "0x19"])
    def test_parse_cap_rejects(self, text: str) -> None:
        """Garbage raises ValueError with a one-line message."""
        with pytest.raises(ValueError, match="capability") as exc:
            parse_cap(text)
        assert "\n" not in str(exc.value)


class TestMasks:
    def test_seed_blog_mask(self) -> None:
        """0000001dbdbeffff (the seed post's container) lacks exactly these capabilities."""
        dec = decode_mask(parse_mask("0000001dbdbeffff"))
        absent = {cap_name(n) for n in dec.absent}
        assert SEED_ABSENT == absent
        assert 32 == len(dec.present)
        assert () == dec.unknown_bits

    @pytest.mark.parametrize(
        ("text", "value"),
        [
            ("0x1f", 0x1F),
            ("0000001dbdbeffff", 0x1DBDBEFFFF),
            ("FFFFFFFFFFFFFFFF", 2**64 - 1),
            ("0", 0),
        ],
    )
    def test_parse_mask(self, text: str, value: int) -> None:
        """Hex with or without 0x, any case, up to 64 bits."""
        assert value == parse_mask(text)

    @pytest.mark.parametrize("text", ["", "0x", "xyz", "12345678901234567", "-1", "1 2"])
    def test_parse_mask_rejects(self, text: str) -> None:
        """Malformed masks raise ValueError naming the input."""
        with pytest.raises(ValueError, match="not a capability mask"):
            parse_mask(text)

    def test_bits_beyond_last_cap_are_reported(self) -> None:
        """Bits 41-63 are kept as unknown bits, not dropped."""
        dec = decode_mask((1 << 41) | (1 << 63) | 1)
        assert (41, 63) == dec.unknown_bits
        assert (0,) == dec.present

    @given(st.sets(st.integers(min_value=0, max_value=63)))
    def test_round_trip(self, numbers: set[int]) -> None:
        """encode -> hex -> parse -> decode gives back the same set of bits."""
        mask = encode_mask(numbers)
        dec = decode_mask(parse_mask(f"{mask:016x}"))
        assert numbers == set(dec.present) | set(dec.unknown_bits)
        assert set(range(41)) - numbers == set(dec.absent)

    @given(st.integers(min_value=0, max_value=2**64 - 1))
    def test_present_absent_partition(self, mask: int) -> None:
        """Present and absent together are exactly the 41 known capabilities."""
        dec = decode_mask(mask)
        assert sorted(dec.present + dec.absent) == list(range(41))
        assert mask == encode_mask(list(dec.present) + list(dec.unknown_bits))
