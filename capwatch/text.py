"""One escaping policy for every string a kernel, a process or a runtime chose.

A comm is 15 raw bytes (``prctl(PR_SET_NAME)``), a cgroup directory any bytes
but ``/`` and NUL, a container or pod name whatever its runtime accepted. Such
strings are kept lossless inside capwatch (bytes decode with ``surrogateescape``,
as ``os.fsdecode`` does for cgroup paths) and made safe where they leave it:

* :func:`visible` -- every sink (metric labels, the JSON log, the terminal table,
  ``explain``, ``ps``): valid UTF-8 that shows every character it was given.
  A byte that is not UTF-8 becomes ``\\xHH`` (HH from 80 to ff); C0 controls and
  DEL become ``\\xHH``, except the usual ``\\t \\n \\r``; C1 controls, invisible format characters
  (bidi overrides, zero-width), line and paragraph separators, private-use,
  unassigned code points and lone surrogates become ``\\uHHHH``. Nothing is
  dropped; printable text, including a backslash, is unchanged, so every name
  that was valid before keeps its label (no series churn on upgrade). The
  escaping is therefore not injective: a name spelled ``ev\\xffil`` in ASCII and
  one with the byte 0xff print alike (whoever can make one can make the other).
* :func:`from_bytes` -- the one way raw bytes become a capwatch string (lossless).
* :func:`visible_all` -- the same on every string of a JSON-able value.
* :func:`visible_fields` -- a structlog processor applying :func:`visible` to
  every string in an event (keys and nested values), for any log renderer.

Pure and fast for the common case: a string with nothing to escape is returned
as it is, after one regular-expression search.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import MutableMapping
from typing import Any

__all__ = ["from_bytes", "visible", "visible_all", "visible_fields"]

# Candidates for escaping: C0, DEL, C1, surrogates, and everything outside ASCII
# printable (checked by category below). Printable ASCII never matches.
_SUSPECT = re.compile(r"[^\x20-\x7e]")
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}
# Categories escaped: Cc control, Cf format (bidi overrides, zero-width joiners),
# Cs surrogate, Co private use, Cn unassigned, Zl/Zp line/paragraph separators.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def from_bytes(raw: bytes) -> str:
    """Raw bytes (a comm, a path) as a string that keeps every byte."""
    return raw.decode("utf-8", "surrogateescape")


def _escape_char(m: re.Match[str]) -> str:
    ch = m.group()
    named = _NAMED.get(ch)
    if named is not None:
        return named
    cp = ord(ch)
    if 0xDC80 <= cp <= 0xDCFF:
        return f"\\x{cp - 0xDC00:02x}"  # a byte surrogateescape kept: show the byte
    if cp < 0x80:
        return f"\\x{cp:02x}"  # C0 and DEL
    if unicodedata.category(ch) in _UNSAFE_CATEGORIES:
        return f"\\u{cp:04x}" if cp <= 0xFFFF else f"\\U{cp:08x}"
    return ch


def visible(s: str) -> str:
    """``s`` as valid UTF-8 text without control or invisible characters."""
    if _SUSPECT.search(s) is None:
        return s
    return _SUSPECT.sub(_escape_char, s)


def visible_all(v: Any) -> Any:
    """:func:`visible` on every string in ``v`` (dict keys and values, lists, tuples
    as lists); other values as they are. For JSON writers."""
    if isinstance(v, str):
        return visible(v)
    if isinstance(v, dict):  # not Mapping: an ABC check costs more than the rest
        return {
            (visible(k) if isinstance(k, str) else k): (
                visible(x) if isinstance(x, str) else visible_all(x)
            )
            for k, x in v.items()
        }
    if isinstance(v, (list, tuple)):
        return [visible_all(x) for x in v]
    return v


def visible_fields(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: :func:`visible` on every string of the event."""
    return {visible(k): visible_all(v) for k, v in event_dict.items()}
