"""A cheaper ``repr`` for received HTTP/2 DATA frames.

h2 (4.x) formats every frame it receives for its trace log before calling
the logger, whether or not anything is logged: ``repr(frame)``. For a DATA
frame hyperframe builds that text by serializing the whole body (a copy of
up to 16 KiB, or more) and hex-encoding all of it, then keeps the first 20
hex digits. On a downstream link carrying a hundred frames per DATA frame
that is a few per cent of desk-sim's CPU and about one of a worker's.

:func:`install` replaces ``DataFrame._body_repr`` with a version that reads
only the first 11 bytes of the body (padding length, data, padding): its
text is exactly hyperframe's (tests/test_h2repr.py compares them).
"""

from __future__ import annotations

from typing import Final

from hyperframe import frame as hf

__all__ = ["install"]

#: 11 bytes are 22 hex digits: past hyperframe's 20, so it truncates as well.
_HEAD: Final = 11


def _data_body_repr(self: hf.DataFrame) -> str:
    head = b""
    padded = "PADDED" in self.flags
    if padded:
        head = bytes((self.pad_length,))
    head += bytes(self.data[:_HEAD])
    if self.pad_length and len(head) < _HEAD:
        head += b"\0" * min(self.pad_length, _HEAD - len(head))
    return hf._raw_data_repr(head)


def install() -> None:
    """Idempotent; called when the modules that use h2 are imported."""
    hf.DataFrame._body_repr = _data_body_repr  # type: ignore[method-assign,assignment]
