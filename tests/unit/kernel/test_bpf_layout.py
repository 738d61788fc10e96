"""The count map's key and the per-CPU count cache: capwatch.h and the Python
side agree (the C compiler's layout against the numpy mirror and the decoding)."""

from __future__ import annotations

import pytest

from capwatch.kernel.bpf import COUNT_KEY_DTYPE, cache_slot_key
from tests.helpers import c_header_values

KEY_FIELDS = ("cgroup_id", "cap", "denied")
CACHE_FIELDS = ("seq_head", "cgroup_id", "n", "seq_tail")
NCAP = 64  # CW_NCAP; checked against the header below


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """Sizes, offsets, signedness and CW_CACHE_SLOT values, from the header, by cc."""
    exprs = {
        "key.size": "sizeof(struct cw_count_key)",
        "cache.size": "sizeof(struct cw_cache)",
        "ncap": "CW_NCAP",
        "cache.n.count": "sizeof(c.n) / sizeof(c.n[0])",
    }
    for f in KEY_FIELDS:
        exprs[f"key.{f}.offset"] = f"offsetof(struct cw_count_key, {f})"
        exprs[f"key.{f}.size"] = f"sizeof(k.{f})"
        exprs[f"key.{f}.signed"] = f"(__typeof__(k.{f}))-1 < 0"
    for f in CACHE_FIELDS:
        exprs[f"cache.{f}.offset"] = f"offsetof(struct cw_cache, {f})"
        exprs[f"cache.{f}.size"] = f"sizeof(c.{f})"
    for cap in range(NCAP):
        for denied in (0, 1):
            exprs[f"slot.{cap}.{denied}"] = f"CW_CACHE_SLOT({cap}, {denied})"
    decls = "struct cw_count_key k; struct cw_cache c; (void)k; (void)c;"
    return c_header_values(tmp_path_factory.mktemp("layout"), exprs, decls=decls)


class TestCountKey:
    def test_size_matches_header(self, c_layout: dict[str, int]) -> None:
        """sizeof(struct cw_count_key) equals the numpy mirror's item size."""
        assert c_layout["key.size"] == COUNT_KEY_DTYPE.itemsize

    def test_fields_match_header(self, c_layout: dict[str, int]) -> None:
        """Each key field: same offset, size and signedness in C and in the mirror."""
        expected = {
            f: (c_layout[f"key.{f}.offset"], c_layout[f"key.{f}.size"], c_layout[f"key.{f}.signed"])
            for f in KEY_FIELDS
        }
        actual = {}
        for f in KEY_FIELDS:
            dtype, offset = COUNT_KEY_DTYPE.fields[f][:2]
            actual[f] = (offset, dtype.itemsize, int(dtype.kind == "i"))
        assert expected == actual


class TestCountCache:
    def test_sequence_words_bracket_the_value(self, c_layout: dict[str, int]) -> None:
        """seq_head is first in memory and seq_tail last: the reader's torn-copy check
        (a map lookup copies in ascending address order) depends on it."""
        size = c_layout["cache.size"]
        assert (0, 8) == (c_layout["cache.seq_head.offset"], c_layout["cache.seq_head.size"])
        assert (size - 8, 8) == (c_layout["cache.seq_tail.offset"], c_layout["cache.seq_tail.size"])

    def test_counters_are_two_per_capability(self, c_layout: dict[str, int]) -> None:
        """n[] holds an allowed and a denied 64-bit counter for each of CW_NCAP capabilities."""
        assert NCAP == c_layout["ncap"]
        assert (NCAP * 2, NCAP * 2 * 8) == (c_layout["cache.n.count"], c_layout["cache.n.size"])

    def test_slot_decoding_inverts_the_header(self, c_layout: dict[str, int]) -> None:
        """Every (cap, denied) the BPF side counts in slot CW_CACHE_SLOT(cap, denied)
        is read back as (cap, denied), and the slots cover n[] exactly once."""
        slots = {
            c_layout[f"slot.{cap}.{denied}"]: (cap, bool(denied))
            for cap in range(NCAP)
            for denied in (0, 1)
        }
        assert sorted(slots) == list(range(c_layout["cache.n.count"]))
        assert slots == {slot: cache_slot_key(slot) for slot in slots}
