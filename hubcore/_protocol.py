"""Hub protocols behind one interface, incremental readers, and encode-once broadcast.

``get_protocol("json")`` and ``get_protocol("messagepack")`` return the two
protocols. Each writes a message to one complete record
(``write_message``), parses complete records (``parse_messages``) and makes
an incremental ``MessageReader`` that takes bytes split anywhere.

``PreparedMessage(message)`` is the broadcast path: it encodes one message at
most once per protocol and hands the same ``bytes`` object to every recipient
(``prepare(message)`` is its deprecated spelling).
"""

from __future__ import annotations

import enum
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, TypeAlias

from ._errors import HubError, LocalProtocolError, RemoteProtocolError
from ._events import HubMessage
from ._framing import Buffer, Found, find_binary_record, find_text_record
from ._json import parse_json_record, write_json_message
from ._limits import DEFAULT_MAX_MESSAGE_BYTES
from ._msgpack import parse_msgpack_record, write_msgpack_message

__all__ = [
    "HubProtocol",
    "MessageReader",
    "PreparedBatch",
    "PreparedMessage",
    "TransferFormat",
    "get_protocol",
    "prepare",
]

#: Protocol version 2 adds Ack and Sequence; clients send 0, 1 or 2 (spec §2).
PROTOCOL_VERSION: Final = 2

Finder: TypeAlias = Callable[[bytes | bytearray, int, int], Found | None]


class TransferFormat(enum.Enum):
    """How records travel: text frames for JSON, binary frames for MessagePack."""

    TEXT = "Text"
    BINARY = "Binary"


