"""gateway.h2repr gives received DATA frames hyperframe's own repr text,
without serializing and hex-encoding the whole body."""

from __future__ import annotations

from hyperframe.frame import DataFrame, Frame
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import h2repr


def _original(f: DataFrame) -> str:
    return Frame._body_repr(f)  # hyperframe's generic version: the whole body


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.integers(0, 40), st.booleans(), st.booleans())
def test_data_frame_repr_is_unchanged(data: bytes, pad: int, padded: bool, parsed: bool) -> None:
    h2repr.install()
    f = DataFrame(1, data=data)
    if padded:
        f.flags.add("PADDED")
        f.pad_length = pad
    if parsed:
        # as h2 sees it: parsed from the wire
        wire = f.serialize()
        f, length = Frame.parse_frame_header(memoryview(wire[:9]))
        f.parse_body(memoryview(wire[9 : 9 + length]))
    assert f._body_repr() == _original(f)
    assert repr(f).endswith(_original(f))


def test_a_big_frame_is_not_copied_for_its_repr() -> None:
    h2repr.install()
    f = DataFrame(1, data=b"\xab" * (1 << 20))
    assert f._body_repr() == "<hex:abababababababababab...>"
    assert type(DataFrame._body_repr) is type(test_a_big_frame_is_not_copied_for_its_repr)
    assert DataFrame._body_repr.__module__ == "gateway.h2repr"
