"""The MessagePack VarInt length prefix (SIGNALR.md §1.2)."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import hubcore
from hubcore import RemoteProtocolError, decode_varint, encode_varint

LENGTHS = st.integers(min_value=0, max_value=2**31 - 1)


def _reference(value: int) -> bytes:
    """The spec's algorithm, written out independently: 7 bits a byte, low group first."""
    out = []
    while True:
        group, value = value & 0x7F, value >> 7
        out.append(group | (0x80 if value else 0))
        if not value:
            return bytes(out)


@given(LENGTHS, st.binary(max_size=3), st.binary(max_size=3))
@example(0, b"", b"")
@example(127, b"", b"")
@example(128, b"", b"")
@example(2**14 - 1, b"", b"")
@example(2**14, b"", b"")
@example(2**21, b"", b"")
@example(2**28, b"", b"")
@example(2**31 - 1, b"", b"")
def test_round_trip(value: int, before: bytes, after: bytes) -> None:
    data = encode_varint(value)
    assert data == _reference(value)
    assert 1 <= len(data) <= 5
    assert decode_varint(before + data + after, len(before)) == (value, len(before) + len(data))


@given(LENGTHS)
def test_incomplete_prefix_returns_none(value: int) -> None:
    data = encode_varint(value)
    for cut in range(len(data)):
        assert decode_varint(data[:cut], 0) is None
        assert decode_varint(b"\x00" + data[:cut], 1) is None


def test_decodes_from_bytearray_and_memoryview() -> None:
    assert decode_varint(bytearray(b"\x80\x29"), 0) == (5248, 2)
    assert decode_varint(memoryview(b"\xff\xff\xff\xff\x07"), 0) == (2**31 - 1, 5)


@pytest.mark.parametrize("fifth", [0x08, 0x0F, 0x7F, 0x80, 0x87, 0xFF])
def test_rejects_a_fifth_byte_above_7_or_with_continuation(fifth: int) -> None:
    with pytest.raises(RemoteProtocolError, match="2GB"):
        decode_varint(b"\xff\xff\xff\xff" + bytes([fifth]), 0)
    # Nothing after the fifth byte changes that: a sixth byte is never read.
    with pytest.raises(RemoteProtocolError, match="2GB"):
        decode_varint(b"\x80\x80\x80\x80" + bytes([fifth]) + b"\x00", 0)


@pytest.mark.parametrize("fifth", range(8))
def test_accepts_a_fifth_byte_up_to_7(fifth: int) -> None:
    assert decode_varint(b"\x80\x80\x80\x80" + bytes([fifth]), 0) == (fifth << 28, 5)


def test_non_minimal_encodings_decode() -> None:
    # Not produced by any writer, but the .NET and JS readers accept them too.
    assert decode_varint(b"\x81\x00", 0) == (1, 2)
    assert decode_varint(b"\x80\x80\x00", 0) == (0, 3)


@pytest.mark.parametrize("value", [-1, 2**31, 2**40])
def test_encode_rejects_out_of_range(value: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        encode_varint(value)


def test_framing_rejects_oversized_prefix_before_the_body() -> None:
    reader = hubcore.get_protocol("messagepack").reader()
    reader.feed(b"\xff\xff\xff\xff\x08")
    with pytest.raises(RemoteProtocolError, match="2GB"):
        reader.next_message()