@dataclass(frozen=True, slots=True, eq=False)
class HubProtocol:
    """One hub protocol: framing plus encoding.

    There is one object per protocol (``get_protocol`` returns it, and so does
    ``HubConnection.protocol``), hashed and compared by identity: use it as a
    dict key to group connections for a broadcast, one payload per group.

    Attributes:
        name: ``"json"`` or ``"messagepack"``, as in the handshake.
        transfer_format: the WebSocket frame type to send records in.
        version: the highest handshake version understood (2).
    """

    name: str
    transfer_format: TransferFormat
    version: int
    _find: Finder
    _parse: Callable[[bytes], HubMessage | None]
    _write: Callable[[HubMessage], bytes]

    def write_message(self, message: HubMessage) -> bytes:
        """Encode ``message`` as one complete record; the caller owns the bytes.

        Raises:
            LocalProtocolError: the message holds a value this protocol cannot carry.
        """
        return self._write(message)

    def parse_messages(
        self, data: bytes, *, max_message_bytes: int | None = None
    ) -> list[HubMessage]:
        """Parse a buffer made of complete records only.

        Unknown message types are skipped.

        Raises:
            RemoteProtocolError: malformed, oversized, or a trailing incomplete record.
        """
        limit = max_message_bytes if max_message_bytes is not None else len(data) + 1
        messages: list[HubMessage] = []
        offset = 0
        while offset < len(data):
            found = self._find(data, offset, limit)
            if found is None:
                raise RemoteProtocolError(
                    f"Incomplete {self.name} message: the data ends inside a record."
                )
            start, end, offset = found
            message = self._parse(data[start:end])
            if message is not None:
                messages.append(message)
        return messages

    def reader(self, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> MessageReader:
        """A new incremental reader for one connection's inbound stream."""
        return MessageReader(self, max_message_bytes=max_message_bytes)

    def find_record(
        self, data: bytes | bytearray, offset: int, max_message_bytes: int
    ) -> Found | None:
        """The framing function: ``(start, end, next_offset)`` of the next record or None."""
        return self._find(data, offset, max_message_bytes)

    def parse_record(self, payload: bytes) -> HubMessage | None:
        """Parse one record body (framing removed); None for unknown types."""
        return self._parse(payload)


JSON_PROTOCOL: Final = HubProtocol(
    name="json",
    transfer_format=TransferFormat.TEXT,
    version=PROTOCOL_VERSION,
    _find=find_text_record,
    _parse=parse_json_record,
    _write=write_json_message,
)
MESSAGEPACK_PROTOCOL: Final = HubProtocol(
    name="messagepack",
    transfer_format=TransferFormat.BINARY,
    version=PROTOCOL_VERSION,
    _find=find_binary_record,
    _parse=parse_msgpack_record,
    _write=write_msgpack_message,
)
_PROTOCOLS: Final = {p.name: p for p in (JSON_PROTOCOL, MESSAGEPACK_PROTOCOL)}


def get_protocol(name: str) -> HubProtocol:
    """Return the hub protocol called ``name`` (``"json"`` or ``"messagepack"``).

    Raises:
        LocalProtocolError: no such protocol.
    """
    try:
        return _PROTOCOLS[name]
    except KeyError:
        raise LocalProtocolError(f"unknown hub protocol {name!r}") from None


class MessageReader:
    """Incremental parser of one inbound byte stream.

    Feed bytes in chunks of any size; ``next_message`` returns each message once
    its record is complete. A record split across chunks is kept until its end
    arrives; the size limit is enforced as soon as it can be known.
    """

    __slots__ = ("_buffer", "_find", "_max", "_parse")

    def __init__(self, protocol: HubProtocol, *, max_message_bytes: int) -> None:
        # The protocol's functions themselves: one call less per record.
        self._find = protocol._find
        self._parse = protocol._parse
        self._max = max_message_bytes
        self._buffer = Buffer()

    def feed(self, data: bytes | bytearray) -> None:
        """Append received bytes; nothing is parsed until ``next_message``."""
        self._buffer.append(data)

    @property
    def buffered_bytes(self) -> int:
        """Bytes received but not yet returned as messages."""
        return len(self._buffer)

    def next_message(self) -> HubMessage | None:
        """The next complete message, or None when more bytes are needed.

        Raises:
            RemoteProtocolError: malformed or oversized input. The reader is
                then unusable: the protocol has no way to resynchronise.
        """
        buffer = self._buffer
        while True:
            found = self._find(buffer.data, buffer.offset, self._max)
            if found is None:
                return None
            message = self._parse(buffer.take(*found))
            if message is not None:
                return message

    def clear(self) -> None:
        """Drop any partial record (a new transport starts a new byte stream)."""
        self._buffer.clear()


class PreparedMessage:
    """A message encoded at most once per protocol, for sending to many connections.

    ``encoded(protocol)`` returns the same ``bytes`` object on every call, so a
    broadcast costs one encoding per protocol, not one per recipient.
    ``HubConnection.send`` accepts it wherever it accepts a message. The
    cheapest broadcast writes ``encoded(protocol)`` to every connection of that
    protocol and calls ``HubConnection.note_sent`` on each (not for stateful
    connections, which must ``send`` it to be numbered).

    Raises:
        LocalProtocolError: ``message`` is not a hub message.
    """

    __slots__ = ("_json", "_msgpack", "message")

    def __init__(self, message: HubMessage) -> None:
        if not isinstance(message, HubMessage):
            raise LocalProtocolError(
                f"PreparedMessage needs a hub message, got {type(message).__name__}"
            )
        self.message = message
        self._json: bytes | None = None
        self._msgpack: bytes | None = None

    def encoded(self, protocol: HubProtocol) -> bytes:
        """The record for ``protocol``, encoded on first use."""
        if protocol is JSON_PROTOCOL:
            data = self._json
            if data is None:
                data = self._json = write_json_message(self.message)
            return data
        if protocol is MESSAGEPACK_PROTOCOL:
            data = self._msgpack
            if data is None:
                data = self._msgpack = write_msgpack_message(self.message)
            return data
        return protocol.write_message(self.message)


class PreparedBatch:
    """Several prepared messages sent together: their records joined, once per protocol.

    A burst or a batch of events for one group costs one join per protocol,
    and every recipient gets the same ``bytes`` (one transport write each).
    ``HubConnection.send`` accounts for every message in it.
    """

    __slots__ = ("_json", "_msgpack", "messages")

    def __init__(self, messages: Iterable[PreparedMessage]) -> None:
        self.messages: tuple[PreparedMessage, ...] = tuple(messages)
        for item in self.messages:
            if type(item) is not PreparedMessage:
                raise LocalProtocolError(
                    f"PreparedBatch holds PreparedMessage objects, got {type(item).__name__}"
                )
        if not self.messages:
            raise LocalProtocolError("PreparedBatch needs at least one message")
        self._json: bytes | None = None
        self._msgpack: bytes | None = None

    def encoded(self, protocol: HubProtocol) -> bytes:
        """All records for ``protocol``, joined in order; computed on first use."""
        if protocol is JSON_PROTOCOL:
            data = self._json
            if data is None:
                data = self._json = b"".join(m.encoded(protocol) for m in self.messages)
            return data
        if protocol is MESSAGEPACK_PROTOCOL:
            data = self._msgpack
            if data is None:
                data = self._msgpack = b"".join(m.encoded(protocol) for m in self.messages)
            return data
        return b"".join(m.encoded(protocol) for m in self.messages)


def prepare(message: HubMessage) -> PreparedMessage:
    """Deprecated: use ``PreparedMessage(message)``, the one way to prepare a broadcast."""
    warnings.warn(
        "hubcore.prepare(message) is deprecated; use hubcore.PreparedMessage(message)",
        DeprecationWarning,
        stacklevel=2,
    )
    return PreparedMessage(message)


# Keep the re-export surface honest for type checkers.
_ = HubError
