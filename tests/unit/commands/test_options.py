"""capwatch.commands.options: option types checked when the command line is parsed."""

from __future__ import annotations

import argparse

import pytest

from capwatch.commands.options import listen_arg
from tests.helpers import run_capwatch


class TestListen:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("127.0.0.1:9649", ("127.0.0.1", 9649)),
            ("0.0.0.0:80", ("0.0.0.0", 80)),
            ("[::1]:9649", ("::1", 9649)),
            ("[::]:0", ("::", 0)),
            ("localhost:9000", ("localhost", 9000)),
        ],
    )
    def test_valid_addresses(self, text: str, expected: tuple[str, int]) -> None:
        """HOST:PORT and [IPv6]:PORT become (host, port)."""
        assert expected == tuple(listen_arg(text)[:2])

    @pytest.mark.parametrize("text", ["9649", ":9649", "127.0.0.1:", "127.0.0.1:70000", "h:x"])
    def test_bad_addresses(self, text: str) -> None:
        """A missing host or a bad port is an argument error, not a late failure."""
        with pytest.raises(argparse.ArgumentTypeError):
            listen_arg(text)

    def test_serve_rejects_a_bad_listen_before_anything_else(self) -> None:
        """serve --listen with no port: one line, exit 2, nothing loaded."""
        r = run_capwatch("serve", "--listen", "127.0.0.1")
        assert (2, 1) == (r.returncode, len(r.stderr.strip().splitlines())), r.stderr
        assert "--listen" in r.stderr
        assert "Traceback" not in r.stderr
