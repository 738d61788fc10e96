"""The options of record, top and --from: typed at parse time, one line when wrong."""

from __future__ import annotations

import argparse

import pytest

from capwatch.commands.options import size_arg
from tests.helpers import run_capwatch


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4096", 4096),
        ("512K", 512 << 10),
        ("100M", 100 << 20),
        ("1.5G", 3 << 29),
        ("2MiB", 2 << 20),
    ],
)
def test_sizes(text: str, size: int) -> None:
    assert size == size_arg(text)


@pytest.mark.parametrize("text", ["", "M", "lots", "100", "-5M"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        size_arg(text)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["record"], "the following arguments are required: -o/--output"),
        (["record", "-o", "f", "--max-size", "lots"], "not a size: 'lots'"),
        (["record", "-o", "f", "--all", "--unique"], "not allowed with argument"),
        (["top", "--sort", "name"], "invalid choice: 'name'"),
        (["trace", "--from", "x.cwrec", "--record", "y.cwrec"], "--record and --from together"),
    ],
)
def test_bad_command_lines_are_one_line(args: list[str], message: str) -> None:
    r = run_capwatch(*args)
    assert 0 != r.returncode
    assert 1 == len(r.stderr.strip().splitlines()), r.stderr
    assert message in r.stderr
