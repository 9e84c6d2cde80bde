from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.protocol.codes import DEFAULT_REASONS, Code, ProtocolError, is_reconnect

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
ROW = re.compile(r"^\| (\d{4}) \| ([^|]+?) \| ([^|]+?) \|", re.M)


def doc_table() -> list[tuple[int, str, str]]:
    return [(int(c), name, cls) for c, name, cls in ROW.findall(DOC.read_text())]


def test_every_documented_code_is_defined_with_its_name_and_class() -> None:
    rows = doc_table()
    assert len(rows) == len(Code) == 24
    for value, name, cls in rows:
        code = Code(value)
        assert DEFAULT_REASONS[code] == name
        assert is_reconnect(value) is (cls == "reconnect"), value


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (4000, True),
        (4499, True),
        (4500, False),
        (4999, False),
        (1000, False),
        (1006, False),
        (1001, True),
        (1011, True),
        (3000, False),
        (5000, False),
    ],
)
def test_is_reconnect_ranges(code: int, expected: bool) -> None:
    assert is_reconnect(code) is expected


def test_protocol_error_carries_code_and_reason() -> None:
    e = ProtocolError(Code.BAD_FRAME)
    assert e.code is Code.BAD_FRAME and e.reason == "bad frame"
    assert str(e) == "4500 bad frame"
    e2 = ProtocolError(Code.UNAUTHORIZED, "unknown tenant")
    assert e2.reason == "unknown tenant" and int(e2.code) == 4501
    assert isinstance(e2, Exception)
