"""Whether a native fast path is on (docs/operations.md, "Native fast
paths"): each one is used on CPython, when the native library has its
entry point, unless its environment switch is "0". Read once, at import
of the module that uses it."""

from __future__ import annotations

import os
import sys

from gateway._native import lib

__all__ = ["enabled"]


def enabled(switch: str, symbol: str) -> bool:
    """True on CPython when the native library exports ``symbol`` and the
    environment variable ``switch`` is not "0"."""
    return (
        sys.implementation.name == "cpython"
        and os.environ.get(switch, "1") != "0"
        and hasattr(lib, symbol)
    )
