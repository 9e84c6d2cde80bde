"""One non-blocking write, for the writers that try to send from where the
data was produced and hand only the rest to a writer task (the downstream
link, desk-sim)."""

from __future__ import annotations

import os

__all__ = ["write_some"]


def write_some(fd: int, data: bytes) -> bytes:
    """Writes what the socket takes now; returns the rest (empty when all
    went out). A failed socket returns everything: the writer task's own
    send then fails and ends the connection."""
    try:
        n = os.write(fd, data)
    except OSError:  # BlockingIOError included: nothing taken
        n = 0
    return data[n:] if n < len(data) else b""
