"""Record framing: pure functions that find one record in a byte buffer.

Each takes the buffered bytes, an offset and the size limit, and returns
``(payload_start, payload_end, next_offset)`` or ``None`` when the record is
not complete yet. They never copy and never consume: the caller owns the
buffer and advances its offset only when a record was returned, so an
incomplete record is simply looked at again when more bytes arrive (the
commit/rollback of wsproto's ``Buffer``).

The size limit covers the whole framed record (JSON text and its RS, or the
VarInt prefix and the body), as ASP.NET Core's ``MaximumReceiveMessageSize``
does (spec §3.3).
"""

from __future__ import annotations

from typing import Final, TypeAlias

from ._errors import RemoteProtocolError
from ._varint import decode_varint

__all__ = ["RECORD_SEPARATOR", "Buffer", "find_binary_record", "find_text_record"]

RECORD_SEPARATOR: Final = b"\x1e"

Bytes: TypeAlias = bytes | bytearray
Found: TypeAlias = tuple[int, int, int]


def _too_big(limit: int) -> RemoteProtocolError:
    return RemoteProtocolError(f"The maximum message size of {limit}B was exceeded.")


def find_text_record(data: Bytes, offset: int, max_message_bytes: int) -> Found | None:
    """Find the next RS-terminated record (JSON protocol and handshake, spec §1.1).

    Raises:
        RemoteProtocolError: the record (with its RS) is longer than
            ``max_message_bytes``, or empty (two RS in a row).
    """
    end = data.find(RECORD_SEPARATOR, offset)
    if end < 0:
        if len(data) - offset >= max_message_bytes:
            raise _too_big(max_message_bytes)
        return None
    if end - offset + 1 > max_message_bytes:
        raise _too_big(max_message_bytes)
    if end == offset:
        raise RemoteProtocolError("Empty record: two record separators in a row.")
    return offset, end, end + 1


def find_binary_record(data: Bytes, offset: int, max_message_bytes: int) -> Found | None:
    """Find the next VarInt-prefixed record (MessagePack protocol, spec §1.2).

    The limit is checked as soon as the prefix is read, before the body arrives.

    Raises:
        RemoteProtocolError: a malformed prefix, an empty record, or a record
            longer than ``max_message_bytes``.
    """
    # One-byte prefixes (records under 128 bytes) and two-byte ones (under
    # 16 KiB) inline; decode_varint does the rest and the errors.
    end = len(data)
    first = data[offset] if offset < end else 0x80
    if first < 0x80:
        length, start = first, offset + 1
    elif offset + 1 < end and data[offset + 1] < 0x80:
        length, start = (first & 0x7F) | (data[offset + 1] << 7), offset + 2
    else:
        prefix = decode_varint(data, offset)
        if prefix is None:
            return None
        length, start = prefix
    if start - offset + length > max_message_bytes:
        raise _too_big(max_message_bytes)
    if length == 0:
        raise RemoteProtocolError("Empty MessagePack record (length 0).")
    stop = start + length
    if stop > end:
        return None
    return start, stop, stop


class Buffer:
    """The receive buffer: unread bytes and a read offset.

    While records arrive whole (the common case), the chunk received is kept
    as is and records are sliced straight out of it: one copy per record.
    Only a record split across chunks makes the buffer a ``bytearray``.
    Consumed bytes are dropped when a new chunk arrives, so a chunk holding
    many records is split in linear time.
    """

    __slots__ = ("data", "offset")

    def __init__(self) -> None:
        self.data: bytes | bytearray = b""
        self.offset = 0

    def __len__(self) -> int:
        return len(self.data) - self.offset

    def append(self, chunk: Bytes) -> None:
        if self.offset >= len(self.data):
            self.data = bytes(chunk)
        else:
            rest = bytearray(self.data[self.offset :]) if self.offset else self.data
            if type(rest) is bytes:
                rest = bytearray(rest)
            rest += chunk
            self.data = rest
        self.offset = 0

    def take(self, start: int, end: int, next_offset: int) -> bytes:
        """Return ``data[start:end]`` and move the offset to ``next_offset``."""
        data = self.data
        payload = data[start:end] if type(data) is bytes else bytes(data[start:end])
        self.offset = next_offset
        return payload

    def clear(self) -> None:
        self.data = b""
        self.offset = 0
