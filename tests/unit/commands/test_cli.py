"""The CLI without a kernel: decode, ps, and one-line errors for bad input."""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers import FIXTURES, SEED_ABSENT, run_capwatch

PROC = str(FIXTURES / "proc")


class TestDecode:
    def test_seed_mask_human(self) -> None:
        """The human view marks the seed post's missing capabilities with '-'."""
        r = run_capwatch("decode", "0000001dbdbeffff")
        assert 0 == r.returncode
        lines = r.stdout.splitlines()
        assert "mask 0x0000001dbdbeffff: 32 of 41 capabilities" == lines[0]
        minus = {ln.split()[2] for ln in lines if ln.startswith("  - ")}
        assert SEED_ABSENT == minus
        assert 41 == sum(1 for ln in lines if ln.startswith(("  - ", "  + ")))

    def test_unknown_bits_are_not_counted_as_capabilities(self) -> None:
        """A mask with bits past the last capability says so in its headline (issue 13, 7)."""
        r = run_capwatch("decode", "1fffffffffffffff")
        assert 0 == r.returncode
        assert (
            "mask 0x1fffffffffffffff: 41 of 41 capabilities, and 20 bits set beyond them"
            " (not capabilities here)"
        ) == r.stdout.splitlines()[0]

    def test_json_with_0x_and_unknown_bits(self) -> None:
        """--json lists present, absent and bits past the last capability."""
        r = run_capwatch("decode", "--json", "0x8000000000000001")
        assert 0 == r.returncode
        doc = json.loads(r.stdout)
        assert (["CAP_CHOWN"], [63], 40) == (
            doc["present"],
            doc["unknown_bits"],
            len(doc["absent"]),
        )


class TestPs:
    def test_fixture_pid(self) -> None:
        """ps PID shows the five sets of that process."""
        r = run_capwatch("ps", "--proc-root", PROC, "1234")
        assert 0 == r.returncode, r.stderr
        assert "modprobe" in r.stdout
        assert "CapBnd: 0000001dbdbeffff" in r.stdout

    def test_json_all(self) -> None:
        """ps without pids lists every process of the proc tree."""
        r = run_capwatch("ps", "--json", "--proc-root", PROC)
        rows = json.loads(r.stdout)
        assert [77, 1234] == [row["pid"] for row in rows]
        assert "CAP_SYS_TIME" not in rows[0]["effective"]

    def test_real_self(self) -> None:
        """ps on the real /proc shows a live process."""
        r = run_capwatch("ps", "--json", str(os.getpid()))
        assert os.getpid() == json.loads(r.stdout)[0]["pid"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["decode", "xyz"], "not a capability mask"),
        (["decode", "12345678901234567"], "not a capability mask"),
        (["decode"], "required: mask"),
        (["ps", "99999999"], "no process with pid 99999999"),
        (["ps", "abc"], "not a number"),
        (["ps", "-5"], ""),
        (["trace", "--cap", "CAP_NOPE"], "unknown capability"),
        (["trace", "--pid", "0"], "must be positive"),
        (["trace", "--duration", "soon"], "not a duration"),
        (["trace", "--duration", "-1"], ""),
        (["trace", "--attach", "uprobe"], "invalid choice"),
        (["serve", "--listen", "nope"], "expected HOST:PORT"),
        (["serve", "--listen", "::1:9649"], "put an IPv6 address in brackets"),
        (["serve", "--listen", "[::1]"], "expected HOST:PORT"),
        (["frobnicate"], "invalid choice"),
        ([], "required"),
    ],
)
def test_bad_input_is_one_line(args: list[str], message: str) -> None:
    """Bad input: one line on stderr starting with 'capwatch:', non-zero exit, no traceback."""
    r = run_capwatch(*args)
    assert 0 != r.returncode
    assert "Traceback" not in r.stderr
    assert 1 == len(r.stderr.strip().splitlines()), r.stderr
    assert r.stderr.startswith("capwatch: ")
    assert message in r.stderr
