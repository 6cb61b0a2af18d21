"""The VarInt length prefix of MessagePack records (spec §1.2).

Seven bits a byte, least significant group first, high bit = "more follows",
at most five bytes, values up to 0x7FFFFFFF.
"""

from __future__ import annotations

from typing import Final

from ._errors import RemoteProtocolError

__all__ = ["MAX_VARINT_VALUE", "decode_varint", "encode_varint"]

MAX_VARINT_VALUE: Final = 0x7FFFFFFF
MAX_VARINT_BYTES: Final = 5

# Lengths below 16 KiB (two bytes) cover nearly every message: precompute them.
_SMALL: Final = tuple(
    bytes([n]) if n < 0x80 else bytes([(n & 0x7F) | 0x80, n >> 7]) for n in range(1 << 14)
)


def encode_varint(value: int) -> bytes:
    """Encode a record length as its VarInt prefix.

    Raises:
        ValueError: ``value`` is negative or above 0x7FFFFFFF.
    """
    if 0 <= value < 1 << 14:
        return _SMALL[value]
    if value < 0 or value > MAX_VARINT_VALUE:
        raise ValueError(f"VarInt value out of range: {value}")
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_varint(data: bytes | bytearray | memoryview, offset: int) -> tuple[int, int] | None:
    """Read a VarInt at ``offset``.

    Returns:
        ``(value, offset after the prefix)``, or ``None`` when ``data`` ends
        inside the prefix.

    Raises:
        RemoteProtocolError: a fifth byte above 0x07 or with its high bit set
            ("messages over 2GB not supported").
    """
    end = len(data)
    # One- and two-byte prefixes (records under 16 KiB) are nearly all of them.
    if offset < end:
        first = data[offset]
        if first < 0x80:
            return first, offset + 1
        if offset + 1 < end and data[offset + 1] < 0x80:
            return (first & 0x7F) | (data[offset + 1] << 7), offset + 2
    value = 0
    for index in range(MAX_VARINT_BYTES):
        pos = offset + index
        if pos >= end:
            return None
        byte = data[pos]
        if index == MAX_VARINT_BYTES - 1 and byte > 0x07:
            raise RemoteProtocolError("Messages over 2GB in size are not supported.")
        value |= (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            return value, pos + 1
    raise AssertionError("unreachable: the fifth byte either ends or is rejected")
