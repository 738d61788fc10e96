"""The escaping policy for strings chosen by the kernel, a process or a runtime."""

from __future__ import annotations

import io
import json
import re
import unicodedata

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from capwatch.text import from_bytes, visible, visible_fields

# What must never reach a sink: C0/C1 controls, DEL, surrogates, bidi and other
# invisible format characters, line/paragraph separators.
_FORBIDDEN = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_ESCAPE = re.compile(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8}|[tnr])")


def _unescape(s: str) -> str:
    """The inverse a reader applies (bytes \\xHH back to surrogateescape)."""

    def one(m: re.Match[str]) -> str:
        e = m.group(1)
        if e in ("t", "n", "r"):
            return {"t": "\t", "n": "\n", "r": "\r"}[e]
        cp = int(e[1:], 16)
        if e[0] == "x" and cp >= 0x80:
            return chr(0xDC00 + cp)  # a raw byte
        return chr(cp)

    return _ESCAPE.sub(one, s)


class TestVisible:
    @pytest.mark.parametrize(
        ("raw", "shown"),
        [
            (b"nginx", "nginx"),
            (b"ev\xffil.scope", "ev\\xffil.scope"),
            (b"\x1b[8mhidden", "\\x1b[8mhidden"),
            (b"\x1b]52;c;aGk=\x07", "\\x1b]52;c;aGk=\\x07"),
            (b"two\nlines\r", "two\\nlines\\r"),
            (b"tab\there", "tab\\there"),
            (b"del\x7f", "del\\x7f"),
            ("c1\u009b".encode(), "c1\\u009b"),
            ("caf\u00e9".encode(), "caf\u00e9"),
            ("rtl\u202eevil".encode(), "rtl\\u202eevil"),
            ("zw\u200bj".encode(), "zw\\u200bj"),
            ("line\u2028sep".encode(), "line\\u2028sep"),
            (b"dev-disk-by\\x2duuid.swap", "dev-disk-by\\x2duuid.swap"),
        ],
    )
    def test_table(self, raw: bytes, shown: str) -> None:
        """Raw bytes as the sinks show them: bytes and controls as escapes, text as it is."""
        assert shown == visible(from_bytes(raw))

    def test_printable_unchanged_is_same_object(self) -> None:
        """The common case costs one search: a clean string comes back as it is."""
        s = "kube-system/coredns-5d78c9869d-abcde"
        assert s is visible(s)

    @given(st.binary(max_size=64))
    def test_any_bytes_become_clean_utf8(self, raw: bytes) -> None:
        """Any bytes in: valid UTF-8 out, with no control or invisible character."""
        out = visible(from_bytes(raw))
        out.encode("utf-8")  # strict: raises on a surrogate
        assert not [c for c in out if unicodedata.category(c) in _FORBIDDEN]

    @given(st.text(max_size=64))
    def test_any_text_becomes_clean_utf8(self, s: str) -> None:
        """Any str (lone surrogates included) in: valid UTF-8, no controls out."""
        out = visible(s)
        out.encode("utf-8")
        assert not [c for c in out if unicodedata.category(c) in _FORBIDDEN]

    @given(st.binary(max_size=64).filter(lambda b: b"\\" not in b))
    def test_bytes_recoverable(self, raw: bytes) -> None:
        """Without a backslash in the input, the escaping is reversible to the bytes."""
        assert raw == _unescape(visible(from_bytes(raw))).encode("utf-8", "surrogateescape")

    def test_from_bytes_keeps_every_byte(self) -> None:
        """from_bytes is lossless (a U+FFFD replacement would drop the byte)."""
        raw = b"a\xff\xfe\x00z"
        assert raw == from_bytes(raw).encode("utf-8", "surrogateescape")


class TestVisibleFields:
    def test_json_log_line_is_clean(self) -> None:
        """A structlog JSON line with hostile values is valid UTF-8 without raw controls."""
        out = io.StringIO()
        log = structlog.wrap_logger(
            structlog.PrintLogger(out),
            processors=[
                visible_fields,
                structlog.processors.JSONRenderer(
                    serializer=lambda o, **_: json.dumps(o, ensure_ascii=False)
                ),
            ],
        )
        log.warning(
            "denial", comm=from_bytes(b"\x1b]52;c;aGk=\x07"), pod=["a\nb"], extra={"k\xff": 1}
        )
        lines = out.getvalue().splitlines()
        assert 1 == len(lines)
        lines[0].encode("utf-8")
        assert {
            "event": "denial",
            "comm": "\\x1b]52;c;aGk=\\x07",
            "pod": ["a\\nb"],
            "extra": {"k\u00ff": 1},
        } == json.loads(lines[0])
